"""MobileViTV2 with timm's state_dict layout, whose transformer MLPs can be per-patch MoE layers.

The transformer layers are numbered 0–8 in forward order: ``stages.2`` holds 0–1, ``stages.3`` 2–5 and
``stages.4`` 6–8 (for every width).
"""

from __future__ import annotations

import torch
from torch import nn

from moevit.config import ModelConfig, MoEConfig
from moevit.layers import ConvNormAct, InvertedResidual, LinearTransformerBlock, MobileVitV2Block, make_divisible
from moevit.moe.layer import MoELayer

_BASE_CHANNELS = (64, 128, 256, 384, 512)
_DEPTHS = (2, 4, 3)  # transformer layers in stages 2, 3, 4


class ClassifierHead(nn.Module):
    """Global average pool → dropout → linear, keys ``head.fc.*`` as timm's."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.mean(dim=(2, 3))))


class MobileViTV2(nn.Module):
    """MobileViTV2 at width ``multiplier``; ``config.moe`` names the MLPs that become MoE layers."""

    def __init__(self, config: ModelConfig, *, multiplier: float) -> None:
        super().__init__()
        self.config = config
        chs = tuple(int(c * multiplier) for c in _BASE_CHANNELS)
        self.stem = ConvNormAct(3, int(32 * multiplier), 3, stride=2)
        prev = int(32 * multiplier)
        stages: list[nn.Module] = [
            nn.Sequential(InvertedResidual(prev, chs[0], stride=1)),
            nn.Sequential(InvertedResidual(chs[0], chs[1], stride=2), InvertedResidual(chs[1], chs[1], stride=1)),
        ]
        prev = chs[1]
        for c, depth in zip(chs[2:], _DEPTHS, strict=True):
            stages.append(nn.Sequential(
                InvertedResidual(prev, c, stride=2),
                MobileVitV2Block(c, c, transformer_dim=make_divisible(0.5 * c), depth=depth),
            ))
            prev = c
        self.stages = nn.Sequential(*stages)
        self.num_features = prev
        self.head = ClassifierHead(prev, config.num_classes, config.drop_rate)
        if config.moe is not None:
            self._make_moe(config.moe)

    # -- structure -------------------------------------------------------------------------------------------
    def transformer_layers(self) -> list[LinearTransformerBlock]:
        """The 9 transformer layers, index 0–8 in forward order."""
        return [blk for stage in self.stages[2:] for blk in stage[1].transformer]

    def moe_layers(self) -> dict[int, MoELayer]:
        """MoE layers by transformer-layer index."""
        return {i: blk.mlp for i, blk in enumerate(self.transformer_layers()) if isinstance(blk.mlp, MoELayer)}

    def _make_moe(self, moe: MoEConfig) -> None:
        blocks = self.transformer_layers()
        for i in moe.layers:
            blk = blocks[i]
            dense_hidden = blk.mlp.fc1.out_channels
            if moe.expert_hidden > dense_hidden:
                raise ValueError(f"expert_hidden={moe.expert_hidden} exceeds the dense MLP width {dense_hidden} "
                                 f"of transformer layer {i}")
            dim = blk.mlp.fc1.in_channels
            blk.mlp = MoELayer(dim, layer_id=i, num_experts=moe.num_experts, expert_hidden=moe.expert_hidden,
                               top_k=moe.top_k, gate=moe.gate, logit_scale=moe.logit_scale, router=moe.router,
                               alpha_init=0.0 if moe.correction == "paper" else 1.0)

    # -- forward ---------------------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected images as a 4-D tensor [B, 3, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            raise ValueError(f"expected 3 colour channels (RGB) in dim 1, got {x.shape[1]} (shape {tuple(x.shape)})")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


_REGISTRY: dict[str, float] = {
    "mobilevitv2_050": 0.5,
    "mobilevitv2_075": 0.75,
    "mobilevitv2_100": 1.0,
    "mobilevitv2_150": 1.5,
    "mobilevitv2_200": 2.0,
}


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(config: ModelConfig) -> MobileViTV2:
    """A model from a full :class:`ModelConfig` (what a checkpoint stores)."""
    if config.arch not in _REGISTRY:
        raise ValueError(f"unknown architecture {config.arch!r}; known: {', '.join(list_models())}")
    return MobileViTV2(config, multiplier=_REGISTRY[config.arch])


def create_model(name: str, *, num_classes: int = 1000, moe: MoEConfig | None = None, drop_rate: float = 0.0,
                 labels: tuple[str, ...] | list[str] = ()) -> MobileViTV2:
    """``moevit.create_model('mobilevitv2_050', num_classes=10, moe=MoEConfig(layers=(8,)))``."""
    return build_model(ModelConfig(arch=name, num_classes=num_classes, drop_rate=drop_rate, moe=moe,
                                   labels=tuple(labels)))

