"""Dense → MoE conversion: the paper's router and expert initialisation (§3.2.1, Algorithm 1 as reconstructed in
docs/architecture.md §Method).

For each chosen transformer layer, in forward order, through the model converted so far:

1. per class, sample images at random sizes between two bounds (32 px steps) and collect the per-patch pre-MLP
   embeddings z = norm2(x) (mean over the P pixels of a patch);
2. Algorithm 1: m_c = class mean; R times: T_c = the K_c patches nearest m_c by cosine, m_c = mean(T_c);
3. fit the min-max scaler on ∪T_c, cluster the scaled patches with Ward linkage into E clusters; the router's
   centroids are the cluster means;
4. MoEfication: expert e keeps the K hidden units of the dense MLP most important on its cluster's pixel tokens,
   plus the correction term (``residual`` or ``paper``).

Step 3 has alternatives for the initialisation ablation of issue 17 (``ConvertConfig.router_init``): k-means on the
same patches, class-mean centroids, random patches as centroids; and ``MoEConfig.router = "linear"`` replaces the
cosine router by a linear one learned from a random start, the experts still cut from the clusters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from moevit.analysis import ClassAffinity
from moevit.config import MoEConfig
from moevit.layers import ConvMlp
from moevit.mobilevitv2 import MobileViTV2
from moevit.moe.layer import MoELayer
from moevit.moe.router import LinearRouter
from moevit.moefy import UNIT_SPLITS, balanced_neuron_groups, load_expert, moe_skeleton, unit_importance

ROUTER_INITS = ("ward", "kmeans", "class-means", "random")


@dataclass(frozen=True)
class ConvertConfig:
    """Options of the conversion; the MoE layout itself is a :class:`MoEConfig`."""

    moe: MoEConfig = field(default_factory=MoEConfig)
    patches_per_class: int = 64  # K_c of Algorithm 1
    rounds: int = 3  # R refinement rounds
    images_per_class: int = 64
    units: str = "overlap-topk"  # how experts get hidden units: see moevit.moefy.UNIT_SPLITS and init_layer
    size_min: int | None = None  # None: 0.625 × the model's training size, up to a 32 px step
    size_max: int | None = None  # None: 1.25 × the model's training size, down to a 32 px step
    seed: int = 0
    router_init: str = "ward"  # how patches are grouped into experts and centroids set: see ROUTER_INITS, cluster()

    def __post_init__(self) -> None:
        if self.units not in UNIT_SPLITS:
            raise ValueError(f"units must be one of {UNIT_SPLITS}, got {self.units!r}")
        if self.router_init not in ROUTER_INITS:
            raise ValueError(f"router_init must be one of {ROUTER_INITS}, got {self.router_init!r}")
        for name in ("patches_per_class", "rounds", "images_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.size_min is not None and self.size_max is not None and not 32 <= self.size_min <= self.size_max:
            raise ValueError(f"conversion sizes {self.size_min}-{self.size_max}: need 32 <= min <= max")



def default_sizes(image_size: int) -> tuple[int, int]:
    """160–320 for a 256 px model (the paper's range), scaled for others; at least one 32 px step."""
    lo = max(32, math.ceil(0.625 * image_size / 32) * 32)
    hi = max(lo, math.floor(1.25 * image_size / 32) * 32)
    return lo, hi


class _Stop(Exception):
    """Raised by the capture hook: nothing after the layer being converted needs to run."""


@torch.no_grad()
def capture_pre_mlp(model: MobileViTV2, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Pixel-level pre-MLP embeddings z = norm2(x) at transformer layer ``layer``: [B, N, P, C]."""
    blk = model.transformer_layers()[layer]
    captured: list[torch.Tensor] = []

    def hook(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[-1])  # ConvMlp gets (z,), MoELayer gets (z_hat, z)
        raise _Stop

    handle = blk.mlp.register_forward_pre_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0].permute(0, 3, 2, 1).contiguous()  # [B, C, P, N] -> [B, N, P, C]


def refine_class_patches(zbar_NC: torch.Tensor, k: int, rounds: int) -> torch.Tensor:
    """Algorithm 1 for one class: indices of its K_c representative patches."""
    m = zbar_NC.mean(dim=0)
    unit = torch.nn.functional.normalize(zbar_NC, dim=1)
    k = min(k, len(zbar_NC))
    idx = torch.arange(len(zbar_NC))
    for _ in range(max(1, rounds)):
        cos = unit @ torch.nn.functional.normalize(m, dim=0)
        idx = cos.topk(k).indices
        m = zbar_NC[idx].mean(dim=0)
    return idx


def ward_clusters(points: np.ndarray, n_clusters: int) -> np.ndarray:
    """Labels 0..E-1 from Ward agglomerative clustering (scipy), relabelled by first appearance."""
    if len(points) < n_clusters:
        raise ValueError(f"{n_clusters} experts but only {len(points)} representative patches to cluster; "
                         "use fewer experts or more --patches-per-class / --images-per-class")
    raw = fcluster(linkage(points.astype(np.float64), method="ward"), t=n_clusters, criterion="maxclust")
    if len(np.unique(raw)) < n_clusters:
        raise ValueError(f"the representative patches form only {len(np.unique(raw))} distinct clusters, "
                         f"fewer than {n_clusters} experts")
    _, first = np.unique(raw, return_index=True)
    order = {int(raw[i]): rank for rank, i in enumerate(sorted(first))}
    return np.array([order[int(r)] for r in raw])


def kmeans_clusters(points: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Labels 0..E-1 from k-means (scikit-learn, k-means++ with 4 seeded starts), relabelled by first appearance."""
    from sklearn.cluster import KMeans

    if len(np.unique(points, axis=0)) < n_clusters:
        raise ValueError(f"{n_clusters} experts but only {len(np.unique(points, axis=0))} distinct representative "
                         "patches to cluster; use fewer experts or more --patches-per-class / --images-per-class")
    raw = KMeans(n_clusters=n_clusters, n_init=4, random_state=seed).fit(points.astype(np.float64)).labels_
    _, first = np.unique(raw, return_index=True)
    order = {int(raw[i]): rank for rank, i in enumerate(sorted(first))}
    return np.array([order[int(r)] for r in raw])


def class_mean_clusters(points: np.ndarray, classes: np.ndarray, n_clusters: int,
                        seed: int) -> tuple[np.ndarray, list[list[int]]]:
    """Experts from classes: labels 0..E-1 and the classes behind each expert.

    E = C: one expert per class. E < C: the class means are grouped by Ward into E groups (similar classes share an
    expert). E > C: each class gets ⌊E/C⌋ experts, the first E mod C classes one more, and a class with several
    splits its representative patches among them by k-means. Each expert's centroid is then the mean of its
    patches, i.e. the mean patch of its class group."""
    present = sorted(int(c) for c in np.unique(classes))
    n_cls = len(present)
    labels = np.empty(len(points), dtype=np.int64)
    if n_clusters <= n_cls:
        means = np.stack([points[classes == c].mean(axis=0) for c in present])
        group = ward_clusters(means, n_clusters) if n_clusters < n_cls else np.arange(n_cls)
        for c, g in zip(present, group, strict=True):
            labels[classes == c] = g
        return labels, [[c for c, g in zip(present, group, strict=True) if g == e] for e in range(n_clusters)]
    owners: list[list[int]] = []
    for rank, c in enumerate(present):
        share = n_clusters // n_cls + (1 if rank < n_clusters % n_cls else 0)
        rows = np.flatnonzero(classes == c)
        sub = np.zeros(len(rows), dtype=np.int64) if share == 1 else kmeans_clusters(points[rows], share, seed)
        labels[rows] = len(owners) + sub
        owners += [[c]] * share
    return labels, owners


def random_centroids(points: np.ndarray, n_clusters: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """E distinct representative patches drawn at random as centroids; labels = the nearest centroid by cosine (the
    router's own choice), each drawn patch kept in its own cluster. Returns (labels, indices of the drawn patches)."""
    if len(points) < n_clusters:
        raise ValueError(f"{n_clusters} experts but only {len(points)} representative patches to draw centroids from; "
                         "use fewer experts or more --patches-per-class / --images-per-class")
    drawn = rng.choice(len(points), size=n_clusters, replace=False)
    unit = points / np.linalg.norm(points, axis=1, keepdims=True).clip(1e-12)
    labels = (unit @ unit[drawn].T).argmax(axis=1)
    labels[drawn] = np.arange(n_clusters)
    return labels, drawn


@dataclass
class LayerSamples:
    """Representative patches of one layer: patch means [M, C], their pixel tokens [M, P, C], their classes."""

    zbar_MC: torch.Tensor
    z_MPC: torch.Tensor
    cls_M: torch.Tensor


def sample_class_images(dataset_at: Callable[[int], Any], targets: list[int], num_classes: int, cfg: ConvertConfig,
                        sizes: list[int]) -> list[tuple[int, int, int]]:
    """(index, class, size) for up to ``images_per_class`` seeded images per class at seeded random sizes."""
    rng = np.random.default_rng(cfg.seed)
    by_class: dict[int, list[int]] = {c: [] for c in range(num_classes)}
    for i, t in enumerate(targets):
        by_class[t].append(i)
    empty = [c for c, v in by_class.items() if not v]
    if empty:
        raise ValueError(f"classes {empty} have no images in the training split; every class needs some")
    picks = []
    for c, idx in by_class.items():
        chosen = rng.permutation(idx)[: cfg.images_per_class]
        picks += [(int(i), c, int(rng.choice(sizes))) for i in chosen]
    return picks


@torch.no_grad()
def collect_layer(model: MobileViTV2, layer: int, picks: list[tuple[int, int, int]],
                  dataset_at: Callable[[int], Any], cfg: ConvertConfig, batch: int = 32) -> LayerSamples:
    """Steps 1–2: embeddings of the sampled images at ``layer`` and Algorithm 1 per class."""
    per_class_bar: dict[int, list[torch.Tensor]] = {}
    per_class_tok: dict[int, list[torch.Tensor]] = {}
    by_size: dict[int, list[tuple[int, int]]] = {}
    for i, c, s in picks:
        by_size.setdefault(s, []).append((i, c))
    for s, items in sorted(by_size.items()):
        ds = dataset_at(s)
        for j in range(0, len(items), batch):
            chunk = items[j:j + batch]
            x = torch.stack([ds[i][0] for i, _ in chunk])
            z_BNPC = capture_pre_mlp(model, layer, x)
            for (_, c), z_NPC in zip(chunk, z_BNPC, strict=True):
                per_class_bar.setdefault(c, []).append(z_NPC.mean(dim=1))
                per_class_tok.setdefault(c, []).append(z_NPC)
    bars, toks, clss = [], [], []
    for c in sorted(per_class_bar):
        zbar = torch.cat(per_class_bar[c])
        tok = torch.cat(per_class_tok[c])
        keep = refine_class_patches(zbar, cfg.patches_per_class, cfg.rounds)
        bars.append(zbar[keep])
        toks.append(tok[keep])
        clss.append(torch.full((len(keep),), c))
    return LayerSamples(torch.cat(bars), torch.cat(toks), torch.cat(clss))


@torch.no_grad()
def init_layer(moe_layer: MoELayer, dense_mlp: ConvMlp, block: torch.nn.Module, samples: LayerSamples,
               moe: MoEConfig, units: str = "overlap-topk", router_init: str = "ward",
               seed: int = 0) -> dict[str, Any]:
    """Steps 3–4 for one layer: scaler, Ward centroids, MoEfied experts. Returns the layer's report.

    ``router_init`` (see :class:`ConvertConfig`) chooses how the scaled representative patches become E clusters
    and centroids: ``ward`` (the paper's), ``kmeans``, ``class-means`` (:func:`class_mean_clusters`) or ``random``
    (:func:`random_centroids`; the drawn patches themselves are the centroids). A ``linear`` router (``moe.router``)
    gets only the scaler and seeded random weights; its experts still come from the clusters.

    ``units``: ``overlap-topk`` gives each expert the K units most important on its cluster's tokens (experts may
    share units); ``disjoint-balanced`` first partitions the units into E equal disjoint groups by balanced k-means
    (MoEfication's split), matches groups to clusters by total importance (Hungarian), and keeps the K most
    important units of the matched group (K <= H / E; K = H / E uses every unit exactly once)."""
    t0 = time.perf_counter()
    zbar = samples.zbar_MC
    lo, hi = zbar.min(dim=0).values, zbar.max(dim=0).values
    scaled = (zbar - lo) / (hi - lo).clamp_min(1e-6)
    extra: dict[str, Any] = {}
    drawn = None
    if router_init == "ward":
        labels = ward_clusters(scaled.numpy(), moe.num_experts)
    elif router_init == "kmeans":
        labels = kmeans_clusters(scaled.numpy(), moe.num_experts, seed)
    elif router_init == "class-means":
        labels, extra["expert_classes"] = class_mean_clusters(scaled.numpy(), samples.cls_M.numpy(),
                                                              moe.num_experts, seed)
    elif router_init == "random":
        labels, drawn = random_centroids(scaled.numpy(), moe.num_experts,
                                         np.random.default_rng([seed, moe_layer.layer_id]))
        extra["drawn_patches"] = drawn.tolist()
    else:
        raise ValueError(f"router_init must be one of {ROUTER_INITS}, got {router_init!r}")
    t_cluster = time.perf_counter() - t0
    router = moe_layer.router
    router.scale_min.copy_(lo)
    router.scale_max.copy_(hi)
    if isinstance(router, LinearRouter):
        router.reset(torch.Generator().manual_seed(seed * 100 + moe_layer.layer_id))
    else:
        router.logit_scale.fill_(moe.logit_scale)
    t1 = time.perf_counter()
    if units not in UNIT_SPLITS:
        raise ValueError(f"units must be one of {UNIT_SPLITS}, got {units!r}")
    members_of = [torch.from_numpy(np.flatnonzero(labels == e)) for e in range(moe.num_experts)]
    importance = torch.stack([unit_importance(dense_mlp, samples.z_MPC[m].reshape(-1, zbar.shape[1]))
                              for m in members_of])  # [E, H]
    if units == "disjoint-balanced":
        from scipy.optimize import linear_sum_assignment

        groups = balanced_neuron_groups(dense_mlp, moe.num_experts)
        if moe.expert_hidden > len(groups[0]):
            raise ValueError(f"K={moe.expert_hidden} exceeds the {len(groups[0])} units of a disjoint group "
                             f"(MLP width / E)")
        score = torch.stack([importance[:, g].sum(dim=1) for g in groups], dim=1)  # [E clusters, E groups]
        _, match = linear_sum_assignment(-score.numpy())
        chosen = [groups[int(match[e])][importance[e, groups[int(match[e])]].topk(moe.expert_hidden).indices]
                  for e in range(moe.num_experts)]
    else:
        chosen = [importance[e].topk(moe.expert_hidden).indices for e in range(moe.num_experts)]
    sizes = []
    for e, members in enumerate(members_of):
        sizes.append(len(members))
        # random: the drawn patch is the centroid; otherwise the cluster mean
        at = members if drawn is None else torch.tensor([int(drawn[e])])
        if not isinstance(router, LinearRouter):
            router.centroids[e].copy_(scaled[at].mean(dim=0))
        load_expert(moe_layer.experts, e, block, dense_mlp, chosen[e].sort().values,
                    centroid=zbar[at].mean(dim=0), correction=moe.correction)
    sets = [set(c.tolist()) for c in chosen]
    pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1:]]
    jaccard = float(np.mean([len(a & b) / len(a | b) for a, b in pairs])) if pairs else 0.0
    return {"cluster_sizes": sizes, "representative_patches": len(zbar), "units": units,
            "router_init": router_init, "router": moe.router, **extra, "mean_unit_jaccard": jaccard,
            "seconds": {"cluster": t_cluster, "moefy": time.perf_counter() - t1}}


@torch.no_grad()
def affinity_from_samples(moe_layer: MoELayer, samples: LayerSamples, num_classes: int) -> torch.Tensor:
    """Class × expert affinity before fine-tuning: per-class mean router softmax over the class's T_c."""
    aff = ClassAffinity(num_classes, moe_layer.num_experts)
    aff.add(moe_layer.router(samples.zbar_MC).softmax(dim=-1)[:, None], samples.cls_M.long())  # one patch per item
    return aff.affinity.float()


def convert(dense: MobileViTV2, dataset_at: Callable[[int], Any], targets: list[int], cfg: ConvertConfig, *,
            on_stage: Callable[[str], None] = lambda s: None) -> tuple[MobileViTV2, dict[str, Any]]:
    """Convert ``dense`` to the MoE layout of ``cfg.moe``. ``dataset_at(size)`` gives the training split at that
    input size. Returns the model and a report (per layer cluster sizes, affinity, timings)."""
    if dense.config.moe is not None:
        raise ValueError(f"the model to convert already has MoE layers {list(dense.config.moe.layers)}; "
                         "start from a dense checkpoint")
    n_cls = dense.config.num_classes
    lo, hi = (cfg.size_min, cfg.size_max)
    if lo is None or hi is None:
        dlo, dhi = default_sizes(dense.config.image_size)
        lo, hi = lo or dlo, hi or dhi
    if lo > hi or lo < 32:
        raise ValueError(f"conversion sizes {lo}-{hi}: need 32 <= min <= max")
    sizes = list(range(lo, hi + 1, 32)) or [lo]
    dense = dense.eval()
    t_start = time.perf_counter()
    model = moe_skeleton(dense, cfg.moe).eval()
    dense_blocks = dense.transformer_layers()
    picks = sample_class_images(dataset_at, targets, n_cls, cfg, sizes)
    report: dict[str, Any] = {"sizes": sizes, "images_sampled": len(picks), "layers": {}}
    for layer in cfg.moe.layers:
        on_stage(f"layer {layer}: collect + Algorithm 1")
        t0 = time.perf_counter()
        samples = collect_layer(model, layer, picks, dataset_at, cfg)
        t_collect = time.perf_counter() - t0
        on_stage(f"layer {layer}: {cfg.router_init} clustering + MoEfication")
        blk = dense_blocks[layer]
        rep = init_layer(model.moe_layers()[layer], blk.mlp, blk, samples, cfg.moe, cfg.units, cfg.router_init,
                         cfg.seed)
        rep["seconds"] = {"collect": t_collect, **rep["seconds"]}
        rep["affinity_before"] = affinity_from_samples(model.moe_layers()[layer], samples, n_cls).tolist()
        report["layers"][str(layer)] = rep
    report["seconds_total"] = time.perf_counter() - t_start
    return model.eval(), report


def conversion_fingerprint(model: MobileViTV2) -> str:
    """Names one conversion, and every fine-tuning of it: the MoE layout plus each router's min-max scaler, which
    conversion fits and training never changes (buffers). moe-convert's report carries it; moe-analyze checks it."""
    import hashlib

    cfg = model.config
    if cfg.moe is None:
        raise ValueError("a dense model has no conversion fingerprint")
    h = hashlib.sha256(f"{cfg.arch}|{cfg.num_classes}|{sorted(cfg.moe.to_dict().items())}".encode())
    for i, layer in sorted(model.moe_layers().items()):
        h.update(str(i).encode())
        for t in (layer.router.scale_min, layer.router.scale_max):
            h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def hidden_within_budget(dense: MobileViTV2, layers: tuple[int, ...], experts: int, *, top_k: int = 1) -> int:
    """The largest K (hidden units per expert) for which the MoE model has no more parameters than ``dense``: the
    paper's regime (its MoEs have 13 % fewer parameters than MobileViTV2-0.5). Raises when even K = 1 is larger."""
    from moevit.flops import count_params
    from moevit.mobilevitv2 import build_model

    budget = sum(p.numel() for p in dense.parameters())
    widths = [dense.transformer_layers()[i].mlp.fc1.out_channels for i in layers]

    def params(k: int) -> int:
        cfg = MoEConfig(layers=tuple(layers), num_experts=experts, expert_hidden=k, top_k=top_k)
        return count_params(build_model(replace(dense.config, moe=cfg)))

    lo, hi = 0, min(widths)
    while lo < hi:  # parameters grow with K: the largest K within the budget
        mid = (lo + hi + 1) // 2
        if params(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo < 1:
        raise ValueError(f"MoE-{experts} at layers {list(layers)} has more parameters than the dense model even "
                         "with K = 1")
    return lo
