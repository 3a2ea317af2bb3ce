"""The strategies of ``strategy:`` in sites.yaml, for real: ``split`` (the trunk here, experts where the placement
puts them), ``local`` (every expert in this process), ``offload-image`` (the image, PNG-encoded at the model's input
size, to one site's Classify server running the whole model; its probabilities back) and ``adaptive`` (per batch,
the cheapest of those by :func:`moevit.partition.policy.choose`, on link estimates this module keeps).

:class:`StrategyRuntime` wraps the :class:`~moevit.coordinator.runtime.SplitRuntime` the rest of the coordinator
knows (every attribute it does not define is the wrapped runtime's) and stamps each :class:`BatchResult` with the
strategy that served it. :class:`LinkEstimator` keeps each link's round-trip time and throughput as moving averages
(EWMA) of the coordinator's own calls and probes links idle for ``adaptive.probe_interval_s`` with a health check,
at most once per interval each, in the gap just after an image (never beside one); under ``adaptive`` a throughput
sample STEP_FACTOR off the estimate wakes the prober to probe that link at once (at most once per interval), whose
sample confirms the change or shows a hiccup before the next image. Under ``adaptive`` the same prober thread also
runs a *strategy probe* of each strategy the policy has not used for ``adaptive.strategy_probe_s``: split runs the
last image through the workers (the camera's and the workers' speeds, the relay links' throughput), offload-image
sends the offload site a blank image (its speed); otherwise a strategy's estimates would stay those of when it was
last used. A probe holds the runtime's forward lock, as every image does: it starts only when no image is running,
and an image that arrives meanwhile waits for it (counted, with the probes, in the summary and the metrics).
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moevit.coordinator.runtime import BatchResult, CoordinatorError, SplitRuntime
from moevit.coordinator.sites import SiteError
from moevit.deploy.topology import Placement, Topology
from moevit.partition.policy import (
    EWMA_ALPHA,
    FIXED,
    Belief,
    LinkEstimate,
    ModelFigures,
    NoFeasibleStrategy,
    PolicyState,
    StrategyCost,
    choose,
    predict,
)

from moevit.calibration import read_calibration
from moevit.checkpoint import load_checkpoint
from moevit.data import denormalize
from moevit.flops import count_macs
from moevit_rpc.channels import open_channel
from moevit_rpc.security import token_metadata
from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc

log = logging.getLogger("moevit.coordinator")

# EWMA_ALPHA, STEP_FACTOR and the rule for a link's throughput samples: moevit.partition.policy.Belief. A sample
# STEP_FACTOR off awaits a second the same way before it replaces the estimate (one alone may be a hiccup); the prober
# takes that second sample at once (_Prober._links: the link is probed right after the call that stepped, its pad
# included), so a link that faded during an image is believed before the next image, not after it
# an idle link's probe: PROBE_PAIRS health checks (the fastest is its round trip: load on the machine only adds time);
# then, when that round trip moved RTT_CHANGE-fold since the link's throughput was last measured (a fade that slows
# the rate also lengthens each exchange) or PAD_INTERVAL_S after the last pad, as many checks carrying a pad of random
# binary metadata (sent as is, PAD_FRAMING bytes of header on top, measured through sim/linkproxy.py): the pad's time
# on the wire is a throughput sample of a link no call uses. The pad is sized to PROBE_AIRTIME_S at the link's
# topology rate (PROBE_PAD_MIN..PROBE_PAD_MAX bytes: far under gRPC's 8 KiB metadata limit): large enough to show over
# the noise of a loaded machine at the good rate, sent rarely because on a faded link it costs airtime and energy.
PROBE_PAD_MIN, PROBE_PAD_MAX, PAD_FRAMING, PROBE_AIRTIME_S, PROBE_PAIRS = 512, 4096, 82, 0.01, 2
PROBE_TIMEOUT_S = 1.0  # a link probe's health check unanswered this long marks the site down
RTT_CHANGE, PAD_INTERVAL_S = 2.0, 10.0
MIN_PROBE_TRANSFER_S = 1e-3  # a pad's time below this reads as "at least this fast"
CLASSIFY_FRAMING = 20  # a ClassifyRequest's bytes beside its PNG (name, top_k)
# A strategy probe starts within this long after an image ends (the prober is woken then), when the next image is
# furthest away, or once no image has come for a whole strategy_probe_s; never in the middle of the gap between two
# images. Started whenever the 0.2-s poll found them due, split's probes (70 ms holding the forward lock) and
# offload-image's (the whole model at the hut, on the same two cores in the emulation) delayed the image after them:
# adaptive's p95 per phase of bench/bench_adaptive_emulated.py was +3 to +14 % over the best fixed strategy's.
PROBE_AFTER_IMAGE_S = 0.15
# An idle link's probe keeps to the same gap (its health checks and pads run on this process's gRPC threads, and in
# the emulation on the link proxies' event loops, which an image would share its cores and interpreter with), or
# starts once no image has come for LINK_IDLE_S (at least 4 probe intervals). A link whose last sample stepped is
# probed at once all the same: a fade is news the next image needs.
LINK_IDLE_S = 2.0
# ... unless images come back to back (a batch run) and never leave a gap: a probe this many times overdue starts
# beside them (an exclusive strategy probe still waits for the forward lock between two images)
OVERDUE = 2.0


def pad_bytes(throughput_bps: float) -> int:
    """The probe pad for a link estimated at ``throughput_bps``."""
    return int(min(PROBE_PAD_MAX, max(PROBE_PAD_MIN, throughput_bps * PROBE_AIRTIME_S / 8)))
MIN_TRANSFER_S = 50e-6  # below this a call's transfer time is noise: its throughput sample is not taken
FLOPS_PER_MAC = 2
# bytes per number of each token codec on the wire, for the policy's token size (scales and headers aside)
_CODEC_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


def model_mb(model: torch.nn.Module) -> float:
    """The model's weights and buffers as held in memory (MiB)."""
    n = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return n / (1 << 20)


def encode_png(x: torch.Tensor) -> bytes:
    """One model input (normalised [3, S, S]) as a PNG of its pixels: lossless at 8 bits, so the offload site decodes
    (moevit.data.load_image) what the camera would have classified, within half a grey level."""
    from PIL import Image

    rgb = (denormalize(x.float()).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- link estimates


@dataclass
class _Link:
    nominal: LinkEstimate
    rtt_s: float | None = None
    throughput_bps: float | None = None
    samples: int = 0
    probes: int = 0
    up: bool = True
    last_used: float = 0.0
    last_probe: float = 0.0
    last_pad: float = 0.0
    rtt_at_sample: float | None = None  # the round trip when the throughput was last measured
    step_way: int = 0  # the last sample was STEP_FACTOR above (1) or below (-1) the estimate
    step_at: float = 0.0  # when that pending step appeared (monotonic): a probe confirms it at once
    # the last such prompt probe: at most one per probe interval, the first one interval after start (as an idle
    # probe waits an interval after a call; the warm-up's blank images leave the first real calls' samples off)
    last_confirm: float = field(default_factory=time.monotonic)


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * new


def _throughput(lk: _Link, sample: float) -> bool:
    """Take a throughput sample into ``lk`` (:meth:`Belief.update`: its moving average in log terms, or the sample
    itself when it is the second in a row STEP_FACTOR off the same way). True when it leaves a new step pending."""
    b = Belief(lk.throughput_bps, lk.step_way).update(sample)
    stepped = b.pending != 0 and b.pending != lk.step_way
    lk.throughput_bps, lk.step_way = b.value, b.pending
    if stepped:
        lk.step_at = time.monotonic()
    return stepped


@dataclass
class LinkEstimator:
    """RTT and throughput of the coordinator's link to each remote site, from its own calls (EWMA).

    ``call(site, nbytes, seconds, server_s)`` takes one call: its RTT-free time ``seconds - rtt - server_s``
    gives a throughput sample; ``rtt(site, seconds)`` a probe's round trip. Until a link has samples its
    topology figures stand (:meth:`LinkEstimate.from_link`)."""

    links: dict[str, _Link] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # set when a sample leaves a step pending: wakes the prober to confirm it now, not at its next tick
    stepped: threading.Event = field(default_factory=threading.Event, repr=False)

    @classmethod
    def for_topology(cls, topology: Topology, sites: list[str]) -> LinkEstimator:
        out = cls()
        for s in sites:
            link = topology.link_between(topology.coordinator, s)
            nominal = LinkEstimate.from_link(link) if link is not None else LinkEstimate(0.01, 1e7)
            out.links[s] = _Link(nominal)
        return out

    def rtt(self, site: str, seconds: float, probe: bool = False, padded_s: float | None = None,
            pad: int = PROBE_PAD_MAX) -> None:
        """A round trip of an empty call; a probe's ``padded_s``: the same with a ``pad`` of bytes more up."""
        with self.lock:
            lk = self.links[site]
            lk.rtt_s, lk.up = _ewma(lk.rtt_s, seconds), True
            if padded_s is not None:
                # the pad's time on the wire: a throughput sample of an idle link (so a strategy not in use is
                # judged on its link as it is now, not as it was when last used); a pad faster than the clock's noise
                # reads as the topology's figure at most
                transfer = max(padded_s - seconds, MIN_PROBE_TRANSFER_S)
                sample = min(8 * (pad + PAD_FRAMING) / transfer, lk.nominal.throughput_bps)
                if _throughput(lk, sample):
                    self.stepped.set()
                lk.rtt_at_sample = seconds
            lk.probes += probe
            lk.samples += not probe

    def call(self, site: str, nbytes: int, seconds: float, server_s: float = 0.0) -> None:
        with self.lock:
            lk = self.links[site]
            lk.last_used, lk.up = time.monotonic(), True
            rtt = lk.rtt_s if lk.rtt_s is not None else 0.0
            transfer = seconds - rtt - server_s
            if transfer > MIN_TRANSFER_S and nbytes > 0:
                if _throughput(lk, 8 * nbytes / transfer):
                    self.stepped.set()
                lk.rtt_at_sample = lk.rtt_s
            if lk.rtt_s is None:  # no probe yet: the whole call bounds the round trip from above
                lk.rtt_s = max(0.0, seconds - server_s)
            lk.samples += 1

    def busy(self, site: str) -> None:
        """A call to ``site`` starts: the link is in use, not idle (no probe until it has been idle a while)."""
        with self.lock:
            self.links[site].last_used = time.monotonic()

    def down(self, site: str) -> None:
        with self.lock:
            self.links[site].up = False

    def estimates(self) -> dict[str, LinkEstimate]:
        with self.lock:
            return {s: LinkEstimate(rtt_s=lk.rtt_s if lk.rtt_s is not None else lk.nominal.rtt_s,
                                    throughput_bps=lk.throughput_bps or lk.nominal.throughput_bps,
                                    tx_nj_per_bit=lk.nominal.tx_nj_per_bit, rx_nj_per_bit=lk.nominal.rx_nj_per_bit,
                                    up=lk.up) for s, lk in self.links.items()}

    def summary(self) -> dict[str, dict[str, Any]]:
        est = self.estimates()
        with self.lock:
            return {s: {"rtt_ms": round(e.rtt_s * 1e3, 3), "throughput_mbps": round(e.throughput_bps / 1e6, 3),
                        "up": e.up, "samples": self.links[s].samples, "probes": self.links[s].probes,
                        "measured": self.links[s].rtt_s is not None} for s, e in est.items()}


def padded_check(health_stub: Any, timeout: float, pad: int, metadata: Any = None) -> float | None:
    """Seconds of one health Check carrying ``pad`` bytes of random binary metadata; None when it fails."""
    import os

    md = [*(metadata or ()), ("x-moevit-probe-bin", os.urandom(pad))]
    t0 = time.perf_counter()
    try:
        health_stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout, metadata=md)
    except grpc.RpcError:
        return None
    return time.perf_counter() - t0


@dataclass
class StrategyProbe:
    """One strategy's probe: ``run(timeout)`` measures it once (bytes it moved; None when it could not run). Due
    when the strategy has not run for the prober's ``strategy_interval`` (``last``: monotonic time of its last image
    or probe); skipped while a link in ``sites`` is down. ``exclusive``: it runs a forward of this runtime (split):
    only while no image runs, holding the forward lock; otherwise (offload-image's blank image, computed at the
    offload site) beside the images."""

    strategy: str
    sites: tuple[str, ...]
    run: Callable[[float], int | None]
    exclusive: bool = True
    last: float = 0.0
    count: int = 0  # probes that ran
    seconds: float = 0.0  # their wall time (the forward lock held)
    cpu_s: float = 0.0  # this process's CPU time in them (the prober thread's)
    bytes: int = 0  # what they moved on the links (payload)

    def as_dict(self) -> dict[str, Any]:
        return {"probes": self.count, "seconds": round(self.seconds, 4), "cpu_s": round(self.cpu_s, 4),
                "bytes": self.bytes}


class _Prober(threading.Thread):
    """Probes each link idle for ``interval`` s, at most once per ``interval`` per link: PROBE_PAIRS pairs of a
    health check and a padded one (:func:`padded_check`) give its round trip and throughput. Then each strategy
    probe that is due (:class:`StrategyProbe`), when ``gate`` is free (:meth:`StrategyRuntime.hold_probes` holds it)
    and, for an exclusive one, ``forward`` (the runtime's forward lock): never waiting for an image."""

    def __init__(self, estimator: LinkEstimator, checks: dict[str, Any], interval: float,
                 padded: dict[str, Any] | None = None) -> None:
        super().__init__(daemon=True, name="link-prober")
        self.estimator, self.checks, self.interval = estimator, checks, interval
        self.padded = padded or {}  # site -> (timeout, pad) -> seconds of a padded check, or None
        self.strategies: list[StrategyProbe] = []
        self.strategy_interval = 0.0  # 0: no strategy probes
        self.forward: Any = None  # the runtime's forward lock
        self.gate = threading.Lock()  # held by each strategy probe, and by whoever holds the probes off
        self.probing = False  # a strategy probe holds the forward lock now
        self.image_end = float("-inf")  # monotonic time the last image ended (StrategyRuntime.classify)
        self.images_running = 0  # images in StrategyRuntime.classify now
        self.pass_done = float("-inf")  # monotonic time the latest completed pass over links and strategies began
        self.count_lock = threading.Lock()
        self.stop_event = threading.Event()

    def in_gap(self, idle_s: float) -> bool:
        """A probe may start now: no image runs, and the last one ended at most PROBE_AFTER_IMAGE_S ago (the next is
        furthest away) or at least ``idle_s`` ago (images have stopped coming)."""
        if self.images_running:
            return False
        since = time.monotonic() - self.image_end
        return since <= PROBE_AFTER_IMAGE_S or since >= idle_s

    def run(self) -> None:
        while not self.stop_event.is_set():
            if self.estimator.stepped.wait(min(0.2, self.interval)):  # a step to confirm: now
                self.estimator.stepped.clear()
            if self.stop_event.is_set():
                break
            started = time.monotonic()
            self._links()
            self._strategies()
            self.pass_done = started  # (StrategyRuntime.settle waits for a pass begun after the last image)

    def _strategies(self) -> None:
        if not self.strategy_interval or self.forward is None:
            return
        gap = self.in_gap(self.strategy_interval)  # else an image runs, or mid-gap: the next may be about to come
        for p in self.strategies:
            now = time.monotonic()
            if self.stop_event.is_set() or now - p.last < self.strategy_interval:
                continue
            if not gap and now - p.last < OVERDUE * self.strategy_interval:
                continue  # probe after the image ends, or after a long idle, or once images never leave a gap
            if any(not self.estimator.links[s].up for s in p.sites if s in self.estimator.links):
                continue  # the health probes above bring it back; a probe would wait out a deadline
            if not self.gate.acquire(blocking=False):
                return  # probes are held off (hold_probes): try at the next tick
            if p.exclusive and not self.forward.acquire(blocking=False):
                self.gate.release()
                return  # an image is running (it may be this strategy's): try at the next tick
            self.probing = p.exclusive
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                moved = p.run(max(1.0, 4 * self.interval))
            except Exception as e:  # a probe must never end the prober: the next one tries again
                log.warning("strategy probe of %s failed: %s", p.strategy, e)
                moved = None
            finally:
                self.probing = False
                p.last = time.monotonic()
                if p.exclusive:
                    self.forward.release()
                self.gate.release()
            if moved is not None:
                p.count += 1
                p.seconds += time.perf_counter() - t0
                p.cpu_s += time.thread_time() - c0
                p.bytes += moved

    def _links(self) -> None:
        """One pass over the links (see the class docstring)."""
        now = time.monotonic()
        for site, check in self.checks.items():
            lk = self.estimator.links[site]
            # a sample STEP_FACTOR off awaits its confirming second (_throughput): probe the link now, even just used
            # (a link that faded during an image was believed only after the next image had gone the same way);
            # at most once per interval, so a link whose samples swing 4-fold every time is not probed without end
            confirm = (site in self.padded and lk.step_way != 0 and lk.step_at >= lk.last_probe
                       and now - lk.last_confirm >= self.interval)
            idle, quiet = now - max(lk.last_used, lk.last_probe), max(LINK_IDLE_S, 4 * self.interval)
            if not confirm and (idle < self.interval or not (self.in_gap(quiet) or idle >= OVERDUE * quiet)):
                continue
            if not self.gate.acquire(blocking=False):
                return  # probes are held off (hold_probes: another strategy's image is timed): at the next pass
            try:
                self._probe_link(site, check, lk, now, confirm)
            finally:
                self.gate.release()

    def _probe_link(self, site: str, check: Any, lk: _Link, now: float, confirm: bool) -> None:
        """One link's probe (see the class docstring)."""
        lk.last_probe = now
        if confirm:
            lk.last_confirm = now
        # a second whatever the interval: a check slowed by a busy machine is not a site that stopped answering
        # (at 0.2 s a loaded camera declared a healthy site down and fell back, for no reason)
        timeout = PROBE_TIMEOUT_S
        bare: list[float] = []
        for _ in range(PROBE_PAIRS if site in self.padded else 1):
            t0 = time.perf_counter()
            if check(timeout) != "SERVING":
                break
            bare.append(time.perf_counter() - t0)
        if not bare:
            self.estimator.down(site)
            return
        rtt, ref = min(bare), lk.rtt_at_sample
        padded: list[float] = []
        pad = pad_bytes(lk.nominal.throughput_bps)
        changed = ref is None or ref <= 0 or max(rtt / ref, ref / rtt) >= RTT_CHANGE
        # a sample STEP_FACTOR off awaits its confirming second (_throughput): pad again now, not PAD_INTERVAL_S
        # later (a link back from a fade was believed faded for 10 s, the whole time adaptive kept the other
        # strategy)
        if site in self.padded and (changed or lk.step_way != 0 or now - lk.last_pad >= PAD_INTERVAL_S):
            lk.last_pad = now
            for _ in range(PROBE_PAIRS):
                if (p := self.padded[site](timeout, pad)) is not None:
                    padded.append(p)
        self.estimator.rtt(site, rtt, probe=True, padded_s=min(padded) if padded else None, pad=pad)


# ---------------------------------------------------------------------------------------------- offload client


class OffloadClient:
    """The Classify stub of the offload site: one image per call, its probabilities back as logits
    (``temperature * log p``, so the camera's calibration gives back the site's probabilities)."""

    def __init__(self, site: str, address: str, topology: Topology, *, num_classes: int, temperature: float,
                 deadline_s: float, max_message_mb: float) -> None:
        self.site, self.address, self.num_classes, self.temperature = site, address, num_classes, temperature
        self.deadline_s = deadline_s
        self.channel = open_channel(address, tls=topology.site(topology.coordinator).tls,
                                    max_message_mb=max_message_mb)
        self.metadata = token_metadata(topology.site(site).token()) or None
        self.stub = expert_pb2_grpc.ClassifierServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.calls = self.failures = self.bytes_sent = self.bytes_received = 0
        self.server_s: float | None = None  # EWMA of the site's own time per image (its reported latency_ms)
        self.last_call_s = self.last_server_s = 0.0  # the last call: its time here, the site's reported time
        self._blank: tuple[int, bytes] | None = None  # speed_probe's image

    def health(self, timeout: float = 1.0) -> str:
        try:
            resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def speed_probe(self, size: int, timeout: float) -> int | None:
        """The site's time for one blank image (its reported latency), kept as its speed (``server_s``) so a site
        adaptive has not sent to for a while is judged on its speed now; the image and call counters are not touched
        (a blank PNG is a tenth of a real one's bytes). The bytes it moved; None when the call fails."""
        if self._blank is None or self._blank[0] != size:
            self._blank = (size, encode_png(torch.zeros(3, size, size)))
        req = expert_pb2.ClassifyRequest(image=self._blank[1], name="speed-probe", top_k=1)
        try:
            resp = self.stub.Classify(req, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError:
            return None
        self.server_s = _ewma(self.server_s, resp.latency_ms / 1e3)
        return req.ByteSize() + resp.ByteSize()

    def classify(self, x: torch.Tensor, estimator: LinkEstimator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, C] and degraded flags [B] of a batch, one Classify call per image; SiteError when it fails."""
        logits = torch.full((len(x), self.num_classes), -1e4)
        degraded = torch.zeros(len(x), dtype=torch.bool)
        for i in range(len(x)):
            req = expert_pb2.ClassifyRequest(image=encode_png(x[i]), name=f"offload-{self.calls}",
                                             top_k=self.num_classes)
            t0 = time.perf_counter()
            if estimator is not None:
                estimator.busy(self.site)
            try:
                resp = self.stub.Classify(req, timeout=self.deadline_s, metadata=self.metadata)
            except grpc.RpcError as e:
                self.failures += 1
                if estimator is not None:
                    estimator.down(self.site)
                raise SiteError(self.site, f"Classify at {self.address} failed: {e.code().name}: {e.details()}",
                                e.code()) from None
            seconds = time.perf_counter() - t0
            self.calls += 1
            sent, got = req.ByteSize(), resp.ByteSize()
            self.bytes_sent += sent
            self.bytes_received += got
            if estimator is not None:
                estimator.call(self.site, sent + got, seconds, server_s=resp.latency_ms / 1e3)
            self.server_s = _ewma(self.server_s, resp.latency_ms / 1e3)
            self.last_call_s, self.last_server_s = seconds, resp.latency_ms / 1e3
            for p in resp.top:
                if p.index < self.num_classes:
                    logits[i, p.index] = self.temperature * float(torch.log(torch.tensor(max(p.probability, 1e-30))))
            degraded[i] = resp.degraded
        return logits, degraded

    def close(self) -> None:
        self.channel.close()


# --------------------------------------------------------------------------------------------------- the runtime


def _local_placement(topology: Topology, model: Any) -> Placement:
    return Placement({(layer, e): (topology.coordinator,) for layer, m in model.moe_layers().items()
                      for e in range(m.num_experts)})


def _offload_site(topology: Topology, need_mb: float, required: bool) -> str | None:
    """The offload site: ``offload.site``, else the remote site with the most gflops whose memory holds the model."""
    where = f"{topology.path}: strategy: {topology.strategy}"
    if topology.offload.site is not None:
        s = topology.site(topology.offload.site)
        if s.device.memory_mb < need_mb:
            if required:
                raise CoordinatorError(f"{topology.path}: offload.site: {s.name} memory_mb {s.device.memory_mb:g} "
                                       f"cannot hold the whole model ({need_mb:.1f} MB)")
            return None
        return s.name
    fits = [s for s in topology.remote_sites() if s.device.memory_mb >= need_mb]
    if not fits:
        if required:
            have = ", ".join(f"{s.name} {s.device.memory_mb:g}" for s in topology.remote_sites()) or "no remote site"
            raise CoordinatorError(f"{where}: no site but {topology.coordinator} can hold the whole model "
                                   f"({need_mb:.1f} MB; memory_mb: {have})")
        return None
    return max(fits, key=lambda s: (s.device.gflops, s.device.memory_mb)).name


class StrategyRuntime:
    """A SplitRuntime (``primary``) run under ``topology.strategy`` (see the module docstring)."""

    def __init__(self, strategy: str, primary: SplitRuntime, *, local: SplitRuntime | None = None,
                 offload: OffloadClient | None = None, figures: ModelFigures | None = None) -> None:
        self.strategy, self.primary, self.local, self.offload = strategy, primary, local, offload
        self.figures = figures
        self.state = PolicyState()
        self.counts: dict[str, int] = {}
        self.decisions: dict[str, int] = {}
        self.fallbacks = 0
        self._routing: dict[tuple[int, int], float] = {}
        self.local_s: float | None = None  # EWMA of a whole-model forward here, per image
        self.split_gflops: float | None = None  # EWMA of the camera's speed in split forwards
        self._camera_at = {"local": 0.0, "split": 0.0}  # when each last measured the camera's speed
        self.site_gflops: dict[str, float] = {}  # EWMA of each worker's speed, from its reported compute time
        self._offload_warm = (0, 0, 0)  # offload calls, bytes sent and received by the warm-up
        self._first_png: float | None = None  # the first real image's PNG size, until offload has sent one
        self._routed_images = 0
        # one forward at a time: the images' (from any thread) and split's probe share the runtime's dispatch
        # context, its clients' call records and the speed estimates read back from them
        self._forward = threading.Lock()
        self._probe_image: torch.Tensor | None = None  # the last image adaptive classified: split's probe runs it
        self.probe_waits, self.probe_wait_s = 0, 0.0  # images that waited behind a strategy probe, and how long
        self.strategy_probes: dict[str, StrategyProbe] = {}
        opts = primary.topology.adaptive
        sites = sorted(set(primary.clients) | ({offload.site} if offload is not None else set()))
        self.links = LinkEstimator.for_topology(primary.topology, sites)
        self._prober: _Prober | None = None
        # every strategy keeps its links' estimates fresh (the summary and metrics show them); adaptive decides on them
        checks: dict[str, Any] = {name: c.health for name, c in primary.clients.items()}
        padded: dict[str, Any] = {name: (lambda t, n, c=c: padded_check(c.health_stub, t, n, c.metadata))
                                  for name, c in primary.clients.items()}
        if offload is not None and offload.site not in checks:
            checks[offload.site] = offload.health
            padded[offload.site] = lambda t, n, o=offload: padded_check(o.health_stub, t, n, o.metadata)
        if checks:
            self._prober = _Prober(self.links, checks, opts.probe_interval_s,
                                   padded if strategy == "adaptive" else None)
            self._prober.forward, self._prober.strategy_interval = self._forward, opts.strategy_probe_s
        if strategy == "adaptive" and self._prober is not None:
            # the strategies adaptive is not using keep their estimates of when they last ran unless measured now
            if primary.clients:
                self.strategy_probes["split"] = StrategyProbe("split", tuple(sorted(primary.clients)),
                                                              self._probe_split)
            if offload is not None:
                self.strategy_probes["offload-image"] = StrategyProbe(
                    "offload-image", (offload.site,), lambda t, o=offload: o.speed_probe(self.figures_size, t),
                    exclusive=False)
            self._prober.strategies = list(self.strategy_probes.values())

    def __getattr__(self, name: str) -> Any:  # everything else is the wrapped runtime's
        if name == "primary":
            raise AttributeError(name)
        return getattr(self.primary, name)

    def start(self) -> None:
        """Begin probing idle links (and, under adaptive, unused strategies)."""
        if self._prober is not None and not self._prober.is_alive():
            self._prober.start()

    @contextlib.contextmanager
    def hold_probes(self) -> Iterator[None]:
        """No probe (of a link or a strategy) starts while in this block (one in progress is waited for): the
        emulation holds them off while other strategies' images run on the same machine."""
        if self._prober is None:
            yield
            return
        with self._prober.gate:
            yield

    def settle(self, timeout: float = 2.0) -> None:
        """Wait (at most ``timeout``) until the prober has made a pass begun after the last image ended: the probes
        due in that gap are done. The emulation calls it in each strategy's own turn, so that one strategy's probes
        never run beside another's timed image (on a camera only one strategy runs)."""
        p = self._prober
        if p is None or not p.is_alive():
            return
        deadline = time.monotonic() + timeout
        while p.pass_done < p.image_end and time.monotonic() < deadline:
            time.sleep(0.002)

    def _probe_split(self, timeout: float) -> int | None:
        """Split's probe (the caller holds the forward lock): the last image through the workers, measuring what a
        split image measures (the camera's and workers' speeds, the links' throughput); the routing statistics and
        per-expert token counts leave it out (the image was counted when it was classified). Bytes it moved."""
        x = self._probe_image
        if x is None:
            return None
        rt = self.primary
        tokens, skips = dict(rt.context.tokens), {k: replace(w.counts) for k, w in rt.skippers.items()}
        moved0 = sum(c.traffic.bytes_sent + c.traffic.bytes_received for c in rt.clients.values())
        try:
            self._run("split", x, observe=False)
        except SiteError as e:  # as an image would: the policy leaves split until the site's health is back
            if e.site in self.links.links:
                self.links.down(e.site)
            log.warning("adaptive: split probe failed: %s", e)
        finally:
            rt.context.tokens.clear()
            rt.context.tokens.update(tokens)
            for k, w in rt.skippers.items():
                w.counts = skips[k]
        return sum(c.traffic.bytes_sent + c.traffic.bytes_received for c in rt.clients.values()) - moved0

    # routing statistics: tokens per image per (layer, expert), from the forwards that routed
    def _observe_routing(self, rt: SplitRuntime, before: dict[tuple[int, int], int], images: int) -> None:
        for key, n in rt.context.tokens.items():
            delta = n - before.get(key, 0)
            if delta:
                self._routing[key] = self._routing.get(key, 0.0) + delta
        self._routed_images += images

    def routing(self) -> dict[tuple[int, int], float]:
        n = max(1, self._routed_images)
        return {k: v / n for k, v in self._routing.items()}

    def predict(self) -> dict[str, StrategyCost]:
        assert self.figures is not None
        routing = self.routing()
        per_layer = {}
        for (layer, _), n in routing.items():
            per_layer[layer] = per_layer.get(layer, 0.0) + n
        expert = sum(n * self.figures.expert_flops_per_token.get(layer, 0.0) for layer, n in per_layer.items())
        figures = ModelFigures(**{**self.figures.__dict__, "trunk_flops": max(0.0, self.figures.trunk_flops - expert)})
        o = self.offload
        if o is not None and self._first_png is not None and o.calls <= self._offload_warm[0]:
            figures = replace(figures, image_bytes=self._first_png)  # no real image sent yet: the first one's PNG
        if o is not None and o.calls > self._offload_warm[0]:  # the images' real size on the wire, once sent
            # (the warm-up's blank images are left out: a blank PNG is a tenth of a real one)
            k, sent, got = o.calls - self._offload_warm[0], o.bytes_sent - self._offload_warm[1], \
                o.bytes_received - self._offload_warm[2]
            figures = replace(figures, image_bytes=sent / k, answer_bytes=got / k)
        for name, client in self.primary.clients.items():  # the health watch saw it go: no strategy may count on it
            if not client.up:
                self.links.down(name)
        costs = predict(self.primary.topology, self.primary.placement, routing, self.links.estimates(), figures,
                        offload_site=self.offload.site if self.offload is not None else None,
                        gflops=self._measured_speeds())
        if self.local is None and costs["local"].feasible:
            costs["local"] = StrategyCost(float("inf"), float("inf"), float("inf"), False, "no local copy")
        return costs

    def _measured_speeds(self) -> dict[str, float]:
        """The sites' speeds (GFLOP/s) measured so far: the coordinator's from its whole-model forwards (local), else
        from its own share of split forwards; each worker's from the compute time it reports; the offload site's from
        the time its server reports per image. A site not here keeps its topology figure."""
        topo = self.primary.topology
        assert self.figures is not None
        whole = self.figures.trunk_flops  # the whole model's FLOPs per image (see _figures)
        speeds = dict(self.site_gflops)
        # the camera's speed from whichever measured it last (one CPU: a local figure from before a busy spell is
        # as stale for split as for local)
        if self.local_s is not None and (self.split_gflops is None or
                                         self._camera_at["local"] >= self._camera_at["split"]):
            speeds[topo.coordinator] = whole / self.local_s / 1e9
        elif self.split_gflops is not None:
            speeds[topo.coordinator] = self.split_gflops
        if self.offload is not None and self.offload.server_s is not None:
            speeds[self.offload.site] = whole / self.offload.server_s / 1e9
        return speeds

    def _run(self, strategy: str, x: torch.Tensor, observe: bool = True) -> BatchResult:
        """``x`` through ``strategy``, its measurements taken (``observe``: its routing too; a probe's is not)."""
        if strategy in self.strategy_probes:
            self.strategy_probes[strategy].last = time.monotonic()
        if strategy == "offload-image":
            assert self.offload is not None
            t0 = time.perf_counter()
            logits, degraded = self.offload.classify(x, self.links)
            return BatchResult(logits, degraded, [], time.perf_counter() - t0)
        rt = self.local if strategy == "local" and self.local is not None else self.primary
        before = dict(rt.context.tokens)
        traffic = {n: (c.traffic.calls, c.traffic.bytes_sent + c.traffic.bytes_received)
                   for n, c in rt.clients.items()}
        out = rt.classify(x)
        if rt is self.local:
            self.local_s = _ewma(self.local_s, out.seconds / len(x))
            self._camera_at["local"] = time.monotonic()
        if observe:
            self._observe_routing(rt, before, len(x))
        waited: dict[str, float] = {}
        for name, c in rt.clients.items():  # each call's time less the worker's compute: a throughput sample
            calls0, _ = traffic[name]
            dn = c.traffic.calls - calls0
            if dn > 0:
                with c.traffic.lock:
                    calls = list(zip(list(c.traffic.rpc_ms)[-dn:], list(c.traffic.server_ms)[-dn:],
                                     list(c.traffic.call_bytes)[-dn:], strict=True))
                for ms, server_ms, nbytes in calls:
                    self.links.call(name, nbytes, ms / 1e3, server_s=server_ms / 1e3)
                waited[name] = sum(ms for ms, _, _ in calls) / 1e3
                if self.figures is not None and (server := sum(s for _, s, _ in calls) / 1e3) > 0:
                    flops = self._site_flops(rt, before, name)
                    if flops > 0:
                        self.site_gflops[name] = _ewma(self.site_gflops.get(name), flops / server / 1e9)
        if rt is self.primary and self.figures is not None:
            # the camera's own compute in a split forward: its time less the longest wait on one site (the layers
            # call their sites one after another; sites of one layer at once): its measured speed when local does
            # not run here (the topology's gflops describe field hardware)
            own = out.seconds - max(waited.values(), default=0.0)
            flops = self._site_flops(rt, before, rt.local_site, trunk=True)
            if own > MIN_TRANSFER_S and flops > 0:
                self.split_gflops = _ewma(self.split_gflops, flops / own / 1e9)
                self._camera_at["split"] = time.monotonic()
        return out

    def _site_flops(self, rt: SplitRuntime, before: dict[tuple[int, int], int], site: str,
                    trunk: bool = False) -> float:
        """FLOPs ``site`` ran in the forward just done: the experts' tokens it was sent (counted since ``before``),
        plus the trunk when ``trunk``."""
        assert self.figures is not None
        flops = 0.0
        routed = 0.0
        for (layer, e), n in rt.context.tokens.items():
            delta = n - before.get((layer, e), 0)
            if delta <= 0:
                continue
            fpt = self.figures.expert_flops_per_token.get(layer, 0.0)
            routed += delta * fpt
            replicas = rt.placement.sites_for(layer, e)
            chosen = rt.local_site if rt.local_site in replicas else replicas[0]
            if chosen == site:
                flops += delta * fpt
        if trunk:  # figures.trunk_flops is the whole model's (trunk + one expert per routed token)
            flops += max(0.0, self.figures.trunk_flops - routed)
        return flops

    def classify(self, x: torch.Tensor) -> BatchResult:
        p = self._prober
        if p is None:
            return self._classify(x)
        with p.count_lock:
            p.images_running += 1
        try:
            return self._classify(x)
        finally:
            with p.count_lock:
                p.images_running -= 1
                p.image_end = time.monotonic()
            self.links.stepped.set()  # the gap before the next image starts now: wakes the prober for probes due

    def _classify(self, x: torch.Tensor) -> BatchResult:
        if self.strategy != "adaptive":
            out = self._run(self.strategy, x)
            out.strategy = self.strategy
            self.counts[self.strategy] = self.counts.get(self.strategy, 0) + len(x)
            return out
        t0 = time.perf_counter()
        if not self._forward.acquire(blocking=False):
            behind = self._prober is not None and self._prober.probing
            self._forward.acquire()
            if behind:  # what a probe cost this image (it counts in the image's time)
                self.probe_waits += 1
                self.probe_wait_s += time.perf_counter() - t0
        try:
            return self._adaptive(x, t0)
        finally:
            self._forward.release()

    def _adaptive(self, x: torch.Tensor, t0: float) -> BatchResult:
        self._probe_image = x[:1].detach().clone()
        tried: list[str] = []
        if self.offload is not None and self._first_png is None:
            # the 1.5 B/pixel guess can be 3x off; one PNG of a real image is not (a blank warm-up image is 10x off)
            self._first_png = float(len(encode_png(x[0])) + CLASSIFY_FRAMING)
        while True:
            costs = self.predict()
            for s in tried:  # failed during this batch: not again for it
                costs[s] = StrategyCost(float("inf"), float("inf"), float("inf"), False, "failed just now")
            objective = self.primary.topology.adaptive.objective
            try:
                d = choose(costs, objective, self.state, margin=self.primary.topology.adaptive.margin,
                           consecutive=self.primary.topology.adaptive.consecutive)
            except NoFeasibleStrategy as e:
                raise SiteError(self.primary.local_site, str(e), grpc.StatusCode.UNAVAILABLE) from None
            self.state = d.state
            try:
                out = self._run(d.strategy, x)
            except SiteError as e:
                # the site stopped answering: mark its link down and decide again without this strategy
                if e.site in self.links.links:
                    self.links.down(e.site)
                tried.append(d.strategy)
                self.fallbacks += len(x)
                log.warning("adaptive: %s failed (%s); choosing again", d.strategy, e)
                continue
            break
        out.seconds = time.perf_counter() - t0
        out.strategy = d.strategy
        out.extra = {"strategy_policy": {"configured": "adaptive", "objective": objective,
                                         "reason": "fallback" if tried else d.reason,
                                         "predicted": d.predicted.as_dict(),
                                         **({"failed": tried} if tried else {})}}
        self.counts[d.strategy] = self.counts.get(d.strategy, 0) + len(x)
        key = "fallback" if tried else d.reason
        self.decisions[key] = self.decisions.get(key, 0) + 1
        return out

    def check_workers(self, wait_s: float = 5.0) -> dict[str, Any]:
        infos = self.primary.check_workers(wait_s) if self.strategy in ("split", "adaptive") else {}
        if self.offload is not None:
            deadline = time.monotonic() + wait_s
            while self.offload.health(0.5) != "SERVING":
                if time.monotonic() > deadline:
                    if self.strategy == "offload-image":
                        raise CoordinatorError(f"offload site {self.offload.site}'s Classify server at "
                                               f"{self.offload.address} not SERVING within {wait_s:g} s; start "
                                               f"moe-coordinator --serve {self.offload.address} --as-site "
                                               f"{self.offload.site} --strategy local there")
                    self.links.down(self.offload.site)
                    log.warning("offload site %s (%s) not reachable: adaptive leaves offload-image out until it "
                                "answers", self.offload.site, self.offload.address)
                    break
                time.sleep(0.1)
        if self.strategy == "adaptive" and self.figures is not None and not self._routed_images:
            # two blank images through each strategy: the policy's first routing figures and measured speeds (the
            # second of each counts: a first forward or call is slow), the streams warmed up
            blank = torch.zeros(1, 3, self.figures_size, self.figures_size)
            for strategy in ("split", "local", "offload-image"):
                if (strategy == "local" and self.local is None) or (strategy == "offload-image" and (
                        self.offload is None or not self.links.links[self.offload.site].up)):
                    continue
                rt = self.local if strategy == "local" else self.primary
                saved = dict(rt.context.tokens)
                try:
                    for _ in range(2):
                        if strategy == "local":
                            self.local_s = None
                        elif strategy == "split":  # the first forward's speeds would weigh 0.8 after the second
                            self.split_gflops = None
                            self.site_gflops.clear()
                        elif strategy == "offload-image" and self.offload is not None:
                            self.offload.server_s = None
                        self._run(strategy, blank)
                except SiteError as e:
                    log.warning("adaptive: warm-up through %s failed: %s", strategy, e)
                rt.context.tokens.clear()
                rt.context.tokens.update(saved)
            if self.offload is not None:
                self._offload_warm = (self.offload.calls, self.offload.bytes_sent, self.offload.bytes_received)
        self.start()
        return infos

    figures_size: int = 64

    def traffic(self) -> dict[str, dict[str, Any]]:
        out = self.primary.traffic() if self.strategy in ("split", "adaptive") else {}
        if self.offload is not None:
            o = self.offload
            t = out.setdefault(o.site, {"calls": 0, "failures": 0, "bytes_sent": 0, "bytes_received": 0, "tokens": 0,
                                        "up": True})
            t = {**t, "calls": t["calls"] + o.calls, "failures": t["failures"] + o.failures,
                 "bytes_sent": t["bytes_sent"] + o.bytes_sent, "bytes_received": t["bytes_received"] + o.bytes_received}
            out[o.site] = t
        return out

    def tokens_by_site(self) -> dict[str, int]:
        per: dict[str, int] = {}
        for rt in [self.primary, *([self.local] if self.local is not None else [])]:
            for k, v in rt.tokens_by_site().items():
                per[k] = per.get(k, 0) + v
        return per

    def strategy_summary(self) -> dict[str, Any]:
        s: dict[str, Any] = {"strategy": self.strategy, "images": dict(self.counts),
                             "links": self.links.summary()}
        if self.offload is not None:
            s["offload_site"] = f"{self.offload.site} ({self.offload.address})"
        if self.strategy == "adaptive":
            s.update(decisions=dict(self.decisions), fallback_images=self.fallbacks,
                     objective=self.primary.topology.adaptive.objective,
                     predicted_now={k: v.as_dict() for k, v in self.predict().items()},
                     strategy_probes={k: p.as_dict() for k, p in self.strategy_probes.items()},
                     probe_waits={"images": self.probe_waits, "seconds": round(self.probe_wait_s, 4)})
        return s

    def close(self) -> None:
        if self._prober is not None:
            self._prober.stop_event.set()
            self.links.stepped.set()  # wakes it now
            if self._prober.is_alive():  # a probe in flight finishes (within its deadline) before the channels close
                self._prober.join(timeout=self.primary.policy.deadline_s + 1.0)
        if self.offload is not None:
            self.offload.close()
        if self.local is not None:
            self.local.close()
        self.primary.close()


def _figures(model: Any, size: int, wire: str) -> ModelFigures:
    """Whole-model FLOPs at ``size`` (trunk + one expert per routed token), per-token expert FLOPs, token bytes."""
    total = FLOPS_PER_MAC * count_macs(model, size)
    fpt, tb = {}, {}
    for layer, m in model.moe_layers().items():
        bank = m.experts
        fpt[layer] = FLOPS_PER_MAC * 2 * bank.dim * bank.hidden
        tb[layer] = bank.dim * _CODEC_BYTES.get(wire.split("+")[0], 2.0)
    # the PNG of a mid-grey-textured input is what offload sends: about 1.5 bytes per pixel, measured on digits
    return ModelFigures(trunk_flops=float(total), expert_flops_per_token=fpt, token_bytes=tb, model_mb=model_mb(model),
                        image_bytes=1.5 * size * size, answer_bytes=12.0 * model.config.num_classes)


def open_runtime(topology: Topology, *, model_path: str | Path | None = None, strategy: str | None = None,
                 **kw: Any) -> StrategyRuntime:
    """The runtime of ``strategy`` (default: the topology's). CoordinatorError (one line naming the key) when the
    strategy cannot run on these sites: local on a coordinator whose memory_mb cannot hold the model,
    offload-image with no site that can."""
    strategy = strategy or topology.strategy
    if strategy not in (*FIXED, "adaptive"):
        raise CoordinatorError(f"{topology.path}: strategy: unknown strategy {strategy!r}")
    path = model_path or topology.model
    if path is None:
        raise CoordinatorError(f"{topology.path}: no model: set `model:` in the topology or pass --model")
    if not Path(path).exists():
        raise CoordinatorError(f"{topology.path}: model file {path} does not exist")

    def load() -> Any:
        m = load_checkpoint(path)
        if m.config.moe is None:
            raise CoordinatorError(f"{path}: a dense model; the coordinator needs an MoE checkpoint (moe-convert)")
        return m

    model = load()
    need = model_mb(model)
    cam = topology.site(topology.coordinator)
    size = kw.get("image_size") or model.config.image_size
    figures = _figures(model, size, kw.get("wire") or topology.rpc.codec) if strategy == "adaptive" else None
    calibration = read_calibration(path, model.config.labels)
    fits_here = cam.device.memory_mb >= need
    if strategy == "local" and not fits_here:
        raise CoordinatorError(f"{topology.path}: strategy: local: {cam.name} memory_mb {cam.device.memory_mb:g} "
                               f"cannot hold the whole model ({need:.1f} MB); use split or offload-image")
    local_placement = _local_placement(topology, model)
    primary_placement = (topology.resolve_placement({i: m.num_experts for i, m in model.moe_layers().items()})
                         if strategy in ("split", "adaptive") else local_placement)
    primary = SplitRuntime(model, topology, primary_placement, **kw)
    primary.calibration = calibration
    local = offload = None
    try:
        if strategy == "adaptive" and fits_here:
            local = SplitRuntime(load(), topology, local_placement, **{**kw, "watch": False})
            local.calibration = calibration
        if strategy in ("offload-image", "adaptive"):
            site = _offload_site(topology, need, required=strategy == "offload-image")
            if site is not None:
                rpc = topology.rpc
                offload = OffloadClient(site, topology.offload_address(site), topology,
                                        num_classes=model.config.num_classes, temperature=calibration.temperature,
                                        deadline_s=kw.get("deadline_s") or rpc.deadline_s,
                                        max_message_mb=kw.get("max_message_mb") or rpc.max_message_mb)
    except BaseException:
        primary.close()
        if local is not None:
            local.close()
        raise
    rt = StrategyRuntime(strategy, primary, local=local, offload=offload, figures=figures)
    rt.figures_size = size
    return rt


class LinkCollector:
    """Prometheus collector of the link estimates and the strategies used (read at scrape time)."""

    def __init__(self, runtime: StrategyRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        rt = self.runtime
        rtt = GaugeMetricFamily("moevit_coordinator_link_rtt_seconds", "Round-trip time of the coordinator's link to "
                                "each site, EWMA of its calls and idle probes", labels=["site"])
        thr = GaugeMetricFamily("moevit_coordinator_link_throughput_bps", "Payload throughput of the link to each "
                                "site (bit/s), EWMA of its calls", labels=["site"])
        up = GaugeMetricFamily("moevit_coordinator_link_up", "1 while the link's last call or probe succeeded",
                               labels=["site"])
        probes = CounterMetricFamily("moevit_coordinator_link_probes", "Health probes of idle links", labels=["site"])
        for site, e in rt.links.estimates().items():
            rtt.add_metric([site], e.rtt_s)
            thr.add_metric([site], e.throughput_bps)
            up.add_metric([site], 1.0 if e.up else 0.0)
            probes.add_metric([site], rt.links.links[site].probes)
        images = CounterMetricFamily("moevit_coordinator_strategy_images", "Images served by each strategy",
                                     labels=["strategy"])
        for k, v in sorted(rt.counts.items()):
            images.add_metric([k], v)
        yield from (rtt, thr, up, probes, images)
        if rt.strategy_probes:  # adaptive
            sp = CounterMetricFamily("moevit_coordinator_strategy_probes", "Probes of strategies adaptive is not "
                                     "using (one image through each, to keep its estimates current)",
                                     labels=["strategy"])
            sb = CounterMetricFamily("moevit_coordinator_strategy_probe_bytes", "Bytes the strategy probes moved on "
                                     "the links", labels=["strategy"])
            for k, p in sorted(rt.strategy_probes.items()):
                sp.add_metric([k], p.count)
                sb.add_metric([k], p.bytes)
            waits = CounterMetricFamily("moevit_coordinator_strategy_probe_wait_seconds", "Time images waited for a "
                                        "strategy probe to finish")
            waits.add_metric([], rt.probe_wait_s)
            yield from (sp, sb, waits)


def strategy_lines(s: dict[str, Any]) -> Iterator[str]:
    """The summary's lines about strategies and links."""
    imgs = ", ".join(f"{k} {v}" for k, v in sorted(s["images"].items())) or "none"
    yield f"strategy {s['strategy']}: images by strategy: {imgs}" + (
        f"; offload to {s['offload_site']}" if "offload_site" in s else "")
    if s["strategy"] == "adaptive":
        dec = ", ".join(f"{k} {v}" for k, v in sorted(s["decisions"].items()))
        yield (f"adaptive ({s['objective']}): decisions {dec}; {s['fallback_images']} image(s) moved by a fallback; "
               "predicted now: " + ", ".join(f"{k} {v['latency_s'] * 1e3:.1f} ms/{v['energy_j']:.3f} J/"
                                            f"{v['bytes']:.0f} B" if v.get("feasible", True) else f"{k} infeasible"
                                            for k, v in s["predicted_now"].items()))
    if s.get("strategy_probes"):
        w, probes = s["probe_waits"], s["strategy_probes"].items()
        yield ("strategy probes (unused strategies, one image each): " + ", ".join(
            f"{k} {p['probes']} ({p['seconds']:.2f} s, {p['bytes'] / 1e3:.1f} kB)" for k, p in probes)
            + f"; {w['images']} image(s) waited {w['seconds']:.3f} s behind one")
    for site, e in s["links"].items():
        yield (f"link {site}: rtt {e['rtt_ms']:.2f} ms, throughput {e['throughput_mbps']:.2f} Mbit/s "
               f"({'measured' if e['measured'] else 'topology figures'}: {e['samples']} calls, {e['probes']} probes)"
               + ("" if e["up"] else ", DOWN"))


__all__ = ["LinkCollector", "LinkEstimator", "OffloadClient", "StrategyRuntime", "encode_png", "model_mb",
           "open_runtime", "strategy_lines"]
