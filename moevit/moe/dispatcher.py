"""Dispatchers: group routed patch tokens by expert, get the experts' outputs, combine them with the gates.

A dispatcher is an interface (``dispatch`` → ``compute`` → ``combine``). :class:`LocalDispatcher` runs the
experts in-process; the coordinator plugs in a remote one that sends each site its tokens, without the model
knowing. Shapes follow the legend in :mod:`moevit.moe`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from moevit.moe.experts import ExpertBank


@dataclass
class DispatchPlan:
    """Patch tokens sorted by expert.

    order_S: index into the flattened [T*k] assignments, sorted by expert.
    experts: the experts that got at least one patch, ascending; counts: patches for each of them.
    x_SPC: the patch tokens in that order (each patch's P pixels stay together).
    scores_SE: the router's probabilities of each of those patches over all experts, when the layer passed them
    (a remote dispatcher uses them to pick a substitute for an expert it cannot reach).
    """

    order_S: torch.Tensor
    experts: list[int]
    counts: list[int]
    x_SPC: torch.Tensor
    top_k: int
    scores_SE: torch.Tensor | None = None

    def slices(self) -> list[slice]:
        """Per expert in ``experts``: its rows of ``order_S`` / ``x_SPC``."""
        out, start = [], 0
        for c in self.counts:
            out.append(slice(start, start + c))
            start += c
        return out

    def chunks(self) -> list[torch.Tensor]:
        """Per expert in ``experts``: its pixel tokens [n_e * P, C]."""
        P, C = self.x_SPC.shape[1:]
        return [c.reshape(-1, C) for c in torch.split(self.x_SPC, self.counts)]


class Dispatcher(ABC):
    """Moves tokens to experts and back. Subclasses say where ``compute`` runs."""

    #: whether :meth:`dispatch` should be given the router's scores (only a dispatcher that uses them pays for
    #: reordering them)
    wants_scores: bool = False

    def dispatch(self, x_TPC: torch.Tensor, expert_idx_TK: torch.Tensor,
                 scores_TE: torch.Tensor | None = None) -> DispatchPlan:
        k = expert_idx_TK.shape[1]
        flat_S = expert_idx_TK.reshape(-1)
        order_S = torch.argsort(flat_S, stable=True)
        experts, counts = torch.unique_consecutive(flat_S[order_S], return_counts=True)
        token_S = order_S // k if k > 1 else order_S
        x_SPC = x_TPC.index_select(0, token_S)
        scores_SE = scores_TE.index_select(0, token_S) if scores_TE is not None else None
        return DispatchPlan(order_S, experts.tolist(), counts.tolist(), x_SPC, k, scores_SE)

    @abstractmethod
    def compute(self, layer_id: int, plan: DispatchPlan) -> list[torch.Tensor]:
        """Outputs of each expert in ``plan.experts`` on its chunk: list of [n_e * P, C]."""

    def combine(self, plan: DispatchPlan, outputs: list[torch.Tensor], gates_TK: torch.Tensor,
                num_tokens: int) -> torch.Tensor:
        P, C = plan.x_SPC.shape[1:]
        y_SPC = torch.cat([o.reshape(-1, P, C) for o in outputs], dim=0) if outputs else plan.x_SPC.new_zeros(0, P, C)
        g_S = gates_TK.reshape(-1).index_select(0, plan.order_S)
        y_SPC = y_SPC * g_S[:, None, None].to(y_SPC.dtype)
        y_TPC = y_SPC.new_zeros(num_tokens, P, C)
        return y_TPC.index_add(0, plan.order_S // plan.top_k, y_SPC)


class LocalDispatcher(Dispatcher):
    """Runs every expert in-process from the layer's :class:`ExpertBank`."""

    def __init__(self, bank: ExpertBank) -> None:
        self.bank = bank

    def compute(self, layer_id: int, plan: DispatchPlan) -> list[torch.Tensor]:
        return [self.bank.forward_one(e, x) for e, x in zip(plan.experts, plan.chunks(), strict=True)]
