"""The strategy policy: what one image would cost under each strategy (split, local, offload-image) on the links as
they are now, and which to use, with hysteresis. Shared by the coordinator (``strategy: adaptive``) and the
simulator, so both choose by the same rule. Pure (no torch, no grpc) and deterministic.

Model of one image, per strategy (seconds, joules, bytes; a MAC-free form of :mod:`moevit.partition.costmodel`'s
assumptions: links independent, compute at the device's ``gflops``, radio energy per bit at each end):

* ``local``: the whole model on the coordinator: ``(trunk + every routed token's expert FLOPs) / gflops``; energy
  ``active_w`` times that; no bytes. Infeasible when the coordinator's ``memory_mb`` cannot hold the model.
* ``offload-image``: the image to the offload site and its answer back: ``rtt + (image + answer) bits /
  throughput`` plus the whole model's FLOPs at that site's speed; energy: radio at both ends plus the site's
  ``active_w`` while it computes. Infeasible when the link is down or the site's memory cannot hold the model.
* ``split``: trunk on the coordinator, then per MoE layer the slowest of (the coordinator's own experts) and, per
  remote site holding experts with load, ``rtt + 2 * tokens * token_bytes bits / throughput + tokens * FLOPs /
  gflops``; bytes both ways; energy: the coordinator's compute, the radio at both ends, each site's compute.
  Infeasible when a site that has tokens to take is down.

:func:`choose` keeps the current strategy unless another is predicted cheaper by more than ``margin`` (a
fraction of the current one's cost) for as many decisions in a row as the gain needs (:func:`decisions_needed`):
``consecutive`` just past the margin, one fewer for each doubling of the gain over the margin, one once the other is
predicted at most ``1 / CLEAR_GAP`` of the current cost (a gap that large is a changed link, not noise: waiting
``consecutive`` images on a link that fell 20-fold cost a phase's p95). A current strategy that became infeasible
(a site stopped answering) is left at once for the cheapest feasible one (a *fallback* decision).

:class:`Belief` is how the coordinator takes a link's throughput samples (moving average in log terms; a sample
``STEP_FACTOR`` off is a changed link only once a second one agrees: one alone may be a loaded machine's hiccup).
The coordinator gets that second sample at once from a probe of the link (coordinator/strategies.py), so a changed
link is believed before the next image, not after it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from moevit.deploy.topology import DEFAULT_RX_NJ_PER_BIT, DEFAULT_TX_NJ_PER_BIT, Link, Placement, Topology

FIXED = ("split", "local", "offload-image")
CLEAR_GAP = 2.0  # another strategy predicted at most half the current one's cost: switch without waiting
EWMA_ALPHA = 0.2  # weight of a new link sample: about the last 5-10 calls matter
# a throughput sample STEP_FACTOR times above (or below) the estimate, confirmed by the next one the same way, is a
# changed link and replaces the estimate; one alone weighs EWMA_ALPHA (on a loaded machine one call in twenty is
# 5-10x slow: replacing the estimate on it made adaptive switch on every hiccup)
STEP_FACTOR = 4.0


@dataclass(frozen=True)
class Belief:
    """One link's throughput (bit/s) as believed from its samples: ``value`` (None before the first) and
    ``pending``: the last sample was STEP_FACTOR or more above (1) or below (-1) the value, and the next one says
    whether the link changed (it replaces the value) or the machine hiccuped (averaged like any other)."""

    value: float | None = None
    pending: int = 0

    def update(self, sample: float) -> Belief:
        """The belief after ``sample``: the first sample as is; one STEP_FACTOR off the same way as the pending one
        replaces the value; any other is averaged in with weight EWMA_ALPHA in log terms (a rate that drops
        100-fold shows after two or three samples, not ten)."""
        if self.value is None:
            return Belief(sample)
        ratio = sample / self.value
        way = 0
        if max(ratio, 1 / ratio) >= STEP_FACTOR:
            way = 1 if ratio > 1 else -1
            if self.pending == way:
                return Belief(sample)
        return Belief(self.value ** (1 - EWMA_ALPHA) * sample ** EWMA_ALPHA, way)


@dataclass(frozen=True)
class LinkEstimate:
    """What the coordinator knows of its link to one site now: round-trip time of an empty call (s), payload
    throughput (bit/s), radio energy per bit at the sending and receiving ends, and whether the site answers."""

    rtt_s: float
    throughput_bps: float
    tx_nj_per_bit: float = DEFAULT_TX_NJ_PER_BIT
    rx_nj_per_bit: float = DEFAULT_RX_NJ_PER_BIT
    up: bool = True

    @classmethod
    def from_link(cls, link: Link) -> LinkEstimate:
        """The topology's nominal figures: two one-way latencies, the bandwidth derated by loss and duty cycle."""
        return cls(rtt_s=2 * link.latency_ms / 1e3,
                   throughput_bps=link.bandwidth_mbps * 1e6 * link.duty_cycle * (1.0 - link.loss),
                   tx_nj_per_bit=link.tx_nj_per_bit, rx_nj_per_bit=link.rx_nj_per_bit)


@dataclass(frozen=True)
class ModelFigures:
    """The model's per-image figures the policy needs. ``trunk_flops``: everything but the experts (routers
    included); ``expert_flops_per_token`` and ``token_bytes`` (one pixel token on the wire with the link's codec)
    per MoE layer; ``model_mb``: the whole model's weights; ``image_bytes``/``answer_bytes``: what offload-image
    sends and gets back."""

    trunk_flops: float
    expert_flops_per_token: Mapping[int, float]
    token_bytes: Mapping[int, float]
    model_mb: float
    image_bytes: float
    answer_bytes: float = 64.0


@dataclass(frozen=True)
class StrategyCost:
    """One strategy's predicted cost per image; ``feasible`` False with ``why`` when it cannot run now."""

    latency_s: float
    energy_j: float
    bytes: float
    feasible: bool = True
    why: str = ""

    def value(self, objective: str) -> float:
        return {"latency": self.latency_s, "energy": self.energy_j, "bytes": self.bytes}[objective]

    def as_dict(self) -> dict[str, float | bool | str]:
        d: dict[str, float | bool | str] = {"latency_s": round(self.latency_s, 6), "energy_j": round(self.energy_j, 6),
                                            "bytes": round(self.bytes, 1)}
        if not self.feasible:
            d.update(feasible=False, why=self.why)
        return d


def _infeasible(why: str) -> StrategyCost:
    return StrategyCost(float("inf"), float("inf"), float("inf"), feasible=False, why=why)


def _chosen_site(sites: tuple[str, ...], local: str) -> str:
    """Local-first, as coordinator/runtime.py sends tokens: the coordinator's own copy, else the first replica."""
    return local if local in sites else sites[0]


def predict(topology: Topology, placement: Placement, routing: Mapping[tuple[int, int], float],
            links: Mapping[str, LinkEstimate], figures: ModelFigures, *,
            offload_site: str | None, gflops: Mapping[str, float] | None = None) -> dict[str, StrategyCost]:
    """Each fixed strategy's predicted cost per image. ``routing``: pixel tokens per image routed to each
    ``(layer, expert)`` (every top-k slot counted); ``links``: the coordinator's link to each remote site (a site
    missing here takes the topology's nominal link); ``offload_site``: where offload-image would go (None: it is
    infeasible); ``gflops``: sites' measured speeds, in place of their topology figures (the coordinator's, per
    image: passed beside the topology rather than built into a copy of it, whose validation cost 4x this function)."""
    cam_name = topology.coordinator
    cam = topology.site(cam_name).device
    measured = gflops or {}

    def speed(site: str) -> float:
        return measured.get(site) or topology.site(site).device.gflops

    def link_to(site: str) -> LinkEstimate | None:
        if site in links:
            return links[site]
        link = topology.link_between(cam_name, site)
        return None if link is None else LinkEstimate.from_link(link)

    expert_flops = sum(n * figures.expert_flops_per_token.get(layer, 0.0) for (layer, _), n in routing.items())
    whole = figures.trunk_flops + expert_flops
    out: dict[str, StrategyCost] = {}

    # local
    if cam.memory_mb < figures.model_mb:
        out["local"] = _infeasible(f"{cam_name} memory_mb {cam.memory_mb:g} < the model's {figures.model_mb:.1f} MB")
    else:
        t = whole / (speed(cam_name) * 1e9)
        out["local"] = StrategyCost(t, cam.active_w * t, 0.0)

    # offload-image
    if offload_site is None:
        out["offload-image"] = _infeasible("no offload site")
    else:
        site = topology.site(offload_site).device
        est = link_to(offload_site)
        if est is None or not est.up:
            out["offload-image"] = _infeasible(f"{offload_site} not reachable")
        elif site.memory_mb < figures.model_mb:
            out["offload-image"] = _infeasible(f"{offload_site} memory_mb {site.memory_mb:g} < the model's "
                                               f"{figures.model_mb:.1f} MB")
        else:
            up_bits, down_bits = 8 * figures.image_bytes, 8 * figures.answer_bytes
            compute = whole / (speed(offload_site) * 1e9)
            t = est.rtt_s + (up_bits + down_bits) / est.throughput_bps + compute
            radio = (up_bits + down_bits) * (est.tx_nj_per_bit + est.rx_nj_per_bit) * 1e-9
            out["offload-image"] = StrategyCost(t, radio + site.active_w * compute,
                                                figures.image_bytes + figures.answer_bytes)

    # split
    t = figures.trunk_flops / (speed(cam_name) * 1e9)
    energy = cam.active_w * t
    nbytes = 0.0
    why = ""
    per_layer: dict[int, dict[str, float]] = {}
    for (layer, e), n in routing.items():
        if n <= 0:
            continue
        s = _chosen_site(placement.sites_for(layer, e), cam_name)
        per_layer.setdefault(layer, {}).setdefault(s, 0.0)
        per_layer[layer][s] += n
    for layer, by_site in sorted(per_layer.items()):
        fpt = figures.expert_flops_per_token.get(layer, 0.0)
        tb = figures.token_bytes.get(layer, 0.0)
        slowest = 0.0
        for s, n in by_site.items():
            dev = topology.site(s).device
            compute = n * fpt / (speed(s) * 1e9)
            energy += dev.active_w * compute
            if s == cam_name:
                slowest = max(slowest, compute)
                continue
            est = link_to(s)
            if est is None or not est.up:
                why = why or f"{s} not reachable"
                continue
            bits = 2 * n * tb * 8
            nbytes += bits / 8
            energy += bits * (est.tx_nj_per_bit + est.rx_nj_per_bit) * 1e-9
            slowest = max(slowest, est.rtt_s + bits / est.throughput_bps + compute)
        t += slowest
    out["split"] = _infeasible(why) if why else StrategyCost(t, energy, nbytes)
    return out


@dataclass(frozen=True)
class PolicyState:
    """Hysteresis memory: the strategy in use, the one predicted cheaper lately, and for how many decisions."""

    current: str | None = None
    challenger: str | None = None
    streak: int = 0


@dataclass(frozen=True)
class Decision:
    strategy: str
    predicted: StrategyCost
    state: PolicyState
    reason: str  # "start", "keep", "switch", "fallback"


class NoFeasibleStrategy(RuntimeError):
    """No strategy can run now (every remote site down and the model does not fit the coordinator)."""


def decisions_needed(gain: float, margin: float, consecutive: int) -> int:
    """Decisions in a row another strategy predicted ``gain`` (a fraction of the current one's cost, past
    ``margin``) cheaper must win before the policy switches: ``consecutive`` just past the margin, one fewer for each
    doubling of the gain over the margin (a gain four margins wide is a changed link far more often than noise, and
    each image it waits costs that gain), at least one; one once the gain reaches ``1 - 1 / CLEAR_GAP``."""
    if gain * CLEAR_GAP >= CLEAR_GAP - 1.0:
        return 1
    if margin <= 0 or gain <= margin:
        return consecutive
    return max(1, consecutive - math.floor(math.log2(gain / margin) + 1e-9))


def choose(costs: Mapping[str, StrategyCost], objective: str, state: PolicyState, *, margin: float = 0.1,
           consecutive: int = 3) -> Decision:
    """The strategy for the next image (see the module docstring for the rule)."""
    feasible = {s: c for s, c in costs.items() if c.feasible}
    if not feasible:
        raise NoFeasibleStrategy("no strategy can run: " + "; ".join(f"{s}: {c.why}" for s, c in costs.items()))
    best = min(sorted(feasible), key=lambda s: feasible[s].value(objective))
    if state.current is None:
        return Decision(best, feasible[best], PolicyState(best), "start")
    if state.current not in feasible:
        return Decision(best, feasible[best], PolicyState(best), "fallback")
    cur = feasible[state.current]
    if best != state.current and feasible[best].value(objective) < cur.value(objective) * (1.0 - margin):
        streak = state.streak + 1 if state.challenger == best else 1
        gain = 1.0 - feasible[best].value(objective) / cur.value(objective)
        if streak >= decisions_needed(gain, margin, consecutive):
            return Decision(best, feasible[best], PolicyState(best), "switch")
        return Decision(state.current, cur, replace(state, challenger=best, streak=streak), "keep")
    return Decision(state.current, cur, PolicyState(state.current), "keep")


__all__ = ["CLEAR_GAP", "EWMA_ALPHA", "FIXED", "STEP_FACTOR", "Belief", "Decision", "LinkEstimate", "ModelFigures",
           "NoFeasibleStrategy", "PolicyState", "StrategyCost", "choose", "decisions_needed", "predict"]
