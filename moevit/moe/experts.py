"""Experts of one MoE layer, stored stacked so any subset can be loaded or served on its own.

Expert e on normalised pixel tokens x̂ [n, C]:
    y = fc2_e(SiLU(fc1_e(γ_e ⊙ x̂ + β_e))) + α_e · v_e
with γ_e, β_e its own copy of the pre-MLP norm's affine, fc1_e/fc2_e a K-unit sub-MLP of the dense MLP and
α_e · v_e the correction term (docs/architecture.md §Model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ExpertBank(nn.Module):
    """E experts of width K over a C-dim model; ``expert_ids`` names which experts of the layer these are."""

    def __init__(self, dim: int, hidden: int, num_experts: int, *, expert_ids: Sequence[int] | None = None,
                 alpha_init: float = 1.0) -> None:
        super().__init__()
        self.dim, self.hidden = dim, hidden
        ids = list(range(num_experts)) if expert_ids is None else [int(i) for i in expert_ids]
        self.expert_ids = ids
        n = len(ids)
        self.norm_weight = nn.Parameter(torch.ones(n, dim))
        self.norm_bias = nn.Parameter(torch.zeros(n, dim))
        self.fc1_weight = nn.Parameter(torch.randn(n, hidden, dim) * dim**-0.5)
        self.fc1_bias = nn.Parameter(torch.zeros(n, hidden))
        self.fc2_weight = nn.Parameter(torch.randn(n, dim, hidden) * hidden**-0.5)
        self.fc2_bias = nn.Parameter(torch.zeros(n, dim))
        self.correction = nn.Parameter(torch.zeros(n, dim))
        self.alpha = nn.Parameter(torch.full((n,), float(alpha_init)))
        self._slot = {e: i for i, e in enumerate(ids)}

    def slot(self, expert: int) -> int:
        """Row of ``expert`` (its index in the layer) in the stacked weights."""
        try:
            return self._slot[int(expert)]
        except KeyError:
            raise KeyError(f"expert {expert} is not in this bank (holds {self.expert_ids})") from None

    def hosts(self, expert: int) -> bool:
        return int(expert) in self._slot

    def forward_one(self, expert: int, x_nC: torch.Tensor) -> torch.Tensor:
        """Run expert ``expert`` (its index in the layer) on pixel tokens [n, C] -> [n, C]."""
        i = self.slot(expert)
        h = torch.addcmul(self.norm_bias[i], x_nC, self.norm_weight[i])
        h = F.silu(F.linear(h, self.fc1_weight[i], self.fc1_bias[i]))
        return F.linear(h, self.fc2_weight[i], self.fc2_bias[i]) + self.alpha[i] * self.correction[i]

    def subset(self, expert_ids: Sequence[int]) -> ExpertBank:
        """A new bank holding copies of only ``expert_ids`` (what a worker serves)."""
        rows = [self.slot(e) for e in expert_ids]
        out = ExpertBank(self.dim, self.hidden, len(rows), expert_ids=expert_ids)
        with torch.no_grad():
            for name, p in self.named_parameters():
                getattr(out, name).copy_(p[rows])
        return out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, experts={self.expert_ids}"
