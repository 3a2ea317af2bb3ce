"""Routing statistics of an MoE model on a dataset: the ``stats.json`` the partitioner and the simulator read.

:func:`profile_model` runs the model over images in eval mode and records, per MoE layer, how many patches each
expert receives per image, how routing at one MoE layer follows routing at the previous one (co-activation), and
which classes use which experts (affinity), together with the model's sizes and MAC counts. The format is
documented in ``docs/stats.md`` and parsed by :func:`partition.costmodel.parse_stats`.

Co-activation rule: successive MoE layers a < b may have different patch grids (the stages downsample), so layer
a's routing is mapped onto layer b's grid spatially. Per image, layer a's routing is a map ``R_a [E_a, h_a, w_a]``
with ``R_a[i, r, c] = (number of top-k slots of patch (r, c) that chose expert i) / k``; it is pooled to
``(h_b, w_b)`` with adaptive average pooling (``torch.nn.functional.adaptive_avg_pool2d``), so each of b's
patches gets the mix of a-experts over the region of the image it covers. Then
``patches[i, j] = sum over b's patches of pooled_a[i] * R_b[j]``, averaged over images. Each b patch carries one
unit, so the matrix sums to b's patches per image, column j sums to (patches routed to j at b) / k, and row i to
the pooled mass of expert i (exactly (patches routed to i at a) / k * N_b / N_a when a's grid is a whole multiple
of b's).

Torch is imported here (it runs the model); the cost model and the partitioner never import this module.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from moevit.partition.costmodel import STATS_FORMAT, parse_stats
from tqdm import tqdm

from moevit.analysis import ClassAffinity
from moevit.checkpoint import model_fingerprint
from moevit.data import UnreadableImageError
from moevit.flops import count_macs
from moevit.mobilevitv2 import MobileViTV2, build_model
from moevit.moe.routing import record_routing

__all__ = ["PIXELS_PER_PATCH", "profile_model", "select_images"]

PIXELS_PER_PATCH = 4  # MobileViTV2 unfolds 2x2 patches



log = logging.getLogger(__name__)


def _readable(dataset: Any, indices: Sequence[int], unreadable: list[str]) -> list[tuple[torch.Tensor, int]]:
    """The items at ``indices`` that decode, each its own image: a folder dataset's ``__getitem__`` would put the
    next readable image in an unreadable one's place and count it twice. Each unreadable file is logged once and
    appended to ``unreadable``."""
    load = getattr(dataset, "load", None)
    if load is None:  # in-memory datasets (digits, synthetic, scenes) have nothing to fail
        return [dataset[k] for k in indices]
    out = []
    for k in indices:
        try:
            out.append(load(k))
        except UnreadableImageError as err:
            log.warning("unreadable, not profiled: %s", err)
            unreadable.append(str(err))
    return out


def select_images(n: int, images: int | None, seed: int) -> list[int]:
    """All of ``range(n)``, or a seeded subset of ``images`` of them in ascending order (spread over the whole
    split: datasets are often stored class by class, so the first N would miss classes)."""
    if images is None or images >= n:
        return list(range(n))
    if images < 1:
        raise ValueError(f"--images must be >= 1, got {images}")
    return sorted(np.random.default_rng(seed).choice(n, size=images, replace=False).tolist())


def _grids(model: MobileViTV2, store: dict[int, tuple[int, int]]) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that record each transformer layer's patch grid (rows, cols) into ``store`` at every forward."""
    handles = []
    index = 0
    for stage in model.stages[2:]:
        block = stage[1]
        layers = list(range(index, index + len(block.transformer)))
        index += len(block.transformer)

        def hook(module: torch.nn.Module, args: tuple[Any, ...], layers: Sequence[int] = layers) -> None:
            h, w = args[0].shape[-2:]
            p = module.patch_size
            grid = (-(-h // p), -(-w // p))  # the block pads up to whole patches
            for i in layers:
                store[i] = grid

        handles.append(block.register_forward_pre_hook(hook))
    return handles


@torch.no_grad()
def profile_model(
    model: MobileViTV2,
    dataset: Any,
    *,
    images: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    count_dense: bool = True,
) -> dict[str, Any]:
    """Routing statistics of ``model`` on ``dataset`` (a moevit dataset: items ``(image [3, S, S], label)``,
    ``.classes``, ``.image_size``); returns the ``stats.json`` dict (see ``docs/stats.md``).

    images: profile a seeded subset of this many (default all); count_dense: also count the MACs of the dense
    model of the same architecture (one extra forward of a freshly built dense model).
    """
    moe = model.moe_layers()
    if not moe:
        raise ValueError("the model has no MoE layers: profile a converted MoE checkpoint, not a dense one")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    n_total = len(dataset)
    if n_total == 0:
        raise ValueError("the dataset split is empty")
    chosen = select_images(n_total, images, seed)
    classes = list(dataset.classes)
    n_cls = len(classes)
    layer_ids = sorted(moe)
    tops = {moe[i].top_k for i in layer_ids}
    if len(tops) != 1:
        raise ValueError(f"MoE layers disagree on top_k ({sorted(tops)}); the stats format assumes one top_k")
    top_k = tops.pop()
    image_size = int(dataset.image_size)

    was_training = model.training
    model.eval()
    grids: dict[int, tuple[int, int]] = {}
    handles = _grids(model, grids)
    per_image: dict[int, list[np.ndarray]] = {i: [] for i in layer_ids}
    class_load = {i: np.zeros((n_cls, moe[i].num_experts)) for i in layer_ids}
    affinity = {i: ClassAffinity(n_cls, moe[i].num_experts) for i in layer_ids}
    pairs = list(zip(layer_ids[:-1], layer_ids[1:], strict=True))
    coact = {(a, b): np.zeros((moe[a].num_experts, moe[b].num_experts)) for a, b in pairs}
    class_images = np.zeros(n_cls, dtype=np.int64)
    unreadable: list[str] = []
    stack = ExitStack()  # the routing recorder's hooks, removed in the finally below
    try:
        rec = stack.enter_context(record_routing(model))
        starts = range(0, len(chosen), batch_size)
        bar = tqdm(starts, desc="profiling", unit="batch", disable=not progress, leave=False)
        for start in bar:
            items = _readable(dataset, chosen[start:start + batch_size], unreadable)
            if not items:
                continue
            x = torch.stack([it[0] for it in items])
            labels = torch.tensor([int(it[1]) for it in items])
            if labels.min() < 0 or labels.max() >= n_cls:
                raise ValueError(f"dataset label {int(labels.max())} outside its {n_cls} classes")
            model(x)
            maps: dict[int, torch.Tensor] = {}
            class_images += np.bincount(labels.numpy(), minlength=n_cls)
            for i in layer_ids:
                layer = moe[i]
                routing = rec[i]
                E = layer.num_experts
                idx_BNK, probs_BNE = routing.expert_idx_BNK, routing.probs_BNE
                B, N, _ = idx_BNK.shape
                h, w = grids[i]
                if h * w != N:
                    raise RuntimeError(f"layer {i}: {N} patches but a {h}x{w} grid")
                onehot_BNE = F.one_hot(idx_BNK, E).sum(dim=2).double()  # top-k slots per patch and expert
                counts_BE = onehot_BNE.sum(dim=1)
                per_image[i].append(counts_BE.numpy())
                lab = labels.numpy()
                np.add.at(class_load[i], lab, counts_BE.numpy())
                affinity[i].add(probs_BNE, labels)
                # [B, N, E] -> [B, E, h, w], each patch's slots weighing 1/k (row-major patches: n = r * w + c)
                maps[i] = (onehot_BNE / top_k).permute(0, 2, 1).reshape(B, E, h, w)
            for a, b in pairs:
                ra, rb = maps[a], maps[b]
                pooled = F.adaptive_avg_pool2d(ra, rb.shape[-2:])
                coact[(a, b)] += torch.einsum("bihw,bjhw->ij", pooled, rb).numpy()
    finally:
        stack.close()
        for hd in handles:
            hd.remove()
        model.train(was_training)

    n = len(chosen) - len(unreadable)
    if n == 0:
        raise ValueError(f"none of the {len(chosen)} chosen images could be read: {unreadable[0]}")
    P = PIXELS_PER_PATCH
    out_layers: list[dict[str, Any]] = []
    expert_macs = 0
    expert_bytes_all = 0
    for i in layer_ids:
        layer = moe[i]
        bank = layer.experts
        counts = np.concatenate(per_image[i])  # [images, E]
        h, w = grids[i]
        params = sum(p[0].numel() for p in bank.parameters())
        weight_bytes = sum(p[0].numel() * p.element_size() for p in bank.parameters())
        expert_bytes_all += sum(p.numel() * p.element_size() for p in bank.parameters())
        macs_tok = 2 * bank.dim * bank.hidden  # fc1 + fc2, the matrix products moevit.flops counts
        expert_macs += h * w * top_k * P * macs_tok
        per_cls = np.maximum(class_images, 1)[:, None]
        out_layers.append({
            "layer": i,
            "dim": bank.dim,
            "num_experts": layer.num_experts,
            "expert_hidden": bank.hidden,
            "grid": [h, w],
            "patches": h * w,
            "expert_params": int(params),
            "expert_weight_bytes": int(weight_bytes),
            "expert_macs_per_token": int(macs_tok),
            "patches_per_expert": {
                "mean": counts.mean(axis=0).tolist(),
                "p95": np.percentile(counts, 95, axis=0).tolist(),
                "max": counts.max(axis=0).tolist(),
                "total": [int(round(v)) for v in counts.sum(axis=0)],
            },
            "class_patches_per_expert": (class_load[i] / per_cls).tolist(),
            "affinity": affinity[i].affinity.tolist(),
        })
    coactivation = []
    for a, b in pairs:
        m = coact[(a, b)] / n
        rows = m.sum(axis=1, keepdims=True)
        cond = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
        coactivation.append({"from_layer": a, "to_layer": b, "rule": "adaptive_avg_pool2d",
                             "patches": m.tolist(), "conditional": cond.tolist()})

    total_macs = count_macs(model, image_size)
    dense_macs = None
    if count_dense:
        dense = build_model(dataclasses.replace(model.config, moe=None))
        dense_macs = count_macs(dense, image_size)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    spec = getattr(dataset, "spec", None)
    stats = {
        "format": STATS_FORMAT,
        "fingerprint": model_fingerprint(model),
        "arch": model.config.arch,
        "data": str(spec) if spec is not None else type(dataset).__name__,
        "split": getattr(dataset, "split", None),
        "image_size": image_size,
        "images": n,
        "seed": seed,
        "classes": classes,
        "class_images": class_images.tolist(),
        "pixels_per_patch": P,
        "top_k": top_k,
        "total_macs": int(total_macs),
        "expert_macs": int(expert_macs),
        "trunk_macs": int(total_macs - expert_macs),
        "dense_macs": None if dense_macs is None else int(dense_macs),
        "trunk_weight_bytes": int(state_bytes - expert_bytes_all),
        "layers": out_layers,
        "coactivation": coactivation,
    }
    parse_stats(stats, "<profile>")  # the writer obeys the reader
    return stats
