"""Routing analysis of §4.2.2: class × expert affinity before and after fine-tuning, the classes each expert
serves, background experts, and expert-usage entropy.

Definitions (all per MoE layer):
- affinity[c, e]: mean router softmax probability of expert e over class c's patches;
- usage[c, e]: fraction of class c's patches whose top-1 expert is e;
- an expert is *background* when at least ``background_share`` of the classes send it at least
  ``min_usage`` of their patches (it serves nearly every class rather than a semantic group);
- entropy: Shannon entropy of the overall expert load divided by log E (1 = perfectly even use).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moevit.mobilevitv2 import MobileViTV2
from moevit.moe.routing import record_routing


class ClassAffinity:
    """The class × expert affinity of one MoE layer, accumulated over batches: per class, the mean router softmax
    probability of each expert over the class's patches. The one computation behind ``moe-analyze``, the
    ``affinity`` of ``stats.json`` (:func:`moevit.partition.profile.profile_model`) and the before-fine-tuning
    affinity of ``moe-convert``."""

    def __init__(self, num_classes: int, num_experts: int) -> None:
        self.prob_sum = torch.zeros(num_classes, num_experts, dtype=torch.float64)
        self.patches = torch.zeros(num_classes, dtype=torch.float64)

    def add(self, probs_BNE: torch.Tensor, labels_B: torch.Tensor) -> None:
        """Router softmax of ``B`` items of ``N`` patches each, the items labelled ``labels_B``."""
        B, N, _ = probs_BNE.shape
        self.prob_sum.index_add_(0, labels_B, probs_BNE.double().sum(dim=1))
        self.patches.index_add_(0, labels_B, torch.full((B,), float(N), dtype=torch.float64))

    @property
    def affinity(self) -> torch.Tensor:
        """[C, E] float64; a class without patches has a row of zeros."""
        return self.prob_sum / self.patches.clamp_min(1)[:, None]


@torch.no_grad()
def routing_by_class(model: MobileViTV2, dataset, *, num_batches: int = 50, batch_size: int = 16, seed: int = 0
                     ) -> dict[int, dict[str, torch.Tensor]]:
    """Affinity and top-1 usage per MoE layer from routing on up to ``num_batches`` held-out batches, drawn at
    random (``seed``) from the whole of ``dataset``: split files are ordered by class, so its first items would
    leave the last classes out."""
    model.eval()
    n_cls = model.config.num_classes
    layers = model.moe_layers()
    aff = {i: ClassAffinity(n_cls, m.num_experts) for i, m in layers.items()}
    use = {i: torch.zeros(n_cls, m.num_experts) for i, m in layers.items()}
    n = min(len(dataset), num_batches * batch_size)
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].sort().values.tolist()
    with record_routing(model) as rec:
        for j in range(0, n, batch_size):
            items = [dataset[i] for i in picks[j:j + batch_size]]
            x = torch.stack([a for a, _ in items])
            y = torch.tensor([b for _, b in items])
            model(x)
            for i in layers:
                r = rec[i]
                E = r.probs_BNE.shape[2]
                aff[i].add(r.probs_BNE, y)
                onehot = torch.nn.functional.one_hot(r.expert_idx_BNK[..., 0], E).float()  # [B, N, E]
                use[i].index_add_(0, y, onehot.sum(dim=1))
    out = {}
    for i, a in aff.items():
        patches = a.patches.float()
        out[i] = {"affinity": a.affinity.float(), "usage": use[i] / patches.clamp_min(1)[:, None],
                  "patches": patches}
    return out


def usage_entropy(load: torch.Tensor) -> float:
    """Normalised entropy of an expert-load vector (1 = even use of all experts)."""
    p = load / load.sum().clamp_min(1e-12)
    h = -(p * p.clamp_min(1e-12).log()).sum()
    return float(h / math.log(len(p))) if len(p) > 1 else 1.0


def summarize_layer(affinity: torch.Tensor, usage: torch.Tensor, classes: list[str], *,
                    background_share: float = 0.8, min_usage: float = 0.05,
                    patches: torch.Tensor | None = None) -> dict[str, Any]:
    """Classes under each expert (Figure 2 as a table), background experts and entropy for one layer. ``patches``
    (per class): classes with none are left out of the groups and of the background share, and listed."""
    n_cls, E = usage.shape
    seen = [c for c in range(n_cls) if patches is None or float(patches[c]) > 0]
    top_expert = affinity.argmax(dim=1)
    groups = {e: [classes[c] for c in seen if int(top_expert[c]) == e] for e in range(E)}
    users = (usage[seen] >= min_usage).float().sum(dim=0)
    background = [e for e in range(E) if users[e] >= background_share * len(seen)]
    load = usage.sum(dim=0)
    return {
        "classes_by_expert": {str(e): groups[e] for e in range(E)},
        "classes_without_patches": [classes[c] for c in range(n_cls) if c not in seen],
        "background_experts": background,
        "classes_using_expert": users.int().tolist(),
        "usage_entropy": usage_entropy(load),
        "load": (load / load.sum().clamp_min(1e-12)).tolist(),
    }


def plot_affinity(path, before: torch.Tensor | None, after: torch.Tensor, classes: list[str], layer: int) -> None:
    """Heatmaps of the class × expert affinity, before (if known) and after, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mats = [("before fine-tuning (representative patches)", before)] if before is not None else []
    mats.append(("routing on held-out images", after))
    n_cls, E = after.shape
    fig, axes = plt.subplots(1, len(mats), figsize=(1.2 + 0.45 * E * len(mats), 1.5 + 0.3 * n_cls), squeeze=False)
    for ax, (title, m) in zip(axes[0], mats, strict=True):
        im = ax.imshow(m.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=max(float(m.max()), 1e-6))
        ax.set_title(f"layer {layer}: {title}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(E))
        ax.set_yticks(range(n_cls))
        ax.set_yticklabels([c[:18] for c in classes], fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    axes[0][0].set_ylabel("class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
