"""Cosine router over min-max-scaled per-patch mean embeddings (paper §3.2.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineRouter(nn.Module):
    """logits_TE = s · cos(minmax(z̄_TC), c_EC); probabilities by softmax over experts.

    ``scale_min``/``scale_max`` are the min-max scaler frozen at conversion (buffers, not trained);
    ``centroids`` live in the scaled space and are trainable, as is the logit scale ``s``.
    """

    def __init__(self, dim: int, num_experts: int, *, logit_scale: float = 20.0) -> None:
        super().__init__()
        self.dim = dim
        self.num_experts = num_experts
        self.register_buffer("scale_min", torch.zeros(dim))
        self.register_buffer("scale_max", torch.ones(dim))
        self.centroids = nn.Parameter(torch.randn(num_experts, dim) * 0.02 + 0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))

    def scale(self, x_TC: torch.Tensor) -> torch.Tensor:
        span = (self.scale_max - self.scale_min).clamp_min(1e-6)
        return (x_TC - self.scale_min) / span

    def forward(self, zbar_TC: torch.Tensor) -> torch.Tensor:
        """Per-patch mean embeddings [T, C] -> routing logits [T, E]."""
        cos_TE = F.normalize(self.scale(zbar_TC), dim=-1) @ F.normalize(self.centroids, dim=-1).t()
        return cos_TE * self.logit_scale


class LinearRouter(nn.Module):
    """logits_TE = W_EC · minmax(z̄_TC) + b_E, learned from a random start (conversion sets only the scaler).

    The baseline of the initialisation ablation (issue 17): a router that owes nothing to the clustering, while the
    experts are still cut from the clusters. Same scaler buffers as :class:`CosineRouter`, so fingerprints and the
    split deployment treat both alike."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_experts = num_experts
        self.register_buffer("scale_min", torch.zeros(dim))
        self.register_buffer("scale_max", torch.ones(dim))
        self.linear = nn.Linear(dim, num_experts)

    def scale(self, x_TC: torch.Tensor) -> torch.Tensor:
        span = (self.scale_max - self.scale_min).clamp_min(1e-6)
        return (x_TC - self.scale_min) / span

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """Seeded re-draw of the weights with nn.Linear's own ranges (uniform ±1/√dim)."""
        bound = 1.0 / self.dim**0.5
        self.linear.weight.uniform_(-bound, bound, generator=generator)
        self.linear.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, zbar_TC: torch.Tensor) -> torch.Tensor:
        """Per-patch mean embeddings [T, C] -> routing logits [T, E]."""
        return self.linear(self.scale(zbar_TC))
