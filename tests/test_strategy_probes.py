"""Strategy probes (issue 19): while adaptive uses one strategy, the prober runs the others now and then so their
estimates are those of now, not of when they were last used. The mechanism on its own thread (fast), the config key,
and a real runtime (a worker and a Classify server as real processes on loopback, a shaped link) whose stale split
estimate a split probe corrects, after which adaptive switches back to split."""

from __future__ import annotations

import time

import pytest
import torch
import yaml
from moevit.coordinator.local import free_port
from moevit.coordinator.strategies import LinkCollector, LinkEstimator, open_runtime
from moevit.deploy.topology import TopologyError, load_topology, parse_topology
from prometheus_client import CollectorRegistry, generate_latest

from moevit.checkpoint import save_checkpoint
from tests.deploy import small_moe_model, write_topology

LAYERS = (1, 5, 8)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probes")
    return save_checkpoint(small_moe_model(LAYERS, image_size=64), tmp / "moe.safetensors")


def _topology(tmp, model_path, *, extra, site_extra, **kw):
    ports = {"cam": free_port(), "north": free_port(), "south": free_port()}
    path = write_topology(tmp, model_path, ports, name="adaptive.yaml", rpc={"codec": "fp32"}, site_extra=site_extra,
                          **kw)
    doc = yaml.safe_load(path.read_text())
    doc.update({"strategy": "adaptive", **extra})
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_strategy_probes_run_when_due_and_never_wait_for_an_image(tmp_path):
    """The prober's strategy probes (the mechanism, on its own thread): one runs once its strategy has been unused
    for ``strategy_interval``, only while the forward lock is free (an image holds it) and probes are not held off,
    never while a link it needs is down, and the thread ends when stopped."""
    import threading

    from moevit.coordinator.strategies import StrategyProbe, _Prober

    topo = load_topology(write_topology(tmp_path, None, {"cam": 1, "north": 2}))
    est = LinkEstimator.for_topology(topo, ["north"])
    prober = _Prober(est, {"north": lambda t: "SERVING"}, 0.05)
    forward = threading.Lock()
    prober.forward, prober.strategy_interval = forward, 0.2
    ran: list[float] = []

    def run(timeout):
        assert prober.probing and forward.locked()  # an exclusive probe holds the forward lock
        ran.append(time.monotonic())
        time.sleep(0.02)
        return 1000

    probe = StrategyProbe("split", ("north",), run, last=time.monotonic())
    prober.strategies = [probe]

    def count_after(seconds):
        time.sleep(seconds)
        return probe.count

    prober.start()
    try:
        with forward:  # an image runs: no probe starts, however long it takes
            assert count_after(0.6) == 0
        assert count_after(0.8) >= 2  # due every 0.2 s of disuse (each probe resets the clock)
        assert probe.bytes == 1000 * probe.count and probe.seconds >= 0.02 * probe.count
        gaps = [b - a for a, b in zip(ran, ran[1:], strict=False)]
        assert min(gaps) >= 0.2
        with prober.gate:  # held off (StrategyRuntime.hold_probes)
            n = probe.count
            assert count_after(0.6) == n
        prober.checks = {}  # (no health probe to bring it back up)
        est.down("north")  # its link is down: the health probes bring it back, not a probe that waits a deadline
        n = probe.count
        assert count_after(0.6) == n
    finally:
        prober.stop_event.set()
        prober.join(2.0)
    assert not prober.is_alive()


def test_strategy_probe_interval_is_validated():
    doc = {"coordinator": "cam", "sites": {"cam": {"address": "127.0.0.1:1", "device": {"gflops": 1, "memory_mb": 8,
                                                                                          "active_w": 1, "idle_w": 0}}},
           "adaptive": {"strategy_probe_s": 0}}
    assert parse_topology(doc, "t.yaml").adaptive.strategy_probe_s == 0  # 0: never
    doc["adaptive"]["strategy_probe_s"] = -1
    with pytest.raises(TopologyError, match=r"adaptive\.strategy_probe_s") as e:
        parse_topology(doc, "t.yaml")
    assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.e2e
def test_split_probe_refreshes_a_stale_split_estimate_and_adaptive_switches_back(tmp_path, model_path):
    """Issue 19: split's speed is measured while split is unused. A camera that cannot hold the model; split's
    experts on north (a real worker), offload-image to south's Classify server (a real process) behind a 0.1 Mbit/s
    link (~0.5 s per image). Split's camera speed is made stale (1000x too slow: as if measured in a loaded spell;
    far enough off that no load on the machine makes split look cheaper), so adaptive sends
    images to south; with the strategy probes held off it stays there and the estimate does not move. Let go, the
    prober runs the last image through split every ``strategy_probe_s``: the estimate moves back toward the speed
    measured at start, and adaptive switches back to split, which is faster here."""
    from moevit.coordinator import local
    from moevit.coordinator.strategies import strategy_lines
    from moevit.sim.linkproxy import ThreadedLinkProxy

    small = {n: {"device": {"gflops": 5, "memory_mb": 1, "active_w": 3, "idle_w": 1}} for n in ("cam", "north")}
    classify_addr = f"127.0.0.1:{free_port()}"
    proxy = ThreadedLinkProxy(classify_addr)
    offload_addr = proxy.start()
    proxy.set_shaping(bandwidth_mbps=0.1, latency_ms=5.0)
    topo = _topology(tmp_path, model_path, site_extra=small,
                     placement={layer: {"north": list(range(6))} for layer in LAYERS},
                     extra={"offload": {"site": "south", "address": offload_addr},
                            "adaptive": {"objective": "latency", "consecutive": 1, "probe_interval_s": 0.2,
                                         "strategy_probe_s": 0.4}})
    t = load_topology(topo)
    north = t.site("north").address
    # both servers start while the runtime loads (each a real process)
    procs = [local.spawn_worker(["--listen", north, "--model", str(model_path), "--experts", "all", "--threads", "1"]),
             local.spawn(local.coordinator_command("--topology", str(topo), "--serve", classify_addr, "--as-site",
                                                   "south", "--strategy", "local", "--no-spawn", "--threads", "1"))]
    rt = None
    try:
        rt = open_runtime(t)
        assert rt.local is None and rt.offload.site == "south"
        local.wait_serving(north, procs[0], 120)
        local.wait_serving(classify_addr, procs[1], 120)
        rt.check_workers()
        measured = rt.split_gflops  # the warm-up's figure
        gen = torch.Generator().manual_seed(0)
        images = [torch.randn(1, 3, 64, 64, generator=gen) for _ in range(4)]

        def classify(i):
            return rt.classify(images[i % len(images)])

        with rt.hold_probes():
            rt.split_gflops = stale = measured / 1000
            held = [classify(i) for i in range(2)]
            time.sleep(0.9)  # two probe intervals: nothing may refresh split while held off
            held.append(classify(2))
            assert [r.strategy for r in held] == ["offload-image"] * 3, [r.extra.get("strategy_policy") for r in held]
            assert rt.split_gflops == stale and rt.strategy_probes["split"].count == 0
        # let go: within a few probe intervals the split probe runs (only while no image does) and the policy,
        # on the refreshed estimate, leaves offload-image
        deadline = time.monotonic() + 60
        after: list = []
        while time.monotonic() < deadline and not (after and after[-1].strategy == "split"):
            time.sleep(0.3)
            after.append(classify(len(after)))
        probes = rt.strategy_probes["split"]
        assert probes.count >= 1 and probes.bytes > 0
        assert rt.split_gflops > 0.1 * measured  # from 0.001x toward what split measures now
        assert after[-1].strategy == "split", [r.strategy for r in after]
        assert after[-1].extra["strategy_policy"]["reason"] == "switch"
        # the probes kept the routing statistics to the images (the probe image was counted once)
        assert rt._routed_images == 2 + sum(r.strategy == "split" for r in held + after)  # + split's warm-up
        s = rt.strategy_summary()
        assert s["strategy_probes"]["split"]["probes"] == probes.count
        assert "strategy probes (unused strategies, one image each): split" in "\n".join(strategy_lines(s))
        reg = CollectorRegistry()
        reg.register(LinkCollector(rt))
        text = generate_latest(reg).decode()
        assert f'moevit_coordinator_strategy_probes_total{{strategy="split"}} {float(probes.count)}' in text
        assert "moevit_coordinator_strategy_probe_wait_seconds_total" in text
    finally:
        if rt is not None:
            rt.close()
            assert not rt._prober.is_alive()  # stopped cleanly: no probe outlives the runtime
        local.stop_processes(procs)
        proxy.stop()


def test_a_link_back_from_a_fade_is_believed_at_the_next_probe(tmp_path):
    """An idle link's probe whose throughput sample is STEP_FACTOR off the estimate pads again at the next pass, so
    the confirming sample replaces the estimate within two probe intervals, not PAD_INTERVAL_S later (the emulation's
    adaptive kept split ~10 s after the hut's link came back)."""
    from moevit.coordinator.strategies import MIN_PROBE_TRANSFER_S, PAD_FRAMING, PAD_INTERVAL_S, _Prober, pad_bytes

    est = LinkEstimator.for_topology(load_topology(write_topology(tmp_path, None, {"cam": 1, "north": 2})), ["north"])
    lk = est.links["north"]
    nominal = lk.nominal.throughput_bps
    lk.throughput_bps, lk.rtt_s, lk.rtt_at_sample = nominal / 20, 0.04, 0.04  # believed faded

    def check(timeout):  # a steady 5 ms round trip (an instant one would wobble 2-fold on clock noise alone)
        time.sleep(0.005)
        return "SERVING"

    prober = _Prober(est, {"north": check}, 0.01, padded={"north": lambda t, pad: 1e-4})
    recovered = min(8 * (pad_bytes(nominal) + PAD_FRAMING) / MIN_PROBE_TRANSFER_S, nominal)
    assert recovered >= 4 * lk.throughput_bps  # the check below is about a step, not about noise
    prober._links()  # the round trip fell 2-fold or more: a padded probe, one sample 4x up (weighs EWMA_ALPHA)
    assert lk.throughput_bps < recovered / 2
    time.sleep(0.02)
    prober._links()  # the round trip is steady now; the pending step pads again and its second sample replaces it
    assert lk.throughput_bps == pytest.approx(recovered)
    assert PAD_INTERVAL_S > 1  # (without the pending step, the next pad would have waited this long)


def test_an_idle_links_probe_waits_for_the_gap_after_an_image(tmp_path):
    """An idle link's probe never runs beside an image, nor mid-gap where the next image may be about to come: only
    within PROBE_AFTER_IMAGE_S after an image ends, or once images have stopped for LINK_IDLE_S. A link whose last
    sample stepped is probed at once, image or not (the next image needs the news)."""
    from moevit.coordinator.strategies import LINK_IDLE_S, PROBE_AFTER_IMAGE_S, _Prober

    est = LinkEstimator.for_topology(load_topology(write_topology(tmp_path, None, {"cam": 1, "north": 2})), ["north"])
    checks: list[float] = []

    def check(timeout):
        checks.append(time.monotonic())
        return "SERVING"

    prober = _Prober(est, {"north": check}, 0.01)
    lk = est.links["north"]

    def probed_at(image_end_ago: float, running: int = 0) -> bool:
        lk.last_probe = lk.last_used = time.monotonic() - 1.0  # idle for 100 probe intervals: due, not overdue
        prober.images_running = running
        prober.image_end = time.monotonic() - image_end_ago
        n = len(checks)
        prober._links()
        return len(checks) > n

    assert probed_at(0.0)  # an image just ended: the next is furthest away
    assert not probed_at(0.0, running=1)  # an image runs now
    assert not probed_at(PROBE_AFTER_IMAGE_S + 0.2)  # mid-gap
    assert not probed_at(LINK_IDLE_S - 0.2)
    assert probed_at(LINK_IDLE_S + 0.2)  # images have stopped coming
    with prober.gate:  # held off (StrategyRuntime.hold_probes: the emulation times another strategy's image)
        assert not probed_at(0.0)
    # a step pending (a call just came back 4x slower): confirmed at once, mid-image as well
    prober.padded = {"north": lambda t, pad: 0.01}
    lk.step_way, lk.step_at, lk.last_confirm = -1, time.monotonic(), 0.0
    assert probed_at(PROBE_AFTER_IMAGE_S + 0.2, running=1)
    # images back to back (a batch run) never leave a gap: a probe OVERDUE times late runs beside them
    from moevit.coordinator.strategies import OVERDUE

    lk.step_way = 0
    n = len(checks)
    prober.images_running, prober.image_end = 1, time.monotonic() - 0.01
    lk.last_used = lk.last_probe = time.monotonic() - OVERDUE * LINK_IDLE_S - 0.1
    prober._links()
    assert len(checks) > n


def test_a_strategy_probe_waits_for_the_gap_unless_images_never_leave_one(tmp_path):
    """A due strategy probe (offload's: beside images, no forward lock) starts only in the gap after an image; once
    it is OVERDUE times its interval late (images back to back), beside them."""
    import threading

    from moevit.coordinator.strategies import OVERDUE, PROBE_AFTER_IMAGE_S, StrategyProbe, _Prober

    topo = load_topology(write_topology(tmp_path, None, {"cam": 1, "north": 2}))
    prober = _Prober(LinkEstimator.for_topology(topo, ["north"]), {}, 0.05)
    prober.forward, prober.strategy_interval = threading.Lock(), 1.0
    probe = StrategyProbe("offload-image", ("north",), lambda t: 10, exclusive=False)
    prober.strategies = [probe]

    def ran(late_s: float, running: int, ended_ago: float) -> bool:
        probe.last, n = time.monotonic() - late_s, probe.count
        prober.images_running, prober.image_end = running, time.monotonic() - ended_ago
        prober._strategies()
        return probe.count > n

    assert ran(1.5, 0, 0.0)  # due, and an image just ended
    assert not ran(1.5, 1, 0.0)  # due, but an image runs
    assert not ran(1.5, 0, PROBE_AFTER_IMAGE_S + 0.2)  # due, mid-gap
    assert ran(OVERDUE * 1.0 + 0.1, 1, 0.0)  # overdue: beside the images
