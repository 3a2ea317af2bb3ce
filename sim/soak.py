"""Soak: many Classify requests through a replicated split deployment under seeded random worker kills and link
faults (issue 8, point 7). The engine; its command line is ``bench/soak.py``:

    .venv/bin/python bench/soak.py [--requests 10000] [--seed 0] [--harsh] [--out bench/results/soak.json]

Deployment, all on loopback: three real ``moe-worker`` processes (torch backend, ``--threads 1``) each hosting
every expert, each behind a :class:`sim.linkproxy.ThreadedLinkProxy`; the placement gives every expert of every MoE
layer to two of them (expert e on w[e mod 3] and w[(e+1) mod 3]). The coordinator is this process: a
:class:`coordinator.runtime.SplitRuntime` (fallback ``skip`` by default, per-layer RPC deadline 2 s, optional
hedging) behind the Classify server of :func:`coordinator.server.start_server` (batches of 1 by default, so every
answer can be compared with the in-process model at batch 1). The model is :mod:`moevit.coordinator.local`'s seeded
``small_moe_model`` at 64 px (MoE layers [1,5,8], E = 6) or ``--model FILE``.

Load: ``--clients`` closed-loop client threads calling Classify (seeded random 64-px PNGs, ``--images`` of them, in
turn) until ``--requests`` have been sent. Every request's start, end, outcome (ok, degraded, failed + gRPC code)
and whether its probabilities equal the fault-free in-process ones (top-1 and every class within 1e-4) are kept in
preallocated arrays (so the record itself does not grow the process).

Faults, drawn from ``random.Random(--seed)`` in a fixed order (kind, worker, duration, following gap), after a
fault-free ``--baseline`` period and ``--gap`` seconds apart:

* ``kill``: SIGKILL of a worker process, restarted on its port after ``--kill-down`` seconds;
* ``reset``: the worker's link down for ``--link-down`` seconds, connections reset (the proxy's ``reset`` outage);
* ``stall``: the link silently stops forwarding for ``--link-down`` seconds (the proxy's ``stall`` outage).

By default one fault at a time, the next one only once every site is up again as the coordinator sees it, so every
expert always has a live replica: degraded answers come only from calls caught by a fault with no time left in
their layer's deadline to try the other replica. ``--harsh`` starts faults on schedule whether or not earlier ones
have ended (any other worker), so both replicas of an expert can be down at once.

Measured: counts (ok / degraded / failed by kind, mismatches with the fault-free output), client-side latency
p50/p99 (all, during faults, outside them), throughput of ok answers per second, RSS of this process (the
coordinator, also its thread and file-descriptor counts) and of each worker every 0.5 s, following restarts, with
a linear slope (MB/min) over the second half of the run (for a worker: pooled over its incarnations, each sampled
from when it reports SERVING, its first 5 s left out); per fault: time from its start to the first ok answer of a
request sent after it, and to the first 1-s window (sliding by 50 ms) of ok throughput back at 95 % of the
pre-fault median (1-s windows between the previous fault's end and this one's start) and of the baseline (the
fault-free start), and from the fault's end (link up, restarted worker SERVING) to 95 % of the pre-fault median;
the lowest 1-s throughput while it lasted; the runtime's dispatch counters (retries, hedges, ...), per-site
traffic, load average before and after. ``bench/soak.py`` writes them to one JSON file and a plot next to it
(``.png``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import math
import os
import random
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between order statistics (numpy's default); NaN for no values."""
    return float(np.percentile(values, q)) if len(values) else math.nan


WORKERS = ("w0", "w1", "w2")
COORDINATOR = "cam"
LAYERS = (1, 5, 8)
NUM_EXPERTS = 6
IMAGE_SIZE = 64
KINDS = ("kill", "reset", "stall")
OUTCOMES = ("ok", "degraded", "failed")
OK, DEGRADED, FAILED = 0, 1, 2
PROB_ATOL = 1e-4
SETTLE_S = 5.0  # a (re)started worker's first seconds are left out of its RSS slope (allocations of its warm-up)


@dataclass
class SoakConfig:
    """Settings of one soak run (the command-line options, see ``--help``)."""

    requests: int = 10_000
    clients: int = 4
    seed: int = 0
    fallback: str = "skip"
    deadline_s: float = 2.0
    hedge_ms: float | None = None
    wire: str = "fp32"
    max_batch: int = 1
    model: str | None = None
    image_size: int | None = None
    images: int = 64
    threads: int = 1
    harsh: bool = False
    kinds: tuple[str, ...] = KINDS
    baseline_s: float = 10.0
    gap_s: tuple[float, float] = (4.0, 8.0)
    kill_down_s: tuple[float, float] = (1.0, 3.0)
    link_down_s: tuple[float, float] = (1.0, 4.0)
    min_faults: int = 0  # > 0: keep sending past ``requests`` until this many faults have ended (short runs, tests)
    tail_s: float = 3.0  # with min_faults: and for this long after the last of them (its recovery is measured)
    rss_interval_s: float = 0.5
    window_s: float = 1.0

    def __post_init__(self) -> None:
        bad = set(self.kinds) - set(KINDS)
        if bad or not self.kinds:
            raise ValueError(f"fault kinds must be among {', '.join(KINDS)}, got {self.kinds}")
        if self.fallback not in ("fail", "local", "nearest", "skip"):
            raise ValueError(f"unknown fallback {self.fallback!r}")
        if self.requests < 1 or self.clients < 1 or self.max_batch < 1:
            raise ValueError("requests, clients and max_batch must be >= 1")


@dataclass
class Fault:
    """One injected fault: what, where, and when (``time.monotonic()`` seconds)."""

    kind: str
    worker: str
    planned_s: float  # how long the worker/link stays down
    start: float = math.nan
    end: float = math.nan  # link back up / restarted worker SERVING
    rejoined: float = math.nan  # the coordinator's health watch sees the site up again
    restart_wall_s: float = math.nan  # kill: seconds the restarted worker took to report SERVING
    error: str | None = None  # the fault could not be injected or undone (e.g. the worker did not restart)
    done: bool = False
    done_at: float = math.nan  # when the injector was through with it (after the rejoin wait)


def draw_fault(rng: random.Random, cfg: SoakConfig) -> tuple[Fault, float]:
    """The next fault of the seeded schedule and the fault-free gap after it (always the same four draws)."""
    kind = cfg.kinds[rng.randrange(len(cfg.kinds))]
    worker = WORKERS[rng.randrange(len(WORKERS))]
    lo, hi = cfg.kill_down_s if kind == "kill" else cfg.link_down_s
    down = rng.uniform(lo, hi)
    gap = rng.uniform(*cfg.gap_s)
    return Fault(kind, worker, down), gap


def random_pngs(n: int, size: int, seed: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class _LoopThread:
    """An asyncio loop on a daemon thread (the Classify server runs on it)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="soak-server-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Cluster:
    """Three workers behind link proxies, a SplitRuntime over them and its Classify server, plus the inputs and
    their fault-free outputs. Use as a context manager."""

    def __init__(self, cfg: SoakConfig, workdir: str | Path) -> None:
        self.cfg, self.workdir = cfg, Path(workdir)
        self.procs: dict[str, Any] = {}
        self.proxies: dict[str, Any] = {}
        self.ports: dict[str, int] = {}
        self.runtime = None
        self.server = None
        self._loop: _LoopThread | None = None
        self._lock = threading.Lock()  # procs[w] replaced by a restart while the sampler reads it

    # -- set-up ----------------------------------------------------------------------------------------------
    def start(self) -> Cluster:
        import torch
        from moevit.coordinator.local import free_port, replicated_placement, small_moe_model, write_topology
        from moevit.coordinator.runtime import SplitRuntime
        from moevit.coordinator.server import start_server
        from moevit.deploy.topology import load_topology
        from moevit.sim.linkproxy import ThreadedLinkProxy

        from moevit.checkpoint import load_checkpoint, save_checkpoint
        from moevit.data import load_image
        from moevit.fuse import folded_copy

        cfg = self.cfg
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        if cfg.model:
            self.model_path = Path(cfg.model)
            model = load_checkpoint(self.model_path)
            self.image_size = cfg.image_size or model.config.image_size
        else:
            model = small_moe_model(LAYERS, num_experts=NUM_EXPERTS, image_size=IMAGE_SIZE, calib_size=IMAGE_SIZE)
            self.model_path = save_checkpoint(model, self.workdir / "moe.safetensors")
            self.image_size = cfg.image_size or IMAGE_SIZE
        self.moe_layers = {i: m.num_experts for i, m in model.moe_layers().items()}
        self.num_classes = model.config.num_classes
        self.ports = {w: free_port() for w in WORKERS}
        # inputs and their fault-free outputs, computed while the workers start: the same checkpoint in-process,
        # one image at a time (as the server runs them with max_batch 1: a batch of another size may round
        # differently and flip a patch that sits on a routing boundary)
        self.pngs = random_pngs(cfg.images, self.image_size, cfg.seed)

        def reference() -> None:
            ref = folded_copy(model)  # as the coordinator runs the trunk
            with torch.no_grad():
                self.ref_probs = torch.cat([ref(load_image(b, self.image_size)[None]) for b in self.pngs]).softmax(1)

        self._start_workers(list(WORKERS), meanwhile=reference)
        for w in WORKERS:
            self.proxies[w] = ThreadedLinkProxy(f"127.0.0.1:{self.ports[w]}")
            self.proxies[w].start()
        rpc: dict[str, Any] = {"deadline_s": cfg.deadline_s}
        if cfg.hedge_ms:
            rpc["hedge_ms"] = cfg.hedge_ms
        topo = write_topology(self.workdir, self.model_path, {COORDINATOR: free_port(), **self.ports},
                              fallback=cfg.fallback, name="soak.yaml", coordinator=COORDINATOR,
                              addresses={w: p.address for w, p in self.proxies.items()},
                              placement=replicated_placement(self.moe_layers, WORKERS), rpc=rpc)
        self.runtime = SplitRuntime.from_topology(load_topology(topo), wire=cfg.wire)
        self.runtime.check_workers(wait_s=10)
        self._loop = _LoopThread()
        self.server = self._loop.run(start_server(self.runtime, "127.0.0.1:0", image_size=self.image_size,
                                                  max_batch=cfg.max_batch))
        return self

    def _start_workers(self, names: list[str], meanwhile: Callable[[], None] | None = None) -> None:
        """Start the named workers at once (each start waits for SERVING; imports take seconds of CPU), running
        ``meanwhile`` in this thread while they start."""
        from moevit.coordinator.local import start_worker

        errors: list[BaseException] = []

        def one(w: str) -> None:
            try:
                address = f"127.0.0.1:{self.ports[w]}"
                proc = start_worker(["--listen", address, "--model", str(self.model_path), "--experts", "all",
                                     "--threads", "1"], address, timeout=60)
            except BaseException as e:  # reported below
                errors.append(e)
                return
            with self._lock:
                self.procs[w] = proc

        threads = [threading.Thread(target=one, args=(w,)) for w in names]
        for t in threads:
            t.start()
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            for t in threads:
                t.join()
        if errors:
            raise errors[0]

    def pid(self, w: str) -> int | None:
        with self._lock:
            p = self.procs.get(w)
        return p.pid if p is not None and p.poll() is None else None

    def all_up(self) -> bool:
        return all(c.up for c in self.runtime.clients.values())

    # -- faults ----------------------------------------------------------------------------------------------
    def kill(self, w: str) -> None:
        with self._lock:  # no longer sampled: its memory is being freed
            p, self.procs[w] = self.procs[w], None
        p.send_signal(signal.SIGKILL)
        p.wait()

    def restart(self, w: str) -> None:
        self._start_workers([w])

    def link(self, w: str, up: bool, mode: str = "reset") -> None:
        proxy = self.proxies[w]
        if not up:
            # the proxy's outage behaviour is a plain attribute read when the link goes down: set while it is up
            proxy.proxy.outage = mode
        proxy.set_up(up)

    # -- tear-down -------------------------------------------------------------------------------------------
    def close(self) -> None:
        from moevit.coordinator.local import stop_process as stop

        if self.server is not None and self._loop is not None:
            try:
                self._loop.run(self.server.stop(0))
            except Exception:  # best effort at tear-down
                pass
        if self._loop is not None:
            self._loop.close()
        if self.runtime is not None:
            self.runtime.close()
        for p in self.proxies.values():
            p.stop()
        for p in self.procs.values():
            if p is not None:
                stop(p)
        if hasattr(self, "_torch_threads"):
            import torch

            torch.set_num_threads(self._torch_threads)

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


class Records:
    """Per-request outcomes in preallocated arrays (filled by the client threads, one slot per request)."""

    def __init__(self, capacity: int) -> None:
        import numpy as np

        self.capacity = capacity
        self.start = np.full(capacity, np.nan)
        self.end = np.full(capacity, np.nan)
        self.outcome = np.full(capacity, -1, dtype=np.int8)
        self.error = np.full(capacity, -1, dtype=np.int16)
        self.mismatch = np.zeros(capacity, dtype=bool)
        self.max_diff = np.full(capacity, np.nan, dtype=np.float32)
        self.error_kinds: list[str] = []
        self.n = 0
        self._lock = threading.Lock()

    def take(self, limit: Callable[[int], bool]) -> int | None:
        """The next request slot, or None once ``limit(n)`` says stop (or the arrays are full)."""
        with self._lock:
            if self.n >= self.capacity or not limit(self.n):
                return None
            self.n += 1
            return self.n - 1

    def error_code(self, kind: str) -> int:
        with self._lock:
            if kind not in self.error_kinds:
                self.error_kinds.append(kind)
            return self.error_kinds.index(kind)

    def done(self):
        """Views of the filled slots."""
        n = self.n
        return self.start[:n], self.end[:n], self.outcome[:n], self.error[:n], self.mismatch[:n]


class RSSSampler(threading.Thread):
    """RSS (MB) of this process and of each worker's current process every ``interval`` seconds."""

    def __init__(self, cluster: Cluster, interval: float) -> None:
        super().__init__(name="soak-rss", daemon=True)
        import psutil

        self.psutil, self.cluster, self.interval = psutil, cluster, interval
        self.me = psutil.Process()
        self.t: list[float] = []
        self.coordinator: list[float] = []
        self.threads: list[int] = []
        self.fds: list[int] = []
        self.workers: dict[str, list[float]] = {w: [] for w in WORKERS}
        self.worker_pids: dict[str, list[int]] = {w: [] for w in WORKERS}
        self.first_seen: dict[int, float] = {}  # pid -> when first sampled (a worker is sampled once SERVING)
        self._procs: dict[int, Any] = {}
        self._halt = threading.Event()

    def _worker_rss(self, w: str) -> tuple[float, int]:
        pid = self.cluster.pid(w)
        if pid is None:
            return math.nan, -1
        try:
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = self.psutil.Process(pid)
                self.first_seen[pid] = time.monotonic()
            return proc.memory_info().rss / 2**20, pid
        except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
            return math.nan, -1

    def sample(self) -> None:
        self.t.append(time.monotonic())
        self.coordinator.append(self.me.memory_info().rss / 2**20)
        self.threads.append(self.me.num_threads())
        self.fds.append(self.me.num_fds())
        for w in WORKERS:
            rss, pid = self._worker_rss(w)
            self.workers[w].append(rss)
            self.worker_pids[w].append(pid)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.sample()


# -- analysis ----------------------------------------------------------------------------------------------------
def pooled_slope(t: list[float], y: list[float], groups: list[int], t_from: float,
                 skip_from: dict[int, float] | None = None, min_span_s: float = 5.0) -> float | None:
    """Least-squares slope of ``y`` over ``t`` (per minute) for samples at ``t >= t_from``, with one intercept per
    group (a worker's incarnation: a restart starts a new process; group -1 = no process); samples of a group
    before ``skip_from[group]`` are left out. None without at least 4 samples spanning ``min_span_s`` in some
    group."""
    skip_from = skip_from or {}
    by: dict[int, list[tuple[float, float]]] = {}
    for ti, yi, g in zip(t, y, groups, strict=True):
        if ti >= t_from and g != -1 and not math.isnan(yi) and ti >= skip_from.get(g, -math.inf):
            by.setdefault(g, []).append((ti, yi))
    num = den = 0.0
    usable = False
    for pts in by.values():
        if len(pts) < 4 or pts[-1][0] - pts[0][0] < min_span_s:
            continue
        usable = True
        tm = statistics.fmean(p[0] for p in pts)
        ym = statistics.fmean(p[1] for p in pts)
        num += sum((p[0] - tm) * (p[1] - ym) for p in pts)
        den += sum((p[0] - tm) ** 2 for p in pts)
    if not usable or den == 0:
        return None
    return num / den * 60.0


def _stats_ms(seconds) -> dict[str, float]:
    xs = [float(v) * 1e3 for v in seconds]
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "p50": percentile(xs, 50), "p90": percentile(xs, 90), "p99": percentile(xs, 99),
            "max": max(xs), "mean": statistics.fmean(xs)}


def _spread(values: list[float]) -> dict[str, Any]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"n": 0}
    return {"n": len(vals), "median": statistics.median(vals), "max": max(vals), "min": min(vals)}


def window_counts(ends_sorted, t0: float, t1: float) -> int:
    import numpy as np

    return int(np.searchsorted(ends_sorted, t1, side="left") - np.searchsorted(ends_sorted, t0, side="left"))


def back_to(ok_ends, t_from: float, rps: float, window: float, t_last: float, step: float = 0.05
            ) -> tuple[float | None, float]:
    """Seconds from ``t_from`` to the start of the first ``window``-second window (sliding by ``step``) with at
    least 95 % of ``rps`` ok answers (None if none before ``t_last``), and the lowest window rate until then."""
    need = 0.95 * rps * window
    low = math.inf
    s = t_from
    while s + window <= t_last:
        c = window_counts(ok_ends, s, s + window)
        low = min(low, c / window)
        if c >= need:
            return s - t_from, low
        s += step
    return None, low


def recovery(fault: Fault, start, end, outcome, mismatch, ok_ends, pre_rps: float, baseline_rps: float,
             window: float, t_last: float) -> dict[str, Any]:
    """Time from the fault's start to the first ok answer of a request sent after it; to the first window of ok
    throughput back at 95 % of ``pre_rps`` (the median before the fault) and of ``baseline_rps`` (the fault-free
    start); from the fault's end (link up, restarted worker SERVING) to 95 % of ``pre_rps``; the lowest window
    throughput among the windows starting while the fault lasted, as a fraction of ``pre_rps``; requests sent
    while the fault lasted, by outcome."""
    import numpy as np

    t_f = fault.start
    t_end = fault.end if not math.isnan(fault.end) else t_last
    good = (outcome == OK) & ~mismatch & (start >= t_f)
    first_ok = float(end[good].min() - t_f) if good.any() else None
    rec, _ = back_to(ok_ends, t_f, pre_rps, window, t_last)
    rec_base, _ = back_to(ok_ends, t_f, baseline_rps, window, t_last)
    rec_end, _ = back_to(ok_ends, t_end, pre_rps, window, t_last)
    lows = [window_counts(ok_ends, s, s + window) / window
            for s in np.arange(t_f, max(t_f, min(t_end, t_last - window)) + 1e-9, 0.05)]
    during = (start >= t_f) & (start < t_end)
    return {"first_ok_s": first_ok, "pre_fault_ok_rps": pre_rps, "recovery_95_s": rec,
            "recovery_95_of_baseline_s": rec_base, "recovery_95_after_end_s": rec_end,
            "min_rps_ratio": (min(lows) / pre_rps) if pre_rps > 0 and lows else None,
            "requests_during": {name: int(np.sum(during & (outcome == i))) for i, name in enumerate(OUTCOMES)}}


def _fault_mask(start, faults: list[Fault], t_last: float):
    import numpy as np

    m = np.zeros(len(start), dtype=bool)
    for f in faults:
        hi = f.end if not math.isnan(f.end) else t_last
        m |= (start >= f.start) & (start < hi)
    return m


# -- the run -----------------------------------------------------------------------------------------------------
@dataclass
class SoakResult:
    summary: dict[str, Any]
    records: Records
    faults: list[Fault]
    rss: RSSSampler
    t0: float
    bound_s: float
    series: dict[str, Any] = field(default_factory=dict)


def request_bound_s(cfg: SoakConfig, moe_layers: int) -> float:
    """The longest a request can take when every call ends by its deadline: each forward at most one deadline
    per MoE layer (a quarter more for ``nearest``'s substitutes) plus 1 s of trunk, and a request waits for at
    most one forward per other client (each has one request out) before its own; one forward more as margin."""
    per_forward = moe_layers * cfg.deadline_s * (1.25 if cfg.fallback == "nearest" else 1.0) + 1.0
    return per_forward * (cfg.clients + 1)


def run_soak(cfg: SoakConfig, workdir: str | Path | None = None, *, log: Callable[[str], None] = print
             ) -> SoakResult:
    """Set up the cluster, run the load under the seeded faults, tear down; the figures and the raw records."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            return run_soak(cfg, tmp, log=log)
    loadavg_before = load_average()
    t_setup = time.monotonic()
    with Cluster(cfg, workdir) as cluster:
        log(f"soak: cluster up in {time.monotonic() - t_setup:.1f} s (workers {cluster.ports}, "
            f"Classify on {cluster.server.address})")
        result = _drive(cfg, cluster, log)
    result.summary["loadavg_before"] = loadavg_before
    result.summary["loadavg_after"] = load_average()
    result.summary["setup_s"] = round(result.t0 - t_setup, 2)
    return result


def _drive(cfg: SoakConfig, cluster: Cluster, log: Callable[[str], None]) -> SoakResult:
    import grpc
    import numpy as np

    from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc

    bound = request_bound_s(cfg, len(cluster.moe_layers))
    client_timeout = bound + 10.0
    capacity = cfg.requests * (4 if cfg.min_faults else 1)
    rec = Records(capacity)
    faults: list[Fault] = []
    stop = threading.Event()
    ref = cluster.ref_probs.numpy()
    ref_top1 = ref.argmax(1)
    requests = [expert_pb2.ClassifyRequest(image=b, name=str(i), top_k=cluster.num_classes)
                for i, b in enumerate(cluster.pngs)]

    def more(n: int) -> bool:
        if stop.is_set():
            return False
        if n < cfg.requests or cfg.min_faults <= 0:
            return n < cfg.requests
        ended = sorted(f.done_at for f in faults if f.done)
        return len(ended) < cfg.min_faults or time.monotonic() < ended[cfg.min_faults - 1] + cfg.tail_s

    def client() -> None:
        with grpc.insecure_channel(cluster.server.address) as ch:
            stub = expert_pb2_grpc.ClassifierServiceStub(ch)
            while (i := rec.take(more)) is not None:
                img = i % len(requests)
                rec.start[i] = time.monotonic()
                try:
                    resp = stub.Classify(requests[img], timeout=client_timeout)
                except grpc.RpcError as e:
                    rec.end[i] = time.monotonic()
                    rec.error[i] = rec.error_code(e.code().name)
                    rec.outcome[i] = FAILED
                    continue
                rec.end[i] = time.monotonic()
                if resp.degraded:
                    rec.outcome[i] = DEGRADED
                    continue
                idx = [p.index for p in resp.top]
                probs = np.array([p.probability for p in resp.top])
                diff = float(np.abs(probs - ref[img, idx]).max()) if idx else math.inf
                rec.max_diff[i] = diff
                rec.mismatch[i] = not idx or idx[0] != ref_top1[img] or diff > PROB_ATOL
                rec.outcome[i] = OK

    def fault_loop() -> None:
        rng = random.Random(cfg.seed)
        active: list[threading.Thread] = []
        if stop.wait(cfg.baseline_s):
            return
        while not stop.is_set():
            fault, gap = draw_fault(rng, cfg)
            if cfg.harsh:
                busy = {f.worker for f in faults if math.isnan(f.end)}
                if fault.worker in busy:  # another worker instead (the draw order stays the same)
                    free = [w for w in WORKERS if w not in busy]
                    if not free:
                        stop.wait(gap)
                        continue
                    fault.worker = free[rng.randrange(len(free))]
                faults.append(fault)
                t = threading.Thread(target=inject, args=(fault,), daemon=True)
                t.start()
                active.append(t)
            else:
                while not cluster.all_up() and not stop.wait(0.05):
                    pass
                if stop.is_set():
                    break
                faults.append(fault)
                inject(fault)
            stop.wait(gap)
        for t in active:
            t.join()

    def inject(f: Fault) -> None:
        f.start = time.monotonic()
        try:
            if f.kind == "kill":
                cluster.kill(f.worker)
                stop.wait(f.planned_s)
                t_restart = time.monotonic()
                cluster.restart(f.worker)  # the cluster is left whole even when the load has ended
                f.end = time.monotonic()
                f.restart_wall_s = f.end - t_restart
            else:
                cluster.link(f.worker, False, f.kind)
                stop.wait(f.planned_s)
                cluster.link(f.worker, True)
                f.end = time.monotonic()
            watch = cluster.runtime.clients[f.worker].watch
            if watch is not None and watch.wait_up(10.0):
                f.rejoined = time.monotonic()
        except Exception as e:  # recorded in the fault's record and the log
            f.error = f"{type(e).__name__}: {e}"
        f.done_at = time.monotonic()
        f.done = True
        log(f"soak: {f.kind:5s} {f.worker} at {f.start - t0:6.1f} s, down {f.end - f.start:4.1f} s, "
            f"{rec.n} requests sent" + (f", ERROR {f.error}" if f.error else ""))

    sampler = RSSSampler(cluster, cfg.rss_interval_s)
    counters_before = cluster.runtime.counters.as_dict()
    t0 = time.monotonic()
    sampler.start()
    clients = [threading.Thread(target=client, name=f"soak-client-{k}") for k in range(cfg.clients)]
    for t in clients:
        t.start()
    injector = threading.Thread(target=fault_loop, name="soak-faults")
    injector.start()
    progress_at = t0
    for t in clients:
        while t.is_alive():
            t.join(1.0)
            if time.monotonic() - progress_at >= 15:
                progress_at = time.monotonic()
                log(f"soak: {progress_at - t0:6.1f} s, {rec.n} requests sent, {len(faults)} faults")
    t_load_end = time.monotonic()
    stop.set()
    injector.join()
    sampler.stop()
    counters = {k: v - counters_before.get(k, 0) for k, v in cluster.runtime.counters.as_dict().items()}
    traffic = cluster.runtime.traffic()
    proxies = {w: {"connections_accepted": p.connections_accepted, "bytes_up": p.bytes_up,
                   "bytes_down": p.bytes_down} for w, p in cluster.proxies.items()}
    result = SoakResult({}, rec, faults, sampler, t0, bound)
    result.summary = analyse(cfg, cluster, result, t_load_end)
    result.summary["counters"] = counters
    result.summary["traffic"] = traffic
    result.summary["proxies"] = proxies
    return result


def analyse(cfg: SoakConfig, cluster: Cluster, res: SoakResult, t_load_end: float) -> dict[str, Any]:
    import numpy as np

    rec, faults, t0, rss = res.records, res.faults, res.t0, res.rss
    start, end, outcome, error, mismatch = rec.done()
    lat = end - start
    t_last = float(np.nanmax(end)) if len(end) else t0
    ok_ends = np.sort(end[(outcome == OK) & ~mismatch])
    counts = {name: int(np.sum(outcome == i)) for i, name in enumerate(OUTCOMES)}
    counts["total"] = int(len(outcome))
    counts["unfinished"] = int(np.sum(outcome < 0))
    counts["failed_by_kind"] = {k: int(np.sum((outcome == FAILED) & (error == j)))
                                for j, k in enumerate(rec.error_kinds)}
    counts["mismatched"] = int(np.sum(mismatch))
    ok_diff = rec.max_diff[:rec.n][outcome == OK]
    in_fault = _fault_mask(start, faults, t_last)
    duration = t_load_end - t0

    # throughput: ok answers per window; the baseline is the median over the fault-free start (first window
    # left out: connections and caches warming)
    w = cfg.window_s
    first_fault = min((f.start for f in faults), default=t_load_end)
    base_windows = [window_counts(ok_ends, s, s + w) / w
                    for s in np.arange(t0 + w, first_fault - w + 1e-9, w)]
    baseline = statistics.median(base_windows) if base_windows else float(len(ok_ends) / max(duration, 1e-9))
    edges = np.arange(t0, t_last + w, w)
    per_window = {name: np.histogram(end[outcome == i], bins=edges)[0].tolist() for i, name in enumerate(OUTCOMES)}

    fault_docs = []
    for k, f in enumerate(faults):
        # pre-fault throughput: median of the windows between the previous fault's end and this one's start
        # (the baseline when fewer than two fit, e.g. overlapping faults of --harsh)
        lo = t0 + w if k == 0 else faults[k - 1].end
        pre = [window_counts(ok_ends, s, s + w) / w for s in np.arange(lo, f.start - w + 1e-9, w)] \
            if not math.isnan(lo) else []
        pre_rps = statistics.median(pre) if len(pre) >= 2 else baseline
        r = recovery(f, start, end, outcome, mismatch, ok_ends, pre_rps, baseline, w, t_last)
        fault_docs.append({"kind": f.kind, "worker": f.worker, "start_s": round(f.start - t0, 3),
                           "down_planned_s": round(f.planned_s, 3),
                           "down_s": None if math.isnan(f.end) else round(f.end - f.start, 3),
                           "restart_wall_s": None if math.isnan(f.restart_wall_s) else round(f.restart_wall_s, 3),
                           "rejoined_after_s": None if math.isnan(f.rejoined) else round(f.rejoined - f.end, 3),
                           **r, "error": f.error})
    by_kind = {}
    for kind in cfg.kinds:
        fs = [d for d in fault_docs if d["kind"] == kind]
        by_kind[kind] = {"n": len(fs), "first_ok_s": _spread([d["first_ok_s"] for d in fs]),
                         "recovery_95_s": _spread([d["recovery_95_s"] for d in fs]),
                         "recovery_95_of_baseline_s": _spread([d["recovery_95_of_baseline_s"] for d in fs]),
                         "recovery_95_after_end_s": _spread([d["recovery_95_after_end_s"] for d in fs]),
                         "min_rps_ratio": _spread([d["min_rps_ratio"] for d in fs]),
                         "rejoined_after_s": _spread([d["rejoined_after_s"] for d in fs])}

    # RSS: slopes over the second half of the load
    t_mid = t0 + duration / 2
    coord_groups = [0] * len(rss.t)
    slopes = {"coordinator": pooled_slope(rss.t, rss.coordinator, coord_groups, t_mid)}
    skip = {pid: seen + SETTLE_S for pid, seen in rss.first_seen.items()}
    for wn in WORKERS:
        slopes[wn] = pooled_slope(rss.t, rss.workers[wn], rss.worker_pids[wn], t_mid, skip)
    slopes_all = {"coordinator": pooled_slope(rss.t, rss.coordinator, coord_groups, t0 + w)}
    stride = max(1, math.ceil(len(rss.t) / 400))

    def down(xs):
        return [None if isinstance(x, float) and math.isnan(x) else round(x, 2) for x in xs[::stride]]

    return {
        "benchmark": "soak",
        "settings": {**dataclasses.asdict(cfg), "workers": list(WORKERS), "model_path": str(cluster.model_path),
                     "image_size": cluster.image_size, "moe_layers": cluster.moe_layers,
                     "placement": "expert e on w[e mod 3] and w[(e+1) mod 3]",
                     "request_bound_s": round(res.bound_s, 3)},
        "seed": cfg.seed,
        "duration_s": round(duration, 2),
        "counts": counts,
        "ok_max_prob_diff": float(np.nanmax(ok_diff)) if len(ok_diff) else None,
        "latency_ms": {"all": _stats_ms(lat[outcome >= 0]), "ok": _stats_ms(lat[outcome == OK]),
                       "degraded": _stats_ms(lat[outcome == DEGRADED]), "failed": _stats_ms(lat[outcome == FAILED]),
                       "sent_during_faults": _stats_ms(lat[(outcome >= 0) & in_fault]),
                       "sent_outside_faults": _stats_ms(lat[(outcome >= 0) & ~in_fault])},
        "over_bound": int(np.sum(~(lat <= res.bound_s))),
        "throughput": {"overall_rps": counts["total"] / duration if duration > 0 else None,
                       "ok_rps": counts["ok"] / duration if duration > 0 else None,
                       "baseline_ok_rps": baseline, "baseline_windows": len(base_windows), "window_s": w,
                       "per_window": per_window},
        "faults": fault_docs,
        "recovery": by_kind,
        "rss": {"interval_s": cfg.rss_interval_s, "t_s": [round(t - t0, 2) for t in rss.t[::stride]],
                "coordinator_mb": down(rss.coordinator), "coordinator_threads": rss.threads[::stride],
                "coordinator_fds": rss.fds[::stride],
                "workers_mb": {wn: down(rss.workers[wn]) for wn in WORKERS},
                "workers_pid": {wn: rss.worker_pids[wn][::stride] for wn in WORKERS},
                "slope_mb_per_min_second_half": slopes, "slope_mb_per_min_whole_run": slopes_all,
                "coordinator_mb_start_end": [round(rss.coordinator[0], 2), round(rss.coordinator[-1], 2)],
                "coordinator_threads_start_end": [rss.threads[0], rss.threads[-1]],
                "coordinator_fds_start_end": [rss.fds[0], rss.fds[-1]]},
    }


# -- output ------------------------------------------------------------------------------------------------------
def plot(summary: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tp = summary["throughput"]
    w = tp["window_s"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    colors = {"kill": "tab:red", "reset": "tab:orange", "stall": "tab:purple"}
    for name, color in (("ok", "tab:green"), ("degraded", "tab:olive"), ("failed", "black")):
        ys = tp["per_window"][name]
        if any(ys):
            ax1.step([i * w for i in range(len(ys))], [y / w for y in ys], where="post", color=color,
                     label=f"{name} / s", lw=0.8)
    ax1.axhline(0.95 * tp["baseline_ok_rps"], color="grey", ls="--", lw=0.8, label="95 % of baseline")
    seen = set()
    for f in summary["faults"]:
        end = f["start_s"] + (f["down_s"] if f["down_s"] is not None else f["down_planned_s"])
        label = f["kind"] if f["kind"] not in seen else None
        seen.add(f["kind"])
        for ax in (ax1, ax2):
            ax.axvspan(f["start_s"], end, color=colors[f["kind"]], alpha=0.15, lw=0,
                       label=label if ax is ax1 else None)
    ax1.set_ylabel(f"answers per second ({w:g} s bins)")
    ax1.legend(loc="lower left", fontsize=8, ncol=4)
    ax1.set_title(f"soak: {summary['counts']['total']} requests, seed {summary['seed']}, "
                  f"ok {summary['counts']['ok']} / degraded {summary['counts']['degraded']} / "
                  f"failed {summary['counts']['failed']}")
    rss = summary["rss"]
    ax2.plot(rss["t_s"], rss["coordinator_mb"], label="coordinator (this process)", color="tab:blue")
    for wn, ys in rss["workers_mb"].items():
        pids = rss.get("workers_pid", {}).get(wn, [0] * len(ys))
        # one line per incarnation of the worker: a gap where its pid changes
        ys = [math.nan if y is None or (i > 0 and pids[i] != pids[i - 1]) else y for i, y in enumerate(ys)]
        ax2.plot(rss["t_s"], ys, label=wn, lw=0.8)
    ax2.set_ylabel("RSS (MB)")
    ax2.set_xlabel("seconds since the load started")
    ax2.legend(loc="center left", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(v: Any, unit: str = "", digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}{unit}"


def format_summary(s: dict[str, Any]) -> str:
    c, lat, tp, rss = s["counts"], s["latency_ms"], s["throughput"], s["rss"]
    lines = [
        f"soak: {c['total']} requests in {s['duration_s']:.1f} s ({_fmt(tp['overall_rps'], ' req/s', 1)}), "
        f"seed {s['seed']}, {len(s['faults'])} faults, load average {s.get('loadavg_before')} -> "
        f"{s.get('loadavg_after')}",
        f"  ok {c['ok']}  degraded {c['degraded']}  failed {c['failed']} {c['failed_by_kind'] or ''}  "
        f"mismatched {c['mismatched']}  over the {s['settings']['request_bound_s']:.0f} s bound {s['over_bound']}",
        f"  latency ms: p50 {_fmt(lat['all'].get('p50'), '', 1)}  p99 {_fmt(lat['all'].get('p99'), '', 1)}  "
        f"max {_fmt(lat['all'].get('max'), '', 1)}; sent during faults p50 "
        f"{_fmt(lat['sent_during_faults'].get('p50'), '', 1)} p99 {_fmt(lat['sent_during_faults'].get('p99'), '', 1)}"
        f"; outside p50 {_fmt(lat['sent_outside_faults'].get('p50'), '', 1)} "
        f"p99 {_fmt(lat['sent_outside_faults'].get('p99'), '', 1)}",
        f"  baseline {_fmt(tp['baseline_ok_rps'], ' ok/s', 1)} (median of {tp['baseline_windows']} windows)",
    ]
    for kind, r in s["recovery"].items():
        if r["n"]:
            fo, rc, rend = r["first_ok_s"], r["recovery_95_s"], r["recovery_95_after_end_s"]
            low = r["min_rps_ratio"].get("median")
            lines.append(f"  {kind:5s} x{r['n']:<3d} first ok after: median {_fmt(fo.get('median'), ' s')} max "
                         f"{_fmt(fo.get('max'), ' s')};  95 % throughput after: median {_fmt(rc.get('median'), ' s')}"
                         f" max {_fmt(rc.get('max'), ' s')} (n={rc['n']}), after its end: median "
                         f"{_fmt(rend.get('median'), ' s')} max {_fmt(rend.get('max'), ' s')}; lowest 1-s throughput "
                         f"while it lasted {_fmt(None if low is None else 100 * low, ' %', 0)} of before (median)")
    sl = rss["slope_mb_per_min_second_half"]
    lines.append("  RSS slope (MB/min, second half): " + ", ".join(f"{k} {_fmt(v, '', 3)}" for k, v in sl.items())
                 + f"; coordinator {rss['coordinator_mb_start_end'][0]:.0f} -> {rss['coordinator_mb_start_end'][1]:.0f}"
                 f" MB, threads {rss['coordinator_threads_start_end']}, fds {rss['coordinator_fds_start_end']}")
    if "counters" in s:
        lines.append(f"  dispatch counters: {s['counters']}")
    return "\n".join(lines)
