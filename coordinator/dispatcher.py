"""The remote dispatcher: at one MoE layer, tokens of experts placed on other sites go out in one RPC per site,
to all sites at once; experts on the coordinator's own site run in-process meanwhile; outputs are combined by the
model's own code (:class:`moevit.moe.Dispatcher`).

An expert may have several replicas. Each expert's tokens go to the first replica that is up (the coordinator's
own copy first; see :mod:`coordinator.health`); when a call fails, its experts are sent to their next replica
within the same deadline; with ``hedge_ms`` set, experts still unanswered after that delay are also sent to their
next replica, the first answer wins and the other call is cancelled. Retries and hedges return the same expert's
output, so the result is exactly the fault-free one. These rules are the pure state machine of
:mod:`coordinator.scheduler`; :meth:`RemoteDispatcher._run` only drives it (sends, waits, timers).

When no replica of an expert answers in time, the topology's ``fallback`` decides: ``fail`` raises
:class:`SiteError` naming the site; ``local`` computes the expert from the coordinator's copy; ``nearest`` sends
each patch to the reachable expert of that layer its router scored highest; ``skip`` leaves the tokens to the
residual path. The last three mark the images that had such patches degraded in the :class:`ForwardContext`.

Legend: ``S`` patch assignments sorted by expert, ``P`` pixels per patch, ``C`` channels, ``E`` experts.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from moevit.coordinator.scheduler import (
    Action,
    Answered,
    CallScheduler,
    Cancel,
    ClearPenalty,
    Complete,
    DeadlinePassed,
    Failed,
    Fallback,
    HedgeTimerFired,
    Penalize,
    RanLocally,
    RunLocal,
    Send,
    SendFailed,
    Submitted,
)
from moevit.coordinator.sites import PendingCall, SiteClient, SiteError

from moevit.moe.dispatcher import Dispatcher, DispatchPlan
from moevit.moe.experts import ExpertBank


@dataclass(frozen=True)
class CallPolicy:
    """How a layer's expert calls are made: deadline per layer (retries included), hedging delay, fallback."""

    deadline_s: float = 10.0
    hedge_ms: float | None = None
    fallback: str = "fail"


@dataclass
class DispatchCounters:
    """Running totals over all layers and forwards (thread-safe increments)."""

    calls: int = 0
    retries: int = 0
    hedges: int = 0
    hedge_wins: int = 0
    cancelled: int = 0
    fallback_tokens: int = 0
    substitutes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("calls", "retries", "hedges", "hedge_wins", "cancelled",
                                              "fallback_tokens", "substitutes")}


class ForwardContext:
    """Bookkeeping shared by all MoE layers: per forward (and per thread, so concurrent forwards from several
    threads do not mix their flags) which images are degraded and why; over all forwards, tokens per expert."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self.tokens: dict[tuple[int, int], int] = defaultdict(int)

    def begin(self, batch_size: int) -> None:
        self._local.batch_size = batch_size
        self._local.degraded = torch.zeros(batch_size, dtype=torch.bool)
        self._local.failures = []
        self._local.missing = [set() for _ in range(batch_size)]
        self._local.num_tokens = 0

    @property
    def batch_size(self) -> int:
        return getattr(self._local, "batch_size", 0)

    @property
    def degraded(self) -> torch.Tensor:
        if not hasattr(self._local, "degraded"):
            self._local.degraded = torch.zeros(0, dtype=torch.bool)
        return self._local.degraded

    @property
    def failures(self) -> list[str]:
        if not hasattr(self._local, "failures"):
            self._local.failures = []
        return self._local.failures

    def missing_sites(self) -> list[list[str]]:
        """Per image of the current forward: the sites whose experts it needed and no replica served (sorted; empty
        for an image that is not degraded). A degraded image is re-scored once these are back
        (:mod:`moevit.coordinator.corrections`)."""
        return [sorted(s) for s in getattr(self._local, "missing", [])]

    @property
    def num_tokens(self) -> int:
        """Patches (all images) entering the current layer of this thread's forward."""
        return getattr(self._local, "num_tokens", 0)

    @num_tokens.setter
    def num_tokens(self, n: int) -> None:
        self._local.num_tokens = n

    def count(self, layer: int, expert: int, n: int) -> None:
        with self._lock:
            self.tokens[(layer, expert)] += n

    def mark(self, plan: DispatchPlan, positions: list[int], num_tokens: int,
             sites: Mapping[int, Sequence[str]] | None = None) -> None:
        """Images owning the patches of the experts at ``positions`` of ``plan`` are degraded; ``sites``: position ->
        the sites holding that expert, recorded per image (:meth:`missing_sites`)."""
        batch = self.batch_size
        if batch == 0:
            raise RuntimeError("ForwardContext.begin(batch_size) was not called before the forward: run the split "
                               "model through SplitRuntime.classify, not model(x)")
        per_image = max(1, num_tokens // max(1, batch))
        slices = plan.slices()
        missing = getattr(self._local, "missing", None)
        for pos in positions:
            sl = plan.order_S[slices[pos]] // plan.top_k
            images = (sl // per_image).clamp_max(batch - 1)
            self.degraded[images] = True
            if sites and missing is not None and pos in sites:
                for i in images.unique().tolist():
                    missing[i].update(sites[pos])


class RemoteDispatcher(Dispatcher):
    """Dispatcher of one MoE layer over the sites of a placement.

    ``replicas``: expert -> sites holding a copy, in order of preference; ``bank`` holds the experts computed
    in-process (those placed on ``local_site``, or every expert for the ``local`` fallback).
    """

    def __init__(self, layer_id: int, bank: ExpertBank, replicas: Mapping[int, Sequence[str]],
                 clients: Mapping[str, SiteClient], *, local_site: str, context: ForwardContext,
                 policy: CallPolicy = CallPolicy(), counters: DispatchCounters | None = None) -> None:
        self.layer_id, self.bank, self.clients = layer_id, bank, clients
        self.local_site, self.context, self.policy = local_site, context, policy
        self.counters = counters if counters is not None else DispatchCounters()
        # the coordinator's own copy first, then the placement's order
        self.replicas = {e: tuple(sorted(sites, key=lambda s: s != local_site)) for e, sites in replicas.items()}
        self.placed_local = {e for e, sites in self.replicas.items() if local_site in sites}
        self.wants_scores = policy.fallback == "nearest"

    # ------------------------------------------------------------------------------------------ plumbing

    def dispatch(self, x_TPC: torch.Tensor, expert_idx_TK: torch.Tensor,
                 scores_TE: torch.Tensor | None = None) -> DispatchPlan:
        self.context.num_tokens = x_TPC.shape[0]
        return super().dispatch(x_TPC, expert_idx_TK, scores_TE)

    def reachable(self, expert: int) -> bool:
        """Computable now: held in-process, or a replica's site is up."""
        return expert in self.placed_local or any(s in self.clients and self.clients[s].up
                                                  for s in self.replicas.get(expert, ()))

    # ------------------------------------------------------------------------------------------ compute

    def compute(self, layer_id: int, plan: DispatchPlan) -> list[torch.Tensor]:
        chunks = plan.chunks()
        for pos, e in enumerate(plan.experts):
            self.context.count(layer_id, e, len(chunks[pos]))
        deadline = time.monotonic() + self.policy.deadline_s
        outputs, errors = self._run(layer_id, list(zip(plan.experts, chunks, strict=True)), deadline)
        if errors:
            self._fall_back(layer_id, plan, chunks, outputs, errors, deadline)
        return outputs  # type: ignore[return-value]

    def _run(self, layer_id: int, items: list[tuple[int, torch.Tensor]], deadline: float
             ) -> tuple[list[torch.Tensor | None], dict[int, SiteError]]:
        """Outputs of ``items`` (expert, tokens), with retries and hedges until ``deadline``; the errors of those
        no replica answered. The decisions are :class:`CallScheduler`'s; this drives it: sends, waits, timers."""
        sched = CallScheduler(layer_id, [e for e, _ in items], self.replicas, local_site=self.local_site,
                              is_up=lambda site: self.clients[site].up, deadline_s=self.policy.deadline_s)
        hedging = bool(self.policy.hedge_ms)
        calls: dict[int, PendingCall] = {}
        attempts: dict[concurrent.futures.Future, int] = {}
        end: list[Complete | Fallback] = []

        def execute(actions: list[Action]) -> None:
            queue = deque(actions)
            while queue:
                act = queue.popleft()
                if isinstance(act, Send):
                    try:
                        call = self.clients[act.site].start(layer_id, [items[i] for i in act.positions],
                                                            timeout=deadline - time.monotonic(), cancellable=hedging)
                    except SiteError as err:  # never started: its items go to their next replica at once
                        queue.extendleft(reversed(sched.handle(SendFailed(act.attempt, err))))
                        continue
                    calls[act.attempt] = call
                    attempts[call.future] = act.attempt
                elif isinstance(act, RunLocal):  # overlaps the calls in flight
                    for i in act.positions:
                        queue.extend(sched.handle(RanLocally(i, self.bank.forward_one(*items[i]))))
                elif isinstance(act, Cancel):
                    call = calls.pop(act.attempt)
                    del attempts[call.future]
                    call.cancel()
                elif isinstance(act, Penalize):
                    if (watch := self.clients[act.site].watch) is not None:
                        watch.penalize()
                elif isinstance(act, ClearPenalty):
                    if (watch := self.clients[act.site].watch) is not None:
                        watch.succeeded()
                else:
                    end.append(act)

        execute(sched.handle(Submitted()))
        hedge_at = time.monotonic() + self.policy.hedge_ms / 1e3 if hedging else float("inf")
        while not sched.finished:
            now = time.monotonic()
            if now >= deadline:  # (a blocking call cannot be cancelled: it ends at the same deadline)
                execute(sched.handle(DeadlinePassed()))
                break
            done, _ = concurrent.futures.wait(list(attempts), timeout=max(0.0, min(deadline, hedge_at) - now),
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                attempt = attempts.pop(fut, None)
                if attempt is not None:  # else cancelled by an earlier answer of this round
                    execute(sched.handle(self._outcome(attempt, calls.pop(attempt))))
            if time.monotonic() >= hedge_at:
                hedge_at = float("inf")
                execute(sched.handle(HedgeTimerFired()))
        self.counters.add(**sched.tally.as_dict())
        result = end[0]
        return list(result.outputs), (result.errors if isinstance(result, Fallback) else {})

    @staticmethod
    def _outcome(attempt: int, call: PendingCall) -> Answered | Failed:
        """Where a call's answer is accepted or turned into a site failure: :meth:`PendingCall.result` decodes it
        and raises :class:`SiteError` for an RPC error, a timeout or an answer that breaks the protocol
        (:meth:`PendingCall._outputs`); a failure is retried on the next replica and penalises the site."""
        try:
            return Answered(attempt, call.result())
        except SiteError as err:
            return Failed(attempt, err)

    # ------------------------------------------------------------------------------------------ fallback

    def _fall_back(self, layer_id: int, plan: DispatchPlan, chunks: list[torch.Tensor],
                   outputs: list[torch.Tensor | None], errors: dict[int, SiteError], deadline: float) -> None:
        if self.policy.fallback == "fail":
            raise next(iter(errors.values()))
        positions = sorted(errors)
        for msg in dict.fromkeys(str(err) for err in errors.values()):
            self.context.failures.append(msg)
        # the sites holding each lost expert: the image is re-scored when they are back (corrections.py)
        held = {pos: [s for s in self.replicas.get(plan.experts[pos], ()) if s != self.local_site] for pos in positions}
        self.context.mark(plan, positions, self.context.num_tokens, held)
        self.counters.add(fallback_tokens=sum(len(chunks[p]) for p in positions))
        if self.policy.fallback == "local":
            for pos in positions:
                outputs[pos] = self.bank.forward_one(plan.experts[pos], chunks[pos])
        elif self.policy.fallback == "nearest" and plan.scores_SE is not None:
            self._substitute(layer_id, plan, chunks, outputs, positions, errors, deadline)
        for pos in positions:  # skip, or what no substitute could compute: the residual carries the token
            if outputs[pos] is None:
                outputs[pos] = torch.zeros_like(chunks[pos])

    def _substitute(self, layer_id: int, plan: DispatchPlan, chunks: list[torch.Tensor],
                    outputs: list[torch.Tensor | None], positions: list[int], errors: dict[int, SiteError],
                    deadline: float) -> None:
        """``nearest``: each patch of a failed expert goes to the reachable expert its router scored highest."""
        assert plan.scores_SE is not None
        num_experts = plan.scores_SE.shape[1]
        failed = {plan.experts[p] for p in positions}
        ok_E = torch.tensor([e not in failed and self.reachable(e) for e in range(num_experts)])
        if not bool(ok_E.any()):
            return
        P, C = plan.x_SPC.shape[1:]
        slices = plan.slices()
        # per substitute expert: the (position, patch indices) pieces it takes over; one batch per expert, since a
        # request may name an expert only once
        pieces: dict[int, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        for pos in positions:
            scores_NE = plan.scores_SE[slices[pos]].masked_fill(~ok_E, float("-inf"))
            best_N = scores_NE.argmax(dim=1)
            for e in best_N.unique().tolist():
                pieces[e].append((pos, (best_N == e).nonzero().squeeze(1)))
        items = [(e, torch.cat([chunks[pos].view(-1, P, C).index_select(0, idx) for pos, idx in ps]).reshape(-1, C))
                 for e, ps in pieces.items()]
        # the substitutes get what is left of the layer's deadline, but at least a quarter of it
        sub_deadline = max(deadline, time.monotonic() + self.policy.deadline_s / 4)
        ys, _ = self._run(layer_id, items, sub_deadline)
        self.counters.add(substitutes=len(items))
        for (_, ps), y in zip(pieces.items(), ys, strict=True):
            if y is None:
                continue
            for (pos, idx), y_part in zip(ps, torch.split(y.view(-1, P, C), [len(idx) for _, idx in ps]),
                                          strict=True):
                if outputs[pos] is None:
                    outputs[pos] = torch.zeros_like(chunks[pos])
                outputs[pos].view(-1, P, C).index_copy_(0, idx, y_part)


__all__ = ["CallPolicy", "DispatchCounters", "ForwardContext", "RemoteDispatcher"]
