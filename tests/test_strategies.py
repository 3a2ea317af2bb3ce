"""The strategies of sites.yaml (split, local, offload-image, adaptive) through real processes on loopback: each
named in every record, local and offload-image agreeing with split, the refusals at start, and the adaptive policy
leaving offload-image when the offload site's server stops answering mid-run."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml
from moevit.coordinator.launcher import ensure_classify_server
from moevit.coordinator.local import free_port
from moevit.coordinator.strategies import PAD_FRAMING, LinkCollector, LinkEstimator, open_runtime, pad_bytes
from moevit.deploy.topology import load_topology
from prometheus_client import CollectorRegistry, generate_latest

from moevit.checkpoint import save_checkpoint
from tests.deploy import small_moe_model, write_topology
from tests.netutil import start_workers, stop

LAYERS = (1, 5, 8)
DATA = "synthetic:classes=5,per_class=10,seed=1,size=64"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strategies")
    return save_checkpoint(small_moe_model(LAYERS, image_size=64), tmp / "moe.safetensors")


def _topology(tmp, model_path, strategy, *, extra=None, site_extra=None, ports=None, **kw):
    ports = {"cam": free_port(), **(ports or {"north": free_port(), "south": free_port()})}
    path = write_topology(tmp, model_path, ports, name=f"{strategy}.yaml", rpc={"codec": "fp32"},
                          site_extra=site_extra, **kw)
    doc = yaml.safe_load(path.read_text())
    doc.update({"strategy": strategy, **(extra or {})})
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _coordinator(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "moevit.coordinator.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _refused(tmp_path, topo):
    """stderr of a run refused at start (before any worker starts)."""
    r = _coordinator("--topology", str(topo), "--data", DATA, "--limit", "2", "--no-spawn", "--out",
                     str(tmp_path / "never.jsonl"))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


def test_link_estimates_are_moving_averages_of_calls_and_probes(tmp_path):
    topo = load_topology(write_topology(tmp_path, None, {"cam": 1, "north": 2}, bandwidth_mbps=8, latency_ms=5))
    est = LinkEstimator.for_topology(topo, ["north"])
    assert est.estimates()["north"].rtt_s == pytest.approx(0.010)  # the topology's until measured
    assert est.estimates()["north"].throughput_bps == pytest.approx(8e6)
    est.rtt("north", 0.002, probe=True)
    est.call("north", 1000, 0.002 + 0.001)  # 8,000 bits in 1 ms past the round trip: 8 Mbit/s
    e = est.estimates()["north"]
    assert e.rtt_s == pytest.approx(0.002) and e.throughput_bps == pytest.approx(8e6)
    est.call("north", 1000, 0.002 + 0.002)  # 4 Mbit/s, averaged in log terms: 8^0.8 * 4^0.2 = 6.96 Mbit/s
    slow = 8e6 ** 0.8 * 4e6 ** 0.2
    assert est.estimates()["north"].throughput_bps == pytest.approx(slow)
    # one sample 4x or more off the estimate is averaged like any other (a hiccup); the second in a row the same way is
    # a changed link: it replaces the estimate
    est.call("north", 1000, 0.002 + 0.016)  # 0.5 Mbit/s
    assert est.estimates()["north"].throughput_bps == pytest.approx(slow ** 0.8 * 0.5e6 ** 0.2)
    est.call("north", 1000, 0.002 + 0.016)
    slower = 0.5e6
    assert est.estimates()["north"].throughput_bps == pytest.approx(slower)
    # the worker's reported compute is not time on the wire: 1,000 bytes in 1 ms past rtt + 5 ms of compute
    est2 = LinkEstimator.for_topology(topo, ["north"])
    est2.rtt("north", 0.002, probe=True)
    est2.call("north", 1000, 0.002 + 0.001 + 0.005, server_s=0.005)
    assert est2.estimates()["north"].throughput_bps == pytest.approx(8e6)
    est.rtt("north", 0.012, probe=True)  # EWMA, weight 0.2: 0.8 * 2 ms + 0.2 * 12 ms; no pad: throughput stays
    assert est.estimates()["north"].rtt_s == pytest.approx(0.004)
    assert est.estimates()["north"].throughput_bps == pytest.approx(slower)
    # an idle link's padded probe measures it: a 1,000-byte pad (+ its framing) 8.7 ms after the bare check = 1 Mbit/s
    pad_s = 8 * (1000 + PAD_FRAMING) / 1e6
    est.rtt("north", 0.004, probe=True, padded_s=0.004 + pad_s, pad=1000)
    assert est.estimates()["north"].throughput_bps == pytest.approx(slower ** 0.8 * 1e6 ** 0.2)
    # the pad is sized to ~10 ms of the link at its estimated rate, within 512..4096 bytes
    assert (pad_bytes(0.25e6), pad_bytes(2e6), pad_bytes(20e6)) == (512, 2500, 4096)
    # a pad as fast as the clock's noise reads as the topology's figure at most, never faster
    for _ in range(39):
        est.rtt("north", 0.004, probe=True, padded_s=0.004, pad=4096)
    assert est.estimates()["north"].throughput_bps == pytest.approx(8e6, rel=0.01)
    est.down("north")
    assert not est.estimates()["north"].up and est.summary()["north"]["probes"] == 42


@pytest.fixture(scope="module")
def workers(model_path):
    """north and south worker processes (every expert), started together, on the ports the strategies' topologies
    below give those sites: the runs share them (a worker keeps no state between calls). That moe-coordinator
    starts the workers it finds missing is tested by
    test_coordinator.py::test_cli_starts_local_workers_and_reports_a_corrupt_image."""
    ports = {"north": free_port(), "south": free_port()}
    procs = start_workers(str(model_path), {n: f"127.0.0.1:{p}" for n, p in ports.items()})
    yield ports
    for p in procs.values():
        stop(p)


@pytest.mark.slow
@pytest.mark.e2e
def test_every_strategy_runs_for_real_and_names_itself(tmp_path, model_path, workers):
    def run(strategy):
        topo = _topology(tmp_path, model_path, strategy, ports=workers)
        out = tmp_path / f"{strategy}.jsonl"
        return out, _coordinator("--topology", str(topo), "--data", DATA, "--limit", "8", "--threads", "1", "--out",
                                 str(out))

    # two runs at a time (their start-ups are seconds of imports on one core each); offload-image and adaptive each
    # start the whole-model Classify server at the same address, so never together
    with ThreadPoolExecutor(2) as pool:
        runs = dict(zip(("split", "offload-image"), pool.map(run, ("split", "offload-image")), strict=True))
        runs.update(zip(("local", "adaptive"), pool.map(run, ("local", "adaptive")), strict=True))
    preds = {}
    for strategy in ("split", "local", "offload-image", "adaptive"):
        out, r = runs[strategy]
        assert r.returncode == 0, r.stderr[-2000:]
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(recs) == 8 and all("error" not in x for x in recs)
        assert {x["strategy"] for x in recs} <= ({strategy} if strategy != "adaptive"
                                                 else {"split", "local", "offload-image"})
        if strategy == "adaptive":  # the choice and its predicted cost, in every record
            assert all(x["strategy_policy"]["predicted"]["latency_s"] > 0 for x in recs)
            assert all(x["strategy_policy"]["configured"] == "adaptive" for x in recs)
        assert f"strategy {strategy}: images by strategy" in r.stdout
        if strategy == "offload-image":  # the whole-model server was started and the images went to it
            assert "Classify server for" in r.stderr and "link north" in r.stdout or "link south" in r.stdout
        preds[strategy] = [x["prediction"] for x in recs]
    assert preds["local"] == preds["split"]  # the same computation (fp32 on the wire)
    # offload-image classifies the 8-bit PNG of the input: at most one flip on these random-model logits
    assert sum(a == b for a, b in zip(preds["offload-image"], preds["split"], strict=True)) >= 7


def test_strategies_that_cannot_run_are_refused_at_start_in_one_line(tmp_path, model_path):
    tiny = {"cam": {"device": {"gflops": 5, "memory_mb": 1, "active_w": 3, "idle_w": 1}}}
    err = _refused(tmp_path, _topology(tmp_path, model_path, "local", site_extra=tiny))
    assert "local.yaml: strategy: local: cam memory_mb 1 cannot hold the whole model" in err
    small = {n: {"device": {"gflops": 5, "memory_mb": 1, "active_w": 3, "idle_w": 1}} for n in ("north", "south")}
    err = _refused(tmp_path, _topology(tmp_path, model_path, "offload-image", site_extra=small))
    assert "offload-image.yaml: strategy: offload-image: no site but cam can hold the whole model" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(_topology(tmp_path, model_path, "split").read_text().replace("strategy: split", "strategy: fast"))
    assert "bad.yaml: strategy: expected one of split, local, offload-image, adaptive" in _refused(tmp_path, bad)


@pytest.mark.slow
@pytest.mark.e2e
def test_adaptive_leaves_offload_when_its_site_stops_answering(tmp_path, model_path):
    # objective energy, a camera drawing 500 W while it computes and a 0.1 W hub: offload-image to north is cheapest
    # whatever the speeds measured on this machine; every expert on the camera, so split needs no worker and
    # adaptive's alternatives are local and split
    hungry = {"cam": {"device": {"gflops": 5, "memory_mb": 256, "active_w": 500, "idle_w": 1}},
              "north": {"device": {"gflops": 50, "memory_mb": 256, "active_w": 0.1, "idle_w": 0.1}}}
    placement = {layer: {"cam": list(range(6))} for layer in LAYERS}
    topo = _topology(tmp_path, model_path, "adaptive", site_extra=hungry, placement=placement,
                     extra={"offload": {"site": "north"}, "adaptive": {"objective": "energy", "consecutive": 1,
                                                                       "probe_interval_s": 60}})
    rt = open_runtime(load_topology(topo))
    server = ensure_classify_server(str(topo), "north", rt.offload.address, check=rt.offload.health, threads=1)
    try:
        rt.check_workers()
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        first = rt.classify(x)
        assert first.strategy == "offload-image"
        assert first.extra["strategy_policy"]["reason"] in ("start", "keep")
        server.stop()  # the offload site goes away mid-run
        moved = rt.classify(x)
        assert moved.strategy in ("local", "split")
        assert moved.extra["strategy_policy"]["reason"] == "fallback"
        assert moved.extra["strategy_policy"]["failed"] == ["offload-image"]
        assert (moved.logits.argmax(1) == first.logits.argmax(1)).all()
        after = rt.classify(x)  # the link is marked down: no more tries on it
        assert after.strategy in ("local", "split") and "failed" not in after.extra["strategy_policy"]
        s = rt.strategy_summary()
        assert s["links"]["north"]["up"] is False and s["fallback_images"] == 1
        reg = CollectorRegistry()  # what --metrics-port serves
        reg.register(LinkCollector(rt))
        text = generate_latest(reg).decode()
        assert 'moevit_coordinator_link_up{site="north"} 0.0' in text
        assert 'moevit_coordinator_strategy_images_total{strategy="offload-image"} 1.0' in text
    finally:
        server.stop()
        rt.close()
