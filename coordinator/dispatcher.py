"""The remote dispatcher: at one MoE layer, tokens of experts placed on other sites go out in one RPC per site,
to all sites at once; experts on the coordinator's own site run in-process meanwhile; outputs are combined by the
model's own code (:class:`moevit.moe.Dispatcher`).

An expert may have several replicas. Each expert's tokens go to the first replica that is up (the coordinator's
own copy first; see :mod:`coordinator.health`); when a call fails, its experts are sent to their next replica
within the same deadline; with ``hedge_ms`` set, experts still unanswered after that delay are also sent to their
next replica, the first answer wins and the other call is cancelled. Retries and hedges return the same expert's
output, so the result is exactly the fault-free one.

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
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import torch
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

    def mark(self, plan: DispatchPlan, positions: list[int], num_tokens: int) -> None:
        """Images owning the patches of the experts at ``positions`` of ``plan`` are degraded."""
        batch = self.batch_size
        if batch == 0:
            raise RuntimeError("ForwardContext.begin(batch_size) was not called before the forward: run the split "
                               "model through SplitRuntime.classify, not model(x)")
        per_image = max(1, num_tokens // max(1, batch))
        slices = plan.slices()
        for pos in positions:
            sl = plan.order_S[slices[pos]] // plan.top_k
            self.degraded[(sl // per_image).clamp_max(batch - 1)] = True


@dataclass
class _Attempt:
    site: str
    positions: list[int]
    call: PendingCall
    hedge: bool = False


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

    def _next_replica(self, expert: int, tried: set[str]) -> str | None:
        for site in self.replicas.get(expert, ()):
            if site != self.local_site and site not in tried and self.clients[site].up:
                return site
        return None

    def _unreachable(self, expert: int, tried: set[str]) -> SiteError:
        sites = [s for s in self.replicas.get(expert, ()) if s != self.local_site]
        down = ", ".join(sites) or "(none)"
        return SiteError(down, f"UNAVAILABLE: no replica of expert {expert} of layer {self.layer_id} is reachable"
                         + (" (tried and failed)" if tried else " (health: down)"), grpc.StatusCode.UNAVAILABLE)

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
        no replica answered."""
        n = len(items)
        outputs: list[torch.Tensor | None] = [None] * n
        tried: list[set[str]] = [set() for _ in range(n)]
        covering = [0] * n
        last_err: dict[int, SiteError] = {}
        inflight: dict[concurrent.futures.Future, _Attempt] = {}
        hedging = bool(self.policy.hedge_ms)

        def launch(positions: list[int], *, hedge: bool = False) -> None:
            groups: dict[str, list[int]] = defaultdict(list)
            for i in positions:
                site = self._next_replica(items[i][0], tried[i])
                if site is None:
                    if covering[i] == 0 and i not in last_err:
                        last_err[i] = self._unreachable(items[i][0], tried[i])
                    continue
                tried[i].add(site)
                groups[site].append(i)
            for site, ps in groups.items():
                client = self.clients[site]
                try:
                    call = client.start(layer_id, [items[i] for i in ps], timeout=deadline - time.monotonic(),
                                        cancellable=hedging)
                except SiteError as err:
                    for i in ps:
                        last_err[i] = err
                    launch(ps)
                    continue
                inflight[call.future] = _Attempt(site, ps, call, hedge)
                for i in ps:
                    covering[i] += 1
                self.counters.add(calls=1, hedges=int(hedge))

        local = [i for i, (e, _) in enumerate(items) if e in self.placed_local]
        launch([i for i, (e, _) in enumerate(items) if e not in self.placed_local])
        for i in local:  # overlap local experts with the calls in flight
            outputs[i] = self.bank.forward_one(*items[i])
        hedge_at = time.monotonic() + self.policy.hedge_ms / 1e3 if hedging else float("inf")
        while inflight:
            now = time.monotonic()
            if now >= deadline:
                break
            done, _ = concurrent.futures.wait(list(inflight), timeout=max(0.0, min(deadline, hedge_at) - now),
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                att = inflight.pop(fut, None)
                if att is None:
                    continue
                for i in att.positions:
                    covering[i] -= 1
                try:
                    ys = att.call.result()
                except SiteError as err:
                    if err.code != grpc.StatusCode.CANCELLED and self.clients[att.site].watch is not None:
                        self.clients[att.site].watch.penalize()
                    again = []
                    for i in att.positions:
                        if outputs[i] is None:
                            last_err[i] = err
                            if covering[i] == 0:
                                again.append(i)
                    if again:
                        self.counters.add(retries=1)
                        launch(again)
                    continue
                watch = self.clients[att.site].watch
                if watch is not None:
                    watch.succeeded()
                won = False
                for i, y in zip(att.positions, ys, strict=True):
                    if outputs[i] is None:
                        outputs[i] = y
                        won = True
                if att.hedge and won:
                    self.counters.add(hedge_wins=1)
                for other_fut, other in list(inflight.items()):  # calls made redundant: cancel (hedge losers)
                    if all(outputs[i] is not None for i in other.positions):
                        other.call.cancel()
                        del inflight[other_fut]
                        for i in other.positions:
                            covering[i] -= 1
                        self.counters.add(cancelled=1)
                        loser = self.clients[other.site].watch
                        if att.hedge and not other.hedge and loser is not None:
                            loser.penalize()  # slower than the hedge delay: route around it for a while
            if time.monotonic() >= hedge_at:
                hedge_at = float("inf")
                slow = [i for i in range(n) if outputs[i] is None and covering[i] > 0]
                if slow:
                    launch(slow, hedge=True)
        for att in inflight.values():  # out of time (a blocking call cannot be cancelled: it ends at the same deadline)
            att.call.cancel()
            for i in att.positions:
                if outputs[i] is None:
                    last_err[i] = SiteError(att.site, f"DEADLINE_EXCEEDED: no answer within the layer's "
                                            f"{self.policy.deadline_s:g} s deadline", grpc.StatusCode.DEADLINE_EXCEEDED)
        errors = {i: last_err.get(i) or self._unreachable(items[i][0], tried[i])
                  for i in range(n) if outputs[i] is None}
        return outputs, errors

    # ------------------------------------------------------------------------------------------ fallback

    def _fall_back(self, layer_id: int, plan: DispatchPlan, chunks: list[torch.Tensor],
                   outputs: list[torch.Tensor | None], errors: dict[int, SiteError], deadline: float) -> None:
        if self.policy.fallback == "fail":
            raise next(iter(errors.values()))
        positions = sorted(errors)
        for msg in dict.fromkeys(str(err) for err in errors.values()):
            self.context.failures.append(msg)
        self.context.mark(plan, positions, self.context.num_tokens)
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
