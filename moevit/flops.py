"""Parameter and multiply-accumulate counts (MACs per image, as torch's flop counter ÷ 2, like timm's tables)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from moevit.mobilevitv2 import MobileViTV2


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: MobileViTV2, image_size: int = 256) -> int:
    """MACs of one image at ``image_size``². For an MoE model every patch runs top-k experts of K units, so
    the count does not depend on which experts are chosen."""
    was_training = model.training
    model.eval()
    x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was_training)
    return int(fc.get_total_flops() // 2)
