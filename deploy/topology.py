"""The deployment topology (``sites.yaml``): sites and their devices, links between them, and expert placement.

This is the single loader shared by the partitioner, the coordinator, the worker and the simulator, so all read a
topology file the same way and refuse the same mistakes. The schema is documented in ``docs/topology.md``.

Every problem found in a file is a :class:`~moevit.deploy.config.ConfigError` (``TopologyError`` is the same
class) whose message names the file, the key path inside it (``sites.pi-north.device.gflops``,
``links[1].between[0]``) and what was expected. Files are read strictly by :func:`moevit.deploy.config.read_yaml`.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from moevit.deploy.config import (
    MAX_FILE_BYTES,
    ConfigError,
    check_keys,
    describe,
    fail,
    index,
    integer,
    join,
    mapping,
    number,
    one_of,
    read_yaml,
)
from moevit.deploy.files import atomic_write

__all__ = [
    "DEFAULT_RX_NJ_PER_BIT",
    "DEFAULT_TX_NJ_PER_BIT",
    "FALLBACKS",
    "OBJECTIVES",
    "STRATEGIES",
    "AdaptiveOptions",
    "OffloadOptions",
    "MAX_FILE_BYTES",
    "Device",
    "Link",
    "Placement",
    "Site",
    "Topology",
    "TopologyError",
    "default_placement",
    "load_placement",
    "load_topology",
    "parse_placement",
    "parse_topology",
    "read_yaml",
    "save_placement",
    "validate_placement",
]

# What the coordinator does when every replica of an expert is unreachable. The coordinator implements them;
# the loader only checks the name. fail: stop and report; local: run the expert on the coordinator from its own
# copy of the model; skip: drop that expert's output for the affected patches (the residual stream passes).
FALLBACKS = ("fail", "local", "nearest", "skip")

# How each image is classified (issue 19). split: the trunk on the coordinator, experts where the placement puts
# them; local: every expert on the coordinator too; offload-image: the image goes to one site that runs the whole
# model (its Classify RPC) and answers; adaptive: per image, the cheapest of these for the topology's objective
# (moevit.partition.policy). The coordinator implements them; the loader checks the names.
STRATEGIES = ("split", "local", "offload-image", "adaptive")
OBJECTIVES = ("latency", "energy", "bytes")
# The whole model's Classify server of the offload site listens, unless `offload.address` says, on the site's host
# at its port + OFFLOAD_PORT_OFFSET (the site's own port is its expert worker's, which adaptive uses too).
OFFLOAD_PORT_OFFSET = 1000

# Radio energy per bit when a link does not say: Wi-Fi-class order of magnitude for a Raspberry-Pi-class board
# (about 1 W transmitting at ~20 Mbit/s, about half that receiving).
DEFAULT_TX_NJ_PER_BIT = 50.0
DEFAULT_RX_NJ_PER_BIT = 25.0

STRING_SOURCE = "<string>"

_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}\Z")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\Z")
_TOP_KEYS = {"required": ("coordinator", "sites"),
             "optional": ("model", "links", "placement", "fallback", "rpc", "strategy", "offload", "adaptive")}
_OFFLOAD_KEYS = {"required": (), "optional": ("site", "address")}
_ADAPTIVE_KEYS = {"required": (), "optional": ("objective", "margin", "consecutive", "probe_interval_s",
                                                 "strategy_probe_s")}
_SITE_KEYS = {"required": ("address", "device"), "optional": ("tls", "token_file", "rpc")}
_SITE_RPC_KEYS = {"required": (), "optional": ("codec",)}
_TLS_KEYS = {"required": ("ca", "cert", "key"), "optional": ()}
_RPC_KEYS = {"required": (), "optional": ("deadline_s", "hedge_ms", "max_message_mb", "stream", "packed", "codec")}
_DEVICE_KEYS = {"required": ("gflops", "memory_mb", "active_w", "idle_w"), "optional": ("battery_wh",)}
_LINK_KEYS = {
    "required": ("between", "bandwidth_mbps", "latency_ms"),
    "optional": ("loss", "tx_nj_per_bit", "rx_nj_per_bit", "duty_cycle"),
}
_PLACEMENT_FILE_KEYS = {"required": ("placement",), "optional": ("fingerprint",)}


# The one error class of every config reader; the old name stays because users and tests catch it by name.
TopologyError = ConfigError

_RANGES = {
    "positive": {"lo": 0.0, "lo_open": True, "what": "a positive number"},
    "non-negative": {"lo": 0.0, "what": "a non-negative number"},
    "loss": {"lo": 0.0, "hi": 1.0, "hi_open": True, "what": "a number in [0, 1)"},
    "fraction": {"lo": 0.0, "lo_open": True, "hi": 1.0, "what": "a number in (0, 1]"},
}


def _number(value: Any, file: str, key: str, kind: str) -> float:
    return number(value, file, key, **_RANGES[kind])


def _site_name(value: Any, file: str, key: str) -> str:
    if not isinstance(value, str):
        if isinstance(value, bool):
            hint = " (quote it: YAML reads yes/no/on/off as booleans)"
        elif isinstance(value, (int, float)):
            hint = " (quote it)"
        else:
            hint = ""
        fail(file, key, f"expected a site name (a string), got {describe(value)}{hint}")
    if not _SITE_NAME.match(value):
        fail(
            file,
            key,
            f"invalid site name {value!r}: use letters, digits, '-' and '_', starting with a letter or digit, "
            "at most 63 characters",
        )
    return value


def _known_site(value: Any, file: str, key: str, known: Iterable[str], where: str = "") -> str:
    name = _site_name(value, file, key)
    known = sorted(known)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        fail(file, key, f"unknown site {name!r} (sites{where}: {', '.join(known)}){hint}")
    return name


def _split_address(address: str) -> tuple[str, int] | str:
    """``(host, port)``, or the reason the address is not ``host:port``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        return "no ':port'"
    if host.startswith("["):
        if not host.endswith("]"):
            return "unclosed '[' around an IPv6 host"
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{host[1:-1]!r} is not an IPv6 address"
        host = host[1:-1]
    elif ":" in host:
        return "an IPv6 host needs brackets, e.g. '[::1]:50051'"
    elif not _HOSTNAME.match(host):
        return f"{host!r} is not a host name or IP address"
    elif re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{host!r} is not an IPv4 address"
    if not (port.isascii() and port.isdigit()):
        return f"port {port!r} is not a number"
    p = int(port)
    if not 1 <= p <= 65535:
        return f"port {p} is outside 1-65535"
    return host, p


def _address(value: Any, file: str, key: str) -> str:
    if not isinstance(value, str):
        fail(file, key, f"expected 'host:port' (a string) with port 1-65535, got {describe(value)}")
    parsed = _split_address(value)
    if isinstance(parsed, str):
        fail(file, key, f"expected 'host:port' with port 1-65535, got {value!r}: {parsed}")
    return value


# ------------------------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class Device:
    """What a site can do. gflops: sustained GFLOP/s; memory_mb: memory available to experts (MB);
    active_w / idle_w: board power while computing / waiting (W); battery_wh: capacity (Wh), None = mains."""

    gflops: float
    memory_mb: float
    active_w: float
    idle_w: float
    battery_wh: float | None = None

    def __post_init__(self) -> None:
        # Same rules as the loader, so a Device built in code (the simulator's sweeps) is as sound as a file's.
        label = "<Device>"
        _number(self.gflops, label, "gflops", "positive")
        _number(self.memory_mb, label, "memory_mb", "positive")
        _number(self.active_w, label, "active_w", "non-negative")
        _number(self.idle_w, label, "idle_w", "non-negative")
        if self.idle_w > self.active_w:
            fail(label, "idle_w", f"expected at most active_w ({self.active_w!r}), got {self.idle_w!r}")
        if self.battery_wh is not None:
            _number(self.battery_wh, label, "battery_wh", "positive")


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of a site: the CA that signs every site's certificate, this site's certificate and key.

    The site's server requires clients to present a certificate signed by ``ca`` (mutual TLS), and the site uses
    its own certificate as a client when it calls other sites.
    """

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class RpcOptions:
    """How the coordinator calls the workers: deadline per expert RPC, optional hedging delay, message cap, and
    whether requests go over one long-lived stream per site (``stream``) or one unary call each, and whether a
    request carries its experts' tokens in one tensor (``packed``) or one tensor per expert; ``codec``: the token
    codec (:mod:`moevit_rpc.codecs`) of every site that does not name its own (``sites.<name>.rpc.codec``)."""

    deadline_s: float = 10.0
    hedge_ms: float | None = None
    max_message_mb: float = 64.0
    stream: bool = True
    packed: bool = True
    codec: str = "fp16"


@dataclass(frozen=True)
class Site:
    """A device at a named place, reachable at ``address`` (``host:port`` of its gRPC daemon).

    ``tls``: mutual TLS files (None: plaintext); ``token_file``: a file holding the bearer token that callers of
    this site's services must present (None: no token); ``codec``: the token codec on the coordinator's link to
    this site (None: the topology's ``rpc.codec``).
    """

    name: str
    address: str
    device: Device
    tls: TLSFiles | None = None
    token_file: Path | None = None
    codec: str | None = None

    def token(self) -> str | None:
        """The bearer token in ``token_file``, or None; read by the one rule of every server and client
        (:func:`moevit_rpc.channels.read_token`, which imports no grpc)."""
        if self.token_file is None:
            return None
        from moevit_rpc.channels import read_token

        try:
            return read_token(self.token_file)
        except ValueError as e:
            prefix = f"{self.token_file}: "
            problem = str(e)[len(prefix):] if str(e).startswith(prefix) else str(e)
            raise ConfigError(str(self.token_file), f"sites.{self.name}.token_file", problem) from None

    def __post_init__(self) -> None:
        _site_name(self.name, "<Site>", "name")
        _address(self.address, f"<Site {self.name}>", "address")

    @property
    def host(self) -> str:
        """The host part of ``address``, without IPv6 brackets."""
        parsed = _split_address(self.address)
        assert not isinstance(parsed, str)  # checked in __post_init__
        return parsed[0]

    @property
    def port(self) -> int:
        parsed = _split_address(self.address)
        assert not isinstance(parsed, str)
        return parsed[1]


@dataclass(frozen=True)
class Link:
    """A bidirectional radio link between sites ``a`` and ``b``.

    bandwidth_mbps: Mbit/s; latency_ms: one-way latency (ms); loss: packet loss probability in [0, 1);
    tx_nj_per_bit / rx_nj_per_bit: radio energy per bit sent / received (nJ); duty_cycle: fraction of time
    the radio may transmit, in (0, 1] (regulatory limit on LoRa-class links, e.g. 0.01 in EU868).
    """

    a: str
    b: str
    bandwidth_mbps: float
    latency_ms: float
    loss: float = 0.0
    tx_nj_per_bit: float = DEFAULT_TX_NJ_PER_BIT
    rx_nj_per_bit: float = DEFAULT_RX_NJ_PER_BIT
    duty_cycle: float = 1.0

    def __post_init__(self) -> None:
        label = f"<Link {self.a} <-> {self.b}>"
        _site_name(self.a, label, "a")
        _site_name(self.b, label, "b")
        if self.a == self.b:
            fail(label, "b", f"a link from a site to itself ({self.a!r})")
        _number(self.bandwidth_mbps, label, "bandwidth_mbps", "positive")
        _number(self.latency_ms, label, "latency_ms", "non-negative")
        _number(self.loss, label, "loss", "loss")
        _number(self.tx_nj_per_bit, label, "tx_nj_per_bit", "non-negative")
        _number(self.rx_nj_per_bit, label, "rx_nj_per_bit", "non-negative")
        _number(self.duty_cycle, label, "duty_cycle", "fraction")

    def connects(self, x: str, y: str) -> bool:
        """True when this link joins ``x`` and ``y``, in either order."""
        return {self.a, self.b} == {x, y} and x != y

    def other(self, site: str) -> str:
        """The far end of the link seen from ``site``."""
        if site == self.a:
            return self.b
        if site == self.b:
            return self.a
        raise ValueError(f"site {site!r} is not an end of the link {self.a} <-> {self.b}")


@dataclass(frozen=True)
class Placement:
    """Where each expert lives: ``(layer, expert) -> site names`` holding a copy (replicas allowed).

    Replica tuples are sorted and deduplicated, so equal placements compare equal whatever order they were
    written in; which replica serves a patch is the coordinator's choice. ``fingerprint`` records which model
    the placement was made for (free text set by the partitioner), None when unknown.
    """

    assignment: Mapping[tuple[int, int], tuple[str, ...]]
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        norm: dict[tuple[int, int], tuple[str, ...]] = {}
        for (layer, expert), sites in dict(self.assignment).items():
            replicas = (sites,) if isinstance(sites, str) else tuple(sites)
            if not replicas:
                raise ValueError(f"Placement: expert {expert} of layer {layer} has an empty site list")
            norm[(int(layer), int(expert))] = tuple(sorted(set(replicas)))
        object.__setattr__(self, "assignment", MappingProxyType(dict(sorted(norm.items()))))

    def __hash__(self) -> int:
        return hash((tuple(self.assignment.items()), self.fingerprint))

    def layers(self) -> tuple[int, ...]:
        """The layers that have at least one placed expert, ascending."""
        return tuple(sorted({layer for layer, _ in self.assignment}))

    def experts(self, layer: int) -> tuple[int, ...]:
        """The placed experts of ``layer``, ascending."""
        return tuple(e for (lay, e) in self.assignment if lay == layer)

    def sites(self) -> tuple[str, ...]:
        """Every site that holds at least one expert, sorted."""
        return tuple(sorted({s for replicas in self.assignment.values() for s in replicas}))

    def sites_for(self, layer: int, expert: int) -> tuple[str, ...]:
        """The sites holding ``expert`` of ``layer`` (sorted); KeyError when it is not placed."""
        try:
            return self.assignment[(layer, expert)]
        except KeyError:
            raise KeyError(f"expert {expert} of layer {layer} is not placed on any site") from None

    def experts_on(self, site: str) -> dict[int, list[int]]:
        """``layer -> experts`` held by ``site``, ascending; layers where it holds none are left out."""
        out: dict[int, list[int]] = {}
        for (layer, expert), replicas in self.assignment.items():
            if site in replicas:
                out.setdefault(layer, []).append(expert)
        return out

    def to_yaml_dict(self) -> dict[int, dict[str, list[int]]]:
        """The human form written to files: ``layer -> site -> [experts]``, all sorted."""
        out: dict[int, dict[str, list[int]]] = {}
        for (layer, expert), replicas in self.assignment.items():
            for site in replicas:
                out.setdefault(layer, {}).setdefault(site, []).append(expert)
        return {layer: dict(sorted(per_site.items())) for layer, per_site in out.items()}


@dataclass(frozen=True)
class OffloadOptions:
    """``offload:``: the site offload-image sends images to (None: the remote site with the most gflops whose
    memory holds the whole model, chosen by the coordinator) and its Classify address (None: the site's host, port +
    :data:`OFFLOAD_PORT_OFFSET`)."""

    site: str | None = None
    address: str | None = None


@dataclass(frozen=True)
class AdaptiveOptions:
    """``adaptive:``: what the policy minimises, and its hysteresis: switch only when another strategy is predicted
    cheaper by more than ``margin`` (a fraction) for ``consecutive`` decisions in a row, fewer as the gain grows
    (:func:`moevit.partition.policy.decisions_needed`); idle links are probed at
    most once per ``probe_interval_s``; a strategy adaptive has not used for ``strategy_probe_s`` is run once on
    the last image (0: never) so its speeds are those of now."""

    objective: str = "latency"
    margin: float = 0.1
    consecutive: int = 3
    probe_interval_s: float = 2.0
    strategy_probe_s: float = 5.0


@dataclass(frozen=True)
class Topology:
    """A parsed, validated ``sites.yaml``. Build it with :func:`load_topology` or :func:`parse_topology`.

    path: the file it was read from (``"<string>"`` for in-memory data); model: the checkpoint, absolute, or
    None; sites: name -> Site, sorted by name; links: in file order; placement: from the file or None (then
    :func:`default_placement` applies); placement_source: ``"inline"``, the placement file's absolute path,
    or None; fallback: one of :data:`FALLBACKS`.
    """

    path: str
    model: Path | None
    coordinator: str
    sites: Mapping[str, Site]
    links: tuple[Link, ...] = ()
    placement: Placement | None = None
    placement_source: str | None = None
    fallback: str = "fail"
    rpc: RpcOptions = field(default_factory=RpcOptions)
    strategy: str = "split"
    offload: OffloadOptions = field(default_factory=OffloadOptions)
    adaptive: AdaptiveOptions = field(default_factory=AdaptiveOptions)

    def offload_address(self, site: str) -> str:
        """Where ``site`` serves the whole model's Classify for offload-image (see :class:`OffloadOptions`)."""
        if self.offload.address is not None and self.offload.site in (None, site):
            return self.offload.address
        s = self.site(site)
        host = f"[{s.host}]" if ":" in s.host else s.host
        port = s.port + OFFLOAD_PORT_OFFSET
        if port > 65535:
            fail(self.path, "offload.address", f"site {site}'s port {s.port} + {OFFLOAD_PORT_OFFSET} is over 65535: "
                 "give offload.address")
        return f"{host}:{port}"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", MappingProxyType(dict(sorted(dict(self.sites).items()))))
        object.__setattr__(self, "links", tuple(self.links))
        for name, site in self.sites.items():
            if site.name != name:
                fail(self.path, f"sites.{name}", f"Site object is named {site.name!r}")
        if self.coordinator not in self.sites:
            fail(self.path, "coordinator", f"{self.coordinator!r} is not a site ({', '.join(self.sites)})")
        for i, link in enumerate(self.links):
            for end in (link.a, link.b):
                if end not in self.sites:
                    fail(self.path, f"links[{i}]", f"unknown site {end!r}")
        if self.fallback not in FALLBACKS:
            fail(self.path, "fallback", f"expected one of {', '.join(FALLBACKS)}, got {describe(self.fallback)}")

    def site(self, name: str) -> Site:
        """The site called ``name``; KeyError naming the known sites otherwise."""
        try:
            return self.sites[name]
        except KeyError:
            raise KeyError(f"unknown site {name!r} (sites: {', '.join(self.sites)})") from None

    def codec_for(self, name: str) -> str:
        """The token codec of the coordinator's calls to site ``name``: its own ``rpc.codec``, else the topology's."""
        return self.site(name).codec or self.rpc.codec

    def link_between(self, a: str, b: str) -> Link | None:
        """The direct link joining ``a`` and ``b`` in either order, or None."""
        for link in self.links:
            if link.connects(a, b):
                return link
        return None

    def remote_sites(self) -> tuple[Site, ...]:
        """Every site except the coordinator, sorted by name."""
        return tuple(site for name, site in self.sites.items() if name != self.coordinator)

    def require_links_to_coordinator(self) -> None:
        """Refuse a topology where some non-coordinator site has no direct link to the coordinator.

        The coordinator sends patch tokens straight to each expert's site, so it needs one hop to every site.
        ``load_topology`` calls this by default; the simulator may load with it off to study multi-hop layouts.
        """
        missing = [s.name for s in self.remote_sites() if self.link_between(self.coordinator, s.name) is None]
        if len(missing) == 1:
            fail(
                self.path,
                f"sites.{missing[0]}",
                f"no link to the coordinator {self.coordinator!r}; add to links: "
                f"{{between: [{self.coordinator}, {missing[0]}], bandwidth_mbps: ..., latency_ms: ...}}",
            )
        if missing:
            fail(
                self.path,
                "links",
                f"sites with no link to the coordinator {self.coordinator!r}: {', '.join(missing)}; "
                "add a links entry between the coordinator and each",
            )

    def resolve_placement(self, moe_layers: Mapping[int, int]) -> Placement:
        """The file's placement, or the default one when absent; validated against ``moe_layers``."""
        placement = self.placement if self.placement is not None else default_placement(self, moe_layers)
        validate_placement(placement, self, moe_layers)
        return placement


# --------------------------------------------------------------------------------------------- placement


def _parse_layers(
    raw: Any, file: str, key: str, known_sites: Iterable[str] | None, where: str
) -> dict[tuple[int, int], list[str]]:
    """Parse ``layer -> site -> experts`` (experts: a list of indices or one index)."""
    layers = mapping(raw, file, key, "a mapping of layer -> site -> experts")
    if not layers:
        fail(file, key or "top level", "expected at least one layer, got an empty mapping")
    known = sorted(known_sites) if known_sites is not None else None
    out: dict[tuple[int, int], list[str]] = {}
    seen_layers: set[int] = set()
    for layer_key, per_site in layers.items():
        layer = index(layer_key, file, join(key, layer_key), "a layer index")
        lkey = join(key, layer)
        if layer in seen_layers:
            fail(file, lkey, f"layer {layer} is listed twice (as {layer_key!r} and as another spelling)")
        seen_layers.add(layer)
        per_site = mapping(per_site, file, lkey, "a mapping of site -> experts")
        if not per_site:
            fail(file, lkey, "expected at least one site, got an empty mapping")
        for site_key, experts in per_site.items():
            skey = join(lkey, site_key)
            if known is not None:
                site = _known_site(site_key, file, skey, known, where)
            else:
                site = _site_name(site_key, file, skey)
            items = experts if isinstance(experts, list) else [experts]
            seen: set[int] = set()
            for i, e in enumerate(items):
                ekey = f"{skey}[{i}]" if isinstance(experts, list) else skey
                expert = index(e, file, ekey, "an expert index")
                if expert in seen:
                    fail(file, ekey, f"expert {expert} is listed twice under site {site!r}")
                seen.add(expert)
                out.setdefault((layer, expert), []).append(site)
    return out


def parse_placement(
    data: Any,
    path: str = STRING_SOURCE,
    *,
    known_sites: Iterable[str] | None = None,
    allow_wrapper: bool = True,
    key: str = "",
    sites_from: str | None = None,
) -> Placement:
    """A Placement from parsed YAML: ``{layer: {site: [experts]}}``, or (when ``allow_wrapper``) the file
    form ``{placement: {layer: {site: [experts]}}, fingerprint: <str>}``. ``known_sites``, when given,
    refuses any other site name; ``sites_from`` names where they come from in that error (a topology file)."""
    data = mapping(data, path, key, "a mapping of layer -> site -> experts")
    fingerprint: str | None = None
    if allow_wrapper and any(k in ("placement", "fingerprint") for k in data):
        check_keys(data, path, key, **_PLACEMENT_FILE_KEYS)
        fingerprint = data.get("fingerprint")
        if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint):
            fail(path, join(key, "fingerprint"), f"expected a non-empty string, got {describe(fingerprint)}")
        key = join(key, "placement")
        data = data["placement"]
    where = f" in {sites_from}" if sites_from else ""
    assignment = _parse_layers(data, path, key, known_sites, where)
    return Placement({k: tuple(v) for k, v in assignment.items()}, fingerprint=fingerprint)


def load_placement(
    path: str | os.PathLike[str], *, known_sites: Iterable[str] | None = None, sites_from: str | None = None
) -> Placement:
    """Read a placement file (either form; see :func:`parse_placement`)."""
    return parse_placement(read_yaml(path), str(path), known_sites=known_sites, sites_from=sites_from)


def save_placement(placement: Placement, path: str | os.PathLike[str], fingerprint: str | None = None) -> Path:
    """Write ``placement`` in the file form (``fingerprint:`` then ``placement:``), atomically.

    ``fingerprint`` defaults to the placement's own. The write goes to a temporary file then ``os.replace``
    so a coordinator reading the file never sees half of it.
    """
    fp = fingerprint if fingerprint is not None else placement.fingerprint
    data: dict[str, Any] = {}
    if fp is not None:
        data["fingerprint"] = fp
    data["placement"] = placement.to_yaml_dict()
    text = (
        "# Expert placement: layer -> site -> experts held there. An expert under two sites is replicated.\n"
        + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    )
    return atomic_write(path, text)


def _check_moe_layers(moe_layers: Mapping[int, int]) -> dict[int, int]:
    if not isinstance(moe_layers, Mapping) or not moe_layers:
        raise ValueError(f"moe_layers must be a non-empty mapping layer -> num_experts, got {moe_layers!r}")
    out: dict[int, int] = {}
    for layer, n in moe_layers.items():
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (layer, n))
        if not ok or layer < 0 or n < 1:
            raise ValueError(f"moe_layers: expected layer (>= 0) -> num_experts (>= 1), got {layer!r}: {n!r}")
        out[layer] = n
    return dict(sorted(out.items()))


def default_placement(topology: Topology, moe_layers: Mapping[int, int]) -> Placement:
    """The placement used when the topology names none: for each MoE layer, expert ``e`` goes to the site at
    index ``e % n`` of the sites sorted by name (coordinator included), one copy each, no replicas.

    Deterministic (independent of file order) and complete, so the system runs before the partitioner has
    produced a placement; it ignores device speed and memory on purpose.
    """
    layers = _check_moe_layers(moe_layers)
    names = sorted(topology.sites)
    return Placement(
        {(layer, e): (names[e % len(names)],) for layer, n in layers.items() for e in range(n)},
        fingerprint=None,
    )


def _ranges(values: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``'0-2, 5, 7-8'``."""
    vs = sorted(set(values))
    parts: list[str] = []
    i = 0
    while i < len(vs):
        j = i
        while j + 1 < len(vs) and vs[j + 1] == vs[j] + 1:
            j += 1
        parts.append(str(vs[i]) if i == j else f"{vs[i]}-{vs[j]}")
        i = j + 1
    return ", ".join(parts)


def validate_placement(placement: Placement, topology: Topology, moe_layers: Mapping[int, int]) -> None:
    """Check ``placement`` against the topology's sites and the model's MoE layers (``layer -> num_experts``).

    Every expert of every MoE layer must be placed at least once, only on known sites, and nothing may be
    placed for a layer that is not an MoE layer or an expert index the layer does not have. All problems
    are reported together in one TopologyError naming the placement's file.
    """
    layers = _check_moe_layers(moe_layers)
    if placement is topology.placement and topology.placement_source not in (None, "inline"):
        file = str(topology.placement_source)
    else:
        file = topology.path
    problems: list[tuple[str, str]] = []
    unknown_sites = sorted(set(placement.sites()) - set(topology.sites))
    for site in unknown_sites:
        where = {f"placement.{layer}" for layer in placement.experts_on(site)}
        problems.append(
            (
                ", ".join(sorted(where)),
                f"unknown site {site!r} (sites in {topology.path}: {', '.join(topology.sites)})",
            )
        )
    for layer in placement.layers():
        if layer not in layers:
            problems.append(
                (
                    f"placement.{layer}",
                    f"layer {layer} is not an MoE layer of the model (MoE layers: {_ranges(layers)})",
                )
            )
    for layer, n in layers.items():
        placed = set(placement.experts(layer))
        extra = sorted(e for e in placed if e >= n)
        if extra:
            problems.append(
                (
                    f"placement.{layer}",
                    f"expert(s) {_ranges(extra)} out of range: layer {layer} has {n} experts (0-{n - 1})",
                )
            )
        missing = sorted(set(range(n)) - placed)
        if missing:
            problems.append(
                (f"placement.{layer}", f"expert(s) {_ranges(missing)} of layer {layer} are not placed on any site")
            )
    if len(problems) == 1:
        fail(file, *problems[0])
    if problems:
        fail(file, "placement", f"{len(problems)} problems:\n" + "\n".join(f"  {k}: {p}" for k, p in problems))


# ----------------------------------------------------------------------------------------------- loading


def _resolve(value: Any, file: str, key: str, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        fail(file, key, f"expected a file path (a non-empty string), got {describe(value)}")
    p = Path(value)
    if p.is_absolute():
        return Path(os.path.normpath(p))
    # normpath, not resolve(): keep symlinks as written and do not require the file to exist yet
    # (the demo builds the model after the topology is written).
    beside = Path(os.path.normpath(base.absolute() / p))
    # Beside the topology file first; a path written relative to the folder the commands run from (as in the
    # examples, run from the project root) is accepted when only it exists.
    from_cwd = Path(os.path.normpath(Path.cwd() / p))
    return from_cwd if not beside.exists() and from_cwd.exists() else beside


def _parse_device(raw: Any, file: str, key: str) -> Device:
    d = mapping(raw, file, key)
    check_keys(d, file, key, **_DEVICE_KEYS)
    active = _number(d["active_w"], file, join(key, "active_w"), "non-negative")
    idle = _number(d["idle_w"], file, join(key, "idle_w"), "non-negative")
    if idle > active:
        fail(file, join(key, "idle_w"), f"expected at most active_w ({d['active_w']!r}), got {d['idle_w']!r}")
    battery = d.get("battery_wh")
    return Device(
        gflops=_number(d["gflops"], file, join(key, "gflops"), "positive"),
        memory_mb=_number(d["memory_mb"], file, join(key, "memory_mb"), "positive"),
        active_w=active,
        idle_w=idle,
        battery_wh=None if battery is None else _number(battery, file, join(key, "battery_wh"), "positive"),
    )


def _parse_tls(raw: Any, file: str, key: str, base: Path) -> TLSFiles:
    d = mapping(raw, file, key, "a mapping with ca, cert and key (PEM file paths)")
    check_keys(d, file, key, **_TLS_KEYS)
    paths = {k: _resolve(d[k], file, join(key, k), base) for k in ("ca", "cert", "key")}
    for k, p in paths.items():
        if not p.is_file():
            fail(file, join(key, k), f"file {str(p)!r} not found (make one with moe-certs)")
    return TLSFiles(**paths)


def _parse_rpc(raw: Any, file: str) -> RpcOptions:
    if raw is None:
        return RpcOptions()
    d = mapping(raw, file, "rpc")
    check_keys(d, file, "rpc", **_RPC_KEYS)
    hedge = d.get("hedge_ms")
    flags = {}
    for name in ("stream", "packed"):
        flags[name] = d.get(name, True)
        if not isinstance(flags[name], bool):
            fail(file, f"rpc.{name}", f"expected true or false, got {describe(flags[name])}")
    return RpcOptions(
        **flags,
        deadline_s=_number(d.get("deadline_s", 10.0), file, "rpc.deadline_s", "positive"),
        hedge_ms=None if hedge is None else _number(hedge, file, "rpc.hedge_ms", "non-negative"),
        max_message_mb=_number(d.get("max_message_mb", 64.0), file, "rpc.max_message_mb", "positive"),
        codec=_codec(d.get("codec", "fp16"), file, "rpc.codec"),
    )


def _codec(raw: Any, file: str, key: str) -> str:
    """A token codec name (``int8+zstd``, ...), checked against :mod:`moevit_rpc.codecs` (numpy only)."""
    from moevit_rpc.codecs import parse_codec

    try:
        return parse_codec(raw).name
    except ValueError as e:
        fail(file, key, str(e) if isinstance(raw, str) else f"expected a codec name, got {describe(raw)}")


def _parse_sites(raw: Any, file: str, base: Path | None = None) -> dict[str, Site]:
    sites = mapping(raw, file, "sites", "a mapping of site name -> {address, device}")
    if not sites:
        fail(file, "sites", "expected at least one site, got an empty mapping")
    out: dict[str, Site] = {}
    addresses: dict[str, str] = {}
    for name, spec in sites.items():
        _site_name(name, file, join("sites", name))
        key = f"sites.{name}"
        spec = mapping(spec, file, key)
        check_keys(spec, file, key, **_SITE_KEYS)
        address = _address(spec["address"], file, f"{key}.address")
        # Two sites on one host:port would be one daemon answering for both: almost surely a copy-paste slip.
        norm = address.lower()
        if norm in addresses:
            fail(file, f"{key}.address", f"address {address!r} is already used by site {addresses[norm]!r}")
        addresses[norm] = name
        base_dir = base if base is not None else Path.cwd()
        tls = None if spec.get("tls") is None else _parse_tls(spec["tls"], file, f"{key}.tls", base_dir)
        token_file = None
        if spec.get("token_file") is not None:
            token_file = _resolve(spec["token_file"], file, f"{key}.token_file", base_dir)
            if not token_file.is_file():
                fail(file, f"{key}.token_file", f"file {str(token_file)!r} not found")
        codec = None
        if spec.get("rpc") is not None:
            site_rpc = mapping(spec["rpc"], file, f"{key}.rpc")
            check_keys(site_rpc, file, f"{key}.rpc", **_SITE_RPC_KEYS)
            if site_rpc.get("codec") is not None:
                codec = _codec(site_rpc["codec"], file, f"{key}.rpc.codec")
        out[name] = Site(name=name, address=address, device=_parse_device(spec["device"], file, f"{key}.device"),
                         tls=tls, token_file=token_file, codec=codec)
    return out


def _parse_links(raw: Any, file: str, sites: Mapping[str, Site]) -> tuple[Link, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        fail(file, "links", f"expected a list of links, got {describe(raw)}")
    out: list[Link] = []
    seen: dict[frozenset[str], int] = {}
    for i, item in enumerate(raw):
        key = f"links[{i}]"
        d = mapping(item, file, key)
        check_keys(d, file, key, **_LINK_KEYS)
        between = d["between"]
        if not isinstance(between, list) or len(between) != 2:
            fail(file, f"{key}.between", f"expected a list of two site names, got {describe(between)}")
        a = _known_site(between[0], file, f"{key}.between[0]", sites)
        b = _known_site(between[1], file, f"{key}.between[1]", sites)
        if a == b:
            fail(file, f"{key}.between", f"a link from a site to itself ({a!r}) is not allowed")
        pair = frozenset((a, b))
        if pair in seen:
            fail(file, f"{key}.between", f"duplicate link {a} <-> {b} (already links[{seen[pair]}])")
        seen[pair] = i
        out.append(
            Link(
                a=a,
                b=b,
                bandwidth_mbps=_number(d["bandwidth_mbps"], file, f"{key}.bandwidth_mbps", "positive"),
                latency_ms=_number(d["latency_ms"], file, f"{key}.latency_ms", "non-negative"),
                loss=_number(d.get("loss", 0.0), file, f"{key}.loss", "loss"),
                tx_nj_per_bit=_number(
                    d.get("tx_nj_per_bit", DEFAULT_TX_NJ_PER_BIT), file, f"{key}.tx_nj_per_bit", "non-negative"
                ),
                rx_nj_per_bit=_number(
                    d.get("rx_nj_per_bit", DEFAULT_RX_NJ_PER_BIT), file, f"{key}.rx_nj_per_bit", "non-negative"
                ),
                duty_cycle=_number(d.get("duty_cycle", 1.0), file, f"{key}.duty_cycle", "fraction"),
            )
        )
    return tuple(out)


def parse_topology(
    data: Any,
    path: str | os.PathLike[str] = STRING_SOURCE,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    require_coordinator_links: bool = True,
) -> Topology:
    """Validate already-parsed YAML (a dict) into a Topology.

    ``path`` names the source in errors. Relative ``model`` and ``placement`` paths resolve against
    ``base_dir``, by default the folder of ``path`` (the current directory for ``"<string>"``).
    ``require_coordinator_links`` runs :meth:`Topology.require_links_to_coordinator`.
    """
    file = str(path)
    if base_dir is not None:
        base = Path(base_dir)
    elif file == STRING_SOURCE:
        base = Path.cwd()
    else:
        base = Path(file).parent
    if data is None:
        fail(file, "top level", "expected a mapping with keys coordinator, sites, ..., got an empty document")
    d = mapping(data, file, "", "a mapping with keys coordinator, sites, ...")
    check_keys(d, file, "", **_TOP_KEYS)

    sites = _parse_sites(d["sites"], file, base)
    coordinator = _known_site(d["coordinator"], file, "coordinator", sites)
    rpc = _parse_rpc(d.get("rpc"), file)
    links = _parse_links(d.get("links"), file, sites)
    model = None if d.get("model") is None else _resolve(d["model"], file, "model", base)

    fallback = d.get("fallback", "fail")
    if fallback not in FALLBACKS:
        fail(file, "fallback", f"expected one of {', '.join(FALLBACKS)}, got {describe(fallback)}")

    strategy = one_of(d.get("strategy", "split"), file, "strategy", STRATEGIES)
    offload = OffloadOptions()
    if d.get("offload") is not None:
        o = mapping(d["offload"], file, "offload")
        check_keys(o, file, "offload", **_OFFLOAD_KEYS)
        offload = OffloadOptions(
            site=None if o.get("site") is None else _known_site(o["site"], file, "offload.site", sites),
            address=None if o.get("address") is None else _address(o["address"], file, "offload.address"))
        if offload.site == coordinator:
            fail(file, "offload.site", f"{coordinator!r} is the coordinator: offload-image sends images elsewhere")
    adaptive = AdaptiveOptions()
    if d.get("adaptive") is not None:
        a = mapping(d["adaptive"], file, "adaptive")
        check_keys(a, file, "adaptive", **_ADAPTIVE_KEYS)
        adaptive = AdaptiveOptions(
            objective=one_of(a.get("objective", "latency"), file, "adaptive.objective", OBJECTIVES),
            margin=_number(a.get("margin", 0.1), file, "adaptive.margin", "non-negative"),
            consecutive=integer(a.get("consecutive", 3), file, "adaptive.consecutive", lo=1),
            probe_interval_s=_number(a.get("probe_interval_s", 2.0), file, "adaptive.probe_interval_s", "positive"),
            strategy_probe_s=_number(a.get("strategy_probe_s", 5.0), file, "adaptive.strategy_probe_s",
                                     "non-negative"))

    raw_placement = d.get("placement")
    placement: Placement | None = None
    source: str | None = None
    if isinstance(raw_placement, str):
        placement_file = _resolve(raw_placement, file, "placement", base)
        if not placement_file.is_file():
            fail(file, "placement", f"placement file {str(placement_file)!r} not found")
        placement = load_placement(placement_file, known_sites=sites, sites_from=file)
        source = str(placement_file)
    elif isinstance(raw_placement, Mapping):
        # Inline: the bare layer -> site -> experts form only; a fingerprint belongs in a placement file.
        placement = parse_placement(raw_placement, file, known_sites=sites, allow_wrapper=False, key="placement")
        source = "inline"
    elif raw_placement is not None:
        fail(
            file,
            "placement",
            f"expected a placement file path or a mapping layer -> site -> experts, got {describe(raw_placement)}",
        )

    topology = Topology(
        path=file,
        model=model,
        coordinator=coordinator,
        sites=sites,
        links=links,
        placement=placement,
        placement_source=source,
        fallback=fallback,
        rpc=rpc,
        strategy=strategy,
        offload=offload,
        adaptive=adaptive,
    )
    if require_coordinator_links:
        topology.require_links_to_coordinator()
    return topology


def load_topology(path: str | os.PathLike[str], *, require_coordinator_links: bool = True) -> Topology:
    """Read and validate a topology file (``sites.yaml``); relative paths in it resolve against its folder (or,
    when only that exists, against the current folder)."""
    return parse_topology(read_yaml(path), str(path), require_coordinator_links=require_coordinator_links)
