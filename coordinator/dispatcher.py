"""The remote dispatcher: at one MoE layer, tokens of experts placed on other sites go out in one RPC per site,
to all sites at once; experts on the coordinator's own site run in-process meanwhile; outputs are combined by the
model's own code (:class:`moevit.moe.Dispatcher`).

When a site fails, the topology's ``fallback`` decides: ``fail`` raises :class:`SiteError` naming the site;
``local`` computes the expert from the coordinator's copy and ``skip`` leaves its tokens to the residual path;
both mark the affected images degraded in the :class:`ForwardContext`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from coordinator.sites import SiteClient, SiteError
from moevit.moe.dispatcher import Dispatcher, DispatchPlan
from moevit.moe.experts import ExpertBank


@dataclass
class ForwardContext:
    """Per-forward bookkeeping shared by all MoE layers: which images are degraded, tokens per expert."""

    batch_size: int = 0
    degraded: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    failures: list[str] = field(default_factory=list)
    tokens: dict[tuple[int, int], int] = field(default_factory=lambda: defaultdict(int))

    def begin(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.degraded = torch.zeros(batch_size, dtype=torch.bool)
        self.failures = []

    def mark(self, plan: DispatchPlan, positions: list[int], num_tokens: int) -> None:
        """Images owning the patches of the experts at ``positions`` of ``plan`` are degraded."""
        per_image = max(1, num_tokens // max(1, self.batch_size))
        starts = [0]
        for c in plan.counts:
            starts.append(starts[-1] + c)
        for pos in positions:
            sl = plan.order_S[starts[pos]:starts[pos + 1]] // plan.top_k
            self.degraded[(sl // per_image).clamp_max(self.batch_size - 1)] = True


class RemoteDispatcher(Dispatcher):
    """Dispatcher of one MoE layer over the sites of a placement."""

    def __init__(self, layer_id: int, bank: ExpertBank, routes: Mapping[int, str], clients: Mapping[str, SiteClient],
                 *, local_site: str, context: ForwardContext, fallback: str = "fail") -> None:
        self.layer_id, self.bank, self.routes, self.clients = layer_id, bank, dict(routes), clients
        self.local_site, self.context, self.fallback = local_site, context, fallback
        self._num_tokens = 0

    def dispatch(self, x_TPC: torch.Tensor, expert_idx_TK: torch.Tensor) -> DispatchPlan:
        self._num_tokens = x_TPC.shape[0]
        return super().dispatch(x_TPC, expert_idx_TK)

    def compute(self, layer_id: int, plan: DispatchPlan) -> list[torch.Tensor]:
        chunks = plan.chunks()
        by_site: dict[str, list[int]] = defaultdict(list)
        for pos, e in enumerate(plan.experts):
            by_site[self.routes[e]].append(pos)
            self.context.tokens[(layer_id, e)] += len(chunks[pos])
        pending = {}
        for site, positions in by_site.items():
            if site == self.local_site:
                continue
            try:
                pending[site] = self.clients[site].start(layer_id, [(plan.experts[p], chunks[p]) for p in positions])
            except SiteError as err:  # refused before sending (e.g. the channel is closed)
                pending[site] = err
        outputs: list[torch.Tensor | None] = [None] * len(chunks)
        for pos in by_site.get(self.local_site, []):  # overlap local experts with the calls in flight
            outputs[pos] = self.bank.forward_one(plan.experts[pos], chunks[pos])
        for site, call in pending.items():
            positions = by_site[site]
            try:
                if isinstance(call, SiteError):
                    raise call
                for pos, y in zip(positions, call.result(), strict=True):
                    outputs[pos] = y
            except SiteError as err:
                self._on_failure(err, plan, positions, chunks, outputs)
        return outputs  # type: ignore[return-value]

    def _on_failure(self, err: SiteError, plan: DispatchPlan, positions: list[int], chunks: list[torch.Tensor],
                    outputs: list[torch.Tensor | None]) -> None:
        if self.fallback == "fail":
            raise err
        self.context.failures.append(str(err))
        self.context.mark(plan, positions, self._num_tokens)
        for pos in positions:
            if self.fallback == "local":
                outputs[pos] = self.bank.forward_one(plan.experts[pos], chunks[pos])
            else:  # skip: the expert adds nothing; the residual carries the token
                outputs[pos] = torch.zeros_like(chunks[pos])
