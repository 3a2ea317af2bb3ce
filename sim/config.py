"""The sweep file (``sweep.yaml``) of ``moe-sim``: its validated dataclasses, and how a sweep expands into scenarios.

One config flows YAML -> :func:`parse_sweep` (validated, typed, frozen dataclasses) -> :func:`expand` (one
:class:`Scenario` per topology variant x link condition x arrival process x failure set x strategy x seed) ->
:func:`sim.engine.run_scenario`. Nothing below the CLI reads the environment or a file other than the ones named
here. The format is documented in ``docs/sim.md`` and shown in ``examples/sweep.yaml``.

Every problem is a :class:`~moevit.deploy.config.ConfigError` (``SimConfigError`` is the same class) whose text
is ``<file>: <key path>: <problem>``, raised before any scenario runs: unknown keys (with a "did you mean"), unknown
strategies, site names that a topology does not have, numbers out of range (a link condition that would leave zero
bandwidth included).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moevit.deploy.config import ConfigError, check_keys, number, read_yaml
from moevit.deploy.config import describe as _describe
from moevit.deploy.config import integer as _int
from moevit.deploy.config import mapping as _mapping
from moevit.deploy.config import non_empty_list as _list
from moevit.deploy.topology import Link, Topology

__all__ = [
    "ARRIVAL_KINDS",
    "STRATEGIES",
    "ALL_STRATEGIES",
    "WIRE_BYTES",
    "Arrival",
    "FailureSet",
    "LinkCondition",
    "LinkOutage",
    "LinkStep",
    "Scenario",
    "Settings",
    "SimConfigError",
    "SiteDown",
    "SweepConfig",
    "TopologyVariant",
    "check_sites",
    "check_skip_layers",
    "default_sweep",
    "expand",
    "figures_at",
    "load_sweep",
    "parse_sweep",
]

# local-dense / local-moe: the whole model on the camera site (dense, or MoE with every expert there);
# offload-image: the image goes to the best-connected site, which runs the MoE model and sends the label back;
# split: the MoE split over the placement, as the coordinator runs it; split-drop-background /
# split-local-background: as split, but patches routed with low router confidence to a background expert (one most
# classes use) are dropped (the residual carries them) or computed on the camera site instead of being sent.
STRATEGIES = ("local-dense", "local-moe", "offload-image", "split", "split-drop-background",
              "split-local-background")
# adaptive: per image, the strategy moevit.partition.policy chooses (the coordinator's rule: split, local-moe or
# offload-image, with the topology's adaptive: objective and hysteresis); listed explicitly, not run by default.
ALL_STRATEGIES = (*STRATEGIES, "adaptive")
ARRIVAL_KINDS = ("periodic", "poisson", "bursty")
WIRE_BYTES = {"fp16": 2, "fp32": 4}


# The one error class of every config reader; the old name stays because users and tests catch it by name.
SimConfigError = ConfigError


# ============================================================================================ dataclasses


@dataclass(frozen=True)
class Arrival:
    """How images arrive at the camera site.

    periodic: one image every ``1 / rate_hz`` s; poisson: exponential gaps of mean ``1 / rate_hz`` s; bursty (a camera
    trap): a trigger fires ``burst_size`` images ``burst_gap_s`` apart, triggers are ``idle_s`` apart on average
    (exponential), so the mean image rate is ``burst_size / (idle_s + (burst_size - 1) * burst_gap_s)``.
    """

    name: str
    kind: str
    rate_hz: float = 1.0
    burst_size: int = 1
    burst_gap_s: float = 0.5
    idle_s: float = 60.0

    @property
    def mean_rate_hz(self) -> float:
        if self.kind == "bursty":
            return self.burst_size / (self.idle_s + (self.burst_size - 1) * self.burst_gap_s)
        return self.rate_hz


@dataclass(frozen=True)
class LinkCondition:
    """A change applied to the coordinator's links (all of them, or those to ``sites``) before a scenario runs.

    ``bandwidth_scale`` multiplies the bandwidth; ``bandwidth_mbps``, ``latency_ms``, ``loss``, ``duty_cycle``,
    ``tx_nj_per_bit``, ``rx_nj_per_bit`` replace the topology's figure when set; ``extra_latency_ms`` adds to the
    one-way latency; ``packet_bytes`` replaces the sweep's packet size on those links (e.g. 222 for LoRa).
    """

    name: str = "nominal"
    sites: tuple[str, ...] | None = None
    bandwidth_scale: float = 1.0
    bandwidth_mbps: float | None = None
    latency_ms: float | None = None
    extra_latency_ms: float = 0.0
    loss: float | None = None
    duty_cycle: float | None = None
    tx_nj_per_bit: float | None = None
    rx_nj_per_bit: float | None = None
    packet_bytes: int | None = None

    def applies_to(self, topology: Topology, site: str) -> bool:
        return site != topology.coordinator and (self.sites is None or site in self.sites)

    def apply(self, topology: Topology) -> Topology:
        """``topology`` with this condition applied to its links that touch the coordinator."""
        links: list[Link] = []
        for link in topology.links:
            far = link.other(topology.coordinator) if topology.coordinator in (link.a, link.b) else None
            if far is None or not self.applies_to(topology, far):
                links.append(link)
                continue
            bw = self.bandwidth_mbps if self.bandwidth_mbps is not None else link.bandwidth_mbps
            lat = self.latency_ms if self.latency_ms is not None else link.latency_ms
            links.append(dataclasses.replace(
                link, bandwidth_mbps=bw * self.bandwidth_scale, latency_ms=lat + self.extra_latency_ms,
                loss=link.loss if self.loss is None else self.loss,
                duty_cycle=link.duty_cycle if self.duty_cycle is None else self.duty_cycle,
                tx_nj_per_bit=link.tx_nj_per_bit if self.tx_nj_per_bit is None else self.tx_nj_per_bit,
                rx_nj_per_bit=link.rx_nj_per_bit if self.rx_nj_per_bit is None else self.rx_nj_per_bit))
        return dataclasses.replace(topology, links=tuple(links))


@dataclass(frozen=True)
class LinkOutage:
    """The link between the coordinator and ``site`` carries nothing from ``start_s`` to ``end_s`` (sim time)."""

    site: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class SiteDown:
    """``site`` is off from ``start_s``; it rejoins at ``end_s`` (None: never). Work it held is lost."""

    site: str
    start_s: float
    end_s: float | None = None


@dataclass(frozen=True)
class FailureSet:
    name: str = "none"
    link_outages: tuple[LinkOutage, ...] = ()
    site_downs: tuple[SiteDown, ...] = ()

    def sites(self) -> set[str]:
        return {o.site for o in self.link_outages} | {d.site for d in self.site_downs}


@dataclass(frozen=True)
class LinkStep:
    """One step of a link schedule: from ``from_s`` (sim time, or seconds since an emulated run started) the
    coordinator's links to ``sites`` (None: every one) carry ``bandwidth_mbps`` with ``latency_ms`` one way, and,
    when given, cost ``tx_nj_per_bit``/``rx_nj_per_bit`` (a radio that falls back to a slower rate at the same power
    spends more energy per bit; None: the topology's figure)."""

    from_s: float
    bandwidth_mbps: float
    latency_ms: float
    sites: tuple[str, ...] | None = None
    tx_nj_per_bit: float | None = None
    rx_nj_per_bit: float | None = None

    def applies(self, site: str) -> bool:
        return self.sites is None or site in self.sites


def figures_at(steps: Sequence[LinkStep], t: float) -> LinkStep | None:
    """The step in effect at ``t`` among ``steps`` (one link's, ascending), None before the first."""
    for s in reversed(steps):
        if t >= s.from_s:
            return s
    return None


@dataclass(frozen=True)
class Settings:
    """Figures shared by every scenario of a sweep (see docs/sim.md for each).

    wire: token codec on the wire (``fp16``, ``int8+zstd``, ...; moevit_rpc.codecs); wire_bytes_per_value: its measured
    bytes per token number, scales and zstd included (None: the codec's nominal size per layer, before zstd);
    codec_s_per_value: its measured CPU seconds per token number, encode + decode both ways (bench/bench_wire.py),
    charged to the site of a remote patch; deadline_s: the coordinator's RPC deadline; image_bytes: the encoded
    image sent by offload-image (None: a JPEG of the model's input, taken as 1/8 of its raw RGB bytes);
    result_bytes: the label sent back; rpc_overhead_bytes: protocol bytes per RPC message each way (HTTP/2 + gRPC
    headers and protobuf framing) on top of the payload; rpc_overhead_s: fixed time per RPC at the worker
    (decode, dispatch, encode); packet_bytes: link-layer packet size (loss and duty cycle act per packet);
    concurrency: images the coordinator works on at once (1: the real coordinator, one image at a time);
    reconnect_s: after a site rejoins, how long until the coordinator's channel is back; detect_s: after a site goes
    down, how long until the coordinator's health watch sees it down (and routes around it); confidence_threshold: a
    patch whose top-1 router probability is below it is "low confidence"; low_confidence_share: the share of a
    background expert's patches taken as low confidence when no trace gives the real count; skip_layers: the MoE
    layers where those patches are dropped or kept local (split-drop/local-background; None: every MoE layer; as
    ``moe-coordinator --skip-layers``, decided by :func:`moevit.offwire.skip_layers`); battery_soc: state of charge
    at the start (fraction of battery_wh).
    """

    wire: str = "fp16"
    wire_bytes_per_value: float | None = None
    codec_s_per_value: float = 0.0
    deadline_s: float = 10.0
    image_bytes: int | None = None
    result_bytes: int = 64
    rpc_overhead_bytes: int = 300
    rpc_overhead_s: float = 0.0
    # offload-image: time per image at the offload site beyond the model's compute and rpc_overhead_s (the image's
    # decode and resize, the Classify server's batching window), measured by the emulation's calibration run
    offload_overhead_s: float = 0.0
    # a measured machine's load: each image draws one of these delays (s, seeded) and starts that much later, as if
    # the coordinator's process waited that long for a core (other jobs' turns; no energy); empty: none
    load_delay_s: tuple[float, ...] = ()
    packet_bytes: int = 1500
    concurrency: int = 1
    reconnect_s: float = 1.0
    detect_s: float = 0.2
    confidence_threshold: float = 0.5
    low_confidence_share: float = 0.5
    skip_layers: tuple[int, ...] | None = None
    battery_soc: float = 1.0
    # LinkStep(from_s, bandwidth_mbps, latency_ms, sites, tx/rx_nj_per_bit), from_s ascending: from from_s on, the
    # coordinator's links to ``sites`` (None: all of them) carry these figures (a message takes the figures of the
    # moment it starts); empty: the topology's, all run long. A plain (from_s, bandwidth_mbps, latency_ms) tuple is
    # a step for every link.
    link_schedule: tuple[LinkStep, ...] = ()

    def __post_init__(self) -> None:
        steps = tuple(s if isinstance(s, LinkStep) else LinkStep(*s) for s in self.link_schedule)
        object.__setattr__(self, "link_schedule", steps)

    def schedule_for(self, site: str) -> tuple[LinkStep, ...]:
        """The steps of ``link_schedule`` that apply to the coordinator's link to ``site``, in order."""
        return tuple(s for s in self.link_schedule if s.sites is None or site in s.sites)

    def wire_bytes(self, stats: Any) -> float | list[float]:
        """Bytes per token number of ``wire``: the measured figure, else the codec's nominal one per MoE layer."""
        if self.wire_bytes_per_value is not None:
            return self.wire_bytes_per_value
        from moevit.partition.costmodel import wire_bytes_for

        return wire_bytes_for(self.wire, stats)


@dataclass(frozen=True)
class TopologyVariant:
    """A topology file of the sweep, by name (``base`` is the one given with ``--topology``)."""

    name: str
    path: str


@dataclass(frozen=True)
class SweepConfig:
    topologies: tuple[TopologyVariant, ...] = ()
    conditions: tuple[LinkCondition, ...] = (LinkCondition(),)
    arrivals: tuple[Arrival, ...] = (Arrival("poisson-0.2hz", "poisson", rate_hz=0.2),)
    failures: tuple[FailureSet, ...] = (FailureSet(),)
    strategies: tuple[str, ...] = STRATEGIES
    seeds: tuple[int, ...] = (0,)
    images: int = 200
    settings: Settings = field(default_factory=Settings)
    source: str = "<default sweep>"


@dataclass(frozen=True)
class Scenario:
    """One deterministic simulation run: which topology variant, under which conditions, with which strategy."""

    topology: str
    condition: LinkCondition
    arrival: Arrival
    failures: FailureSet
    strategy: str
    seed: int
    images: int
    settings: Settings

    @property
    def id(self) -> str:
        return (f"{self.topology}/{self.condition.name}/{self.arrival.name}/{self.failures.name}/{self.strategy}"
                f"/seed{self.seed}")

    def params(self) -> dict[str, Any]:
        """The scenario's identifying parameters (the first columns of the results)."""
        return {"id": self.id, "topology": self.topology, "condition": self.condition.name,
                "arrival": self.arrival.name, "arrival_rate_hz": self.arrival.mean_rate_hz,
                "failures": self.failures.name, "strategy": self.strategy, "seed": self.seed, "images": self.images}


# ============================================================================================ parsing helpers


def _keys(d: Mapping[str, Any], file: str, key: str, allowed: Sequence[str], required: Sequence[str] = ()) -> None:
    check_keys(d, file, key, required=required, optional=allowed)


def _num(v: Any, file: str, key: str, *, lo: float = 0.0, **bounds: Any) -> float:
    return number(v, file, key, lo=lo, **bounds)


def _name(v: Any, file: str, key: str) -> str:
    if not isinstance(v, str) or not v or len(v) > 64 or any(c in v for c in "/,\n"):
        raise SimConfigError(file, key, f"expected a short name without '/' or ',', got {_describe(v)}")
    return v


def _unique(items: Sequence[Any], file: str, key: str) -> None:
    seen: set[str] = set()
    for i, it in enumerate(items):
        if it.name in seen:
            raise SimConfigError(file, f"{key}[{i}].name", f"name {it.name!r} is used twice")
        seen.add(it.name)


# ============================================================================================ sections


def _parse_arrival(d: Any, file: str, key: str) -> Arrival:
    d = _mapping(d, file, key)
    _keys(d, file, key, ("name", "kind", "rate_hz", "interval_s", "burst_size", "burst_gap_s", "idle_s"), ("kind",))
    kind = d["kind"]
    if kind not in ARRIVAL_KINDS:
        close = difflib.get_close_matches(str(kind), ARRIVAL_KINDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SimConfigError(file, f"{key}.kind", f"unknown arrival kind {kind!r} (kinds: "
                             f"{', '.join(ARRIVAL_KINDS)}){hint}")
    if kind == "bursty":
        for k in ("rate_hz", "interval_s"):
            if k in d:
                raise SimConfigError(file, f"{key}.{k}", "a bursty process is set by burst_size, burst_gap_s and "
                                     "idle_s, not a rate")
        size = _int(d.get("burst_size", 5), file, f"{key}.burst_size", 1)
        gap = _num(d.get("burst_gap_s", 0.5), file, f"{key}.burst_gap_s")
        idle = _num(d.get("idle_s", 60.0), file, f"{key}.idle_s", lo_open=True)
        name = d.get("name", f"bursty-{size}x{gap:g}s-idle{idle:g}s")
        return Arrival(_name(name, file, f"{key}.name"), kind, burst_size=size, burst_gap_s=gap, idle_s=idle)
    for k in ("burst_size", "burst_gap_s", "idle_s"):
        if k in d:
            raise SimConfigError(file, f"{key}.{k}", f"only bursty arrivals take {k}")
    if ("rate_hz" in d) == ("interval_s" in d):
        raise SimConfigError(file, key, f"a {kind} process needs exactly one of rate_hz or interval_s")
    if "interval_s" in d:
        rate = 1.0 / _num(d["interval_s"], file, f"{key}.interval_s", lo_open=True)
    else:
        rate = _num(d["rate_hz"], file, f"{key}.rate_hz", lo_open=True)
    name = d.get("name", f"{kind}-{rate:g}hz")
    return Arrival(_name(name, file, f"{key}.name"), kind, rate_hz=rate)


_CONDITION_KEYS = ("name", "sites", "bandwidth_scale", "bandwidth_mbps", "latency_ms", "extra_latency_ms", "loss",
                   "duty_cycle", "tx_nj_per_bit", "rx_nj_per_bit", "packet_bytes")


def _parse_condition(d: Any, file: str, key: str) -> LinkCondition:
    d = _mapping(d, file, key)
    _keys(d, file, key, _CONDITION_KEYS, ("name",))
    sites = None
    if "sites" in d:
        sites = tuple(_name(s, file, f"{key}.sites[{i}]") for i, s in enumerate(_list(d["sites"], file,
                                                                                      f"{key}.sites")))

    def opt(k: str, **kw: Any) -> float | None:
        return None if d.get(k) is None else _num(d[k], file, f"{key}.{k}", **kw)

    # Zero bandwidth would make every transfer take forever: refuse it here rather than hang a scenario.
    return LinkCondition(
        name=_name(d["name"], file, f"{key}.name"), sites=sites,
        bandwidth_scale=_num(d.get("bandwidth_scale", 1.0), file, f"{key}.bandwidth_scale", lo_open=True),
        bandwidth_mbps=opt("bandwidth_mbps", lo_open=True), latency_ms=opt("latency_ms"),
        extra_latency_ms=_num(d.get("extra_latency_ms", 0.0), file, f"{key}.extra_latency_ms"),
        loss=opt("loss", hi=1.0, hi_open=True), duty_cycle=opt("duty_cycle", lo_open=True, hi=1.0),
        tx_nj_per_bit=opt("tx_nj_per_bit"), rx_nj_per_bit=opt("rx_nj_per_bit"),
        packet_bytes=None if d.get("packet_bytes") is None else _int(d["packet_bytes"], file,
                                                                     f"{key}.packet_bytes", 1))


def _parse_failures(d: Any, file: str, key: str) -> FailureSet:
    d = _mapping(d, file, key)
    _keys(d, file, key, ("name", "link_outages", "site_downs"), ("name",))
    outages = []
    for i, o in enumerate(d.get("link_outages") or []):
        k = f"{key}.link_outages[{i}]"
        o = _mapping(o, file, k)
        _keys(o, file, k, ("site", "start_s", "end_s"), ("site", "start_s", "end_s"))
        start = _num(o["start_s"], file, f"{k}.start_s")
        end = _num(o["end_s"], file, f"{k}.end_s")
        if end <= start:
            raise SimConfigError(file, f"{k}.end_s", f"expected after start_s ({start:g}), got {end:g}")
        outages.append(LinkOutage(_name(o["site"], file, f"{k}.site"), start, end))
    downs = []
    for i, o in enumerate(d.get("site_downs") or []):
        k = f"{key}.site_downs[{i}]"
        o = _mapping(o, file, k)
        _keys(o, file, k, ("site", "start_s", "end_s"), ("site", "start_s"))
        start = _num(o["start_s"], file, f"{k}.start_s")
        end = None if o.get("end_s") is None else _num(o["end_s"], file, f"{k}.end_s")
        if end is not None and end <= start:
            raise SimConfigError(file, f"{k}.end_s", f"expected after start_s ({start:g}), got {end:g}")
        downs.append(SiteDown(_name(o["site"], file, f"{k}.site"), start, end))
    return FailureSet(_name(d["name"], file, f"{key}.name"), tuple(outages), tuple(downs))


_STEP_KEYS = ("from_s", "bandwidth_mbps", "latency_ms", "sites", "tx_nj_per_bit", "rx_nj_per_bit")


def _parse_schedule(v: Any, file: str, key: str) -> tuple[LinkStep, ...]:
    """``[{from_s, bandwidth_mbps, latency_ms, sites?, tx_nj_per_bit?, rx_nj_per_bit?}, ...]``: from_s ascending
    (steps for different sites may share a time, two for one link may not); site names are checked against the
    topology later (:func:`check_sites`)."""
    steps: list[LinkStep] = []
    for i, step in enumerate(_list(v, file, key)):
        sk = f"{key}[{i}]"
        _keys(_mapping(step, file, sk), file, sk, _STEP_KEYS, required=("from_s", "bandwidth_mbps", "latency_ms"))
        sites = None
        if step.get("sites") is not None:
            sites = tuple(_name(s, file, f"{sk}.sites[{j}]") for j, s in enumerate(_list(step["sites"], file,
                                                                                          f"{sk}.sites")))
            if len(set(sites)) != len(sites):
                raise SimConfigError(file, f"{sk}.sites", "a site is listed twice")

        def opt(k: str, step: Any = step, sk: str = sk) -> float | None:
            return None if step.get(k) is None else _num(step[k], file, f"{sk}.{k}")

        new = LinkStep(_num(step["from_s"], file, f"{sk}.from_s"),
                       _num(step["bandwidth_mbps"], file, f"{sk}.bandwidth_mbps", lo_open=True),
                       _num(step["latency_ms"], file, f"{sk}.latency_ms"), sites, opt("tx_nj_per_bit"),
                       opt("rx_nj_per_bit"))
        for prev in steps:
            if new.from_s < prev.from_s:
                raise SimConfigError(file, f"{sk}.from_s", f"steps must be in ascending from_s order ({new.from_s:g} "
                                     f"after {prev.from_s:g})")
            if new.from_s == prev.from_s and (new.sites is None or prev.sites is None
                                              or set(new.sites) & set(prev.sites)):
                raise SimConfigError(file, f"{sk}.from_s", f"two steps for one link at from_s {new.from_s:g}")
        steps.append(new)
    return tuple(steps)


def _parse_settings(d: Any, file: str, key: str) -> Settings:
    d = _mapping(d, file, key)
    names = [f.name for f in dataclasses.fields(Settings)]
    _keys(d, file, key, names)
    out: dict[str, Any] = {}
    for k, v in d.items():
        kk = f"{key}.{k}"
        if k == "wire":
            from moevit_rpc.codecs import parse_codec

            try:
                out[k] = parse_codec(v).name
            except ValueError as e:
                raise SimConfigError(file, kk, str(e) if isinstance(v, str) else
                                     f"expected a codec name, got {_describe(v)}") from None
        elif k == "wire_bytes_per_value":
            out[k] = None if v is None else _num(v, file, kk, lo_open=True)
        elif k == "image_bytes":
            out[k] = None if v is None else _int(v, file, kk, 1)
        elif k in ("result_bytes", "rpc_overhead_bytes"):
            out[k] = _int(v, file, kk, 0)
        elif k in ("packet_bytes", "concurrency"):
            out[k] = _int(v, file, kk, 1)
        elif k in ("confidence_threshold", "low_confidence_share"):
            out[k] = _num(v, file, kk, hi=1.0)
        elif k == "battery_soc":
            out[k] = _num(v, file, kk, lo_open=True, hi=1.0)
        elif k == "deadline_s":
            out[k] = _num(v, file, kk, lo_open=True)
        elif k == "link_schedule":
            out[k] = _parse_schedule(v, file, kk)
        elif k == "load_delay_s":
            out[k] = tuple(_num(x, file, f"{kk}[{i}]") for i, x in enumerate(_list(v, file, kk)))
        elif k == "skip_layers":
            out[k] = None if v is None else _layer_ids(v, file, kk)
        else:
            out[k] = _num(v, file, kk)
    return Settings(**out)


def _layer_ids(v: Any, file: str, key: str) -> tuple[int, ...]:
    """A non-empty list of distinct MoE layer ids (whether each is an MoE layer of the stats is checked later, by
    :func:`check_skip_layers`)."""
    items = _list(v, file, key)
    ids = [_int(x, file, f"{key}[{i}]", 0) for i, x in enumerate(items)]
    if len(set(ids)) != len(ids):
        raise SimConfigError(file, key, f"layer {next(i for i in ids if ids.count(i) > 1)} listed twice")
    return tuple(sorted(ids))


_TOP = ("topologies", "conditions", "arrivals", "failures", "strategies", "seeds", "images", "settings")


def parse_sweep(data: Any, file: str = "<sweep>", *, base_dir: str | Path | None = None) -> SweepConfig:
    """Validate a parsed sweep file into a :class:`SweepConfig` (site names are checked later, by
    :func:`check_sites`, once the topologies are loaded)."""
    if data is None:
        data = {}
    d = _mapping(data, file, "")
    _keys(d, file, "", _TOP)
    base = Path(base_dir) if base_dir is not None else Path(file).parent
    cfg: dict[str, Any] = {"source": file}
    if "topologies" in d:
        variants = []
        for i, t in enumerate(_list(d["topologies"], file, "topologies")):
            k = f"topologies[{i}]"
            t = _mapping(t, file, k)
            _keys(t, file, k, ("name", "file"), ("name", "file"))
            if not isinstance(t["file"], str) or not t["file"]:
                raise SimConfigError(file, f"{k}.file", f"expected a file path, got {_describe(t['file'])}")
            p = Path(t["file"])
            variants.append(TopologyVariant(_name(t["name"], file, f"{k}.name"),
                                            str(p if p.is_absolute() else base / p)))
        _unique(variants, file, "topologies")
        cfg["topologies"] = tuple(variants)
    if "conditions" in d:
        conds = [_parse_condition(c, file, f"conditions[{i}]")
                 for i, c in enumerate(_list(d["conditions"], file, "conditions"))]
        _unique(conds, file, "conditions")
        cfg["conditions"] = tuple(conds)
    if "arrivals" in d:
        arr = [_parse_arrival(a, file, f"arrivals[{i}]") for i, a in enumerate(_list(d["arrivals"], file,
                                                                                     "arrivals"))]
        _unique(arr, file, "arrivals")
        cfg["arrivals"] = tuple(arr)
    if "failures" in d:
        fs = [_parse_failures(f, file, f"failures[{i}]") for i, f in enumerate(_list(d["failures"], file,
                                                                                    "failures"))]
        _unique(fs, file, "failures")
        cfg["failures"] = tuple(fs)
    if "strategies" in d:
        strategies = []
        for i, s in enumerate(_list(d["strategies"], file, "strategies")):
            if s not in ALL_STRATEGIES:
                close = difflib.get_close_matches(str(s), ALL_STRATEGIES, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise SimConfigError(file, f"strategies[{i}]",
                                     f"unknown strategy {s!r} (strategies: {', '.join(ALL_STRATEGIES)}){hint}")
            if s in strategies:
                raise SimConfigError(file, f"strategies[{i}]", f"strategy {s!r} is listed twice")
            strategies.append(s)
        cfg["strategies"] = tuple(strategies)
    if "seeds" in d:
        s = d["seeds"]
        if isinstance(s, list):
            seeds = tuple(_int(v, file, f"seeds[{i}]") for i, v in enumerate(_list(s, file, "seeds")))
            if len(set(seeds)) != len(seeds):
                raise SimConfigError(file, "seeds", "a seed is listed twice")
        else:
            seeds = tuple(range(_int(s, file, "seeds", 1)))
        cfg["seeds"] = seeds
    if "images" in d:
        cfg["images"] = _int(d["images"], file, "images", 1)
    if "settings" in d:
        cfg["settings"] = _parse_settings(d["settings"], file, "settings")
    return SweepConfig(**cfg)


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file; every problem is a SimConfigError (or a TopologyError for bad YAML)."""
    return parse_sweep(read_yaml(path), str(path))


def default_sweep(*, seeds: int = 3, images: int = 200) -> SweepConfig:
    """What ``moe-sim`` runs with no ``--sweep``: every strategy, the topology as written and with its links at a
    tenth and a hundredth of their bandwidth, a Poisson stream and camera-trap bursts, no failures."""
    return SweepConfig(
        conditions=(LinkCondition("nominal"), LinkCondition("bw-x0.1", bandwidth_scale=0.1),
                    LinkCondition("bw-x0.01", bandwidth_scale=0.01)),
        arrivals=(Arrival("poisson-0.5hz", "poisson", rate_hz=0.5),
                  Arrival("trap-5x0.5s", "bursty", burst_size=5, burst_gap_s=0.5, idle_s=60.0)),
        seeds=tuple(range(seeds)), images=images, source="<default sweep>")


# ============================================================================================ checks and expansion


def check_sites(sweep: SweepConfig, topologies: Mapping[str, Topology]) -> None:
    """Every site a condition or failure names exists in every topology variant and is not the coordinator where
    that makes no sense; the conditions leave every link valid (positive bandwidth, loss below 1)."""
    def known(name: str, topo: Topology, site: str, key: str, *, remote_only: bool) -> None:
        remote = [s for s in topo.sites if s != topo.coordinator]
        allowed = remote if remote_only else list(topo.sites)
        if site not in allowed:
            close = difflib.get_close_matches(site, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            what = "remote site" if remote_only else "site"
            extra = f" ({site!r} is the coordinator)" if site == topo.coordinator else ""
            raise SimConfigError(sweep.source, key, f"unknown {what} {site!r}{extra} in topology {name!r} "
                                 f"({topo.path}; {what}s: {', '.join(allowed) or 'none'}){hint}")

    for name, topo in topologies.items():
        for i, c in enumerate(sweep.conditions):
            for j, s in enumerate(c.sites or ()):
                known(name, topo, s, f"conditions[{i}].sites[{j}]", remote_only=True)
            try:
                c.apply(topo)
            except ValueError as e:
                raise SimConfigError(sweep.source, f"conditions[{i}]", f"in topology {name!r}: {e}") from None
        for i, step in enumerate(sweep.settings.link_schedule):
            for j, s in enumerate(step.sites or ()):
                known(name, topo, s, f"settings.link_schedule[{i}].sites[{j}]", remote_only=True)
        for i, f in enumerate(sweep.failures):
            for j, o in enumerate(f.link_outages):
                known(name, topo, o.site, f"failures[{i}].link_outages[{j}].site", remote_only=True)
            for j, o in enumerate(f.site_downs):
                known(name, topo, o.site, f"failures[{i}].site_downs[{j}].site", remote_only=False)


def check_skip_layers(sweep: SweepConfig, moe_layers: Iterable[int], what: str = "the stats") -> None:
    """``settings.skip_layers`` names only MoE layers of ``moe_layers`` (those of the stats and trace)."""
    from moevit.offwire import skip_layers

    try:
        skip_layers(sweep.settings.skip_layers, moe_layers)
    except ValueError as e:
        raise SimConfigError(sweep.source, "settings.skip_layers", f"{e} of {what}") from None


def expand(sweep: SweepConfig, topology_names: Iterable[str]) -> list[Scenario]:
    """Every scenario of the sweep, in a stable order (topology, condition, arrival, failures, seed, strategy)."""
    out = []
    for t in topology_names:
        for c in sweep.conditions:
            for a in sweep.arrivals:
                for f in sweep.failures:
                    for seed in sweep.seeds:
                        for s in sweep.strategies:
                            out.append(Scenario(t, c, a, f, s, seed, sweep.images, sweep.settings))
    return out
