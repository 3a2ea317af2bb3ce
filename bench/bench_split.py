"""Split inference over loopback vs the same MoE model in-process: the figures docs/benchmarks.md holds the project to.

    .venv/bin/python bench/bench_split.py [--quick] [--out bench/results/split.json]

Models: ``mobilevitv2_050``, 10 classes, 256×256 input, E = 16 experts of K = 64 hidden units at MoE layers [8] and
[1,3,5,7], seeded; each router's scaler and centroids are set from real patches of random calibration images (as in
tests/test_coordinator.py) so an image's patches spread over all experts. Every worker is a real ``moe-worker``
process (torch backend, ``--threads 1``, ``OMP_WAIT_POLICY=PASSIVE``) hosting every expert; which of them a worker
serves is the topology's placement:

* ``3w``: coordinator + three worker sites, every expert remote, expert e on worker e mod 3;
* ``cam+2w``: the coordinator's own site holds every third expert (e mod 3 = 0), two workers the rest;
* ``layerwise`` (latency only): every expert of a MoE layer on one worker, the layers dealt to w1, w2, w3 in turn, so
  each layer makes one call instead of three (with MoE [8] only w1 is used).

``3w`` also runs with unary calls instead of the stream (``split_3w_unary``) and with one tensor per expert
instead of one packed tensor per request (``split_3w_per_expert``), side by side.

CPU placement (fairness on a small machine): this process, which is the coordinator, runs on ``--coordinator-cpus``
(default core 0) with ``--threads`` torch threads (default 1); every worker runs on ``--worker-cpus`` (default
core 1; each worker starts on every core and has all its threads moved there once it serves). The in-process
baseline is the same checkpoint, loaded again, run in this process on the coordinator's cores with the same thread
count and memory format, its BatchNorms folded as the coordinator folds them; split and in-process runs are
interleaved (round-robin, starting point rotating, see bench/common.py) so load drift hits both alike.

Figures:

a. batch-1 latency, split (``3w`` and ``cam+2w``, fp16 on the wire) vs in-process: p50, p99, the ratio of the
   medians, the median of the per-round ratios and of per-block (``--block`` rounds) ratios;
b. throughput, 8 closed-loop clients calling the Classify RPC of a coordinator server (``coordinator.server.serve``
   in a subprocess pinned to the coordinator's cores; clients in this process, moved to the workers' cores for
   the run) with 256×256 JPEGs, vs the in-process model at batch 8 on the coordinator's cores: model only (the
   target's baseline) and JPEG decode + model (the same work the server does). Each split round starts its 8
   clients from idle (ramp included, the target's figure); the steady-state rate of the same rounds, without the
   first and last 8 answers, is reported beside it, and so are the median of the per-round ratios with a seeded
   bootstrap interval (``--tp-rounds``, default 9) and the server's and in-process CPU per image;
c. bytes on the wire per image: a :class:`sim.linkproxy.ThreadedLinkProxy` in front of each worker counts the TCP
   payload both ways (HTTP/2 and gRPC framing included, TCP/IP headers not) over N images; the payload floor is
   tokens sent to remote experts × dim × 2 bytes (fp16) × 2 (there and back); the coordinator's own count of
   serialised messages (``runtime.traffic()``) is reported too;
d. one expert call at 64 tokens (dim 128, K 64): the worker's onnxruntime backend vs its torch backend, one thread
   each, interleaved (the in-process ``ExpertBank.forward_one`` for reference, and the expert's two matrix
   products alone: the arithmetic floor of any float32 backend; and an onnxruntime call of a one-node Identity
   graph: the fixed cost of any onnxruntime call);
e. top-1 agreement of fp16 vs fp32 on the wire through the same ``3w`` deployment: the trained digits model at
   runs/demo/moe.safetensors on all 1797 bundled digits when it exists, else 2000 random 64-px images through a
   seeded random model; also fp32 wire vs in-process logits (max abs difference).

Writes one JSON file (bench/common.py's ``write_result``) and prints a markdown table for the README.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # ``python bench/bench_split.py``: the repo's packages (sim, coordinator, ...)
    sys.path.insert(0, str(REPO_ROOT))

try:  # ``python -m bench.bench_split`` from the repo root
    from bench.common import load_average, percentile, summarize, time_interleaved, write_result
except ImportError:  # ``python bench/bench_split.py``: bench/ is sys.path[0]
    from common import load_average, percentile, summarize, time_interleaved, write_result

from moevit.coordinator.local import free_port, spawn_worker, stop_process, wait_serving  # noqa: E402

ARCH = "mobilevitv2_050"
NUM_CLASSES = 10
IMAGE_SIZE = 256
NUM_EXPERTS = 16
EXPERT_HIDDEN = 64
LAYER_SETS: tuple[tuple[int, ...], ...] = ((8,), (1, 3, 5, 7))
WORKERS = ("w1", "w2", "w3")
COORDINATOR = "cam"
SEED = 0
DEMO_MODEL = REPO_ROOT / "runs" / "demo" / "moe.safetensors"
TARGETS = {"latency_8": 1.05, "latency_1357": 1.15, "throughput": 0.9, "bytes": 1.05, "onnx": 0.5,
           "agreement": 0.999, "fp32_maxdiff": 1e-5}


# ------------------------------------------------------------------------------------------------ CPU placement
def parse_cpus(spec: str) -> set[int]:
    """``"0"``, ``"0,2"``, ``"0-3"`` -> set of CPU indices."""
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-")
            cpus.update(range(int(lo), int(hi) + 1))
        elif part:
            cpus.add(int(part))
    return cpus


def pin_process(cpus: set[int] | None) -> None:
    """Move every thread of this process (and those it starts later) onto ``cpus``."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return
    os.sched_setaffinity(0, cpus)
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)


def pin_pid(pid: int, cpus: set[int] | None) -> list[int]:
    """Move every thread of process ``pid`` onto ``cpus`` (threads it starts later inherit it); returns the CPUs
    its main thread is allowed afterwards, as read back from the kernel."""
    if cpus:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):  # a thread that just ended
                os.sched_setaffinity(int(tid), cpus)
    return sorted(os.sched_getaffinity(pid))


# ----------------------------------------------------------------------------------------------------- the models
def build_model(layers: tuple[int, ...], *, image_size: int = IMAGE_SIZE, num_experts: int = NUM_EXPERTS,
                seed: int = SEED, calibrate: bool = True):
    """The seeded random MoE model; routers calibrated on random images so patches spread over every expert."""
    import torch

    import moevit
    from moevit.convert import capture_pre_mlp

    torch.manual_seed(seed)
    config = moevit.ModelConfig(arch=ARCH, num_classes=NUM_CLASSES, labels=tuple(str(i) for i in range(NUM_CLASSES)),
                                image_size=image_size,
                                moe=moevit.MoEConfig(layers=layers, num_experts=num_experts,
                                                     expert_hidden=EXPERT_HIDDEN))
    model = moevit.build_model(config).eval()
    if not calibrate:
        return model
    # enough images that the smallest MoE layer (2x2 patches at 64 px, last stage) has a patch per expert
    calib = torch.randn(4 if image_size >= 256 else 32, 3, image_size, image_size,
                        generator=torch.Generator().manual_seed(seed + 42))
    with torch.no_grad():
        for i, layer in model.moe_layers().items():
            zbar = capture_pre_mlp(model, i, calib).mean(dim=2).reshape(-1, layer.router.dim)
            lo, hi = zbar.min(0).values, zbar.max(0).values
            layer.router.scale_min.copy_(lo)
            layer.router.scale_max.copy_(hi)
            pick = torch.randperm(len(zbar), generator=torch.Generator().manual_seed(seed + i))[: layer.num_experts]
            layer.router.centroids.copy_((zbar[pick] - lo) / (hi - lo))
            layer.experts.correction.normal_(0, 0.1)
    return model


def layers_name(layers: tuple[int, ...]) -> str:
    return "[" + ",".join(str(i) for i in layers) + "]"


def placement_for(config: str, layers: tuple[int, ...], num_experts: int) -> dict[int, dict[str, list[int]]]:
    """``3w``: every expert remote, e -> WORKERS[e % 3]; ``cam+2w``: e -> [cam, w1, w2][e % 3]; ``layerwise``: the
    i-th MoE layer's experts all on WORKERS[i % 3]."""
    if config == "layerwise":
        return {layer: {WORKERS[i % len(WORKERS)]: list(range(num_experts))} for i, layer in enumerate(layers)}
    sites = list(WORKERS) if config == "3w" else [COORDINATOR, *WORKERS[:2]]
    return {layer: {s: [e for e in range(num_experts) if e % len(sites) == k] for k, s in enumerate(sites)}
            for layer in layers}


# ------------------------------------------------------------------------------------------------ the deployment
def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc; clock-tick resolution)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_worker(address: str, model_path: Path, *, backend: str = "torch", site: str | None = None,
                 stderr: Any = None) -> subprocess.Popen:
    """A ``moe-worker`` process hosting every expert of ``model_path`` on ``address`` as the benchmarks run it:
    torch backend (or ``backend``), one thread, ``OMP_WAIT_POLICY=PASSIVE``, warnings only; its output goes to
    ``stderr`` (a file). It starts on every core (imports take seconds of CPU); callers pin it once it serves
    (:func:`pin_pid`)."""
    args = ["--listen", address, "--model", str(model_path), "--experts", "all", "--threads", "1",
            "--backend", backend, "--log-level", "warning", *(["--site", site] if site else [])]
    return spawn_worker(args, log=stderr, cwd=REPO_ROOT)


class Deployment:
    """Worker processes (every expert hosted) of one checkpoint, and topologies over them.

    ``topology(config, proxies=...)`` writes a sites.yaml whose placement is ``config``'s and whose worker
    addresses are the workers' own or, with ``proxies``, those of link proxies in front of them.
    """

    def __init__(self, workdir: Path, model_path: Path, layers: tuple[int, ...], num_experts: int, *,
                 worker_cpus: set[int] | None, backend: str = "torch") -> None:
        self.workdir, self.model_path, self.layers, self.num_experts = workdir, model_path, layers, num_experts
        self.worker_cpus, self.backend = worker_cpus, backend
        self.addresses: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.proxies: dict[str, Any] = {}
        self.affinity: dict[str, list[int]] = {}
        self._count = 0

    def start(self) -> Deployment:
        for name in WORKERS:
            address = f"127.0.0.1:{free_port()}"
            log = (self.workdir / f"{name}.log").open("w")
            self.procs[name] = start_worker(address, self.model_path, backend=self.backend, site=name, stderr=log)
            self.addresses[name] = address
        for name, proc in self.procs.items():
            wait_serving(self.addresses[name], proc)
            self.affinity[name] = pin_pid(proc.pid, self.worker_cpus)
        return self

    def proxied(self) -> dict[str, str]:
        """Addresses of one link proxy per worker (started on first use; they live as long as the deployment)."""
        from moevit.sim.linkproxy import ThreadedLinkProxy

        if not self.proxies:
            for name in WORKERS:
                self.proxies[name] = ThreadedLinkProxy(self.addresses[name])
                self.proxies[name].start()
        return {name: p.address for name, p in self.proxies.items()}

    def topology(self, config: str, *, proxies: bool = False, stream: bool = True, packed: bool = True) -> Path:
        import yaml

        addresses = self.proxied() if proxies else self.addresses
        sites = {COORDINATOR: f"127.0.0.1:{free_port()}", **addresses}
        device = {"gflops": 5, "memory_mb": 256, "active_w": 3, "idle_w": 1}
        doc = {
            "model": str(self.model_path), "coordinator": COORDINATOR, "fallback": "fail",
            "sites": {n: {"address": a, "device": dict(device)} for n, a in sites.items()},
            "links": [{"between": [COORDINATOR, n], "bandwidth_mbps": 100, "latency_ms": 1} for n in WORKERS],
            "placement": placement_for(config, self.layers, self.num_experts),
            "rpc": {"stream": stream, "packed": packed},
        }
        self._count += 1
        path = self.workdir / f"sites-{config}-{'proxy' if proxies else 'direct'}-{self._count}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def runtime(self, config: str, *, wire: str = "fp16", proxies: bool = False, memory_format=None,
                stream: bool = True, packed: bool = True):
        from moevit.coordinator.runtime import SplitRuntime
        from moevit.deploy.topology import load_topology

        topology = self.topology(config, proxies=proxies, stream=stream, packed=packed)
        runtime = SplitRuntime.from_topology(load_topology(topology), wire=wire)
        if memory_format is not None:
            runtime.model.to(memory_format=memory_format)
        runtime.check_workers()
        return runtime

    def stop(self) -> None:
        for p in self.proxies.values():
            p.stop()
        self.proxies.clear()
        for p in self.procs.values():
            stop_process(p)
        self.procs.clear()

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------------ helpers
def stats(times: list[float]) -> dict[str, float]:
    s = summarize(times)
    s["p99"] = percentile(times, 99)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}


def ratio_stats(num: list[float], den: list[float], block: int) -> dict[str, Any]:
    """Ratios of two interleaved series: of the medians, median of per-round ratios, per-block medians."""
    blocks = [statistics.median(num[i:i + block]) / statistics.median(den[i:i + block])
              for i in range(0, len(num) - block + 1, block)]
    return {
        "ratio_of_medians": round(statistics.median(num) / statistics.median(den), 4),
        "median_round_ratio": round(statistics.median(a / b for a, b in zip(num, den, strict=True)), 4),
        "block_ratios": [round(b, 4) for b in blocks],
        "median_block_ratio": round(statistics.median(blocks), 4) if blocks else None,
    }


def bootstrap_median_ci(values: list[float], *, seed: int = SEED, draws: int = 10_000, level: float = 0.95
                        ) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``values`` (seeded): how far the median of so many rounds
    moves between runs when the rounds themselves vary as much as these did."""
    import numpy as np

    a = np.asarray(values, dtype=float)
    meds = np.median(np.random.default_rng(seed).choice(a, size=(draws, len(a)), replace=True), axis=1)
    lo, hi = np.quantile(meds, [(1 - level) / 2, (1 + level) / 2])
    return round(float(lo), 4), round(float(hi), 4)


def cycling(fn: Callable[[Any], Any], inputs: list[Any]) -> Callable[[], Any]:
    """``fn`` on the inputs in turn: the k-th call of every such wrapper sees the same input."""
    state = {"i": 0}

    def call() -> Any:
        x = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        return fn(x)

    return call


def random_images(n: int, size: int, seed: int):
    import torch

    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def jpeg_images(n: int, size: int, seed: int) -> list[bytes]:
    """Smooth random colour fields with a little noise, as JPEG (quality 90): realistic sizes and decode cost."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, size=img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# --------------------------------------------------------------------------------------------------- a. latency
def bench_latency(dep: Deployment, ref, layers: tuple[int, ...], args, memory_format) -> dict[str, Any]:
    import torch

    runtimes = {"split_3w": dep.runtime("3w", memory_format=memory_format),
                "split_cam+2w": dep.runtime("cam+2w", memory_format=memory_format),
                # the same deployment with one unary RunExperts call per site and layer instead of the stream
                "split_3w_unary": dep.runtime("3w", memory_format=memory_format, stream=False),
                # ... and with one tensor per expert in each request instead of one packed tensor
                "split_3w_per_expert": dep.runtime("3w", memory_format=memory_format, packed=False),
                # one call per layer: what the per-call cost weighs when the workers share a core
                "split_layerwise": dep.runtime("layerwise", memory_format=memory_format)}
    for codec in args.wires:  # the same 3w deployment with another token codec on every link (--wires)
        if codec != "fp16":
            runtimes[f"split_3w_{codec}"] = dep.runtime("3w", wire=codec, memory_format=memory_format)
    xs = [x[None].contiguous(memory_format=memory_format) for x in random_images(16, IMAGE_SIZE, seed=1)]
    try:
        fns = {name: cycling(rt.classify, xs) for name, rt in runtimes.items()}
        cpu_share: list[float] = []  # CPU time the in-process forward got per wall second: < 1 = shared core

        def inprocess(x):
            c0, w0 = time.thread_time(), time.perf_counter()
            out = ref(x)
            cpu_share.append((time.thread_time() - c0) / (time.perf_counter() - w0))
            return out

        fns["inprocess"] = cycling(inprocess, xs)
        for rt in runtimes.values():
            for c in rt.clients.values():
                c.traffic.rpc_ms.clear()
        calls0 = sum(c.traffic.calls for rt in runtimes.values() for c in rt.clients.values())
        cpu0 = {name: proc_cpu_seconds(p.pid) for name, p in dep.procs.items()}
        with torch.inference_mode():
            times = time_interleaved(fns, rounds=args.rounds, warmup=args.warmup)
        calls = sum(c.traffic.calls for rt in runtimes.values() for c in rt.clients.values()) - calls0
        worker_cpu = sum(proc_cpu_seconds(p.pid) - cpu0[name] for name, p in dep.procs.items())
        out: dict[str, Any] = {"rounds": args.rounds, "warmup_rounds": args.warmup, "images": len(xs),
                               "times_ms": {k: [round(t, 3) for t in v] for k, v in times.items()},
                               "summary": {k: stats(v) for k, v in times.items()}}
        out["vs_inprocess"] = {name: ratio_stats(times[name], times["inprocess"], args.block) for name in runtimes}
        out["worker_cpu_ms_per_call"] = round(worker_cpu * 1e3 / max(1, calls), 3)
        # per deployment, in a short untimed pass each (reading /proc inside the timed calls would add to them)
        by_config = {}
        with torch.inference_mode():
            for name, rt in runtimes.items():
                n0 = sum(c.traffic.calls for c in rt.clients.values())
                c0 = sum(proc_cpu_seconds(p.pid) for p in dep.procs.values())
                for x in xs:
                    rt.classify(x)
                n = sum(c.traffic.calls for c in rt.clients.values()) - n0
                by_config[name] = round((sum(proc_cpu_seconds(p.pid) for p in dep.procs.values()) - c0) * 1e3
                                        / max(1, n), 3)
        out["worker_cpu_ms_per_call_by_config"] = by_config
        out["inprocess_cpu_per_wall_s"] = {"p50": round(statistics.median(cpu_share), 3),
                                           "p10": round(percentile(cpu_share, 10), 3)}
        out["loadavg_after"] = load_average()
        out["rpc_ms_p50"] = {name: {site: round(statistics.median(c.traffic.rpc_ms), 3)
                                    for site, c in rt.clients.items() if c.traffic.rpc_ms}
                             for name, rt in runtimes.items()}
        out["calls_per_image"] = {name: round(sum(c.traffic.calls for c in rt.clients.values())
                                              / (args.rounds + args.warmup), 2) for name, rt in runtimes.items()}
        return out
    finally:
        for rt in runtimes.values():
            rt.close()


# ------------------------------------------------------------------------------------------------ b. throughput
def serve_child(argv: list[str]) -> int:
    """``--serve-child TOPOLOGY ADDRESS THREADS MEMORY_FORMAT STATS``: the Classify server, in its own process;
    on exit it writes the size of every batch it ran to the JSON file STATS."""
    topology_path, address, threads, fmt, stats_path = argv
    import asyncio
    import logging

    import torch
    from moevit.coordinator.runtime import SplitRuntime
    from moevit.coordinator.server import serve
    from moevit.deploy.topology import load_topology

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(int(threads))
    runtime = SplitRuntime.from_topology(load_topology(topology_path))
    if fmt == "channels_last":
        runtime.model.to(memory_format=torch.channels_last)
    runtime.check_workers()
    sizes: list[int] = []
    classify = runtime.classify

    def counted(x):
        sizes.append(len(x))
        return classify(x)

    runtime.classify = counted  # the servicer looks the method up per batch
    try:
        asyncio.run(serve(runtime, address, image_size=IMAGE_SIZE, max_batch=8))
    finally:
        runtime.close()
        Path(stats_path).write_text(json.dumps({"batch_sizes": sizes}))
    return 0


def run_clients(address: str, images: list[bytes], n: int, concurrency: int
                ) -> tuple[float, list[float], float | None]:
    """``n`` Classify calls by ``concurrency`` closed-loop clients: (seconds, per-call latencies ms, steady-state
    images/s). The steady rate leaves out the ramp at both ends: the calls answered after the first
    ``concurrency`` answers and up to the ``concurrency``-th last, over that time (answers of one batch arrive
    together, so the window holds whole batches)."""
    import grpc

    from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc

    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    done_at: list[float] = []
    errors: list[BaseException] = []
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = expert_pb2_grpc.ClassifierServiceStub(channel)

        def client() -> None:
            while True:
                with lock:
                    if issued[0] >= n or errors:
                        return
                    k = issued[0]
                    issued[0] += 1
                req = expert_pb2.ClassifyRequest(image=images[k % len(images)], name=f"img{k}", top_k=5)
                t0 = time.perf_counter()
                try:
                    stub.Classify(req, timeout=120)
                except grpc.RpcError as e:
                    with lock:
                        errors.append(e)
                    return
                t1 = time.perf_counter()
                with lock:
                    latencies.append((t1 - t0) * 1e3)
                    done_at.append(t1)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"Classify failed: {errors[0]}")
    steady = None
    if n > 2 * concurrency:
        done_at.sort()
        start, end = done_at[concurrency - 1], done_at[n - concurrency - 1]
        inside = sum(1 for t in done_at if start < t <= end)
        steady = inside / (end - start) if end > start else None
    return seconds, latencies, steady


def bench_throughput(dep: Deployment, ref, args, memory_format, coord_cpus, worker_cpus) -> dict[str, Any]:
    import torch

    from moevit.data import load_image

    fmt = "channels_last" if memory_format == torch.channels_last else "contiguous"
    address = f"127.0.0.1:{free_port()}"
    log = (dep.workdir / "server.log").open("w")
    stats_path = dep.workdir / f"server-stats-{free_port()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-child", str(dep.topology("3w")), address,
           str(args.threads), fmt, str(stats_path)]
    server = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)
    images = jpeg_images(16, IMAGE_SIZE, seed=3)
    n, batch = args.requests, 8
    try:
        wait_serving(address, server)
        server_cpus = pin_pid(server.pid, coord_cpus)
        pin_process(worker_cpus)  # the clients run beside the workers, off the server's cores
        run_clients(address, images, 2 * batch, args.concurrency)  # warm-up: connections, first batches
        pin_process(coord_cpus)

        def split_run() -> tuple[float, list[float], float | None]:
            pin_process(worker_cpus)
            try:
                return run_clients(address, images, n, args.concurrency)
            finally:
                pin_process(coord_cpus)

        decoded = [load_image(b, IMAGE_SIZE) for b in images]

        def inproc_model() -> float:
            t0 = time.perf_counter()
            for k in range(0, n, batch):
                x = torch.stack([decoded[(k + j) % len(decoded)] for j in range(batch)])
                ref(x.contiguous(memory_format=memory_format)).softmax(dim=1).topk(5)
            return time.perf_counter() - t0

        def inproc_decode_model() -> float:
            t0 = time.perf_counter()
            for k in range(0, n, batch):
                x = torch.stack([load_image(images[(k + j) % len(images)], IMAGE_SIZE) for j in range(batch)])
                ref(x.contiguous(memory_format=memory_format)).softmax(dim=1).topk(5)
            return time.perf_counter() - t0

        with torch.inference_mode():
            inproc_model()
            rounds: dict[str, list[float]] = {"split": [], "inprocess_model": [], "inprocess_decode_model": []}
            steady: list[float] = []  # the split rounds' steady-state rates (ramps at both ends left out)
            # CPU each run got per wall second: the in-process runs on the coordinator's core (this thread), the
            # split on the server's process (coordinator's core) and on the workers (their core). On a machine
            # shared with other jobs these say how much of its cores each side really had.
            shares: dict[str, list[float]] = {"split_server": [], "split_workers": [], "inprocess_model": [],
                                              "inprocess_decode_model": []}
            latencies: list[float] = []
            for r in range(args.tp_rounds):
                order = ["split", "inprocess_model", "inprocess_decode_model"]
                order = order[r % 3:] + order[:r % 3]
                for name in order:
                    c0 = time.thread_time()
                    s0, w0 = proc_cpu_seconds(server.pid), sum(proc_cpu_seconds(p.pid) for p in dep.procs.values())
                    if name == "split":
                        seconds, lat, rate = split_run()
                        latencies += lat
                        if rate is not None:
                            steady.append(rate)
                        shares["split_server"].append((proc_cpu_seconds(server.pid) - s0) / seconds)
                        shares["split_workers"].append(
                            (sum(proc_cpu_seconds(p.pid) for p in dep.procs.values()) - w0) / seconds)
                    else:
                        seconds = inproc_model() if name == "inprocess_model" else inproc_decode_model()
                        shares[name].append((time.thread_time() - c0) / seconds)
                    rounds[name].append(n / seconds)
        ips = {k: round(statistics.median(v), 3) for k, v in rounds.items()}
        # rounds alternate, so each split round has in-process rounds beside it on a machine in the same state
        round_ratios = [a / b for a, b in zip(rounds["split"], rounds["inprocess_model"], strict=True)]
        stop_process(server)
        try:
            sizes = json.loads(stats_path.read_text())["batch_sizes"]
        except (OSError, ValueError, KeyError):
            sizes = []
        return {
            "server_batches": {"count": len(sizes), "mean_size": round(statistics.fmean(sizes), 3) if sizes else None,
                               "histogram": {str(k): sizes.count(k) for k in sorted(set(sizes))},
                               "note": "every batch the server ran, warm-up included"},
            "requests_per_round": n, "rounds": args.tp_rounds, "concurrency": args.concurrency, "batch": batch,
            "images_per_s": {k: [round(x, 3) for x in v] for k, v in rounds.items()},
            "median_images_per_s": ips,
            "ratio_vs_model": round(ips["split"] / ips["inprocess_model"], 4),
            "ratio_vs_decode_model": round(ips["split"] / ips["inprocess_decode_model"], 4),
            "steady_split_images_per_s": [round(x, 3) for x in steady],
            "ratio_steady_vs_model": round(statistics.median(steady) / ips["inprocess_model"], 4) if steady else None,
            "round_ratios_vs_model": [round(r, 4) for r in round_ratios],
            "median_round_ratio_vs_model": round(statistics.median(round_ratios), 4),
            "median_round_ratio_ci95": list(bootstrap_median_ci(round_ratios)),
            # CPU the server spent per image vs the in-process model's: what the split costs the camera site
            "cpu_ms_per_image": {k: round(statistics.median(c / r for c, r in zip(shares[s], rounds[k], strict=True))
                                          * 1e3, 2)
                                 for k, s in (("split", "split_server"), ("inprocess_model", "inprocess_model"))},
            "request_latency_ms": stats(latencies),
            "cpu_per_wall_s": {k: round(statistics.median(v), 3) for k, v in shares.items()},
            "server_cpus": server_cpus,
            "jpeg_bytes_mean": round(statistics.fmean(len(b) for b in images)),
        }
    finally:
        pin_process(coord_cpus)
        stop_process(server)


# ----------------------------------------------------------------------------------------------------- c. bytes
def bench_bytes(dep: Deployment, layers: tuple[int, ...], args, memory_format) -> dict[str, Any]:
    import torch

    rt = dep.runtime("3w", proxies=True, memory_format=memory_format)
    proxies = dep.proxies
    dims = {i: m.experts.dim for i, m in rt.model.moe_layers().items()}
    xs = [x[None].contiguous(memory_format=memory_format) for x in random_images(args.byte_images, IMAGE_SIZE, 5)]
    try:
        with torch.inference_mode():
            for x in xs[:3]:  # connections up, HPACK tables warm: the steady state is what an image costs
                rt.classify(x)
            time.sleep(0.2)
            for p in proxies.values():
                p.reset_counters()
            tokens0 = dict(rt.context.tokens)
            traffic0 = rt.traffic()
            for x in xs:
                rt.classify(x)
            time.sleep(0.2)  # trailing frames (window updates, pings) reach the counters
        n = len(xs)
        up = sum(p.bytes_up for p in proxies.values())
        down = sum(p.bytes_down for p in proxies.values())
        remote = {layer: 0 for layer in layers}
        for (layer, e), count in rt.context.tokens.items():
            sites = rt.placement.sites_for(layer, e)
            if COORDINATOR not in sites:
                remote[layer] += count - tokens0.get((layer, e), 0)
        floor_layer = {layer: remote[layer] * dims[layer] * 2 * 2 / n for layer in layers}
        floor = sum(floor_layer.values())
        traffic = rt.traffic()
        msg_sent = sum(traffic[s]["bytes_sent"] - traffic0[s]["bytes_sent"] for s in traffic)
        msg_recv = sum(traffic[s]["bytes_received"] - traffic0[s]["bytes_received"] for s in traffic)
        calls = sum(traffic[s]["calls"] - traffic0[s]["calls"] for s in traffic)
        return {
            "images": n, "wire": "fp16", "element_bytes": 2,
            "remote_tokens_per_image": {str(k): v / n for k, v in remote.items()},
            "dims": {str(k): v for k, v in dims.items()},
            "floor_bytes_per_image": round(floor, 1),
            "floor_bytes_per_image_by_layer": {str(k): round(v, 1) for k, v in floor_layer.items()},
            "wire_bytes_per_image": {"up": round(up / n, 1), "down": round(down / n, 1),
                                     "total": round((up + down) / n, 1)},
            "ratio_wire_vs_floor": round((up + down) / n / floor, 4),
            "message_bytes_per_image": {"sent": round(msg_sent / n, 1), "received": round(msg_recv / n, 1),
                                        "total": round((msg_sent + msg_recv) / n, 1)},
            "ratio_messages_vs_floor": round((msg_sent + msg_recv) / n / floor, 4),
            "calls_per_image": round(calls / n, 3),
            "overhead_bytes_per_call": round(((up + down) - floor * n) / max(1, calls), 1),
        }
    finally:
        rt.close()


# ------------------------------------------------------------------------------------------------------ d. onnx
def bench_onnx(workdir: Path, args) -> dict[str, Any]:
    import torch
    from moevit.worker.backends import OnnxBackend, TorchBackend

    from moevit.checkpoint import model_fingerprint

    model = build_model((8,), image_size=64, calibrate=False)
    bank = model.moe_layers()[8].experts
    with torch.no_grad():  # non-trivial norm affines so the folded graph is exercised
        bank.norm_weight.normal_(1.0, 0.2)
        bank.norm_bias.normal_(0.0, 0.2)
    banks = {8: bank.subset(list(bank.expert_ids))}
    torch_backend = TorchBackend(banks)
    onnx_backend = OnnxBackend(banks, model_fingerprint(model), workdir / "onnx-cache", threads=1)
    x = torch.randn(64, bank.dim, generator=torch.Generator().manual_seed(7))
    diff = max(float((onnx_backend.run(8, e, x) - torch_backend.run(8, e, x)).abs().max()) for e in range(4))
    calls = 50

    def many(fn: Callable[[int], Any]) -> Callable[[], None]:
        def run() -> None:
            for k in range(calls):
                fn(k % NUM_EXPERTS)
        return run

    def in_process(e: int) -> Any:
        with torch.inference_mode():
            return bank.forward_one(e, x)

    # The arithmetic any fp32 backend must do: the expert's two matrix products alone, [64, C] x [C, K] then
    # [64, K] x [K, C] (no bias, norm or activation). If the torch call is already close to this, onnxruntime
    # cannot be twice as fast without giving up float32.
    w1t = [bank.fc1_weight[e].detach().t().contiguous() for e in range(NUM_EXPERTS)]
    w2t = [bank.fc2_weight[e].detach().t().contiguous() for e in range(NUM_EXPERTS)]
    h = torch.empty(64, bank.hidden)
    y = torch.empty(64, bank.dim)

    def matmuls(e: int) -> Any:
        torch.mm(x, w1t[e], out=h)
        return torch.mm(h, w2t[e], out=y)

    # The fixed cost of any onnxruntime call from Python, the same way the backend calls it: a one-node
    # Identity graph on the same [64, C] input.
    identity = _identity_session(bank.dim)

    fns = {"onnxruntime": many(lambda e: onnx_backend.run(8, e, x)),
           "onnxruntime_identity": many(lambda e: identity.run(None, {"x": x.numpy()})),
           "torch_backend": many(lambda e: torch_backend.run(8, e, x)),
           "expertbank_forward_one": many(in_process),
           "matmuls_only": many(matmuls)}
    times = time_interleaved(fns, rounds=args.onnx_rounds, warmup=3)
    us = {k: [t * 1e3 / calls for t in v] for k, v in times.items()}
    return {
        "tokens": 64, "dim": bank.dim, "hidden": bank.hidden, "threads": 1, "calls_per_sample": calls,
        "rounds": args.onnx_rounds, "us_per_call": {k: stats(v) for k, v in us.items()},
        "ratio_onnx_vs_torch_backend": round(statistics.median(us["onnxruntime"])
                                             / statistics.median(us["torch_backend"]), 4),
        "ratio_onnx_vs_forward_one": round(statistics.median(us["onnxruntime"])
                                           / statistics.median(us["expertbank_forward_one"]), 4),
        "ratio_matmuls_only_vs_torch_backend": round(statistics.median(us["matmuls_only"])
                                                     / statistics.median(us["torch_backend"]), 4),
        "ratio_identity_plus_matmuls_vs_torch_backend": round(
            (statistics.median(us["onnxruntime_identity"]) + statistics.median(us["matmuls_only"]))
            / statistics.median(us["torch_backend"]), 4),
        "max_abs_diff_onnx_vs_torch": diff,
    }


def _identity_session(dim: int):
    """An onnxruntime session (one thread, like the backend's) of y = Identity(x), x [n, dim] float32."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", dim])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------------- e. agreement
def bench_agreement(workdir: Path, args, worker_cpus) -> dict[str, Any]:
    import torch

    from moevit.checkpoint import load_checkpoint, read_config, save_checkpoint
    from moevit.fuse import fold_batchnorm

    if DEMO_MODEL.exists() and not args.random_agreement:
        from moevit.data import open_dataset

        config = read_config(DEMO_MODEL)
        size = config.image_size
        xs_list = []
        for split in ("train", "eval"):  # the two splits partition the 1797 digits
            data = open_dataset("digits", image_size=size, split=split)
            xs_list += [data[i][0] for i in range(len(data))]
        xs = torch.stack(xs_list)
        if args.agreement_images:
            xs = xs[: args.agreement_images]
        model_path, source = DEMO_MODEL, f"trained model {DEMO_MODEL.relative_to(REPO_ROOT)} on the bundled digits"
        layers = tuple(config.moe.layers)
        num_experts = config.moe.num_experts
    else:
        size = 64
        layers, num_experts = (1, 3, 5, 7), NUM_EXPERTS
        model = build_model(layers, image_size=size)
        model_path = save_checkpoint(model, workdir / "agree.safetensors")
        xs = random_images(args.agreement_images or 2000, size, seed=11)
        source = f"seeded random model (MoE {layers_name(layers)}, E {num_experts}) on random {size}-px images"
    ref = load_checkpoint(model_path).eval()
    fold_batchnorm(ref)  # as the coordinator runs the trunk
    dep_dir = workdir / "agree"
    dep_dir.mkdir(exist_ok=True)
    with Deployment(dep_dir, Path(model_path), layers, num_experts, worker_cpus=worker_cpus) as dep:
        rt16, rt32 = dep.runtime("3w", wire="fp16"), dep.runtime("3w", wire="fp32")
        try:
            top16, top32, topref = [], [], []
            maxdiff32 = maxdiff16 = 0.0
            with torch.inference_mode():
                for k in range(0, len(xs), 64):
                    x = xs[k:k + 64]
                    l16, l32, lref = rt16.classify(x).logits, rt32.classify(x).logits, ref(x)
                    top16.append(l16.argmax(1))
                    top32.append(l32.argmax(1))
                    topref.append(lref.argmax(1))
                    maxdiff32 = max(maxdiff32, float((l32 - lref).abs().max()))
                    maxdiff16 = max(maxdiff16, float((l16 - lref).abs().max()))
        finally:
            rt16.close()
            rt32.close()
    t16, t32, tref = torch.cat(top16), torch.cat(top32), torch.cat(topref)
    n = len(t16)
    return {
        "source": source, "images": n, "image_size": size, "moe_layers": list(layers), "num_experts": num_experts,
        "deployment": "3w (every expert remote)",
        "agreement_fp16_vs_fp32": round(float((t16 == t32).float().mean()), 6),
        "disagreements": int((t16 != t32).sum()),
        "agreement_fp16_vs_inprocess": round(float((t16 == tref).float().mean()), 6),
        "agreement_fp32_vs_inprocess": round(float((t32 == tref).float().mean()), 6),
        "max_abs_logit_diff_fp32_vs_inprocess": maxdiff32,
        "max_abs_logit_diff_fp16_vs_inprocess": maxdiff16,
    }


# --------------------------------------------------------------------------------------------------------- report
def figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, name in (("[8]", "latency_8"), ("[1,3,5,7]", "latency_1357")):
        lat = result["latency"].get(key)
        if lat is None:
            continue
        r = lat["vs_inprocess"]["split_3w"]["ratio_of_medians"]
        s, i = lat["summary"]["split_3w"], lat["summary"]["inprocess"]
        rows.append({"figure": f"split (3 workers) ÷ in-process, batch-1 p50, MoE {key}",
                     "measured": f"{r:.3f} ({s['p50']:.1f} / {i['p50']:.1f} ms; p99 {s['p99']:.1f} / {i['p99']:.1f})",
                     "target": f"≤ {TARGETS[name]}", "holds": r <= TARGETS[name]})
        r2 = lat["vs_inprocess"]["split_cam+2w"]["ratio_of_medians"]
        s2 = lat["summary"]["split_cam+2w"]
        rows.append({"figure": f"split (cam holds ⅓ + 2 workers) ÷ in-process, batch-1 p50, MoE {key}",
                     "measured": f"{r2:.3f} ({s2['p50']:.1f} / {i['p50']:.1f} ms)", "target": "(info)",
                     "holds": None})
        if "split_layerwise" in lat["vs_inprocess"]:
            rl, sl = lat["vs_inprocess"]["split_layerwise"]["ratio_of_medians"], lat["summary"]["split_layerwise"]
            used = "w1 only" if len(key.split(",")) == 1 else "one worker per layer"
            rows.append({"figure": f"split, each layer's experts on one worker ({used}), MoE {key}",
                         "measured": f"{rl:.3f} ({sl['p50']:.1f} / {i['p50']:.1f} ms; "
                                     f"{lat['calls_per_image']['split_layerwise']:.2f} calls per image)",
                         "target": "(info)", "holds": None})
        # the 3w deployment with one transport choice changed: (config, what changed, its label, the default's)
        for config, change, label, default in (("split_3w_unary", "unary calls instead of the stream", "unary",
                                                "streamed"),
                                               ("split_3w_per_expert", "one tensor per expert instead of packed",
                                                "per expert", "packed")):
            if config not in lat["vs_inprocess"]:
                continue
            rc, sc = lat["vs_inprocess"][config]["ratio_of_medians"], lat["summary"][config]
            cpu = lat["worker_cpu_ms_per_call_by_config"]
            rows.append({"figure": f"split (3 workers), {change}, MoE {key}",
                         "measured": f"{rc:.3f} ({sc['p50']:.1f} / {i['p50']:.1f} ms); worker CPU per call "
                                     f"{cpu[config]:.2f} ms {label}, {cpu['split_3w']:.2f} ms {default}",
                         "target": "(info)", "holds": None})
        for config in sorted(c for c in lat["vs_inprocess"] if c.startswith("split_3w_") and c not in
                             ("split_3w_unary", "split_3w_per_expert")):  # --wires: another token codec
            rc, sc = lat["vs_inprocess"][config]["ratio_of_medians"], lat["summary"][config]
            rows.append({"figure": f"split (3 workers), {config.removeprefix('split_3w_')} on the wire instead of "
                                   f"fp16, MoE {key}",
                         "measured": f"{rc:.3f} ({sc['p50']:.1f} / {i['p50']:.1f} ms)", "target": "(info)",
                         "holds": None})
    for key, tp in result["throughput"].items():
        r = tp["ratio_vs_model"]
        ips = tp["median_images_per_s"]
        share = tp["cpu_per_wall_s"]
        steady = tp.get("ratio_steady_vs_model")
        steady_text = f"steady state {steady:.3f}; " if steady is not None else ""
        holds: bool | str = r >= TARGETS["throughput"]
        ci = tp.get("median_round_ratio_ci95")
        if ci is not None and tp["rounds"] > 1:  # several rounds: the verdict follows their interval
            target = TARGETS["throughput"]
            holds = True if ci[0] >= target else False if ci[1] < target else "unclear: the interval holds the target"
        if ci is not None and tp["rounds"] > 1:
            steady_text += (f"median of {tp['rounds']} paired rounds {tp['median_round_ratio_vs_model']:.3f}, "
                            f"95 % CI {ci[0]:.3f}–{ci[1]:.3f}; ")
        rows.append({"figure": f"Classify throughput, 8 clients ÷ in-process batch 8, MoE {key}",
                     "measured": f"{r:.3f} ({ips['split']:.1f} / {ips['inprocess_model']:.1f} img/s; {steady_text}"
                                 f"{tp['ratio_vs_decode_model']:.3f} vs decode + model; CPU/s: server "
                                 f"{share['split_server']:.2f}, workers {share['split_workers']:.2f}, in-process "
                                 f"{share['inprocess_model']:.2f})",
                     "target": f"≥ {TARGETS['throughput']}", "holds": holds})
    for key, b in result["bytes"].items():
        r = b["ratio_wire_vs_floor"]
        rows.append({"figure": f"bytes on the wire per image ÷ payload floor, MoE {key}",
                     "measured": f"{r:.3f} ({b['wire_bytes_per_image']['total']:.0f} / "
                                 f"{b['floor_bytes_per_image']:.0f} B; messages "
                                 f"{b['message_bytes_per_image']['total']:.0f} B)",
                     "target": f"≤ {TARGETS['bytes']}", "holds": r <= TARGETS["bytes"]})
    ag = result.get("agreement")
    if ag:
        d = ag["max_abs_logit_diff_fp32_vs_inprocess"]
        rows.append({"figure": "coordinator logits vs in-process, fp32 wire (max abs diff)",
                     "measured": f"{d:.2e} ({ag['images']} images)", "target": "≤ 1e-5",
                     "holds": d <= TARGETS["fp32_maxdiff"]})
        a = ag["agreement_fp16_vs_fp32"]
        rows.append({"figure": "fp16 wire top-1 agreement with fp32",
                     "measured": f"{100 * a:.2f} % ({ag['images']} images, {ag['disagreements']} differ)",
                     "target": "≥ 99.9 %", "holds": a >= TARGETS["agreement"]})
    on = result.get("onnx")
    if on:
        r = on["ratio_onnx_vs_torch_backend"]
        u = on["us_per_call"]
        rows.append({"figure": "onnxruntime expert call ÷ torch expert call, 64 tokens",
                     "measured": f"{r:.3f} ({u['onnxruntime']['p50']:.1f} / {u['torch_backend']['p50']:.1f} µs; "
                                 f"{on['ratio_onnx_vs_forward_one']:.3f} vs ExpertBank.forward_one)",
                     "target": f"≤ {TARGETS['onnx']}", "holds": r <= TARGETS["onnx"]})
        if "matmuls_only" in u:
            rows.append({"figure": "the expert's two fp32 matrix products alone ÷ torch expert call, 64 tokens",
                         "measured": f"{on['ratio_matmuls_only_vs_torch_backend']:.3f} "
                                     f"({u['matmuls_only']['p50']:.1f} / {u['torch_backend']['p50']:.1f} µs)",
                         "target": "(info: a floor for any fp32 backend)", "holds": None})
        if "onnxruntime_identity" in u:
            rows.append({"figure": "an onnxruntime call of a one-node Identity graph + the two products ÷ torch "
                                   "expert call",
                         "measured": f"{on['ratio_identity_plus_matmuls_vs_torch_backend']:.3f} "
                                     f"({u['onnxruntime_identity']['p50']:.1f} + {u['matmuls_only']['p50']:.1f} / "
                                     f"{u['torch_backend']['p50']:.1f} µs)",
                         "target": "(info: a floor for onnxruntime at torch's GEMM speed)", "holds": None})
    return rows


def pool_throughput(paths: list[str]) -> int:
    """``--pool``: the paired throughput rounds of several runs of this benchmark, pooled per layer set."""
    pooled: dict[str, list[float]] = {}
    for path in paths:
        try:
            runs = json.loads(Path(path).read_text())["throughput"]
        except (OSError, ValueError, KeyError) as e:
            print(f"bench_split: {path}: no throughput section to pool ({e})", file=sys.stderr)
            return 2
        for key, tp in runs.items():
            if "round_ratios_vs_model" not in tp:
                print(f"bench_split: {path}: {key} has no per-round ratios (a run from before they were recorded)",
                      file=sys.stderr)
                return 2
            pooled.setdefault(key, []).extend(tp["round_ratios_vs_model"])
    target = TARGETS["throughput"]
    for key, ratios in pooled.items():
        lo, hi = bootstrap_median_ci(ratios)
        share = sum(r >= target for r in ratios) / len(ratios)
        print(f"MoE {key}: {len(ratios)} paired rounds from {len(paths)} file(s): median split ÷ in-process "
              f"{statistics.median(ratios):.3f}, 95 % bootstrap interval {lo:.3f}–{hi:.3f}; {100 * share:.0f} % of "
              f"rounds ≥ {target}")
    return 0


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| figure | measured | target | holds? |", "|---|---|---|---|"]
    for r in rows:
        holds = "—" if r["holds"] is None else r["holds"] if isinstance(r["holds"], str) else (
            "yes" if r["holds"] else "**no**")
        lines.append(f"| {r['figure']} | {r['measured']} | {r['target']} | {holds} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------- main
_T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run (< 1 minute): few rounds, MoE [8] only "
                    "for throughput, 300 images for agreement")
    ap.add_argument("--out", default=None, help="JSON result (default bench/results/split.json, with --quick "
                    "bench/results/split_quick.json)")
    ap.add_argument("--coordinator-cpus", default="0", help="cores of the coordinator and in-process model (0)")
    ap.add_argument("--worker-cpus", default="1", help="cores of every worker process (1)")
    ap.add_argument("--no-pin", action="store_true", help="leave CPU placement to the OS")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of coordinator and in-process model")
    ap.add_argument("--memory-format", choices=("channels_last", "contiguous"), default="channels_last")
    ap.add_argument("--rounds", type=int, default=None, help="latency rounds per layer set (default 200; quick 20)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--block", type=int, default=None, help="rounds per block for block ratios (default 20; "
                    "quick 5)")
    ap.add_argument("--requests", type=int, default=None, help="Classify requests per throughput round (96; "
                    "quick 32)")
    ap.add_argument("--tp-rounds", type=int, default=None, help="throughput rounds (9; quick 1)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--byte-images", type=int, default=None, help="images for the byte count (50; quick 10)")
    ap.add_argument("--onnx-rounds", type=int, default=None, help="rounds of the expert-call timing (60; quick 10)")
    ap.add_argument("--agreement-images", type=int, default=None,
                    help="limit for the agreement check (default: all; quick 300)")
    ap.add_argument("--random-agreement", action="store_true",
                    help="use a random model on random images for (e) even when the trained demo model exists")
    ap.add_argument("--only", default="latency,throughput,bytes,onnx,agreement",
                    help="comma-separated sections to run")
    ap.add_argument("--layers", default=None, help="layer sets, e.g. '8;1,3,5,7' (default both)")
    ap.add_argument("--wires", nargs="+", default=["fp16"], metavar="CODEC",
                    help="latency: also time the 3w deployment with these token codecs, e.g. int4+zstd (fp16 always)")
    ap.add_argument("--pool", nargs="+", metavar="JSON", help="run nothing: pool the paired throughput rounds of "
                    "these result files per layer set (median, bootstrap interval, share of rounds >= the target)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--serve-child":
        return serve_child(argv[1:])
    args = _parser().parse_args(argv)
    if args.pool:
        return pool_throughput(args.pool)
    quick = args.quick
    args.out = args.out or ("bench/results/split_quick.json" if quick else "bench/results/split.json")
    args.rounds = args.rounds or (20 if quick else 200)
    args.block = args.block or (5 if quick else 20)
    args.requests = args.requests or (32 if quick else 96)
    args.tp_rounds = args.tp_rounds or (1 if quick else 9)
    args.byte_images = args.byte_images or (10 if quick else 50)
    args.onnx_rounds = args.onnx_rounds or (10 if quick else 60)
    if args.agreement_images is None and quick:
        args.agreement_images = 300
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    layer_sets = LAYER_SETS if args.layers is None else tuple(
        tuple(int(i) for i in part.split(",")) for part in args.layers.split(";"))

    pinned = not args.no_pin and (os.cpu_count() or 1) >= 2
    coord_cpus = parse_cpus(args.coordinator_cpus) if pinned else None
    worker_cpus = parse_cpus(args.worker_cpus) if pinned else None
    pin_process(coord_cpus)  # before torch or grpc start any thread
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    loadavg_before = load_average()
    t_start = time.perf_counter()

    import torch

    from moevit.checkpoint import load_checkpoint, save_checkpoint
    from moevit.fuse import fold_batchnorm

    torch.set_num_threads(args.threads)
    memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    workdir = Path(tempfile.mkdtemp(prefix="bench-split-"))
    result: dict[str, Any] = {
        "benchmark": "split",
        "description": "split inference over loopback (coordinator + worker processes) vs the same MoE model "
                       "in-process: batch-1 latency, Classify throughput, bytes on the wire, onnxruntime vs torch "
                       "expert call, fp16 vs fp32 wire agreement",
        "settings": {
            "arch": ARCH, "num_classes": NUM_CLASSES, "image_size": IMAGE_SIZE, "num_experts": NUM_EXPERTS,
            "expert_hidden": EXPERT_HIDDEN, "layer_sets": [list(s) for s in layer_sets], "seed": SEED,
            "quick": quick, "wire": "fp16", "memory_format": args.memory_format, "threads": args.threads,
            "worker": "moe-worker (torch backend, --threads 1, OMP_WAIT_POLICY=PASSIVE, --experts all)",
            "configs": {"3w": "every expert remote, expert e on w{1,2,3}[e mod 3]",
                        "cam+2w": "expert e on [cam, w1, w2][e mod 3]: the coordinator computes a third",
                        "layerwise": "the i-th MoE layer's experts all on w{1,2,3}[i mod 3] (latency only)"},
            "rounds": args.rounds, "warmup_rounds": args.warmup, "block": args.block,
        },
        "affinity": {
            "pinned": pinned,
            "coordinator_cpus": sorted(coord_cpus) if coord_cpus else None,
            "worker_cpus": sorted(worker_cpus) if worker_cpus else None,
            "how": "coordinator = this process and the in-process baseline (sched_setaffinity on every thread); "
                   "workers: every thread moved to the worker cores once SERVING (startup uses all cores); the "
                   "Classify server subprocess likewise onto the coordinator cores; throughput clients run on the "
                   "worker cores",
            "workers_read_back": {},
            "coordinator_read_back": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None,
        },
        "loadavg_before": loadavg_before,
        "latency": {}, "throughput": {}, "bytes": {},
    }
    try:
        for layers in layer_sets:
            key = layers_name(layers)
            need = sections & {"latency", "throughput", "bytes"}
            if quick and layers != layer_sets[0]:
                need = need - {"throughput"}
            if not need:
                continue
            say(f"MoE {key}: building the model, starting 3 workers ...")
            model = build_model(layers)
            path = save_checkpoint(model, workdir / f"moe{'-'.join(map(str, layers))}.safetensors")
            ref = load_checkpoint(path).eval().to(memory_format=memory_format)
            fold_batchnorm(ref)  # the in-process model as the coordinator runs it
            dep_dir = workdir / f"dep{'-'.join(map(str, layers))}"
            dep_dir.mkdir()
            with Deployment(dep_dir, path, layers, NUM_EXPERTS, worker_cpus=worker_cpus) as dep:
                say(f"MoE {key}: workers serving")
                result["affinity"]["workers_read_back"][key] = dep.affinity
                if "latency" in need:
                    say(f"MoE {key}: latency ({args.rounds} rounds)")
                    result["latency"][key] = bench_latency(dep, ref, layers, args, memory_format)
                if "bytes" in need:
                    say(f"MoE {key}: bytes on the wire")
                    result["bytes"][key] = bench_bytes(dep, layers, args, memory_format)
                if "throughput" in need:
                    say(f"MoE {key}: throughput")
                    result["throughput"][key] = bench_throughput(dep, ref, args, memory_format, coord_cpus,
                                                                 worker_cpus)
        if "onnx" in sections:
            say("expert call: onnxruntime vs torch")
            result["onnx"] = bench_onnx(workdir, args)
        if "agreement" in sections:
            say("fp16 vs fp32 wire agreement")
            result["agreement"] = bench_agreement(workdir, args, worker_cpus)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    rows = figures(result)
    result["figures"] = rows
    result["table_markdown"] = markdown(rows)
    out = write_result(args.out, result)
    print(result["table_markdown"])
    print(f"\nload average before {loadavg_before}, after {load_average()}; {result['seconds']} s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
