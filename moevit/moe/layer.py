"""The per-patch MoE layer that takes the place of a transformer MLP (docs/architecture.md §Model).

y = Σ_{e ∈ topk} g_e · E_e(ẑ), one routing decision per patch shared by its P pixels.
Shapes follow the legend in :mod:`moevit.moe`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moevit.moe.dispatcher import Dispatcher, LocalDispatcher
from moevit.moe.experts import ExpertBank
from moevit.moe.router import CosineRouter, LinearRouter


@dataclass
class Routing:
    """The routing of one forward: chosen experts and gates per patch, and the full softmax."""

    expert_idx_BNK: torch.Tensor
    gates_BNK: torch.Tensor
    probs_BNE: torch.Tensor


class RoutingTap(nn.Module):
    """Where a layer's routing can be read: a step that does nothing, called with the routing of every forward, for
    forward hooks to attach to (:func:`moevit.moe.routing.record_routing`). No parameters, no state: a production
    forward keeps nothing."""

    def forward(self, expert_idx_TK: torch.Tensor, gates_TK: torch.Tensor, probs_TE: torch.Tensor,
                batch: int) -> None:
        return None


class MoELayer(nn.Module):
    """Router + experts + a swappable dispatcher. ``layer_id`` is the transformer layer index (0–8)."""

    def __init__(self, dim: int, *, layer_id: int, num_experts: int, expert_hidden: int, top_k: int = 1,
                 gate: str = "renorm", logit_scale: float = 20.0, alpha_init: float = 1.0,
                 router: str = "cosine") -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = gate
        self.router: CosineRouter | LinearRouter = (LinearRouter(dim, num_experts) if router == "linear" else
                                                    CosineRouter(dim, num_experts, logit_scale=logit_scale))
        self.experts = ExpertBank(dim, expert_hidden, num_experts, alpha_init=alpha_init)
        self.dispatcher: Dispatcher = LocalDispatcher(self.experts)
        self.tap = RoutingTap()

    def set_dispatcher(self, dispatcher: Dispatcher | None) -> None:
        """Plug in another dispatcher (``None`` restores the in-process one)."""
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(self.experts)

    def route(self, z_BCPN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routing decisions from the (affine) pre-MLP embedding: expert_idx [T, k], gates [T, k], probs [T, E]."""
        B, C, P, N = z_BCPN.shape
        zbar_TC = z_BCPN.mean(dim=2).permute(0, 2, 1).reshape(B * N, C)  # [B, C, P, N] -> [B*N, C]
        probs_TE = self.router(zbar_TC).softmax(dim=-1)
        top_p_TK, expert_idx_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.gate == "renorm":
            # Values are the top-k renormalised probabilities (exactly 1 for top-1); dividing by a detached sum
            # keeps d(log p) flowing to the router, which a plain p/p would cancel.
            gates_TK = top_p_TK / top_p_TK.sum(dim=-1, keepdim=True).detach()
        else:
            gates_TK = top_p_TK
        return expert_idx_TK, gates_TK, probs_TE

    def forward(self, z_hat_BCPN: torch.Tensor, z_BCPN: torch.Tensor) -> torch.Tensor:
        B, C, P, N = z_hat_BCPN.shape
        expert_idx_TK, gates_TK, probs_TE = self.route(z_BCPN)
        x_TPC = z_hat_BCPN.permute(0, 3, 2, 1).reshape(B * N, P, C)  # [B, C, P, N] -> [B*N, P, C]
        y_TPC = self.mix(x_TPC, expert_idx_TK, gates_TK, probs_TE, batch=B)
        return y_TPC.reshape(B, N, P, C).permute(0, 3, 2, 1)  # [B*N, P, C] -> [B, C, P, N]

    def mix(self, x_TPC: torch.Tensor, expert_idx_TK: torch.Tensor, gates_TK: torch.Tensor, probs_TE: torch.Tensor,
            *, batch: int) -> torch.Tensor:
        """The dispatch point: routed tokens through the dispatcher (dispatch → compute → combine) -> [T, P, C].

        Separate from :meth:`forward` so a camera side that computes the routing elsewhere (the ONNX segments of
        :mod:`moevit.segments`) hands its tokens to the same dispatcher."""
        T = x_TPC.shape[0]
        self.tap(expert_idx_TK, gates_TK, probs_TE, batch)  # stores nothing unless a recorder hooks it
        plan = self.dispatcher.dispatch(x_TPC, expert_idx_TK,
                                        probs_TE.detach() if self.dispatcher.wants_scores else None)
        outputs = self.dispatcher.compute(self.layer_id, plan)
        return self.dispatcher.combine(plan, outputs, gates_TK, T)

    def extra_repr(self) -> str:
        return f"layer_id={self.layer_id}, experts={self.num_experts}, top_k={self.top_k}, gate={self.gate}"
