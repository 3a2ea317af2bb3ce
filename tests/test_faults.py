"""Fault tolerance of split inference with real worker processes on loopback (issue 8): kill -9 with requests in
flight, rejoin, flapping and silent links through a local TCP proxy, deadlines that reach the worker, busy
workers, the ``nearest`` fallback, and workers outliving their coordinator."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from moevit.coordinator.runtime import SplitRuntime
from moevit.coordinator.server import start_server
from moevit.coordinator.sites import SiteClient, SiteError
from moevit.deploy.topology import load_topology
from moevit.sim.linkproxy import ThreadedLinkProxy
from moevit.worker.backends import TorchBackend
from moevit.worker.server import WorkerServer
from PIL import Image

from moevit.checkpoint import save_checkpoint
from moevit.data import load_image
from moevit.fuse import folded_copy
from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc
from tests.deploy import replicated_placement, small_moe_model, write_topology
from tests.netutil import free_port, start_worker, start_workers, stop, wait_serving

LAYERS = (1, 5, 8)
E = 6
SIZE = 64
WORKERS = ("w0", "w1", "w2")


# end to end through real worker/coordinator processes: make test runs it, make test-quick leaves it out
pytestmark = pytest.mark.e2e


def _replicated() -> dict[int, dict[str, list[int]]]:
    """Expert e on w[e mod 3] and w[(e+1) mod 3]: every expert has two replicas."""
    return replicated_placement({layer: E for layer in LAYERS}, WORKERS)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class LoopThread:
    """An asyncio loop on a daemon thread, for in-process async servers in synchronous tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # one torch thread here: three worker processes share the cores, and spinning OpenMP threads would starve them
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("faults")
    model = small_moe_model(LAYERS, num_experts=E, calib_size=SIZE)
    path = save_checkpoint(model, tmp / "moe.safetensors")
    ports = {"cam": free_port(), **{w: free_port() for w in WORKERS}}
    procs = start_workers(str(path), {w: f"127.0.0.1:{ports[w]}" for w in WORKERS})
    images = [_png(i) for i in range(200)]
    x = torch.stack([load_image(b, SIZE) for b in images])
    ref = folded_copy(model)  # as the coordinator runs the trunk
    with torch.no_grad():  # one image at a time, as the Classify server below runs them (max_batch=1): a batch
        # of another size may round differently and flip a patch that sits on a routing boundary
        probs = torch.cat([ref(x[i:i + 1]) for i in range(len(x))]).softmax(dim=1)
    c = {"tmp": tmp, "model": model, "ref": ref, "path": path, "ports": ports, "procs": procs, "images": images,
         "x": x, "probs": probs}
    yield c
    for p in c["procs"].values():
        stop(p)
    torch.set_num_threads(threads)


def _restart(cluster, w: str) -> float:
    """Start worker ``w`` again on its port; returns the time it was first seen SERVING."""
    stop(cluster["procs"][w])
    cluster["procs"][w] = start_worker(str(cluster["path"]), f"127.0.0.1:{cluster['ports'][w]}")
    return time.monotonic()


def _runtime(cluster, name: str, **kw) -> SplitRuntime:
    topo_kw = {k: kw.pop(k) for k in ("fallback", "placement", "rpc", "addresses", "ports") if k in kw}
    ports = topo_kw.pop("ports", cluster["ports"])
    topo = write_topology(cluster["tmp"], cluster["path"], ports, name=name,
                          **{"placement": _replicated(), **topo_kw})
    rt = SplitRuntime.from_topology(load_topology(topo), wire="fp32", **kw)
    rt.check_workers(wait_s=5)
    return rt


def _ensure_all_up(cluster) -> None:
    for w in WORKERS:
        if cluster["procs"][w].poll() is not None:
            _restart(cluster, w)


def test_kill9_with_200_in_flight_then_rejoin(cluster):
    """kill -9 of a worker with 200 Classify requests in flight: every request ends well before its deadline,
    served by a replica, equal to the fault-free output; the restarted worker is used again within 2 s."""
    _ensure_all_up(cluster)
    rt = _runtime(cluster, "kill.yaml", fallback="skip", rpc={"deadline_s": 5.0})
    loop = LoopThread()
    # a queue sized for the 200 concurrent requests (the default of 32 answers the rest RESOURCE_EXHAUSTED)
    server = loop.run(start_server(rt, "127.0.0.1:0", image_size=SIZE, max_batch=1, max_queue=256))
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = expert_pb2_grpc.ClassifierServiceStub(ch)
            t0 = time.monotonic()
            futs = [stub.Classify.future(expert_pb2.ClassifyRequest(image=b, name=str(i)), timeout=30)
                    for i, b in enumerate(cluster["images"])]
            while sum(f.done() for f in futs) < 16:
                time.sleep(0.005)
            cluster["procs"]["w0"].send_signal(signal.SIGKILL)
            in_flight = sum(not f.done() for f in futs)
            codes, degraded, worst = {}, 0, 0.0
            for i, f in enumerate(futs):
                try:
                    resp = f.result(timeout=40)
                except grpc.RpcError as e:
                    codes[e.code().name] = codes.get(e.code().name, 0) + 1
                    continue
                codes["OK"] = codes.get("OK", 0) + 1
                worst = max(worst, resp.latency_ms)
                if resp.degraded:
                    degraded += 1
                    continue
                ref = cluster["probs"][i]
                top = torch.tensor([p.probability for p in resp.top])
                idx = [p.index for p in resp.top]
                assert idx[0] == int(ref.argmax()), f"image {i}: top-1 differs from the fault-free run"
                torch.testing.assert_close(top, ref[idx], atol=1e-4, rtol=0)
            elapsed = time.monotonic() - t0
        assert in_flight >= 150, f"only {in_flight} requests were in flight at the kill"
        assert codes == {"OK": 200}, codes
        assert degraded == 0  # every expert had a live replica
        assert elapsed < 30 and worst < 30_000
        assert not rt.clients["w0"].up
        assert rt.counters.retries >= 0 and rt.traffic()["w0"]["failures"] >= 0

        # Rejoin: the restarted worker gets calls again within 2 s of answering SERVING.
        calls_before = rt.clients["w0"].traffic.calls
        serving_at = _restart(cluster, "w0")
        with grpc.insecure_channel(server.address) as ch:
            stub = expert_pb2_grpc.ClassifierServiceStub(ch)
            used_at = None
            while time.monotonic() - serving_at < 5:
                stub.Classify(expert_pb2.ClassifyRequest(image=cluster["images"][0]), timeout=10)
                if rt.clients["w0"].traffic.calls > calls_before:
                    used_at = time.monotonic()
                    break
                time.sleep(0.02)
        assert used_at is not None, "the restarted worker was never used again"
        assert used_at - serving_at < 2.0, f"rejoined after {used_at - serving_at:.2f} s"
    finally:
        loop.run(server.stop(0))
        loop.close()
        rt.close()


def _classify_checked(cluster, rt: SplitRuntime, seed: int, n: int = 4):
    """A batch through ``rt``: its result, the fault-free in-process probabilities of the same batch, seconds."""
    idx = torch.randint(0, len(cluster["x"]), (n,), generator=torch.Generator().manual_seed(seed))
    x = cluster["x"][idx]
    t0 = time.monotonic()
    res = rt.classify(x)
    dt = time.monotonic() - t0
    with torch.no_grad():
        want = cluster["ref"](x).softmax(dim=1)
    return want, res, dt


def test_flapping_link_is_served_by_replicas(cluster):
    """A link that goes down and up every 2 s (connections reset): every batch is answered, none degraded, each
    equal to the fault-free output; calls go over the link again once it stays up."""
    _ensure_all_up(cluster)
    with ThreadedLinkProxy(f"127.0.0.1:{cluster['ports']['w1']}") as proxy:
        rt = _runtime(cluster, "flap.yaml", fallback="skip", rpc={"deadline_s": 3.0},
                      addresses={"w1": proxy.address})
        stop_flap = threading.Event()

        def flap() -> None:
            while not stop_flap.wait(2.0):
                proxy.set_up(not proxy.is_up)

        threading.Thread(target=flap, daemon=True).start()
        try:
            t_end, worst, batches, seed = time.monotonic() + 6.5, 0.0, 0, 0
            while time.monotonic() < t_end:
                want, res, dt = _classify_checked(cluster, rt, seed)
                seed += 1
                batches += 1
                worst = max(worst, dt)
                assert not bool(res.degraded.any()), res.failures
                torch.testing.assert_close(res.logits.softmax(1), want, atol=1e-5, rtol=0)
        finally:
            stop_flap.set()
        proxy.set_up(True)
        # the deadline bounds each MoE layer's calls, retries included: a forward ends within one per layer
        assert batches > 3 and worst < len(LAYERS) * 3.0
        assert rt.clients["w1"].watch.transitions >= 2  # seen down and up again
        assert rt.clients["w1"].watch.wait_up(3.0)
        before = rt.clients["w1"].traffic.calls
        _classify_checked(cluster, rt, 999)
        assert rt.clients["w1"].traffic.calls > before
        rt.close()


def test_silent_link_is_hedged_or_degraded_within_the_deadline(cluster):
    """A link that silently stops forwarding (connections stay open): with hedging the other replica answers and
    the loser is cancelled; without, the call ends at the deadline and the result is marked degraded."""
    _ensure_all_up(cluster)
    # w0 is the first replica of experts 0, 2, 3 and 5 (replicas are tried in name order)
    with ThreadedLinkProxy(f"127.0.0.1:{cluster['ports']['w0']}", outage="stall") as proxy:
        hedged = _runtime(cluster, "silent-hedge.yaml", fallback="skip", rpc={"deadline_s": 2.0, "hedge_ms": 50.0},
                          addresses={"w0": proxy.address})
        plain = _runtime(cluster, "silent.yaml", fallback="skip", rpc={"deadline_s": 1.0},
                         placement={layer: {"w0": list(range(E))} for layer in LAYERS},
                         addresses={"w0": proxy.address})
        proxy.set_up(False)
        for seed in range(3):
            want, res, dt = _classify_checked(cluster, hedged, seed)
            assert dt < len(LAYERS) * 2.0
            assert not bool(res.degraded.any()), res.failures
            torch.testing.assert_close(res.logits.softmax(1), want, atol=1e-5, rtol=0)
        assert hedged.counters.hedges > 0 and hedged.counters.hedge_wins > 0 and hedged.counters.cancelled > 0
        # no replicas: the stalled site's experts fall back (skip) at the deadline
        want, res, dt = _classify_checked(cluster, plain, 0)
        assert dt < len(LAYERS) * 1.0 + 1.0  # at most one deadline per MoE layer
        assert bool(res.degraded.all())
        assert any("w0" in f and "DEADLINE_EXCEEDED" in f for f in res.failures), res.failures
        proxy.set_up(True)
        hedged.close()
        plain.close()


class SlowBackend(TorchBackend):
    """Takes ``delay`` seconds per request: a worker stuck past its callers' deadlines."""

    def __init__(self, banks, delay: float) -> None:
        super().__init__(banks)
        self.delay = delay

    def run_many(self, layer, items):
        time.sleep(self.delay)
        return super().run_many(layer, items)


@pytest.fixture()
def slow_worker(cluster):
    from moevit.checkpoint import model_fingerprint

    model = cluster["model"]
    banks = {i: layer.experts for i, layer in model.moe_layers().items()}
    backend = SlowBackend(banks, delay=0.6)
    loop = LoopThread()
    server = WorkerServer(backend, model_fingerprint(model), arch="test", site="slow", max_queue=1)
    server._servicer.inline_elements = 0  # every request through the compute thread, as large ones are
    port = loop.run(server.start())
    yield server, port
    loop.run(server.stop(0))
    loop.close()


def test_deadline_cancellation_reaches_the_worker(cluster, slow_worker):
    """On a unary call (stream off, or a hedge) the worker learns that the caller gave up."""
    server, port = slow_worker
    from moevit.checkpoint import model_fingerprint

    client = SiteClient("slow", f"127.0.0.1:{port}", fingerprint=model_fingerprint(cluster["model"]),
                        wire="fp32", deadline_s=0.2, watch=False, stream=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(SiteError, match="DEADLINE_EXCEEDED"):
            client.start(8, [(0, torch.randn(16, 128))]).result()
        assert time.monotonic() - t0 < 0.5
        t_end = time.monotonic() + 2
        while server._servicer.cancelled < 1 and time.monotonic() < t_end:
            time.sleep(0.02)
        assert server._servicer.cancelled == 1  # the worker saw the caller give up
        assert client.health() == "SERVING"
    finally:
        client.close()


def test_a_late_answer_on_the_stream_is_dropped_and_the_stream_keeps_serving(cluster, slow_worker):
    """A request abandoned at its deadline on the expert stream: the caller gets DEADLINE_EXCEEDED on time, the
    worker's late answer is not taken for the next request's (answers are matched by request_id), and the next
    request on the same stream gets its own, exact answer."""
    server, port = slow_worker
    model = cluster["model"]
    from moevit.checkpoint import model_fingerprint

    client = SiteClient("slow", f"127.0.0.1:{port}", fingerprint=model_fingerprint(model), wire="fp32",
                        deadline_s=0.3, watch=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(SiteError, match="DEADLINE_EXCEEDED"):
            client.start(8, [(0, torch.randn(16, 128))]).result()
        assert time.monotonic() - t0 < 0.6
        stream = client._stream
        x = torch.randn(5, 128)
        (y,) = client.start(8, [(1, x)], timeout=3.0).result()  # queued behind the abandoned one on the worker
        assert client._stream is stream and not stream.ended  # the same stream served both
        bank = model.moe_layers()[8].experts
        torch.testing.assert_close(y, bank.forward_one(1, x), atol=1e-5, rtol=0)
        assert client.traffic.failures == 1 and client.traffic.calls == 1
    finally:
        client.close()


def test_a_busy_worker_refuses_at_once_and_the_coordinator_reroutes(cluster, slow_worker):
    """Beyond its queue cap a worker answers RESOURCE_EXHAUSTED at once; the coordinator then uses another
    replica, so the result is exact and not degraded."""
    _ensure_all_up(cluster)
    server, port = slow_worker
    from moevit.checkpoint import model_fingerprint

    fp = model_fingerprint(cluster["model"])
    # unary calls: requests on one stream are served one after another, so one client cannot overfill the queue
    hog = SiteClient("slow", f"127.0.0.1:{port}", fingerprint=fp, wire="fp32", deadline_s=5, watch=False,
                     stream=False)
    busy = hog.start(8, [(0, torch.randn(16, 128))])  # occupies the only admitted slot for 0.6 s
    time.sleep(0.1)
    t0 = time.monotonic()
    with pytest.raises(SiteError, match="RESOURCE_EXHAUSTED"):
        hog.start(8, [(1, torch.randn(16, 128))]).result()
    assert time.monotonic() - t0 < 0.3
    placement = {layer: {"slow": list(range(E)), "w1": list(range(E))} for layer in LAYERS}
    ports = {"cam": cluster["ports"]["cam"], "slow": port, "w1": cluster["ports"]["w1"]}
    rt = _runtime(cluster, "busy.yaml", fallback="skip", placement=placement, ports=ports,
                  rpc={"deadline_s": 5.0})
    busy.result()
    busy = hog.start(8, [(0, torch.randn(16, 128))])  # the slot taken again while the coordinator classifies
    time.sleep(0.05)
    want, res, dt = _classify_checked(cluster, rt, 7)
    assert not bool(res.degraded.any())
    torch.testing.assert_close(res.logits.softmax(1), want, atol=1e-5, rtol=0)
    assert rt.counters.retries >= 1
    assert server._servicer.refused_busy >= 2
    busy.result()
    hog.close()
    rt.close()


def test_nearest_fallback_uses_the_best_reachable_expert(cluster):
    """``nearest``: the patches of an unreachable expert go to the expert their router scored highest among the
    reachable ones: exactly the model with the unreachable experts masked out of its routers (top-1, renorm
    gate = 1)."""
    _ensure_all_up(cluster)
    gone = {0, 3}
    placement = {layer: {"gone": sorted(gone), "w1": [1, 4], "w2": [2, 5]} for layer in LAYERS}
    ports = {"cam": cluster["ports"]["cam"], "gone": free_port(), "w1": cluster["ports"]["w1"],
             "w2": cluster["ports"]["w2"]}
    rt = _runtime(cluster, "nearest.yaml", fallback="nearest", placement=placement, ports=ports,
                  rpc={"deadline_s": 3.0})
    x = cluster["x"][:6]
    assert rt.clients["w1"].up and rt.clients["w2"].up and not rt.clients["gone"].up
    res = rt.classify(x)
    mask = torch.zeros(E)
    mask[sorted(gone)] = float("-inf")
    hooks = [layer.router.register_forward_hook(lambda _m, _i, out: out + mask)
             for layer in cluster["ref"].moe_layers().values()]
    try:
        with torch.no_grad():
            want = cluster["ref"](x)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(res.logits, want, atol=1e-4, rtol=1e-4)
    assert bool(res.degraded.all())
    assert rt.counters.substitutes > 0
    assert any("gone" in f for f in res.failures)
    rt.close()


def test_workers_outlive_the_coordinator_and_a_restarted_one_finds_them(cluster, tmp_path):
    _ensure_all_up(cluster)
    topo = write_topology(tmp_path, cluster["path"], cluster["ports"], placement=_replicated())
    addr = f"127.0.0.1:{free_port()}"

    def coordinator() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "moevit.coordinator.cli", "--topology", str(topo),
                                 "--serve", addr,
                                 "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        wait_serving(addr, proc=proc)
        return proc

    def classify() -> expert_pb2.ClassifyResponse:
        with grpc.insecure_channel(addr) as ch:
            return expert_pb2_grpc.ClassifierServiceStub(ch).Classify(
                expert_pb2.ClassifyRequest(image=cluster["images"][3]), timeout=20)

    first = coordinator()
    try:
        a = classify()
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        for w in WORKERS:
            wait_serving(f"127.0.0.1:{cluster['ports'][w]}", timeout=2)
            assert cluster["procs"][w].poll() is None
        second = coordinator()
        try:
            b = classify()
        finally:
            stop(second)
    finally:
        stop(first)
    assert not a.degraded and not b.degraded
    assert [p.index for p in a.top] == [p.index for p in b.top]
