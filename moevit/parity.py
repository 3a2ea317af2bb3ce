"""Weights and images drawn from names and seeds alone, for comparing this MobileViTV2 with another implementation
of the same state_dict (timm's): both load the same tensors whatever their own initialisation code does.
``bench/timm_parity.py`` and ``tests/test_model.py`` compare against timm's stored logits for them."""

from __future__ import annotations

import math

import torch

SIZES = ((256, 256), (224, 224), (250, 190), (64, 64))  # the sizes timm's logits are stored for (h, w)


def reference_weights(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights for ``model``'s state_dict drawn from its names and shapes in order: fan-in scaled normal weights,
    non-trivial norm scales, biases and running statistics; integer buffers kept."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            out[name] = t.clone()
        elif name.endswith("running_mean") or (name.endswith("bias") and t.dim() == 1):
            out[name] = torch.randn(t.shape, generator=g) * 0.1
        elif name.endswith("running_var"):
            out[name] = torch.rand(t.shape, generator=g) + 0.5
        elif t.dim() == 1:  # a norm's scale
            out[name] = 1 + torch.randn(t.shape, generator=g) * 0.1
        else:
            out[name] = torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel())
    return out


def reference_input(h: int, w: int) -> torch.Tensor:
    """One seeded image [1, 3, h, w] for that size."""
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * 10_000 + w))


__all__ = ["SIZES", "reference_input", "reference_weights"]
