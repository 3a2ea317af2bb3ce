"""The discrete-event simulator: one :class:`~sim.config.Scenario` becomes one deterministic run.

Everything is driven by one event queue (a heap of ``(time, sequence, callback, args)``; equal times run in the
order they were scheduled), with explicit seeded random streams, so the same scenario and seed always give the same
result, bit for bit, on any machine.

What one image does (docs/sim.md has the formulas):

* it arrives at the camera site (periodic, Poisson or camera-trap bursts) and waits, FIFO, until the coordinator
  has a free slot (``concurrency``; the real coordinator works on one image at a time);
* the trunk runs on the coordinator's CPU (a FIFO server), split into the segments before, between and after the
  MoE layers;
* at each MoE layer the image's routed patches (sampled from ``stats.json``, or replayed from a trace) are grouped by
  the site holding their expert; the coordinator sends each remote site one RPC (payload + protocol overhead) over
  its link, all at once, and computes its own experts meanwhile; each link direction is a FIFO radio with
  bandwidth, one-way latency, per-packet loss with retransmission rounds, a duty-cycle off-time after every packet
  and outage windows; the worker's CPU is a FIFO server; the reply comes back the same way;
* replica failover, as the coordinator's health-aware dispatcher does it: a site is seen down ``detect_s`` after it
  dies until ``reconnect_s`` after it rejoins; while it is, the experts it would serve go to their next replica
  that is up (same result, not degraded), and those with none go straight to the fallback, without waiting for a
  deadline;
* a reply missing at the layer's deadline (a site that died with the work in flight, a link that is out) leaves no
  time for another replica: the fallback applies;
* the topology's ``fallback``, applied once the layer's other calls are back (as the coordinator does): ``fail`` ends
  the image, ``local`` computes those patches on the coordinator, ``skip`` goes on without them, ``nearest`` gives
  them to a substitute expert of the layer: on the coordinator when it holds any, else on the lowest-latency site
  that is up and holds any, else skipped (each of the last three marks the image degraded).

Per-patch compute times, bytes and the trunk time come from the one cost model (:func:`partition.costmodel.
coefficients`); the simulator adds what an expectation cannot show: queueing, bursts, loss as it happens,
duty-cycle waits, outages, energy over a deployment's idle time, and battery life.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from moevit.deploy.topology import Device, Link, Placement, Topology
from moevit.partition.costmodel import FLOPS_PER_MAC, MB, Stats, coefficients
from moevit.partition.placement import background_experts
from moevit.partition.policy import LinkEstimate, ModelFigures, PolicyState, choose, predict
from moevit.sim.config import Arrival, FailureSet, LinkStep, Scenario, Settings, figures_at
from moevit.sim.trace import Trace

__all__ = ["TRUNK_FRACTION_BEFORE", "Calibration", "ComputeModel", "EventQueue", "LinkResult", "Routing",
           "ScenarioResult", "SiteResult", "World", "arrival_times", "best_connected", "compute_model", "dense_macs",
           "run_scenario", "sample_routing"]

# Share of MobileViTV2's MACs (dense model, every width and input size alike: measured with torch's FlopCounterMode
# at 64 and 256 px on mobilevitv2_050) done before the MLP of each transformer layer. The stats give only the trunk's
# total, so this splits it into the segments before, between and after the MoE layers.
TRUNK_FRACTION_BEFORE = {0: 0.507, 1: 0.570, 2: 0.751, 3: 0.787, 4: 0.822, 5: 0.858, 6: 0.955, 7: 0.971, 8: 0.986}


# ============================================================================================ inputs


@dataclass(frozen=True)
class Calibration:
    """Compute speeds measured on the machine of an emulation run; when given they replace the topology's device
    figures at every site (the topology describes field hardware, the emulation runs on one laptop).

    trunk_gflops: the model without its experts, batch 1; expert_gflops: one expert on one image's tokens;
    how: how they were measured (free text for reports)."""

    trunk_gflops: float
    expert_gflops: float
    how: str = ""


@dataclass(frozen=True, eq=False)
class World:
    """What every scenario of a sweep shares (put once into Ray's object store): the topology variants by name,
    the placement of each, the routing statistics, and optionally a trace and a calibration."""

    topologies: Mapping[str, Topology]
    placements: Mapping[str, Placement]
    stats: Stats
    trace: Trace | None = None
    calibration: Calibration | None = None


@dataclass(frozen=True, eq=False)
class ComputeModel:
    """Seconds of compute, per image or per patch, on each site (sorted names), from the cost model.

    trunk_s: the trunk on the coordinator; patch_s: [L, S] one routed patch of layer l's experts on site s;
    local_moe_s / local_dense_s: the whole MoE / dense model on the coordinator; offload_s: [S] the whole MoE model
    on site s (offload-image); patch_bytes: [L] one patch's tokens one way on the wire."""

    sites: tuple[str, ...]
    coordinator: int
    trunk_s: float
    patch_s: np.ndarray
    patch_bytes: np.ndarray
    local_moe_s: float
    local_dense_s: float
    offload_s: np.ndarray
    dense_estimated: bool


def _with_gflops(topology: Topology, gflops: float) -> Topology:
    sites = {n: dataclasses.replace(s, device=dataclasses.replace(s.device, gflops=gflops))
             for n, s in topology.sites.items()}
    return dataclasses.replace(topology, sites=sites)


def dense_macs(stats: Stats) -> tuple[int, bool]:
    """MACs of the dense model per image: from the stats, or estimated (trunk + the dense MLPs the MoE layers
    replaced: MobileViTV2's MLP is dim -> 2 dim -> dim, 4 dim^2 MACs per pixel token). (macs, estimated)."""
    if stats.dense_macs is not None:
        return int(stats.dense_macs), False
    mlp = sum(ls.patches * stats.pixels_per_patch * 4 * ls.dim * ls.dim for ls in stats.layers)
    return int(stats.trunk_macs + mlp), True


def compute_model(topology: Topology, stats: Stats, *, wire_bytes: float | list[float] = 2,
                  calibration: Calibration | None = None, codec_s_per_value: float = 0.0) -> ComputeModel:
    """The compute figures of ``stats`` on ``topology``'s devices (or the calibrated speeds), via
    :func:`partition.costmodel.coefficients`."""
    if calibration is None:
        coef_t = coef_e = coefficients(topology, stats, wire_bytes=wire_bytes, codec_s_per_value=codec_s_per_value)
        gflops_t = np.array([topology.sites[n].device.gflops for n in coef_t.sites])
    else:
        coef_t = coefficients(_with_gflops(topology, calibration.trunk_gflops), stats, wire_bytes=wire_bytes)
        coef_e = coefficients(_with_gflops(topology, calibration.expert_gflops), stats, wire_bytes=wire_bytes,
                              codec_s_per_value=codec_s_per_value)
        gflops_t = np.full(len(coef_t.sites), calibration.trunk_gflops)
    c = coef_t.coordinator
    routed = np.array([ls.patches * stats.top_k for ls in stats.layers], dtype=np.float64)  # patches per layer
    experts_s = routed @ coef_e.patch_compute_s  # [S]: every routed patch of an image on site s
    trunk_site_s = stats.trunk_macs * FLOPS_PER_MAC / (gflops_t * 1e9)  # [S] the trunk on site s
    dmacs, estimated = dense_macs(stats)
    return ComputeModel(
        sites=coef_t.sites, coordinator=c, trunk_s=float(coef_t.trunk_s), patch_s=coef_e.patch_compute_s,
        patch_bytes=coef_e.patch_bytes, local_moe_s=float(coef_t.trunk_s + experts_s[c]),
        local_dense_s=float(dmacs * FLOPS_PER_MAC / (gflops_t[c] * 1e9)),
        offload_s=trunk_site_s + experts_s, dense_estimated=estimated)


def best_connected(topology: Topology) -> str | None:
    """The remote site the coordinator reaches best: highest effective throughput ``bandwidth x duty_cycle x
    (1 - loss)``, then lowest latency, then name. None when the coordinator has no links."""
    best = None
    for site in topology.remote_sites():
        link = topology.link_between(topology.coordinator, site.name)
        if link is None:
            continue
        key = (-link.bandwidth_mbps * link.duty_cycle * (1 - link.loss), link.latency_ms, site.name)
        if best is None or key < best[0]:
            best = (key, site.name)
    return None if best is None else best[1]


# ============================================================================================ workload


def arrival_times(arrival: Arrival, n: int, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (s) of ``n`` images, ascending, the first at or after 0."""
    if arrival.kind == "periodic":
        return np.arange(n, dtype=np.float64) / arrival.rate_hz
    if arrival.kind == "poisson":
        return np.cumsum(rng.exponential(1.0 / arrival.rate_hz, size=n))
    k = arrival.burst_size
    bursts = -(-n // k)
    idle = rng.exponential(arrival.idle_s, size=bursts)
    # A trigger fires an exponential idle time after the previous burst's last image.
    starts = np.cumsum(idle + np.r_[0.0, np.full(bursts - 1, (k - 1) * arrival.burst_gap_s)])
    t = (starts[:, None] + np.arange(k)[None, :] * arrival.burst_gap_s).reshape(-1)
    return t[:n]


@dataclass(frozen=True, eq=False)
class Routing:
    """Per image and MoE layer: patches per expert ``counts[l]`` [n, E] and of those the low-confidence ones
    ``low[l]`` [n, E] (background experts only); ``source`` says where they came from."""

    counts: tuple[np.ndarray, ...]
    low: tuple[np.ndarray, ...]
    background: tuple[np.ndarray, ...]  # per layer: bool [E]
    source: str


def sample_routing(stats: Stats, n: int, rng: np.random.Generator, *, trace: Trace | None = None,
                   low_confidence_share: float = 0.5) -> Routing:
    """Routing of ``n`` images: replayed from ``trace`` (in order, wrapping around) or sampled from the stats (a
    class by the profiled class frequencies, then each layer's patches multinomially over that class's mean
    per-expert shares). Low-confidence patches of background experts: the trace's counts when it has them, else a
    binomial ``low_confidence_share`` of the background expert's patches."""
    background = tuple(np.isin(np.arange(ls.num_experts), background_experts(stats, ls.layer))
                       for ls in stats.layers)
    counts: list[np.ndarray] = []
    low: list[np.ndarray] = []
    if trace is not None:
        idx = np.arange(n) % trace.images
        for li, ls in enumerate(stats.layers):
            counts.append(trace.patches[ls.layer][idx])
            if trace.low_confidence is not None:
                low.append(trace.low_confidence[ls.layer][idx] * background[li][None, :])
        source = f"trace {trace.source}"
        if trace.low_confidence is None:
            source += f" (low confidence: assumed share {low_confidence_share:g})"
            low = [rng.binomial(c, low_confidence_share) * bg[None, :] for c, bg in zip(counts, background,
                                                                                          strict=True)]
        else:
            source += f" (low confidence: top-1 < {trace.header.confidence_threshold:g}, recorded)"
    else:
        classes = rng.choice(len(stats.classes), size=n, p=stats.class_prior)
        for ls in stats.layers:
            shares = ls.class_load / np.maximum(ls.class_load.sum(axis=1, keepdims=True), 1e-300)
            empty = ls.class_load.sum(axis=1) <= 0  # a class never seen in profiling: use the mean load
            if empty.any():
                shares[empty] = ls.load_mean / ls.load_mean.sum()
            counts.append(rng.multinomial(ls.patches * stats.top_k, shares[classes]))
        low = [rng.binomial(c, low_confidence_share) * bg[None, :] for c, bg in zip(counts, background, strict=True)]
        source = f"stats {stats.source} (sampled; low confidence: assumed share {low_confidence_share:g})"
    return Routing(tuple(counts), tuple(low), background, source)


# ============================================================================================ engine


class EventQueue:
    """A heap of events ``(time, sequence, callback, args)``; equal times run in scheduling order."""

    __slots__ = ("_heap", "_seq", "now", "events")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self.now = 0.0
        self.events = 0

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        if t < self.now:  # guards the model's arithmetic: nothing may be scheduled in the past
            raise RuntimeError(f"event scheduled at {t} before now ({self.now})")
        heapq.heappush(self._heap, (t, self._seq, fn, args))
        self._seq += 1

    def run(self) -> None:
        heap = self._heap
        while heap:
            t, _, fn, args = heapq.heappop(heap)
            self.now = t
            self.events += 1
            fn(*args)


class _Windows:
    """Sorted, merged time intervals ``[start, end)`` (outages, downtime)."""

    __slots__ = ("spans",)

    def __init__(self, spans: Sequence[tuple[float, float]]) -> None:
        merged: list[list[float]] = []
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.spans = [(a, b) for a, b in merged]

    def contains(self, t: float) -> bool:
        return bool(self.spans) and any(a <= t < b for a, b in self.spans)

    def overlaps(self, t0: float, t1: float) -> bool:
        return bool(self.spans) and (any(a < t1 and t0 < b for a, b in self.spans) or self.contains(t0))

    def advance(self, t: float, work: float) -> float:
        """The time at which ``work`` seconds of activity started at ``t`` end, pausing inside the windows."""
        for a, b in self.spans:
            if b <= t:
                continue
            if t >= a:  # starts inside a window: wait for its end
                t = b
                continue
            if t + work <= a:
                break
            work -= a - t
            t = b
        return t + work

    def total(self, horizon: float) -> float:
        return sum(max(0.0, min(b, horizon) - a) for a, b in self.spans if a < horizon)


class _Cpu:
    """A FIFO server: work is served in the order it is requested (requests come in event-time order)."""

    __slots__ = ("free_at", "busy_s")

    def __init__(self) -> None:
        self.free_at = 0.0
        self.busy_s = 0.0

    def serve(self, now: float, seconds: float) -> float:
        start = now if now > self.free_at else self.free_at
        self.free_at = start + seconds
        self.busy_s += seconds
        return self.free_at


class _Channel:
    """One direction of a link: a FIFO radio.

    A message of n bytes is cut into packets of ``packet_bytes``; every packet occupies the radio for its airtime
    ``bits / bandwidth`` and then, on a duty-cycled link, keeps it silent for ``airtime x (1 / duty_cycle - 1)``
    (the regulatory off-time, so a saturated link carries ``duty_cycle x bandwidth``). Each packet is lost
    independently with probability ``loss``; lost packets go again in another round, which starts one round trip
    (2 x latency: the loss is noticed at the receiver and reported back) after the round before ends. The radio
    pauses during outage windows and resumes where it stopped. The last bit arrives ``latency`` after it leaves.
    """

    __slots__ = ("rate", "lat", "loss", "duty", "packet", "outages", "rng", "free_at", "airtime_s", "bits",
                 "payload", "schedule", "link", "tx_nj", "rx_nj", "tx_j", "rx_j", "last_tx_j", "last_rx_j")

    def __init__(self, link: Link, packet_bytes: int, outages: _Windows, rng: np.random.Generator) -> None:
        self.rate = link.bandwidth_mbps * 1e6
        self.lat = link.latency_ms / 1e3
        self.loss = link.loss
        self.duty = link.duty_cycle
        self.packet = packet_bytes
        self.outages = outages
        self.rng = rng
        self.free_at = 0.0
        self.airtime_s = 0.0
        self.bits = 0.0  # on air, retransmissions included
        self.payload = 0  # bytes handed to the link
        self.schedule: Sequence[LinkStep] = ()  # Settings.schedule_for(this link's site)
        self.link = link
        self.tx_nj, self.rx_nj = link.tx_nj_per_bit, link.rx_nj_per_bit
        self.tx_j = self.rx_j = 0.0  # radio energy at the sending / receiving end, retransmissions included
        self.last_tx_j = self.last_rx_j = 0.0  # of the last message sent

    def figures_at(self, t: float) -> tuple[float, float]:
        """(bit/s, one-way latency s) at time ``t`` under the link schedule."""
        step = figures_at(self.schedule, t)
        if step is None:
            return self.link.bandwidth_mbps * 1e6, self.link.latency_ms / 1e3
        return step.bandwidth_mbps * 1e6, step.latency_ms / 1e3

    def send(self, now: float, nbytes: int) -> float:
        """Queue a message at ``now``; returns when its last bit arrives at the far end."""
        self.payload += nbytes
        if self.schedule:
            at = now if now > self.free_at else self.free_at
            self.rate, self.lat = self.figures_at(at)
            step = figures_at(self.schedule, at)
            self.tx_nj = self.link.tx_nj_per_bit if step is None or step.tx_nj_per_bit is None else step.tx_nj_per_bit
            self.rx_nj = self.link.rx_nj_per_bit if step is None or step.rx_nj_per_bit is None else step.rx_nj_per_bit
        bits0 = self.bits
        full, rest = divmod(nbytes, self.packet)
        npk = full + (1 if rest else 0)
        off = 1.0 / self.duty - 1.0
        t = now if now > self.free_at else self.free_at
        tx = self.rng.geometric(1.0 - self.loss, size=npk).tolist() if self.loss > 0 and npk else None
        rounds = max(tx) if tx else 1
        if rounds == 1:
            tx = None
        last_bits = last_off = 0.0
        for r in range(1, rounds + 1):
            if tx is None:
                n_full, has_rest = full, rest > 0
            else:
                sent = [k >= r for k in tx]
                has_rest = bool(rest) and sent[-1]
                n_full = sum(sent) - (1 if has_rest else 0)
            last_bits = (rest if has_rest else self.packet) * 8.0 if (n_full or has_rest) else 0.0
            bits = n_full * self.packet * 8.0 + (rest * 8.0 if has_rest else 0.0)
            air = bits / self.rate
            # every packet but the round's last is followed by its off-time before the next one starts
            span = air * (1.0 + off) - last_bits / self.rate * off
            if r > 1:
                t = t + max(2.0 * self.lat, last_off)
            t = self.outages.advance(t, span) if self.outages.spans else t + span
            last_off = last_bits / self.rate * off
            self.airtime_s += air
            self.bits += bits
        self.free_at = t + last_off
        sent = self.bits - bits0
        self.last_tx_j, self.last_rx_j = sent * self.tx_nj * 1e-9, sent * self.rx_nj * 1e-9
        self.tx_j += self.last_tx_j
        self.rx_j += self.last_rx_j
        return t + self.lat


# ============================================================================================ results


@dataclass(frozen=True)
class SiteResult:
    """One site over the whole scenario. compute_j: active_w x busy time; radio_j: tx + rx energy of its links;
    idle_j: idle_w x the time it was neither busy nor down; energy_j: their sum; *_per_image: divided by the images
    that arrived; avg_power_w: energy_j / horizon; lifetime_h: battery (state of charge x battery_wh) / avg power,
    None on mains; soc_end: state of charge at the end of the run."""

    site: str
    busy_s: float
    down_s: float
    compute_j: float
    radio_j: float
    idle_j: float
    energy_j: float
    active_j_per_image: float
    energy_j_per_image: float
    avg_power_w: float
    battery_wh: float | None
    lifetime_h: float | None
    soc_end: float | None
    utilisation: float


@dataclass(frozen=True)
class LinkResult:
    """The coordinator's link to ``site``: bytes handed to it each way (payload + protocol overhead, per image too),
    bits actually on air (retransmissions included) and the share of time each direction's radio was busy."""

    site: str
    bytes_up: int
    bytes_down: int
    bytes_per_image: float
    bits_on_air: float
    utilisation_up: float
    utilisation_down: float


@dataclass
class ScenarioResult:
    """What one scenario measured. Latencies are of completed images (ok or degraded), arrival to result."""

    params: dict[str, Any]
    horizon_s: float = 0.0
    arrived: int = 0
    ok: int = 0
    degraded: int = 0
    failed: int = 0
    latency_mean_s: float = math.nan
    latency_p50_s: float = math.nan
    latency_p95_s: float = math.nan
    latency_p99_s: float = math.nan
    latency_max_s: float = math.nan
    wait_mean_s: float = math.nan
    service_mean_s: float = math.nan
    throughput_hz: float = 0.0
    bytes_per_image: float = 0.0
    patches_sent_per_image: float = 0.0
    patches_dropped_per_image: float = 0.0
    patches_kept_local_per_image: float = 0.0
    offload_site: str | None = None
    routing_source: str = ""
    events: int = 0
    wall_s: float = 0.0
    sites: dict[str, SiteResult] = field(default_factory=dict)
    links: dict[str, LinkResult] = field(default_factory=dict)
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    error: str | None = None
    strategy_images: dict[str, int] = field(default_factory=dict)  # adaptive: images per strategy chosen
    arrivals_s: list[float] = field(default_factory=list)  # arrival of each completed image, as latencies_s
    image_strategies: list[str] = field(default_factory=list)  # adaptive: each completed image's strategy
    # active energy (compute + radio) of each completed image, as latencies_s: the coordinator's site, all sites
    image_camera_j: list[float] = field(default_factory=list)
    image_energy_j: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """A flat row for the CSV: parameters, figures, and per-site / per-link columns ``name:site``."""
        out = dict(self.params)
        for k in ("horizon_s", "arrived", "ok", "degraded", "failed", "latency_mean_s", "latency_p50_s",
                  "latency_p95_s", "latency_p99_s", "latency_max_s", "wait_mean_s", "service_mean_s",
                  "throughput_hz", "bytes_per_image", "patches_sent_per_image", "patches_dropped_per_image",
                  "patches_kept_local_per_image", "offload_site", "events", "wall_s", "error"):
            out[k] = getattr(self, k)
        for s in self.sites.values():
            out[f"energy_j_per_image:{s.site}"] = s.energy_j_per_image
            out[f"active_j_per_image:{s.site}"] = s.active_j_per_image
            out[f"avg_power_w:{s.site}"] = s.avg_power_w
            out[f"lifetime_h:{s.site}"] = s.lifetime_h
            out[f"utilisation:{s.site}"] = s.utilisation
        for lk in self.links.values():
            out[f"bytes_per_image:{lk.site}"] = lk.bytes_per_image
            out[f"link_utilisation_up:{lk.site}"] = lk.utilisation_up
        return out

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ============================================================================================ the scenario


class _Image:
    __slots__ = ("i", "arrival", "start", "finish", "pending", "degraded", "failed", "reason", "deadline", "deferred",
                 "strategy", "camera_j", "energy_j", "waited")

    def __init__(self, i: int, arrival: float) -> None:
        self.i, self.arrival = i, arrival
        self.start = self.finish = math.nan
        self.pending = 0
        self.degraded = self.failed = False
        self.reason = ""
        self.deadline = math.inf  # the current MoE layer's deadline
        # the current layer's patches no replica served: (site, patches, why), given to the fallback once the
        # layer's other parts are done
        self.deferred: list[tuple[int, float, str]] = []
        self.strategy = ""  # adaptive: what the policy chose for this image
        self.camera_j = 0.0  # active energy (compute + radio) this image cost the coordinator's site
        self.energy_j = 0.0  # ... and every site together
        self.waited = False  # Settings.load_delay_s drawn for it already


class _Rpc:
    __slots__ = ("img", "li", "site", "compute_s", "bytes_back", "closed", "local_s", "nbytes", "patches", "retry")

    def __init__(self, img: _Image, li: int, site: int, compute_s: float, bytes_back: int, local_s: float,
                 nbytes: int, patches: float, retry: bool) -> None:
        self.img, self.li, self.site, self.compute_s, self.bytes_back = img, li, site, compute_s, bytes_back
        self.local_s = local_s  # what the coordinator would spend computing the same patches (fallback local)
        self.nbytes, self.patches = nbytes, patches  # request payload, patches (for a fallback)
        self.retry = retry  # already a fallback's call (nearest's substitute): a miss gets no further fallback
        self.closed = False


class _Run:
    """The state of one scenario run; the callbacks are the model's event handlers."""

    def __init__(self, world: World, sc: Scenario) -> None:
        self.sc = sc
        st: Settings = sc.settings
        self.st = st
        base = world.topologies[sc.topology]
        self.topology = topo = sc.condition.apply(base)
        self.stats = stats = world.stats
        self.calibration = world.calibration
        self.cm = cm = compute_model(topo, stats, wire_bytes=st.wire_bytes(stats), calibration=world.calibration,
                                      codec_s_per_value=st.codec_s_per_value)
        self.sites = cm.sites
        self.c = cm.coordinator
        self.fallback = topo.fallback
        S = len(self.sites)
        index = {n: j for j, n in enumerate(self.sites)}
        self.q = EventQueue()
        # Separate seeded streams, so every strategy of a seed sees the same images arriving with the same routing.
        rng_arr = np.random.default_rng([sc.seed, 1])
        rng_route = np.random.default_rng([sc.seed, 2])
        self.arrivals = arrival_times(sc.arrival, sc.images, rng_arr)
        self.jitter_rng = np.random.default_rng([sc.seed, 4])
        self.adaptive = sc.strategy == "adaptive"  # per image, moevit.partition.policy, as moe-coordinator does
        self.split = sc.strategy.startswith("split") or self.adaptive
        self.routing = None
        if self.split:
            self.routing = sample_routing(stats, sc.images, rng_route, trace=world.trace,
                                          low_confidence_share=st.low_confidence_share)
        failures: FailureSet = sc.failures
        self.down = [_Windows([(d.start_s, math.inf if d.end_s is None else d.end_s)
                               for d in failures.site_downs if d.site == n]) for n in self.sites]
        # A site that rejoins is reachable only once the coordinator's channel has reconnected.
        self.unreachable = [_Windows([(d.start_s, math.inf if d.end_s is None else d.end_s + st.reconnect_s)
                                      for d in failures.site_downs if d.site == n]) for n in self.sites]
        # What the coordinator's health watch says: a site is seen down detect_s after it dies, and up again once
        # its channel has reconnected after it rejoins (coordinator.health); while it is seen down nothing is sent
        # there.
        seen = [[(d.start_s + st.detect_s, math.inf if d.end_s is None else d.end_s + st.reconnect_s)
                 for d in failures.site_downs if d.site == n] for n in self.sites]
        self.seen_down = [_Windows([(a, b) for a, b in w if a < b]) for w in seen]
        self.watched = any(w.spans for j, w in enumerate(self.seen_down) if j != self.c)
        self.cpus = [_Cpu() for _ in range(S)]
        self.dev_active_w = [topo.sites[n].device.active_w for n in self.sites]
        self.up: list[_Channel | None] = [None] * S
        self.dn: list[_Channel | None] = [None] * S
        self.links: list[Link | None] = [None] * S
        for j, name in enumerate(self.sites):
            if j == self.c:
                continue
            link = topo.link_between(topo.coordinator, name)
            if link is None:
                continue
            self.links[j] = link
            outages = _Windows([(o.start_s, o.end_s) for o in failures.link_outages if o.site == name])
            pk = sc.condition.packet_bytes if (sc.condition.packet_bytes and sc.condition.applies_to(topo, name)) \
                else st.packet_bytes
            self.up[j] = _Channel(link, pk, outages, np.random.default_rng([sc.seed, 3, j, 0]))
            self.dn[j] = _Channel(link, pk, outages, np.random.default_rng([sc.seed, 3, j, 1]))
            self.up[j].schedule = self.dn[j].schedule = st.schedule_for(name)
        # Where each expert's patches go: the coordinator's own copy when it has one, else the first replica (what
        # coordinator.runtime.SplitRuntime does).
        placement = world.placements[sc.topology]
        self.site_of: list[np.ndarray] = []
        self.replicas: list[list[tuple[int, ...]]] = []
        for ls in stats.layers:
            reps = [placement.sites_for(ls.layer, e) for e in range(ls.num_experts)]
            self.site_of.append(np.array([self.c if topo.coordinator in r else index[r[0]] for r in reps]))
            self.replicas.append([tuple(index[n] for n in r) for r in reps])
        for li, so in enumerate(self.site_of):
            for e, j in enumerate(so):
                if j != self.c and self.links[j] is None:
                    raise ValueError(f"expert {e} of layer {stats.layers[li].layer} is on {self.sites[j]!r}, which has "
                                     f"no direct link to the coordinator {topo.coordinator!r}")
        # Per layer: the experts each site serves first; whether the coordinator holds any expert (fallback
        # nearest substitutes there first); the remote sites holding any, by link latency (then bandwidth, name).
        self.experts_at = [[[e for e, s in enumerate(so) if s == j] for j in range(S)] for so in self.site_of]
        self.coord_holds = [any(self.c in r for r in reps) for reps in self.replicas]
        self.holders_any = []
        for reps in self.replicas:
            held = {j for r in reps for j in r if j != self.c and self.links[j] is not None}
            self.holders_any.append(sorted(held, key=lambda j: (self.links[j].latency_ms, -self.links[j].bandwidth_mbps,
                                                                self.sites[j])))
        layers = [ls.layer for ls in stats.layers]
        cuts = [TRUNK_FRACTION_BEFORE.get(layer, (layer + 1) / 10) for layer in layers]
        self.segments = np.diff([0.0, *cuts, 1.0]) * cm.trunk_s  # before layer 0, between, after the last
        self.offload_site = None
        if sc.strategy in ("offload-image", "adaptive"):
            best = best_connected(topo)
            if best is None and not self.adaptive:
                raise ValueError(f"{topo.path}: offload-image needs a remote site linked to the coordinator")
            self.offload_site = None if best is None else index[best]
        self.misfit = strategy_misfit(topo, stats, sc.strategy, None if self.offload_site is None
                                      else self.sites[self.offload_site])
        # A quality-90 JPEG of a natural scene is about an eighth of its raw RGB bytes.
        self.image_bytes = st.image_bytes if st.image_bytes is not None else stats.image_size ** 2 * 3 // 8
        self.images: list[_Image] = []
        self.waiting: list[_Image] = []
        self.wait_head = 0
        self.free_slots = st.concurrency
        self.sent_patches = 0
        self.dropped_patches = 0
        self.kept_local = 0
        if self.split:
            self._plan_layers()
        if self.adaptive:
            self._policy_setup(placement)

    # -- arrivals and slots ---------------------------------------------------------------------------------------
    def run(self) -> None:
        q = self.q
        for i, t in enumerate(self.arrivals):
            q.at(float(t), self._arrive, i)
        for d in self.sc.failures.site_downs:
            if d.site == self.topology.coordinator:
                q.at(d.start_s, self._camera_down, d.end_s if d.end_s is not None else math.inf)
        q.run()

    def _arrive(self, i: int) -> None:
        img = _Image(i, self.q.now)
        self.images.append(img)
        if self.down[self.c].contains(self.q.now):
            self._fail(img, "camera site down")
            return
        self.waiting.append(img)
        self._next()

    def _next(self) -> None:
        while self.free_slots > 0 and self.wait_head < len(self.waiting):
            img = self.waiting[self.wait_head]
            self.wait_head += 1
            if img.failed:
                continue
            self.free_slots -= 1
            img.start = self.q.now
            self._begin(img)

    def _release(self, img: _Image) -> None:
        if not math.isnan(img.start):
            self.free_slots += 1
            self._next()

    def _camera_down(self, until: float) -> None:
        cpu = self.cpus[self.c]
        cpu.free_at = max(cpu.free_at, until)
        for img in self.images:
            if not img.failed and math.isnan(img.finish):
                self._fail(img, "camera site down")

    def _fail(self, img: _Image, reason: str) -> None:
        if img.failed or not math.isnan(img.finish):
            return
        img.failed = True
        img.reason = reason
        img.finish = self.q.now
        self._release(img)

    def _finish(self, img: _Image) -> None:
        if img.failed:
            return
        img.finish = self.q.now
        self._release(img)

    # -- strategies -----------------------------------------------------------------------------------------------
    def _policy_setup(self, placement: Placement) -> None:
        """adaptive: the policy's inputs. Routing and FLOPs per routed patch (the unit of the simulator's routing),
        the whole model's memory, the image and answer bytes; the links' figures as the topology gives them (the
        simulator knows them exactly) and up unless the health watch sees the site down."""
        stats, P = self.stats, self.stats.pixels_per_patch
        self.pol_routing = {(ls.layer, e): float(ls.load_mean[e]) for ls in stats.layers
                            for e in range(ls.num_experts)}
        expert = {ls.layer: float(FLOPS_PER_MAC * P * ls.expert_macs_per_token) for ls in stats.layers}
        routed = sum(n * expert[layer] for (layer, _), n in self.pol_routing.items())
        self.pol_figures = ModelFigures(
            trunk_flops=float(FLOPS_PER_MAC * stats.trunk_macs) + routed,  # predict() takes the whole model's
            expert_flops_per_token=expert,
            token_bytes={ls.layer: float(b) for ls, b in zip(stats.layers, self.cm.patch_bytes, strict=True)},
            model_mb=(stats.trunk_weight_bytes + stats.expert_bytes_total + stats.buffer_bytes) / (1 << 20),
            image_bytes=float(self.image_bytes), answer_bytes=float(self.st.result_bytes))
        self.pol_figures = dataclasses.replace(self.pol_figures, trunk_flops=self.pol_figures.trunk_flops - routed)
        self.pol_placement = placement
        self.pol_state = PolicyState()
        # the speeds the simulator computes at (a calibration replaces the topology's), as the coordinator measures
        # them: its own from the trunk, a worker's from its experts, the offload site's from the whole model
        self.pol_topology = self.topology
        if self.calibration is not None:
            whole = self.pol_figures.trunk_flops + routed
            speed = {n: (self.calibration.trunk_gflops if j == self.c else
                         whole / self.cm.offload_s[j] / 1e9 if j == self.offload_site else
                         self.calibration.expert_gflops) for j, n in enumerate(self.sites)}
            self.pol_topology = dataclasses.replace(self.topology, sites={
                n: dataclasses.replace(s, device=dataclasses.replace(s.device, gflops=speed[n]))
                for n, s in self.topology.sites.items()})
        self.strategy_images: dict[str, int] = {}

    def _decide(self) -> str:
        now, topo = self.q.now, self.topology
        links = {}
        for j, name in enumerate(self.sites):
            link = self.links[j]
            if j != self.c and link is not None:
                step = figures_at(self.st.schedule_for(name), now)
                if step is not None:  # the figures of the moment (the simulator knows them exactly)
                    link = dataclasses.replace(
                        link, bandwidth_mbps=step.bandwidth_mbps, latency_ms=step.latency_ms,
                        tx_nj_per_bit=link.tx_nj_per_bit if step.tx_nj_per_bit is None else step.tx_nj_per_bit,
                        rx_nj_per_bit=link.rx_nj_per_bit if step.rx_nj_per_bit is None else step.rx_nj_per_bit)
                links[name] = dataclasses.replace(LinkEstimate.from_link(link), up=not self.seen_down[j].contains(now))
        costs = predict(self.pol_topology, self.pol_placement, self.pol_routing, links, self.pol_figures,
                        offload_site=None if self.offload_site is None else self.sites[self.offload_site])
        opts = topo.adaptive
        d = choose(costs, opts.objective, self.pol_state, margin=opts.margin, consecutive=opts.consecutive)
        self.pol_state = d.state
        self.strategy_images[d.strategy] = self.strategy_images.get(d.strategy, 0) + 1
        return "local-moe" if d.strategy == "local" else d.strategy

    def _begin(self, img: _Image) -> None:
        now, cm, strategy = self.q.now, self.cm, self.sc.strategy
        if self.st.load_delay_s and not img.waited:
            img.waited = True
            d = float(self.jitter_rng.choice(self.st.load_delay_s))
            if d > 0:  # Settings.load_delay_s: the coordinator's process waits for a core first
                self.q.at(now + d, self._begin, img)
                return
        if self.adaptive:
            strategy = img.strategy = self._decide()
        if strategy == "local-dense":
            self.q.at(self._serve(img, self.c, now, cm.local_dense_s), self._finish, img)
        elif strategy == "local-moe":
            self.q.at(self._serve(img, self.c, now, cm.local_moe_s), self._finish, img)
        elif strategy == "offload-image":
            j = self.offload_site
            img.pending = 1
            self._send(img, -1, j, self.image_bytes, float(cm.offload_s[j]) + self.st.offload_overhead_s,
                       self.st.result_bytes, cm.local_moe_s)
        else:
            self.q.at(self._serve(img, self.c, now, float(self.segments[0])), self._layer, img, 0)

    def _plan_layers(self) -> None:
        """Patches per site for every image and MoE layer, after the strategy's treatment of weak background
        patches (only at the layers of ``settings.skip_layers``); computed once, vectorised (the event handlers then
        only read Python lists)."""
        assert self.routing is not None
        S = len(self.sites)
        self.per_site: list[list[list[float]]] = []
        self.counts: list[np.ndarray] = []  # per layer [n, E]: patches per expert that leave the coordinator's hands
        from moevit.offwire import skip_layers

        # the coordinator's --skip-layers rule: only these layers' weak background patches stay off the wire
        skipping = skip_layers(self.st.skip_layers, self.stats.moe_layers())
        for li, site_of in enumerate(self.site_of):
            counts = self.routing.counts[li].astype(np.float64)
            onehot = np.zeros((len(site_of), S))
            onehot[np.arange(len(site_of)), site_of] = 1.0
            local_extra = np.zeros(len(counts))
            strategy = self.sc.strategy if self.stats.layers[li].layer in skipping else "split"
            if strategy == "split-drop-background":
                low = self.routing.low[li]
                counts = counts - low  # dropped wherever their expert is: no bytes, no compute
                self.dropped_patches += int(low.sum())
            elif strategy == "split-local-background":
                moved = self.routing.low[li] * (site_of != self.c)[None, :]  # remote experts' weak patches stay home
                counts = counts - moved
                local_extra = moved.sum(axis=1)
                self.kept_local += int(local_extra.sum())
            per_site = counts @ onehot
            per_site[:, self.c] += local_extra
            self.counts.append(counts)
            self.per_site.append(per_site.tolist())
        self.patch_s = self.cm.patch_s.tolist()
        self.patch_bytes = self.cm.patch_bytes.tolist()

    def _layer(self, img: _Image, li: int) -> None:
        if img.failed:
            return
        now, c = self.q.now, self.c
        patch_s = self.patch_s[li]
        pb = self.patch_bytes[li]
        img.deadline = now + self.st.deadline_s
        row = self._failover(img, li, now) if self.watched else self.per_site[li][img.i]
        img.pending = 0
        for j, n in enumerate(row):
            if n <= 0:
                continue
            img.pending += 1
            compute = n * patch_s[j]
            if j == c:
                self.q.at(self._serve(img, j, now, compute), self._part_done, img, li)
            else:
                nbytes = int(round(n * pb))
                self.sent_patches += int(n)
                self._send(img, li, j, nbytes, compute, nbytes, n * patch_s[c], n)
        if img.pending == 0:
            img.pending = 1
            self._part_done(img, li)

    def _failover(self, img: _Image, li: int, now: float) -> list[float]:
        """Patches per site of layer ``li`` for ``img`` as the coordinator's dispatcher routes them at ``now``: the
        experts of a site its health watch sees down go to their next replica that is up (placement order, only
        sites with a link to the coordinator), all of one site's in one RPC; patches of experts with no such
        replica are queued in ``img.deferred`` for the fallback."""
        row = self.per_site[li][img.i]
        seen = self.seen_down
        down = [j for j, n in enumerate(row) if n > 0 and j != self.c and seen[j].contains(now)]
        if not down:
            return row
        row = list(row)
        counts = self.counts[li][img.i]
        for j in down:
            row[j] = 0.0
            lost = 0.0
            for e in self.experts_at[li][j]:
                n = float(counts[e])
                if n <= 0:
                    continue
                alt = next((k for k in self.replicas[li][e]
                            if k != j and self.links[k] is not None and not seen[k].contains(now)), None)
                if alt is None:
                    lost += n
                else:
                    row[alt] += n
            if lost > 0:
                img.deferred.append((j, lost, f"{self.sites[j]} down, no replica up"))
        return row

    def _send(self, img: _Image, li: int, j: int, nbytes: int, compute_s: float, bytes_back: int,
              local_s: float, patches: float = 0.0, retry: bool = False, deadline: float | None = None) -> None:
        now = self.q.now
        ov = self.st.rpc_overhead_bytes
        rpc = _Rpc(img, li, j, compute_s + self.st.rpc_overhead_s, bytes_back + ov, local_s, nbytes, patches, retry)
        up = self.up[j]
        arrive = up.send(now, nbytes + ov)
        self._radio(img, up.last_tx_j, up.last_rx_j)
        self.q.at(arrive, self._at_site, rpc)
        self.q.at(now + self.st.deadline_s if deadline is None else deadline, self._timeout, rpc)

    def _serve(self, img: _Image, j: int, now: float, seconds: float) -> float:
        """Site ``j``'s CPU takes ``seconds`` of ``img``'s work from ``now`` (after its queue); returns when done."""
        e = seconds * self.dev_active_w[j]
        img.energy_j += e
        if j == self.c:
            img.camera_j += e
        return self.cpus[j].serve(now, seconds)

    def _radio(self, img: _Image, camera_j: float, site_j: float) -> None:
        img.camera_j += camera_j
        img.energy_j += camera_j + site_j

    def _at_site(self, rpc: _Rpc) -> None:
        now, j = self.q.now, rpc.site
        if self.unreachable[j].contains(now):
            return  # lost: the site is off (or not yet reconnected); the deadline will notice
        end = self._serve(rpc.img, j, now, rpc.compute_s)
        if self.down[j].overlaps(now, end):
            return  # the site died while the work was queued or running
        self.q.at(end, self._site_reply, rpc)

    def _site_reply(self, rpc: _Rpc) -> None:
        dn = self.dn[rpc.site]
        arrive = dn.send(self.q.now, rpc.bytes_back)
        self._radio(rpc.img, dn.last_rx_j, dn.last_tx_j)
        self.q.at(arrive, self._reply, rpc)

    def _reply(self, rpc: _Rpc) -> None:
        if rpc.closed:
            return
        rpc.closed = True
        self._part_done(rpc.img, rpc.li)

    def _timeout(self, rpc: _Rpc) -> None:
        if rpc.closed:
            return
        rpc.closed = True
        img = rpc.img
        if img.failed:
            return
        if rpc.li < 0:
            self._offload_timeout(rpc)
            return
        if rpc.retry:  # nearest's substitute missed too: the residual carries those patches (the coordinator's zeros)
            img.degraded = True
        else:  # the layer's deadline is spent: no other replica is tried, the fallback takes these patches
            img.deferred.append((rpc.site, rpc.patches, f"{self.sites[rpc.site]} no reply within "
                                                        f"{self.st.deadline_s:g} s"))
        self._part_done(img, rpc.li)

    def _fallback(self, img: _Image, li: int, j: int, patches: float, why: str) -> None:
        """The topology's fallback for ``patches`` of layer ``li`` that site ``j``'s experts did not serve; run
        once the layer's other parts are done (the coordinator falls back after its calls are back)."""
        fb, now, c = self.fallback, self.q.now, self.c
        if fb == "fail":
            self._fail(img, f"{why} (fallback {fb})")
            return
        img.degraded = True
        where = c if fb == "local" else self._substitute(li, j, now) if fb == "nearest" else None
        if where is None:  # skip, or no substitute: the residual carries them
            return
        img.pending += 1
        compute = patches * self.patch_s[li][where]
        if where == c:
            self.q.at(self._serve(img, c, now, compute), self._part_done, img, li)
        else:  # what is left of the layer's deadline, but at least a quarter of it (the coordinator's rule)
            nbytes = int(round(patches * self.patch_bytes[li]))
            self.sent_patches += int(patches)
            self._send(img, li, where, nbytes, compute, nbytes, patches * self.patch_s[li][c], patches, retry=True,
                       deadline=max(img.deadline, now + self.st.deadline_s / 4))

    def _substitute(self, li: int, missed: int, now: float) -> int | None:
        """For fallback ``nearest``: where the patches of layer ``li`` that ``missed`` did not serve go instead.
        The coordinator gives each patch to the reachable expert its router scored highest; without router scores
        the simulator takes the coordinator when it holds any expert of the layer (no radio), else the remote site
        with the lowest link latency that holds one and is not seen down, other than ``missed``; None: none."""
        if self.coord_holds[li]:
            return self.c
        for k in self.holders_any[li]:
            if k != missed and not self.seen_down[k].contains(now):
                return k
        return None

    def _offload_timeout(self, rpc: _Rpc) -> None:
        """offload-image: the image got no label in time. ``nearest`` sends it once more to the nearest other linked
        site (a second miss fails); ``local`` runs the whole model on the coordinator; ``fail`` and ``skip`` (a
        skipped image has no result) fail it."""
        img, fb = rpc.img, self.fallback
        if fb == "nearest" and not rpc.retry:
            alt = self._nearest_other(rpc.site)
            if alt is not None:
                img.degraded = True
                self._send(img, rpc.li, alt, rpc.nbytes, float(self.cm.offload_s[alt]) + self.st.offload_overhead_s,
                           rpc.bytes_back - self.st.rpc_overhead_bytes, rpc.local_s, rpc.patches, retry=True)
                return
        if fb in ("fail", "nearest", "skip"):
            self._fail(img, f"{self.sites[rpc.site]} no reply within {self.st.deadline_s:g} s (fallback {fb})")
            return
        img.degraded = True
        self.q.at(self._serve(img, self.c, self.q.now, rpc.local_s), self._part_done, img, rpc.li)

    def _nearest_other(self, missed: int) -> int | None:
        """offload-image's ``nearest``: the linked remote site other than ``missed`` with the lowest link latency
        (then the highest bandwidth, then name)."""
        best = None
        for j, lk in enumerate(self.links):
            if lk is None or j in (missed, self.c):
                continue
            key = (lk.latency_ms, -lk.bandwidth_mbps, self.sites[j])
            if best is None or key < best[0]:
                best = (key, j)
        return None if best is None else best[1]

    def _part_done(self, img: _Image, li: int) -> None:
        if img.failed:
            return
        img.pending -= 1
        if img.pending > 0:
            return
        if img.deferred:  # the layer's calls are all back: now the fallback for what no replica served
            todo, img.deferred = img.deferred, []
            for j, patches, why in todo:
                self._fallback(img, li, j, patches, why)
                if img.failed:
                    return
            if img.pending > 0:
                return
        if li < 0:  # offload-image: the label is back
            self._finish(img)
            return
        end = self._serve(img, self.c, self.q.now, float(self.segments[li + 1]))
        if li + 1 < len(self.site_of):
            self.q.at(end, self._layer, img, li + 1)
        else:
            self.q.at(end, self._finish, img)

    # -- results --------------------------------------------------------------------------------------------------
    def result(self) -> ScenarioResult:
        sc, topo = self.sc, self.topology
        res = ScenarioResult(params=sc.params())
        imgs = self.images
        n = len(imgs)
        # The run lasts until the last arrival or the last piece of work, whichever is later (a camera site that
        # never comes back leaves its CPU "busy" forever: that is not work).
        ends = [float(self.arrivals[-1]) if len(self.arrivals) else 0.0]
        ends += [im.finish for im in imgs if math.isfinite(im.finish)]
        ends += [c.free_at for c in self.cpus if math.isfinite(c.free_at)]
        horizon = max(max(ends), 1e-9)
        done = [im for im in imgs if not im.failed and not math.isnan(im.finish)]
        lat = np.array([im.finish - im.arrival for im in done])
        res.horizon_s, res.arrived = horizon, n
        res.failed = sum(1 for im in imgs if im.failed)
        res.degraded = sum(1 for im in done if im.degraded)
        res.ok = len(done) - res.degraded
        for im in imgs:
            if im.failed:
                res.failures_by_reason[im.reason] = res.failures_by_reason.get(im.reason, 0) + 1
        if len(lat):
            res.latency_mean_s = float(lat.mean())
            res.latency_p50_s, res.latency_p95_s, res.latency_p99_s = (float(v) for v in
                                                                       np.percentile(lat, [50, 95, 99]))
            res.latency_max_s = float(lat.max())
            res.wait_mean_s = float(np.mean([im.start - im.arrival for im in done]))
            res.service_mean_s = float(np.mean([im.finish - im.start for im in done]))
            res.latencies_s = [float(v) for v in lat]
            res.arrivals_s = [float(im.arrival) for im in done]
            if self.adaptive:
                res.image_strategies = [im.strategy for im in done]
            res.image_camera_j = [im.camera_j for im in done]
            res.image_energy_j = [im.energy_j for im in done]
        res.throughput_hz = len(done) / horizon
        per = max(n, 1)
        total_bytes = 0
        radio = np.zeros(len(self.sites))
        for j, name in enumerate(self.sites):
            up, dn, link = self.up[j], self.dn[j], self.links[j]
            if up is None or dn is None or link is None:
                continue
            b = up.payload + dn.payload
            total_bytes += b
            # tx at the sender, rx at the receiver, per bit on air (retransmissions included), at the energy per bit
            # of the moment (a link schedule may change it)
            radio[self.c] += up.tx_j + dn.rx_j
            radio[j] += up.rx_j + dn.tx_j
            res.links[name] = LinkResult(site=name, bytes_up=up.payload, bytes_down=dn.payload,
                                         bytes_per_image=b / per, bits_on_air=up.bits + dn.bits,
                                         utilisation_up=up.airtime_s / horizon, utilisation_down=dn.airtime_s / horizon)
        res.bytes_per_image = total_bytes / per
        res.patches_sent_per_image = self.sent_patches / per
        res.patches_dropped_per_image = self.dropped_patches / per
        res.patches_kept_local_per_image = self.kept_local / per
        res.offload_site = None if self.offload_site is None else self.sites[self.offload_site]
        res.routing_source = self.routing.source if self.routing is not None else ""
        soc = sc.settings.battery_soc
        for j, name in enumerate(self.sites):
            dev: Device = topo.sites[name].device
            busy = self.cpus[j].busy_s
            down = self.down[j].total(horizon)
            compute_j = busy * dev.active_w
            idle_j = max(0.0, horizon - busy - down) * dev.idle_w
            energy = compute_j + radio[j] + idle_j
            power = energy / horizon
            life = soc_end = None
            if dev.battery_wh is not None:
                life = soc * dev.battery_wh / power if power > 0 else math.inf
                soc_end = soc - energy / 3600.0 / dev.battery_wh
            res.sites[name] = SiteResult(
                site=name, busy_s=busy, down_s=down, compute_j=compute_j, radio_j=float(radio[j]), idle_j=idle_j,
                energy_j=energy, active_j_per_image=(compute_j + radio[j]) / per, energy_j_per_image=energy / per,
                avg_power_w=power, battery_wh=dev.battery_wh, lifetime_h=life, soc_end=soc_end,
                utilisation=busy / horizon)
        res.events = self.q.events
        if self.adaptive:
            res.strategy_images = dict(self.strategy_images)
        return res


def dense_weight_bytes(stats: Stats) -> int:
    """fp32 weights of the dense model: the trunk plus the dense MLPs the MoE layers replaced (dim -> 2 dim -> dim)."""
    return int(stats.trunk_weight_bytes + sum((4 * ls.dim * ls.dim + 3 * ls.dim) * 4 for ls in stats.layers))


def strategy_misfit(topology: Topology, stats: Stats, strategy: str, offload_site: str | None) -> str | None:
    """Why a whole-model strategy cannot run on this topology: the model does not fit the memory of the site that
    has to hold it (the cost model's rule: weights plus the working buffer, 1 MB = 10^6 bytes); None when it fits.
    Split strategies hold only their placement's experts: moe-partition keeps those within every site's memory."""
    need = {"local-moe": stats.trunk_weight_bytes + stats.expert_bytes_total + stats.buffer_bytes,
            "local-dense": dense_weight_bytes(stats) + stats.buffer_bytes,
            "offload-image": stats.trunk_weight_bytes + stats.expert_bytes_total + stats.buffer_bytes}.get(strategy)
    site = offload_site if strategy == "offload-image" else topology.coordinator
    if need is None or site is None:
        return None
    cap = topology.sites[site].device.memory_mb * MB
    if need <= cap:
        return None
    what = "the dense model" if strategy == "local-dense" else "the whole MoE model"
    return f"does not fit: {what} needs {need / MB:.2f} MB on {site}, which has {cap / MB:.2f} MB"


def run_scenario(world: World, scenario: Scenario) -> ScenarioResult:
    """Simulate one scenario; deterministic for a given world and scenario (seed included). A strategy whose
    model does not fit the memory of the site that must hold it is not simulated: its result carries the reason."""
    import time

    t0 = time.perf_counter()
    run = _Run(world, scenario)
    if run.misfit is not None:
        return ScenarioResult(params=scenario.params(), error=run.misfit)
    run.run()
    res = run.result()
    res.wall_s = time.perf_counter() - t0
    return res
