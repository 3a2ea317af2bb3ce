"""Attacks of issue 21 against real processes on loopback: payload builders and the measurements each is judged by.

Shared by ``tests/test_attacks.py``, ``tests/test_untrusted_inputs.py``, ``bench/attacks.py`` (one attack per run,
its figure as JSON) and ``bench/soak_attacks.py`` (the attacks mixed into normal traffic). Run as a module only by
:class:`HealthProbe`, which measures health latency from a process of its own (``python -m moevit.sim.attacks
_probe ADDRESS EVERY_S TIMEOUT_S``).
"""

from __future__ import annotations

import io
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moevit_rpc.channels import plain_channel_options
from moevit_rpc.memory import SETTLE_S, TICK_S
from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
# the attack clients' channels: room for payloads over the servers' 64 MiB cap, no proxy, no keepalive pings
CHANNEL_OPTIONS = plain_channel_options(max_message_mb=128)

# How long after the last large request the servers' heap trims are done (moevit_rpc.memory: the second trim is
# SETTLE_S after it, on TICK_S ticks), with room for a loaded machine
SETTLED_WAIT_S = SETTLE_S + 2 * TICK_S + 2.5


def rss_mb(pid: int) -> float:
    """Resident set size of a process, MB (from /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def settled_rss_mb(pid: int, *, wait_s: float = SETTLED_WAIT_S, every_s: float = 1.0, within_mb: float = 2.0,
                   samples: int = 3, timeout_s: float = 30.0) -> float:
    """The RSS of a process once its heap trims are done and it has stopped falling: call it when the last large
    request was answered. It waits ``wait_s`` (by default past both of the servers' trims, 1 s and 5 s after the
    last large request on 0.5 s ticks, plus 2.5 s for a loaded machine: moevit_rpc.memory; after a Classify flood it
    is the second trim that gives the memory back), then for ``samples`` readings ``every_s`` apart within
    ``within_mb``, at most ``timeout_s`` from now. A flat RSS alone is no sign: it is flat before a trim too."""
    deadline = time.monotonic() + timeout_s
    time.sleep(wait_s)
    window = [rss_mb(pid)]
    while time.monotonic() < deadline:
        time.sleep(every_s)
        window = [*window[-(samples - 1):], rss_mb(pid)]
        if len(window) == samples and max(window) - min(window) <= within_mb:
            break
    return round(window[-1], 1)


class HealthProbe:
    """Health.Check every ``every_s`` from a process of its own (so the attacker's own work, e.g. serialising
    large requests, does not slow the probe down); :attr:`worst_s` is the slowest answer once it stopped (a check
    that fails or times out counts as its time)."""

    def __init__(self, address: str, every_s: float = 0.05, timeout_s: float = 5.0) -> None:
        self.address, self.every_s, self.timeout_s = address, every_s, timeout_s
        self.latencies: list[float] = []
        self.failures = 0
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> HealthProbe:
        self._proc = subprocess.Popen([sys.executable, "-m", "moevit.sim.attacks", "_probe", self.address,
                                       str(self.every_s), str(self.timeout_s)], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        self._proc.stdout.readline()  # "ready": the first check answered
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        out, _ = self._proc.communicate("stop\n", timeout=self.timeout_s + 10)
        result = json.loads(out.strip().splitlines()[-1])
        self.latencies, self.failures = result["latencies"], result["failures"]

    @property
    def worst_s(self) -> float:
        return max(self.latencies, default=0.0)


def _probe(address: str, every_s: float, timeout_s: float) -> None:
    """The probe process: checks until a line arrives on stdin, then prints the latencies as JSON."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    latencies: list[float] = []
    failures = 0
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
        print("ready", flush=True)
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            except grpc.RpcError:
                failures += 1
            latencies.append(round(time.perf_counter() - t0, 4))
            stop.wait(every_s)
    print(json.dumps({"latencies": latencies, "failures": failures}), flush=True)


# -------------------------------------------------------------------------------------------- worker payloads


def refused_requests(fingerprint: str, layer: int, dim: int, unhosted: int) -> dict[str, expert_pb2.RunExpertsRequest]:
    """The refused RunExperts requests of issue 21 item 1, each several MiB, keyed by kind."""
    n = 5_000_000
    zeros = bytes(8 << 20)
    rows = len(zeros) // (4 * dim)
    tensor = expert_pb2.Tensor(data=zeros[: rows * dim * 4], shape=[rows, dim], dtype=expert_pb2.FLOAT32)
    big = expert_pb2.Tensor(data=bytes(32 << 20), shape=[(32 << 20) // (4 * dim), dim], dtype=expert_pb2.FLOAT32)
    return {
        # 5 M packed entries (about 9.5 MiB), for a model this worker does not serve
        "packed_entries_wrong_fingerprint": expert_pb2.RunExpertsRequest(
            model_fingerprint="0" * 16, layer=layer, packed=expert_pb2.PackedTokens(experts=[1] * n, counts=[1] * n)),
        # the same for an expert the worker does not host
        "packed_entries_unhosted": expert_pb2.RunExpertsRequest(
            model_fingerprint=fingerprint, layer=layer,
            packed=expert_pb2.PackedTokens(experts=[unhosted] * n, counts=[0] * n)),
        # a 32 MiB tensor for another model
        "tensor_wrong_fingerprint": expert_pb2.RunExpertsRequest(
            model_fingerprint="0" * 16, layer=layer, batches=[expert_pb2.ExpertTokens(expert=0, tokens=big)]),
        # an 8 MiB tensor naming an expert the worker does not host
        "tensor_unhosted": expert_pb2.RunExpertsRequest(
            model_fingerprint=fingerprint, layer=layer,
            batches=[expert_pb2.ExpertTokens(expert=unhosted, tokens=tensor)]),
    }


def many_batches_request(fingerprint: str, layer: int, count: int = 12_000_000) -> bytes:
    """A RunExpertsRequest of ``count`` empty batches (about 4.8 bytes each: 57 MiB for 12 M), serialised by hand
    (building it through protobuf would take minutes): its token-element estimate is 0."""
    head = expert_pb2.RunExpertsRequest(model_fingerprint=fingerprint, layer=layer).SerializeToString()
    one = expert_pb2.RunExpertsRequest(batches=[expert_pb2.ExpertTokens(expert=1)]).SerializeToString()
    return head + one * count


def start_worker(model: str | Path, experts: str, *extra: str, log: Path | None = None) -> tuple[subprocess.Popen,
                                                                                                    str]:
    """A ``moe-worker`` process on a free loopback port, SERVING; (process, address)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    err = open(log, "w") if log is not None else tempfile.TemporaryFile()  # noqa: SIM115 - the process owns it
    proc = subprocess.Popen([sys.executable, "-m", "moevit.worker.cli", "--listen", address, "--model", str(model),
                             "--experts", experts, "--threads", "1", *extra], cwd=REPO_ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    from moevit.coordinator.local import wait_serving

    try:  # one fresh health check every 0.1 s: no channel backoff between the start and the first answer
        wait_serving(address, proc, 120, what="the attacked worker")
    except BaseException:
        proc.kill()
        raise
    return proc, address


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def attack_refused(address: str, pid: int, fingerprint: str, *, layer: int, dim: int, unhosted: int,
                   rounds: int = 6, stream: bool = False) -> dict[str, Any]:
    """Send every refused request kind ``rounds`` times (unary, and on a stream when ``stream``), plus the
    many-batches request; the worker's RSS growth and the slowest health answer meanwhile. ``request_cpu_ms``: the
    worker's CPU time (all its threads) from sending each kind (``stream:KIND`` on the stream) to its answer, the
    most over the rounds; ``request_loop_cpu_ms`` the part on the event loop's thread (see
    :func:`process_cpu_s`); ``*_median`` the median over the rounds, which one slow round (a first touch of fresh
    pages, a neighbour on a shared host) does not move. The requests go one at a time, so a request's figure bounds
    how long it could keep the worker from answering health on an idle machine, and load does not inflate it as it
    does wall time."""
    requests = refused_requests(fingerprint, layer, dim, unhosted)
    out: dict[str, Any] = {"rss_start_mb": round(rss_mb(pid), 1), "codes": {}}
    samples: dict[str, dict[str, list[float]]] = {"request_cpu_ms": {}, "request_loop_cpu_ms": {}}

    def cpu_of(kind: str, cpu0: float, loop0: float) -> None:
        for key, s in (("request_cpu_ms", process_cpu_s(pid) - cpu0), ("request_loop_cpu_ms", loop_cpu_s(pid) - loop0)):
            samples[key].setdefault(kind, []).append(s * 1e3)

    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as ch, HealthProbe(address) as probe:
        unary = ch.unary_unary("/moevit.rpc.v1.ExpertService/RunExperts")

        def send(kind: str, data: bytes) -> tuple[str, float]:
            """One unary call: its status name and seconds to the answer; its CPU goes to ``kind``'s samples."""
            t0, cpu0, loop0 = time.perf_counter(), process_cpu_s(pid), loop_cpu_s(pid)
            try:
                unary(data, timeout=60)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            seconds = time.perf_counter() - t0
            cpu_of(kind, cpu0, loop0)
            out["codes"][f"unary:{kind}"] = code
            return code, seconds

        for round_ in range(rounds):
            if round_ == 1:  # after one request of each kind: the allocator's arenas have grown to their working size
                out["rss_warm_mb"] = round(rss_mb(pid), 1)
            for kind, req in requests.items():
                code, _ = send(kind, req.SerializeToString())
                print(f"{kind}: {code}, worker RSS {rss_mb(pid):.0f} MB", file=sys.stderr)
        data = many_batches_request(fingerprint, layer)
        answer_s = []
        for _ in range(rounds):
            code, seconds = send("many_batches", data)
            answer_s.append(seconds)
            print(f"many_batches: {code} in {seconds:.3f} s", file=sys.stderr)
        out["many_batches_answer_s"] = round(max(answer_s), 3)
        if stream:
            stub = expert_pb2_grpc.ExpertServiceStub(ch)
            marks: list[tuple[str, float, float]] = []
            answered: queue.Queue[None] = queue.Queue()

            def one_at_a_time() -> Iterator[expert_pb2.RunExpertsRequest]:
                """Each request once the previous one is answered, so each one's CPU time is its own."""
                for kind, req in [kr for _ in range(rounds) for kr in requests.items()]:
                    marks.append((f"stream:{kind}", process_cpu_s(pid), loop_cpu_s(pid)))
                    yield req
                    answered.get(timeout=120)

            answers = []
            for answer in stub.RunExpertsStream(one_at_a_time(), timeout=120):
                answers.append(answer)
                cpu_of(*marks[-1])
                answered.put(None)
            out["codes"]["stream"] = sorted({grpc.StatusCode.OK.name if not a.error_code else
                                             next(c.name for c in grpc.StatusCode if c.value[0] == a.error_code)
                                             for a in answers})
    for key, by_kind in samples.items():
        out[key] = {kind: round(max(ms), 1) for kind, ms in by_kind.items()}
        out[f"{key}_median"] = {kind: round(statistics.median(ms), 1) for kind, ms in by_kind.items()}
    out["rss_end_mb"] = settled_rss_mb(pid)
    out["rss_growth_mb"] = round(out["rss_end_mb"] - out["rss_start_mb"], 1)
    if "rss_warm_mb" in out:
        out["rss_growth_after_warm_mb"] = round(out["rss_end_mb"] - out["rss_warm_mb"], 1)
    out["health_worst_s"] = round(probe.worst_s, 3)
    out["health_failures"] = probe.failures
    return out


def process_cpu_s(pid: int) -> float:
    """CPU time of a process so far, all its threads, seconds (per-thread ``schedstat``, nanoseconds: the
    clock-tick figures of ``/proc/PID/stat`` are too coarse for a few milliseconds). A thread that exits between two
    readings takes its time with it; the servers' threads live as long as they do."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            pass
    return total / 1e9


def loop_cpu_s(pid: int) -> float:
    """CPU time of a server process's main thread, where its asyncio event loop (and every handler, health checks
    included) runs, seconds."""
    with open(f"/proc/{pid}/task/{pid}/schedstat", encoding="ascii") as f:
        return int(f.read().split()[0]) / 1e9


def _headers_of(request: expert_pb2.RunExpertsRequest, token: str | None) -> tuple[tuple[str, str], ...]:
    """The headers an honest client sends with ``request`` (its distinct experts, as a coordinator names each once)."""
    from moevit_rpc.headers import request_headers
    from moevit_rpc.security import token_metadata

    named = request.packed.experts if request.HasField("packed") else [b.expert for b in request.batches]
    distinct = list(dict.fromkeys(named[:1000]))
    return (*token_metadata(token), *request_headers(request.model_fingerprint, request.layer, distinct))


def attack_refused_cpu(address: str, pid: int, fingerprint: str, *, layer: int, dim: int, unhosted: int,
                       repeat: int = 10, token: str | None = None, kinds: Collection[str] | None = None,
                       pause_s: float = 2.5) -> dict[str, Any]:
    """The worker's CPU time per refused request (milliseconds, all its threads), for each kind of
    :func:`refused_requests`, sent ``repeat`` times in a row each way: ``body`` without headers (an older client,
    or one that does not say what it sends: the message is received and refused from its bytes or once parsed) and
    ``headers`` with the headers that say what the message says (:mod:`moevit_rpc.headers`: refused before the
    message is received). With ``token`` (the worker's) both carry it, and ``no_token`` sends the requests without
    it. ``*_loop_ms`` is the part of it on the event loop's thread, which health checks wait for. Each way is
    warmed up with two requests and starts ``pause_s`` after the previous one (the heap trim 1 s after large
    requests is not counted)."""
    from moevit_rpc.security import token_metadata

    requests = refused_requests(fingerprint, layer, dim, unhosted)
    ways = {"body": lambda r: token_metadata(token) or None, "headers": lambda r: _headers_of(r, token)}
    if token:
        ways["no_token"] = lambda r: None
    out: dict[str, Any] = {"repeat": repeat, "kinds": {}}
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
        unary = ch.unary_unary("/moevit.rpc.v1.ExpertService/RunExperts")
        for kind, request in requests.items():
            if kinds is not None and kind not in kinds:
                continue
            data = request.SerializeToString()
            row: dict[str, Any] = {"mib": round(len(data) / (1 << 20), 1)}
            for way, metadata in ways.items():
                md = metadata(request)
                codes = set()
                for i in range(2 + repeat):
                    if i == 2:
                        time.sleep(pause_s)
                        cpu0, loop0 = process_cpu_s(pid), loop_cpu_s(pid)
                    try:
                        unary(data, timeout=60, metadata=md)
                        codes.add("OK")
                    except grpc.RpcError as e:
                        codes.add(e.code().name)
                time.sleep(0.3)  # the worker frees the last request after its caller has the answer
                row[f"{way}_ms"] = round((process_cpu_s(pid) - cpu0) / repeat * 1e3, 2)
                row[f"{way}_loop_ms"] = round((loop_cpu_s(pid) - loop0) / repeat * 1e3, 2)
                row[f"{way}_codes"] = sorted(codes)
            out["kinds"][kind] = row
            print(f"{kind}: {row}", file=sys.stderr)
    return out


def small_model(tmp: Path) -> tuple[Path, str]:
    """The tests' seeded small MoE model (layers 5 and 8, four experts), saved under ``tmp``; (path, fingerprint)."""
    from moevit.coordinator.local import small_moe_model

    from moevit.checkpoint import model_fingerprint, save_checkpoint

    model = small_moe_model((5, 8), num_experts=4, calib_size=64)
    return save_checkpoint(model, tmp / "moe.safetensors"), model_fingerprint(model)


# ------------------------------------------------------------------------------------------------- watches


async def _watches(address: str, n: int, token: str | None) -> dict[str, Any]:
    """Open ``n`` Health.Watch streams without a token and keep them; then Info with ``token`` (as a coordinator
    calls), and one more watch with the token; all timed."""
    import asyncio

    metadata = (("authorization", f"Bearer {token}"),) if token else None
    out: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        calls = [stub.Watch(health_pb2.HealthCheckRequest()) for _ in range(n)]

        async def first(call: Any) -> str:
            try:
                await asyncio.wait_for(call.read(), 10)
                return "OPEN"
            except grpc.aio.AioRpcError as e:
                return e.code().name
            except TimeoutError:
                return "NO_ANSWER"

        states = await asyncio.gather(*(first(c) for c in calls))
        out["watches"] = {k: states.count(k) for k in sorted(set(states))}
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as ch2:
            t0 = time.perf_counter()
            try:
                await expert_pb2_grpc.ExpertServiceStub(ch2).Info(expert_pb2.InfoRequest(), timeout=10,
                                                                  metadata=metadata)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            out["info"] = {"code": code, "s": round(time.perf_counter() - t0, 3)}
            watch = health_pb2_grpc.HealthStub(ch2).Watch(health_pb2.HealthCheckRequest(), metadata=metadata)
            out["watch_with_token"] = await first(watch)
            watch.cancel()
        for c in calls:
            c.cancel()
        await asyncio.sleep(0.5)  # let grpc's poller deliver the cancellations before the loop closes
    return out


def attack_watches(address: str, n: int = 254, token: str | None = None) -> dict[str, Any]:
    import asyncio

    return asyncio.run(_watches(address, n, token))


# ------------------------------------------------------------------------------------------------- Classify


def progressive_bomb(size: int = 2000, extra_scans: int = 400) -> bytes:
    """A progressive JPEG of ``size``² flat grey pixels whose last scan is repeated ``extra_scans`` times: a few
    KB that the decoder passes over once per scan (2000², 400 scans: 21 KB, 4.4 s to decode on this machine)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (size, size), 128).save(buf, "JPEG", progressive=True, quality=50)
    data = buf.getvalue()
    last, eoi = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    return data[:eoi] + data[last:eoi] * extra_scans + data[eoi:]


def png(size: tuple[int, int], seed: int = 0) -> bytes:
    """A PNG of seeded noise (small sizes) or flat colour (large ones, so the file stays small)."""
    from PIL import Image

    buf = io.BytesIO()
    if size[0] * size[1] <= 1 << 16:
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    else:
        Image.new("RGB", size, (90, 140, 60)).save(buf, "PNG")
    return buf.getvalue()


class ClassifyDeployment:
    """A worker process and a ``moe-coordinator --serve`` process in front of it (the tests' small model at 64 px,
    MoE layers 5 and 8, experts split between the coordinator and the worker), on loopback."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        from moevit.coordinator.local import free_port, write_topology

        self.tmp = Path(tmp)
        self.model, self.fingerprint = small_model(self.tmp)
        ports = {"cam": free_port(), "w": free_port()}
        placement = {8: {"cam": [2, 3], "w": [0, 1]}, 5: {"cam": [0, 1], "w": [2, 3]}}
        topology = write_topology(self.tmp, self.model, ports, placement=placement)
        self.worker, self.worker_address = start_worker(self.model, "8:0-1,5:2-3", log=self.tmp / "worker.log")
        topology.write_text(topology.read_text().replace(f"127.0.0.1:{ports['w']}", self.worker_address))
        self.address = f"127.0.0.1:{free_port()}"
        self.log = self.tmp / "coordinator.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "moevit.coordinator.cli", "--topology", str(topology),
                                      "--serve", self.address, "--no-spawn", "--threads", "1", "--image-size", "64",
                                      *extra], cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.log.open("w"))
        from moevit.coordinator.local import wait_serving

        try:
            wait_serving(self.address, self.proc, timeout=180)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        stop(self.proc)
        stop(self.worker)

    def __enter__(self) -> ClassifyDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def classify(address: str, image: bytes, *, timeout: float = 30.0, name: str = "") -> tuple[str, float]:
    """(status code name, seconds) of one Classify call on a channel of its own."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
        stub = expert_pb2_grpc.ClassifierServiceStub(ch)
        t0 = time.perf_counter()
        try:
            stub.Classify(expert_pb2.ClassifyRequest(image=image, name=name), timeout=timeout)
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        return code, time.perf_counter() - t0


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    return t, box


def attack_bomb(address: str, pid: int | None = None, *, bombs: int = 2, cancelled: int = 8) -> dict[str, Any]:
    """A legitimate 64-px PNG sent 0.3 s after ``bombs`` progressive-JPEG bombs, then after ``cancelled`` large
    PNGs (6000x6000, flat) whose callers gave up after 0.1 s: how long the legitimate request waits each time; with
    the server's ``pid``, its RSS before and once settled after (the decodes given up on end on their threads)."""
    legit = png((64, 64), 1)
    out: dict[str, Any] = {"legit_alone_s": round(classify(address, legit)[1], 3)}
    if pid is not None:
        out["rss_start_mb"] = round(rss_mb(pid), 1)

    def behind(bomb: bytes) -> tuple[dict[str, Any], list[Any]]:
        """The legitimate request 0.3 s after ``bombs`` copies of ``bomb``, and the bombs' answers."""
        threads = [in_background(lambda: classify(address, bomb, timeout=60)) for _ in range(bombs)]
        time.sleep(0.3)
        code, seconds = classify(address, legit)
        for t, _ in threads:
            t.join(70)
        return {"code": code, "s": round(seconds, 3)}, [box[0] and (box[0][0], round(box[0][1], 3))
                                                        for _, box in threads]

    out["legit_behind_bombs"], out["bomb_answers"] = behind(progressive_bomb())
    # within the scan limits (56 scans of 4 MP): decoded, on the decode threads
    out["legit_behind_bombs_within_limits"], out["bomb_within_limits_answers"] = behind(
        progressive_bomb(extra_scans=50))
    big = png((6000, 6000))
    cancelled_calls = [in_background(lambda: classify(address, big, timeout=0.1)) for _ in range(cancelled)]
    for t, _ in cancelled_calls:
        t.join(10)
    code, seconds = classify(address, legit)
    out["legit_after_cancelled"] = {"code": code, "s": round(seconds, 3)}
    if pid is not None:
        out["rss_end_mb"] = settled_rss_mb(pid, timeout_s=60.0)
        out["rss_growth_mb"] = round(out["rss_end_mb"] - out["rss_start_mb"], 1)
    return out


def attack_flood(address: str, pid: int, *, requests: int = 16, mib: int = 48) -> dict[str, Any]:
    """``requests`` concurrent Classify calls of ``mib`` MiB of junk each; the server's RSS before, at its highest
    while they run, and after; then a legitimate request."""
    junk = np.random.default_rng(0).bytes(mib << 20)
    out: dict[str, Any] = {"rss_start_mb": round(rss_mb(pid), 1)}
    peak = [out["rss_start_mb"]]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(rss_mb(pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    calls = [in_background(lambda: classify(address, junk, timeout=120)) for _ in range(requests)]
    for t, _ in calls:
        t.join(130)
    done.set()
    sampler.join()
    out["codes"] = sorted({box[0][0] for _, box in calls if box})
    out["rss_peak_mb"] = round(max(peak), 1)
    # before the next request, and after it: the batcher once held its last batch's images until the next request
    # came (47-96 MB more before it than after)
    out["rss_before_next_mb"] = settled_rss_mb(pid)
    code, seconds = classify(address, png((64, 64), 2))
    out["legit_after"] = {"code": code, "s": round(seconds, 3)}
    out["rss_end_mb"] = settled_rss_mb(pid)
    return out


if __name__ == "__main__" and sys.argv[1:2] == ["_probe"]:
    _probe(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
