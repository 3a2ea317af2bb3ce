"""Typed configuration of the network: :class:`MoEConfig` and :class:`ModelConfig`, both JSON-round-trippable.

These are what a checkpoint's metadata stores, so a model rebuilds from its file alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

NUM_TRANSFORMER_LAYERS = 9
CORRECTIONS = ("residual", "paper")
GATES = ("renorm", "softmax")
ROUTERS = ("cosine", "linear")


@dataclass(frozen=True)
class MoEConfig:
    """Where and how the transformer MLPs become per-patch mixtures of experts.

    layers: transformer layer indices 0–8 in forward order whose MLP is replaced.
    num_experts: E experts per MoE layer.
    expert_hidden: K hidden units per expert (≤ the dense MLP's hidden width of that layer).
    top_k: experts per patch (1 or 2).
    correction: ``residual`` (v_e = MLP(μ_e) − sub_e(μ_e), α_e = 1, exact at the centroid) or ``paper``
        (v_e = MLP(μ_e), α_e = 0 at start, trainable).
    gate: ``renorm`` (softmax renormalised over the chosen top-k: a top-1 gate is exactly 1, its gradient
        still reaches the router) or ``softmax`` (the plain softmax probability, as in LIMoE).
    logit_scale: initial value of the learnable scale s on the cosine router logits.
    router: ``cosine`` (the paper's: cosine to centroids set at conversion, times s) or ``linear`` (logits = W ·
        minmax(z̄) + b, weights learned from a random start: the ablation's "linear router trained from scratch").
    """

    layers: tuple[int, ...] = (8,)
    num_experts: int = 16
    expert_hidden: int = 64
    top_k: int = 1
    correction: str = "residual"
    gate: str = "renorm"
    logit_scale: float = 20.0
    router: str = "cosine"

    def __post_init__(self) -> None:
        layers = tuple(sorted({int(i) for i in self.layers}))
        object.__setattr__(self, "layers", layers)
        if not layers:
            raise ValueError("MoEConfig.layers is empty: name at least one transformer layer (0-8)")
        bad = [i for i in layers if not 0 <= i < NUM_TRANSFORMER_LAYERS]
        if bad:
            raise ValueError(f"MoEConfig.layers: {bad} out of range; MobileViTV2 has transformer layers 0-8")
        if self.num_experts < 1:
            raise ValueError(f"MoEConfig.num_experts must be >= 1, got {self.num_experts}")
        if self.expert_hidden < 1:
            raise ValueError(f"MoEConfig.expert_hidden must be >= 1, got {self.expert_hidden}")
        if self.top_k not in (1, 2) or self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k must be 1 or 2 and <= num_experts, got {self.top_k}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"MoEConfig.correction must be one of {CORRECTIONS}, got {self.correction!r}")
        if self.gate not in GATES:
            raise ValueError(f"MoEConfig.gate must be one of {GATES}, got {self.gate!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"MoEConfig.router must be one of {ROUTERS}, got {self.router!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        if self.router == "cosine":  # the default is left out: cosine models' files and fingerprints stay as before
            del d["router"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoEConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown MoE config keys: {sorted(unknown)}")
        return cls(**{**d, "layers": tuple(d.get("layers", (8,)))})


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model: architecture name, classes, MoE layout, label names."""

    arch: str = "mobilevitv2_050"
    num_classes: int = 1000
    drop_rate: float = 0.0
    moe: MoEConfig | None = None
    labels: tuple[str, ...] = field(default_factory=tuple)
    image_size: int = 256  # the input side it was trained at: the default of every command that feeds it images

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "drop_rate": self.drop_rate,
            "moe": self.moe.to_dict() if self.moe else None,
            "labels": list(self.labels),
            "image_size": self.image_size,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        moe = d.get("moe")
        return cls(
            arch=d["arch"],
            num_classes=int(d["num_classes"]),
            drop_rate=float(d.get("drop_rate", 0.0)),
            moe=MoEConfig.from_dict(moe) if moe else None,
            labels=tuple(d.get("labels", ())),
            image_size=int(d.get("image_size", 256)),
        )
