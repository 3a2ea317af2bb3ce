"""The cost model: what one image costs under a placement, per site and end to end; and the routing-statistics
file (``stats.json``) it reads.

One cost model serves the partitioner, the coordinator and the simulator, so all three agree on what a
placement costs. It is pure (numpy only: no torch, no grpc, no ray) and deterministic. The numbers it needs about
the model and its routing come from ``stats.json`` (written by ``moe-profile``; format in ``docs/stats.md``), the
numbers about devices and links from the topology (``deploy/topology.py``).

Model of one image (every figure is an expectation per image; units are seconds, joules and bytes):

* The coordinator runs the trunk (everything but the experts, routers included): ``trunk_macs`` at its device's
  speed. A MAC is two FLOPs (:data:`FLOPS_PER_MAC`); ``gflops`` in the topology is FLOP/s.
* At each MoE layer the coordinator sends every remote site its tokens in one RPC, all sites at once, runs the
  experts it holds itself in-process (no bytes), and waits for every reply. The layer takes
  ``max over sites of (send + compute + return)`` (the coordinator's own term is its compute alone). Links are
  taken as independent (no contention between the coordinator's links).
* A routed patch is P pixel tokens (P = 4); each token is ``dim`` numbers of ``wire_bytes`` bytes on the wire each
  way: the token codec's size per number, per layer (2 for fp16, 4 for fp32, about 1 for int8 with its scales;
  :func:`wire_bytes_for` gives a codec's nominal size, ``bench/bench_wire.py`` measures it with zstd), and the
  codec's CPU (``codec_s_per_value``: encode + decode both ways, per number) is added to a remote patch's time on
  its site. Transfer time one way: ``latency + bits / (bandwidth * duty_cycle) / (1 - loss)``:
  a duty-cycled link transmits on average a ``duty_cycle`` fraction of the time, and each lost packet is sent
  again (expected transmissions ``1 / (1 - loss)``). A site is contacted in a layer (and pays the link latency
  both ways) when it holds an expert of that layer whose mean load is above zero.
* Radio energy: ``tx_nj_per_bit`` of the link on the sending end, ``rx_nj_per_bit`` on the receiving end, per bit
  actually transmitted (retransmissions included; duty cycling changes time, not energy). Compute energy:
  ``active_w`` of the device times its compute time. Idle energy (``idle_w`` while not computing, within this
  image's latency) is reported separately and is not part of the ``energy`` objective: it is paid whatever the
  placement, per hour rather than per image, and the simulator accounts for it over a deployment.
* Per-layer parallelism, honestly: every MoE layer's outputs return to the coordinator before the next layer (the
  next norm spans the whole image), so experts of different layers never talk to each other and co-locating
  experts that are co-activated *across* layers saves no bytes and no time in expectation; cross-layer
  co-activation is recorded in ``stats.json`` for the simulator only. What does matter is co-activation *within*
  a layer: experts busy in the same images queue on one site when placed together. The latency therefore
  averages the per-layer maximum over **class scenarios** (each class's mean routing, weighted by how often the
  class occurs in the profiled images): ``E_class[max_site ...]`` rather than ``max_site E[...]``, so a
  placement that puts all of one class's experts on one slow site is charged for it. ``scenarios="mean"`` gives
  the plain mean-load estimate instead (also always reported as ``latency_mean_load_s``).
* Replicas: with ``replica_policy="local-first"`` (default, what ``coordinator/runtime.py`` does) all of a
  replicated expert's load goes to one copy: the coordinator's own when it holds one, else the first replica in
  site-name order. With ``"split"`` the load is split evenly over the copies (a coordinator that round-robins
  them); only then does a coordinator copy beside a remote one balance load rather than replace the remote one.
* Memory per site: the expert weights it holds, plus a working buffer (the largest MoE layer's worst case: every
  patch of the image routed to this site, fp32 input, output and hidden activations) when it holds any expert.
  The coordinator always holds the trunk weights and the buffer; with ``fallback: local`` it also holds every
  expert (its own copy of the whole model), so experts placed there cost no extra memory. 1 MB = 10^6 bytes.
* Background skipping (optional, ``evaluate_placement(offwire=...)``): a share of each expert's patches per layer
  stays off the wire, dropped or computed on the coordinator; :func:`moevit.partition.placement.skip_fractions`
  gives the shares of a rule at the layers :func:`moevit.offwire.skip_layers` allows (``--skip-layers``), the
  expectation of what the simulator's split-drop/local-background strategies draw per image.
* Only direct links to the coordinator are used. A placement that puts an expert on a site with no direct link to
  the coordinator is refused (the cost model does not route over several hops).

Objectives (lower is better): ``latency`` (seconds per image), ``energy`` (active joules per image over all sites:
compute + radio), ``bytes`` (payload bytes per image on all links, both ways, retransmissions not counted) and
``weighted``: ``w_latency * seconds + w_energy * joules + w_bytes * megabytes``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from moevit.deploy.config import ConfigError, integer, join, read_json
from moevit.deploy.files import atomic_write
from moevit.deploy.topology import Placement, Topology, TopologyError, parse_topology, validate_placement

__all__ = [
    "DEFAULT_WEIGHTS",
    "FLOPS_PER_MAC",
    "MB",
    "OBJECTIVES",
    "REPLICA_POLICIES",
    "SCENARIOS",
    "STATS_FORMAT",
    "Coactivation",
    "CostCoefficients",
    "ImageCost",
    "LayerStats",
    "LinkCost",
    "SiteCost",
    "Stats",
    "StatsError",
    "check_offwire",
    "coefficients",
    "evaluate_placement",
    "load_stats",
    "objective_value",
    "parse_stats",
    "parse_weights",
    "save_stats",
    "synthetic_stats",
    "synthetic_topology",
    "wire_bytes_for",
]

FLOPS_PER_MAC = 2
MB = 1_000_000
STATS_FORMAT = "moevit-stats/1"
OBJECTIVES = ("latency", "energy", "bytes", "weighted")
REPLICA_POLICIES = ("local-first", "split")
SCENARIOS = ("class", "mean")
# Weighted objective: per second, per joule, per megabyte. Per-image values of a MobileViTV2-0.5 on Pi-class
# boards are of the same order in these units (tens of ms, a fraction of a joule, a fraction of a MB).
DEFAULT_WEIGHTS: Mapping[str, float] = {"latency": 1.0, "energy": 1.0, "bytes": 1.0}
# Bytes per number in the worker's working buffer: it computes in fp32 whatever the wire format.
_BUFFER_ELEMENT_BYTES = 4
_MAX_STATS_BYTES = 64 << 20


# ============================================================================================ routing statistics


# The one error class of every config reader; the old name stays because users and tests catch it by name.
StatsError = ConfigError


def _need(d: Mapping[str, Any], key: str, source: str, where: str) -> Any:
    if not isinstance(d, Mapping):
        raise StatsError(source, where or "top level", f"expected a mapping, got {type(d).__name__}")
    if key not in d:
        raise StatsError(source, join(where, key), "missing")
    return d[key]


def _int(value: Any, source: str, where: str, minimum: int = 0) -> int:
    return integer(value, source, where, minimum)


def _array(value: Any, shape: tuple[int, ...], source: str, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise StatsError(source, where, f"expected numbers of shape {list(shape)}") from None
    if arr.shape != shape:
        raise StatsError(source, where, f"expected shape {list(shape)}, got {list(arr.shape)}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise StatsError(source, where, "expected finite numbers >= 0")
    return arr


@dataclass(frozen=True, eq=False)
class LayerStats:
    """One MoE layer as profiled. Loads are patches per image routed to each expert, every top-k slot counted.

    load_mean / load_p95: [E]; class_load: [C, E] mean per image of each class; affinity: [C, E] per-class mean of
    the router's softmax over experts. expert_weight_bytes: one expert's weights as stored (fp32);
    expert_macs_per_token: one expert on one pixel token (matrix products, as ``moevit.flops`` counts MACs).
    """

    layer: int
    dim: int
    num_experts: int
    expert_hidden: int
    grid: tuple[int, int]
    patches: int
    expert_params: int
    expert_weight_bytes: int
    expert_macs_per_token: int
    load_mean: np.ndarray
    load_p95: np.ndarray
    class_load: np.ndarray
    affinity: np.ndarray


@dataclass(frozen=True, eq=False)
class Coactivation:
    """Co-activation of the experts of two successive MoE layers ``a`` < ``b``, on layer b's patch grid.

    patches[i, j]: expected patches per image (on b's grid) whose layer-a routing, pooled spatially to b's grid,
    is expert i and whose layer-b routing is expert j (each top-k slot weighs 1/k). conditional: rows normalised
    (P(j at b | i at a)); rows of experts never used are zero.
    """

    from_layer: int
    to_layer: int
    patches: np.ndarray
    conditional: np.ndarray


@dataclass(frozen=True, eq=False)
class Stats:
    """A parsed ``stats.json``; build it with :func:`load_stats` or :func:`parse_stats`."""

    fingerprint: str
    arch: str
    image_size: int
    pixels_per_patch: int
    top_k: int
    classes: tuple[str, ...]
    class_images: np.ndarray
    images: int
    trunk_macs: int
    trunk_weight_bytes: int
    total_macs: int | None
    dense_macs: int | None
    layers: tuple[LayerStats, ...]
    coactivation: tuple[Coactivation, ...] = ()
    source: str = "<stats>"
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def moe_layers(self) -> dict[int, int]:
        """``layer -> num_experts``, as the topology's placement checks want it."""
        return {ls.layer: ls.num_experts for ls in self.layers}

    def layer(self, index: int) -> LayerStats:
        for ls in self.layers:
            if ls.layer == index:
                return ls
        raise KeyError(f"{self.source}: layer {index} is not an MoE layer (MoE layers: {list(self.moe_layers())})")

    @property
    def class_prior(self) -> np.ndarray:
        """Share of the profiled images in each class ([C], sums to 1)."""
        total = float(self.class_images.sum())
        if total <= 0:
            return np.full(len(self.classes), 1.0 / len(self.classes))
        return self.class_images / total

    @property
    def buffer_bytes(self) -> int:
        """A site's working buffer: the largest layer's worst case (all patches of an image routed there)."""
        return max(
            ls.patches * self.top_k * self.pixels_per_patch * (2 * ls.dim + ls.expert_hidden) * _BUFFER_ELEMENT_BYTES
            for ls in self.layers
        )

    @property
    def expert_bytes_total(self) -> int:
        """Every expert of every MoE layer, one copy each."""
        return sum(ls.num_experts * ls.expert_weight_bytes for ls in self.layers)


def parse_stats(data: Any, source: str = "<stats>") -> Stats:
    """Validate a parsed ``stats.json`` (a dict) into :class:`Stats`; StatsError names the key that is wrong."""
    if not isinstance(data, Mapping):
        raise StatsError(source, "", f"expected a JSON object, got {type(data).__name__}")
    fmt = data.get("format")
    if fmt != STATS_FORMAT:
        raise StatsError(source, "format", f"expected {STATS_FORMAT!r}, got {fmt!r} (write it with moe-profile)")
    fingerprint = _need(data, "fingerprint", source, "")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise StatsError(source, "fingerprint", f"expected a non-empty string, got {fingerprint!r}")
    arch = _need(data, "arch", source, "")
    classes = _need(data, "classes", source, "")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise StatsError(source, "classes", "expected a non-empty list of class names")
    n_cls = len(classes)
    class_images = _array(_need(data, "class_images", source, ""), (n_cls,), source, "class_images")
    top_k = _int(_need(data, "top_k", source, ""), source, "top_k", 1)
    ppp = _int(_need(data, "pixels_per_patch", source, ""), source, "pixels_per_patch", 1)
    total = data.get("total_macs")
    dense = data.get("dense_macs")
    raw_layers = _need(data, "layers", source, "")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise StatsError(source, "layers", "expected a non-empty list of MoE layers")
    layers: list[LayerStats] = []
    for i, d in enumerate(raw_layers):
        w = f"layers[{i}]"
        E = _int(_need(d, "num_experts", source, w), source, f"{w}.num_experts", 1)
        if top_k > E:
            raise StatsError(source, "top_k", f"{top_k} exceeds {w}.num_experts ({E})")
        grid = _need(d, "grid", source, w)
        if not (isinstance(grid, list) and len(grid) == 2):
            raise StatsError(source, f"{w}.grid", f"expected [rows, cols], got {grid!r}")
        grid_t = (_int(grid[0], source, f"{w}.grid[0]", 1), _int(grid[1], source, f"{w}.grid[1]", 1))
        patches = _int(_need(d, "patches", source, w), source, f"{w}.patches", 1)
        if patches != grid_t[0] * grid_t[1]:
            raise StatsError(source, f"{w}.patches", f"{patches} is not grid rows x cols ({grid_t[0]} x {grid_t[1]})")
        ppe = _need(d, "patches_per_expert", source, w)
        load_mean = _array(_need(ppe, "mean", source, f"{w}.patches_per_expert"), (E,), source,
                           f"{w}.patches_per_expert.mean")
        load_p95 = _array(_need(ppe, "p95", source, f"{w}.patches_per_expert"), (E,), source,
                          f"{w}.patches_per_expert.p95")
        expected = patches * top_k
        if not math.isclose(float(load_mean.sum()), expected, rel_tol=1e-6, abs_tol=1e-6):
            raise StatsError(source, f"{w}.patches_per_expert.mean", f"sums to {load_mean.sum():.6g}, expected "
                             f"patches x top_k = {expected}")
        layers.append(LayerStats(
            layer=_int(_need(d, "layer", source, w), source, f"{w}.layer"),
            dim=_int(_need(d, "dim", source, w), source, f"{w}.dim", 1),
            num_experts=E,
            expert_hidden=_int(_need(d, "expert_hidden", source, w), source, f"{w}.expert_hidden", 1),
            grid=grid_t,
            patches=patches,
            expert_params=_int(_need(d, "expert_params", source, w), source, f"{w}.expert_params", 1),
            expert_weight_bytes=_int(_need(d, "expert_weight_bytes", source, w), source,
                                     f"{w}.expert_weight_bytes", 1),
            expert_macs_per_token=_int(_need(d, "expert_macs_per_token", source, w), source,
                                       f"{w}.expert_macs_per_token", 1),
            load_mean=load_mean,
            load_p95=load_p95,
            class_load=_array(_need(d, "class_patches_per_expert", source, w), (n_cls, E), source,
                              f"{w}.class_patches_per_expert"),
            affinity=_array(_need(d, "affinity", source, w), (n_cls, E), source, f"{w}.affinity"),
        ))
    seen = [ls.layer for ls in layers]
    if len(set(seen)) != len(seen) or seen != sorted(seen):
        raise StatsError(source, "layers", f"layer indices must be distinct and ascending, got {seen}")
    coacts: list[Coactivation] = []
    by_layer = {ls.layer: ls for ls in layers}
    for i, d in enumerate(data.get("coactivation") or []):
        w = f"coactivation[{i}]"
        a = _int(_need(d, "from_layer", source, w), source, f"{w}.from_layer")
        b = _int(_need(d, "to_layer", source, w), source, f"{w}.to_layer")
        if a not in by_layer or b not in by_layer:
            raise StatsError(source, w, f"layers {a} -> {b} are not both MoE layers ({seen})")
        shape = (by_layer[a].num_experts, by_layer[b].num_experts)
        coacts.append(Coactivation(a, b, _array(_need(d, "patches", source, w), shape, source, f"{w}.patches"),
                                   _array(_need(d, "conditional", source, w), shape, source, f"{w}.conditional")))
    return Stats(
        fingerprint=fingerprint,
        arch=str(arch),
        image_size=_int(_need(data, "image_size", source, ""), source, "image_size", 1),
        pixels_per_patch=ppp,
        top_k=top_k,
        classes=tuple(classes),
        class_images=class_images,
        images=_int(_need(data, "images", source, ""), source, "images"),
        trunk_macs=_int(_need(data, "trunk_macs", source, ""), source, "trunk_macs"),
        trunk_weight_bytes=_int(_need(data, "trunk_weight_bytes", source, ""), source, "trunk_weight_bytes"),
        total_macs=None if total is None else _int(total, source, "total_macs"),
        dense_macs=None if dense is None else _int(dense, source, "dense_macs"),
        layers=tuple(layers),
        coactivation=tuple(coacts),
        source=source,
        raw=dict(data),
    )


def load_stats(path: str | os.PathLike[str]) -> Stats:
    """Read and validate ``stats.json``; every problem is a StatsError naming the file."""
    source = str(path)
    data = read_json(path, max_bytes=_MAX_STATS_BYTES, what="a stats file", missing_hint="write it with moe-profile")
    return parse_stats(data, source)


def save_stats(data: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Validate ``data`` (as :func:`parse_stats` does) and write it as JSON, atomically."""
    parse_stats(data, str(path))
    return atomic_write(path, json.dumps(data, indent=1) + "\n")


# mobilevitv2_050's transformer layers: dim, and the patch-grid side as a fraction of the input side.
_GEOMETRY_050 = {0: (64, 16), 1: (64, 16), 2: (96, 32), 3: (96, 32), 4: (96, 32), 5: (96, 32),
                 6: (128, 64), 7: (128, 64), 8: (128, 64)}


def synthetic_stats(
    *,
    layers: Sequence[int] = tuple(range(9)),
    num_experts: int = 16,
    expert_hidden: int = 64,
    num_classes: int = 4,
    image_size: int = 256,
    top_k: int = 1,
    concentration: float = 0.3,
    seed: int = 0,
    fingerprint: str = "synthetic",
) -> dict[str, Any]:
    """A plausible ``stats.json`` dict for a mobilevitv2_050 MoE without a model (benchmarks, tests, the simulator).

    Each class routes its patches by a seeded Dirichlet(``concentration``) over experts (small = class-specific
    experts, large = uniform); classes are equally frequent; co-activation assumes layers independent within a
    class. MAC and byte figures follow the architecture (trunk ≈ 0.48 GMAC at 256 px, timm's count).
    """
    rng = np.random.default_rng(seed)
    P = 4
    prior = np.full(num_classes, 1.0 / num_classes)
    out_layers: list[dict[str, Any]] = []
    frac: dict[int, np.ndarray] = {}
    expert_macs = 0
    for layer in layers:
        dim, div = _GEOMETRY_050[layer]
        side = max(1, math.ceil(image_size / div))
        patches = side * side
        share = rng.dirichlet(np.full(num_experts, concentration), size=num_classes)  # [C, E]
        frac[layer] = share
        class_load = share * patches * top_k
        mean = prior @ class_load
        params = 2 * dim * expert_hidden + expert_hidden + 4 * dim + 1
        macs_tok = 2 * dim * expert_hidden
        expert_macs += patches * top_k * P * macs_tok
        logits = np.log(share + 1e-3)
        affinity = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        out_layers.append({
            "layer": layer, "dim": dim, "num_experts": num_experts, "expert_hidden": expert_hidden,
            "grid": [side, side], "patches": patches, "expert_params": params, "expert_weight_bytes": 4 * params,
            "expert_macs_per_token": macs_tok,
            "patches_per_expert": {"mean": mean.tolist(), "p95": np.minimum(1.6 * class_load.max(0), patches).tolist(),
                                   "total": (mean * 100).tolist()},
            "class_patches_per_expert": class_load.tolist(),
            "affinity": affinity.tolist(),
        })
    coacts = []
    for a, b in zip(layers[:-1], layers[1:], strict=True):
        patches_b = out_layers[list(layers).index(b)]["patches"]
        counts = np.einsum("c,ci,cj->ij", prior, frac[a], frac[b]) * patches_b
        rows = counts.sum(axis=1, keepdims=True)
        cond = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
        coacts.append({"from_layer": a, "to_layer": b, "rule": "adaptive_avg_pool2d",
                       "patches": counts.tolist(), "conditional": cond.tolist()})
    trunk = int(4.8e8 * (image_size / 256) ** 2)
    return {
        "format": STATS_FORMAT,
        "fingerprint": fingerprint,
        "arch": "mobilevitv2_050",
        "source": "synthetic",
        "data": "synthetic", "split": "none",
        "image_size": image_size,
        "images": 100 * num_classes,
        "classes": [f"class{c}" for c in range(num_classes)],
        "class_images": [100] * num_classes,
        "pixels_per_patch": P,
        "top_k": top_k,
        "trunk_macs": trunk,
        "expert_macs": expert_macs,
        "total_macs": trunk + expert_macs,
        "dense_macs": None,
        "trunk_weight_bytes": 4_400_000,
        "layers": out_layers,
        "coactivation": coacts,
    }


def synthetic_topology(
    n_sites: int,
    stats: Stats,
    *,
    seed: int = 0,
    coordinator_share: float = 0.2,
    memory_slack: float = 1.5,
    coordinator_gflops: float = 4.0,
    gflops: tuple[float, float] = (2.0, 20.0),
    bandwidth_mbps: tuple[float, float] = (50.0, 1000.0),
    latency_ms: tuple[float, float] = (0.2, 3.0),
    loss: tuple[float, float] = (0.0, 0.02),
) -> Topology:
    """A seeded star topology for benchmarks and tests: coordinator ``cam`` with room for the trunk and a
    ``coordinator_share`` of the experts, ``n_sites - 1`` remote sites ``node001``... sharing ``memory_slack`` times
    the experts' bytes (each 0.5-1.5 of an even share), device and link figures drawn uniformly from the ranges."""
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    rng = np.random.default_rng(seed)
    need, buf = stats.expert_bytes_total, stats.buffer_bytes
    cam_mb = (stats.trunk_weight_bytes + buf + (coordinator_share if n_sites > 1 else 1.0) * need) / MB
    sites: dict[str, Any] = {"cam": {"address": "10.0.0.1:50050", "device": {
        "gflops": coordinator_gflops, "memory_mb": cam_mb * (1 + 1e-9), "active_w": 4.0, "idle_w": 1.5}}}
    links = []
    share = memory_slack * need / max(1, n_sites - 1)
    for i in range(1, n_sites):
        name = f"node{i:03d}"
        sites[name] = {"address": f"10.{i // 250}.{i % 250}.2:50051", "device": {
            "gflops": float(rng.uniform(*gflops)), "memory_mb": float((buf + share * rng.uniform(0.5, 1.5)) / MB),
            "active_w": float(rng.uniform(2.0, 6.0)), "idle_w": 0.5}}
        links.append({"between": ["cam", name], "bandwidth_mbps": float(rng.uniform(*bandwidth_mbps)),
                      "latency_ms": float(rng.uniform(*latency_ms)), "loss": float(rng.uniform(*loss))})
    return parse_topology({"coordinator": "cam", "sites": sites, "links": links}, f"<synthetic {n_sites} sites>")


# ============================================================================================ coefficients


@dataclass(frozen=True, eq=False)
class CostCoefficients:
    """Per-patch and per-contact costs of serving a layer's patches on each site; the linear core of the model.

    Arrays are indexed [layer position, site position] over ``layers`` (stats order) and ``sites`` (sorted names).
    ``inf`` marks a site with no direct link to the coordinator. Figures for a patch routed to a site:

    patch_send_s / patch_return_s: transfer time of its tokens (0 on the coordinator); patch_compute_s: expert
    compute; patch_time_s: their sum; contact_s: [S] latency both ways, paid once per layer when a site is
    contacted; patch_bytes: [L] payload one way; patch_energy_j: all energy it causes (compute at the site, radio
    at both ends); patch_radio_coord_j / patch_radio_site_j: the radio part at the coordinator / at the site.
    free_bytes: [S] memory left for expert weights (``inf`` on a coordinator that holds every expert anyway).
    """

    sites: tuple[str, ...]
    coordinator: int
    layers: tuple[int, ...]
    pixels_per_patch: int
    patch_send_s: np.ndarray
    patch_return_s: np.ndarray
    patch_compute_s: np.ndarray
    patch_time_s: np.ndarray
    contact_s: np.ndarray
    patch_bytes: np.ndarray
    patch_energy_j: np.ndarray
    patch_radio_coord_j: np.ndarray
    patch_radio_site_j: np.ndarray
    expert_bytes: np.ndarray
    buffer_bytes: int
    fixed_bytes: np.ndarray
    cap_bytes: np.ndarray
    free_bytes: np.ndarray
    reachable: np.ndarray
    trunk_s: float
    trunk_j: float
    coordinator_holds_all: bool


def wire_bytes_for(codec: str, stats: Stats) -> list[float]:
    """Per MoE layer of ``stats``: the nominal bytes per token number of the token codec ``codec`` (``fp16``,
    ``int8+zstd``, ...; before the zstd stage, whose gain must be measured). ValueError for an unknown codec."""
    from moevit_rpc.codecs import nominal_bytes_per_value, parse_codec

    c = parse_codec(codec)
    return [nominal_bytes_per_value(c, ls.dim) for ls in stats.layers]


def _per_layer(value: float | Sequence[float], layers: int, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    arr = np.full(layers, float(arr)) if arr.ndim == 0 else arr
    if arr.shape != (layers,) or not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"{name} must be a number >= 0 or one per MoE layer ({layers}), got {value!r}")
    return arr


def coefficients(topology: Topology, stats: Stats, *, wire_bytes: float | Sequence[float] = 2,
                 codec_s_per_value: float | Sequence[float] = 0.0) -> CostCoefficients:
    """The per-patch costs of ``stats``' layers on ``topology``'s sites (see :class:`CostCoefficients`).
    ``wire_bytes``: bytes per token number on the wire (one figure, or one per MoE layer); ``codec_s_per_value``:
    CPU seconds per token number of the codec's encode + decode both ways, charged to the remote site."""
    wire = _per_layer(wire_bytes, len(stats.layers), "wire_bytes")
    if (wire <= 0).any():
        raise ValueError(f"wire_bytes must be > 0, got {wire_bytes!r}")
    codec_s = _per_layer(codec_s_per_value, len(stats.layers), "codec_s_per_value")
    sites = tuple(sorted(topology.sites))
    c = sites.index(topology.coordinator)
    L, S = len(stats.layers), len(sites)
    P = stats.pixels_per_patch
    dims = np.array([ls.dim for ls in stats.layers], dtype=np.float64)
    macs = np.array([ls.expert_macs_per_token for ls in stats.layers], dtype=np.float64) * P  # per patch
    patch_bytes = P * dims * wire
    send = np.zeros((L, S))
    comp = np.zeros((L, S))
    contact = np.zeros(S)
    radio_c = np.zeros((L, S))
    radio_s = np.zeros((L, S))
    reachable = np.ones(S, dtype=bool)
    for j, name in enumerate(sites):
        dev = topology.sites[name].device
        comp[:, j] = macs * FLOPS_PER_MAC / (dev.gflops * 1e9)
        if j == c:
            continue
        comp[:, j] += P * dims * codec_s  # the codec's work for a patch that travels (both ends, both ways)
        link = topology.link_between(topology.coordinator, name)
        if link is None:
            reachable[j] = False
            send[:, j] = np.inf
            contact[j] = np.inf
            continue
        # Expected transmissions per bit 1/(1-loss); a duty-cycled radio sends a duty_cycle share of the time.
        bits_on_air = patch_bytes * 8 / (1.0 - link.loss)
        send[:, j] = bits_on_air / (link.bandwidth_mbps * 1e6 * link.duty_cycle)
        contact[j] = 2 * link.latency_ms / 1000.0
        # One way out (coordinator tx, site rx) and one way back (site tx, coordinator rx), same link figures.
        radio_c[:, j] = bits_on_air * (link.tx_nj_per_bit + link.rx_nj_per_bit) * 1e-9
        radio_s[:, j] = bits_on_air * (link.rx_nj_per_bit + link.tx_nj_per_bit) * 1e-9
    active = np.array([topology.sites[n].device.active_w for n in sites])
    energy = comp * active[None, :] + radio_c + radio_s
    coord_dev = topology.sites[topology.coordinator].device
    trunk_s = stats.trunk_macs * FLOPS_PER_MAC / (coord_dev.gflops * 1e9)
    cap = np.array([topology.sites[n].device.memory_mb * MB for n in sites])
    buffer = stats.buffer_bytes
    holds_all = topology.fallback == "local"
    fixed = np.zeros(S)
    fixed[c] = stats.trunk_weight_bytes + buffer + (stats.expert_bytes_total if holds_all else 0)
    free = cap - buffer
    free[c] = np.inf if holds_all else cap[c] - fixed[c]
    return CostCoefficients(
        sites=sites, coordinator=c, layers=tuple(ls.layer for ls in stats.layers), pixels_per_patch=P,
        patch_send_s=send, patch_return_s=send.copy(), patch_compute_s=comp, patch_time_s=2 * send + comp,
        contact_s=contact, patch_bytes=patch_bytes, patch_energy_j=energy, patch_radio_coord_j=radio_c,
        patch_radio_site_j=radio_s,
        expert_bytes=np.array([ls.expert_weight_bytes for ls in stats.layers], dtype=np.float64),
        buffer_bytes=buffer, fixed_bytes=fixed, cap_bytes=cap, free_bytes=free, reachable=reachable,
        trunk_s=trunk_s, trunk_j=trunk_s * coord_dev.active_w, coordinator_holds_all=holds_all,
    )


# ============================================================================================ results


@dataclass(frozen=True)
class SiteCost:
    """What one site does and spends per image (expectations).

    experts: expert copies it holds (all layers); memory_bytes / memory_cap_bytes / fits: weights + buffer (+ trunk
    on the coordinator) against its ``memory_mb``; patches / tokens: routed patches and pixel tokens it serves;
    bytes_in / bytes_out: payload received from / sent to the coordinator (0 on the coordinator: in-process);
    compute_s: expert compute (the coordinator's trunk is ``ImageCost.trunk_s``); compute_j: active energy of
    that compute (the coordinator's includes the trunk); radio_j: tx + rx energy at this site; idle_j: ``idle_w``
    while not computing within the image's latency; energy_j: compute_j + radio_j.
    """

    site: str
    experts: int
    memory_bytes: float
    memory_cap_bytes: float
    fits: bool
    patches: float
    tokens: float
    bytes_in: float
    bytes_out: float
    compute_s: float
    compute_j: float
    radio_j: float
    idle_j: float
    energy_j: float

    @property
    def memory_mb(self) -> float:
        return self.memory_bytes / MB


@dataclass(frozen=True)
class LinkCost:
    """The coordinator's link to one remote site, per image: payload each way and time on the link each way
    (transfer plus one latency per layer in which the site is contacted)."""

    site: str
    bytes_out: float
    bytes_back: float
    send_s: float
    return_s: float


@dataclass(frozen=True)
class ImageCost:
    """Cost of one image under a placement. latency_s: end to end (trunk + each MoE layer's slowest site,
    averaged over class scenarios unless ``scenarios="mean"``); latency_mean_load_s: the same from mean loads;
    layer_latency_s: each MoE layer's share; bytes: payload on all links, both ways; energy_j: active energy
    (compute + radio) over all sites; idle_j: idle energy over all sites; feasible: every site within memory."""

    latency_s: float
    latency_mean_load_s: float
    trunk_s: float
    layer_latency_s: Mapping[int, float]
    bytes: float
    energy_j: float
    idle_j: float
    sites: Mapping[str, SiteCost]
    links: Mapping[str, LinkCost]
    feasible: bool

    def objective(self, name: str, weights: Mapping[str, float] | None = None) -> float:
        return objective_value(self, name, weights)

    def memory_shortfall(self) -> list[str]:
        """``'site: needs X MB, has Y MB'`` for each site over its memory."""
        return [f"{s.site}: needs {s.memory_bytes / MB:.2f} MB, has {s.memory_cap_bytes / MB:.2f} MB"
                for s in self.sites.values() if not s.fits]


def parse_weights(text: str | Mapping[str, float] | None) -> dict[str, float]:
    """Weights of the ``weighted`` objective from ``"latency=1,energy=0.5,bytes=0"`` (unnamed ones keep
    :data:`DEFAULT_WEIGHTS`); ValueError names a bad entry."""
    out = dict(DEFAULT_WEIGHTS)
    if text is None:
        return out
    items = text.items() if isinstance(text, Mapping) else []
    if isinstance(text, str):
        parsed = []
        for part in (p.strip() for p in text.split(",") if p.strip()):
            key, eq, value = (s.strip() for s in part.partition("="))
            if not eq:
                raise ValueError(f"--weights: {part!r} is not name=value (e.g. latency=1,energy=0.5,bytes=0)")
            try:
                parsed.append((key, float(value)))
            except ValueError:
                raise ValueError(f"--weights: {key}={value!r} is not a number") from None
        items = parsed
    for key, value in items:
        if key not in DEFAULT_WEIGHTS:
            raise ValueError(f"--weights: unknown name {key!r}; expected some of {', '.join(DEFAULT_WEIGHTS)}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--weights: {key} must be a finite number >= 0, got {value}")
        out[key] = float(value)
    if not any(out.values()):
        raise ValueError("--weights: at least one weight must be above zero")
    return out


def objective_value(cost: ImageCost, name: str, weights: Mapping[str, float] | None = None) -> float:
    """The objective ``name`` (one of :data:`OBJECTIVES`) of ``cost``; lower is better."""
    if name == "latency":
        return cost.latency_s
    if name == "energy":
        return cost.energy_j
    if name == "bytes":
        return cost.bytes
    if name == "weighted":
        w = parse_weights(weights)
        return w["latency"] * cost.latency_s + w["energy"] * cost.energy_j + w["bytes"] * cost.bytes / MB
    raise ValueError(f"objective {name!r} is not one of {', '.join(OBJECTIVES)}")


# ============================================================================================ evaluation


def _shares(
    placement: Placement, stats: Stats, coef: CostCoefficients, topology: Topology, replica_policy: str
) -> list[np.ndarray]:
    """Per layer: [E, S] share of each expert's load served by each site."""
    index = {name: j for j, name in enumerate(coef.sites)}
    out: list[np.ndarray] = []
    for ls in stats.layers:
        F = np.zeros((ls.num_experts, len(coef.sites)))
        for e in range(ls.num_experts):
            replicas = placement.sites_for(ls.layer, e)
            for name in replicas:
                if not coef.reachable[index[name]]:
                    raise TopologyError(
                        topology.path, f"sites.{name}",
                        f"expert {e} of layer {ls.layer} is placed on {name!r}, which has no direct link to the "
                        f"coordinator {topology.coordinator!r}; the cost model only uses direct links")
            if replica_policy == "split" or len(replicas) == 1:
                for name in replicas:
                    F[e, index[name]] = 1.0 / len(replicas)
            else:  # local-first: replicas are sorted by site name
                chosen = topology.coordinator if topology.coordinator in replicas else replicas[0]
                F[e, index[chosen]] = 1.0
        out.append(F)
    return out


def check_offwire(stats: Stats, offwire: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``offwire`` as float arrays, one share [E] in [0, 1] per MoE layer of ``stats``; ValueError naming what is
    wrong otherwise."""
    if len(offwire) != len(stats.layers):
        raise ValueError(f"offwire needs one share per expert for each of the {len(stats.layers)} MoE layers, "
                         f"got {len(offwire)}")
    out = []
    for ls, f in zip(stats.layers, offwire, strict=True):
        f = np.asarray(f, dtype=np.float64)
        if f.shape != (ls.num_experts,) or not ((f >= 0) & (f <= 1)).all():
            raise ValueError(f"offwire at layer {ls.layer}: expected {ls.num_experts} shares in [0, 1], got {f!r}")
        out.append(f)
    return out


def _skip_shares(shares: list[np.ndarray], offwire: Sequence[np.ndarray], action: str, c: int) -> list[np.ndarray]:
    """``shares`` (per layer [E, S]) after a skip rule keeps ``offwire[l][e]`` (checked: :func:`check_offwire`) of
    each expert's patches off the wire: gone everywhere (``residual``), or a remote copy's share moved to the
    coordinator ``c`` (``local``)."""
    if action not in ("residual", "local"):
        raise ValueError(f"offwire_action must be residual or local, got {action!r}")
    out = []
    for F, f in zip(shares, offwire, strict=True):
        G = F * (1.0 - f)[:, None]
        if action == "local":
            G[:, c] = F[:, c] + f * (F.sum(axis=1) - F[:, c])
        out.append(G)
    return out


def evaluate_placement(
    topology: Topology,
    stats: Stats,
    placement: Placement,
    *,
    wire_bytes: float | Sequence[float] = 2,
    replica_policy: str = "local-first",
    scenarios: str = "class",
    coef: CostCoefficients | None = None,
    offwire: Sequence[np.ndarray] | None = None,
    offwire_action: str = "residual",
) -> ImageCost:
    """What one image costs under ``placement`` (see the module docstring for the model).

    ``offwire``: per MoE layer of ``stats``, the share [E] of each expert's patches a background-skip rule keeps off
    the wire (:func:`moevit.partition.placement.skip_fractions`, the expectation of what the simulator's
    split-drop/local-background draw); ``offwire_action`` ``residual``: those patches are dropped wherever their
    expert is (no bytes, no compute), ``local``: a remote expert's ones are computed on the coordinator instead.

    The placement must cover every expert of ``stats``' MoE layers, on sites of ``topology``
    (:func:`~moevit.deploy.topology.validate_placement`); a site without a direct link to the coordinator is refused.
    ``coef`` may pass precomputed :func:`coefficients` (same topology, stats and wire_bytes) to save time in loops.
    Memory overruns do not raise: they show as ``SiteCost.fits`` / ``ImageCost.feasible``.
    """
    if replica_policy not in REPLICA_POLICIES:
        raise ValueError(f"replica_policy must be one of {REPLICA_POLICIES}, got {replica_policy!r}")
    if scenarios not in SCENARIOS:
        raise ValueError(f"scenarios must be one of {SCENARIOS}, got {scenarios!r}")
    validate_placement(placement, topology, stats.moe_layers())
    if coef is None:
        coef = coefficients(topology, stats, wire_bytes=wire_bytes)
    shares = _shares(placement, stats, coef, topology, replica_policy)
    S, c = len(coef.sites), coef.coordinator
    if offwire is not None:
        shares = _skip_shares(shares, check_offwire(stats, offwire), offwire_action, c)
    prior = stats.class_prior
    patches = np.zeros(S)
    bytes_in = np.zeros(S)
    compute_s = np.zeros(S)
    radio_site = np.zeros(S)
    radio_coord = 0.0
    send_s = np.zeros(S)
    layer_lat: dict[int, float] = {}
    mean_lat = coef.trunk_s
    finite_contact = np.where(np.isfinite(coef.contact_s), coef.contact_s, 0.0)
    for li, ls in enumerate(stats.layers):
        F = shares[li]
        load_mean = ls.load_mean @ F  # [S]
        loaded = (ls.load_mean > 0)[:, None] & (F > 0)
        contacted = loaded.any(axis=0)
        contact = np.where(contacted, finite_contact, 0.0)
        pt = np.where(contacted | (load_mean > 0), coef.patch_time_s[li], 0.0)
        mean_lat += float(np.max(contact + load_mean * pt))
        if scenarios == "class":
            load_cls = ls.class_load @ F  # [C, S]
            per_class = np.max(contact[None, :] + load_cls * pt[None, :], axis=1)
            layer_lat[ls.layer] = float(prior @ per_class)
        else:
            layer_lat[ls.layer] = float(np.max(contact + load_mean * pt))
        patches += load_mean
        remote = np.arange(S) != c
        bytes_in += np.where(remote, load_mean * coef.patch_bytes[li], 0.0)
        compute_s += load_mean * coef.patch_compute_s[li]
        radio_site += load_mean * coef.patch_radio_site_j[li]
        radio_coord += float(load_mean @ coef.patch_radio_coord_j[li])
        send_s += np.where(remote & contacted, coef.contact_s / 2 + load_mean * np.nan_to_num(coef.patch_send_s[li]),
                           0.0)
    latency = coef.trunk_s + sum(layer_lat.values())
    radio_site[c] += radio_coord
    held: dict[str, float] = {}
    count: dict[str, int] = {}
    for (layer, _e), replicas in placement.assignment.items():
        w = float(stats.layer(layer).expert_weight_bytes)
        for name in replicas:
            held[name] = held.get(name, 0.0) + w
            count[name] = count.get(name, 0) + 1
    sites: dict[str, SiteCost] = {}
    links: dict[str, LinkCost] = {}
    total_energy = 0.0
    total_idle = 0.0
    for j, name in enumerate(coef.sites):
        dev = topology.sites[name].device
        if j == c:
            memory = coef.fixed_bytes[c] + (0.0 if coef.coordinator_holds_all else held.get(name, 0.0))
            busy = compute_s[j] + coef.trunk_s
            compute_j = busy * dev.active_w
        else:
            memory = held.get(name, 0.0) + (coef.buffer_bytes if count.get(name) else 0.0)
            busy = compute_s[j]
            compute_j = busy * dev.active_w
        idle_j = max(0.0, latency - busy) * dev.idle_w
        energy = compute_j + radio_site[j]
        total_energy += energy
        total_idle += idle_j
        sites[name] = SiteCost(
            site=name, experts=count.get(name, 0), memory_bytes=float(memory),
            memory_cap_bytes=float(coef.cap_bytes[j]),
            fits=bool(memory <= coef.cap_bytes[j] + 1e-6), patches=float(patches[j]),
            tokens=float(patches[j] * coef.pixels_per_patch), bytes_in=float(bytes_in[j]),
            bytes_out=float(bytes_in[j]), compute_s=float(compute_s[j]), compute_j=float(compute_j),
            radio_j=float(radio_site[j]), idle_j=float(idle_j), energy_j=float(energy),
        )
        if j != c and coef.reachable[j]:
            links[name] = LinkCost(site=name, bytes_out=float(bytes_in[j]), bytes_back=float(bytes_in[j]),
                                   send_s=float(send_s[j]), return_s=float(send_s[j]))
    return ImageCost(
        latency_s=float(latency),
        latency_mean_load_s=float(mean_lat),
        trunk_s=float(coef.trunk_s),
        layer_latency_s=layer_lat,
        bytes=float(2 * bytes_in.sum()),
        energy_j=float(total_energy),
        idle_j=float(total_idle),
        sites=sites,
        links=links,
        feasible=all(s.fits for s in sites.values()),
    )
