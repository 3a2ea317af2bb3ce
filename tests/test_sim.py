"""The discrete-event simulator without Ray: closed-form latency and energy, determinism, strategies, failures,
the sweep and trace formats, and the errors moe-sim gives before any scenario runs."""

from __future__ import annotations

import dataclasses
import json
import math
import struct

import numpy as np
import pytest
import yaml
from moevit.deploy.topology import Link, Placement, default_placement, load_topology, parse_topology
from moevit.partition.costmodel import evaluate_placement, parse_stats, synthetic_stats
from moevit.sim.cli import main
from moevit.sim.config import (
    STRATEGIES,
    Arrival,
    FailureSet,
    LinkCondition,
    LinkOutage,
    Scenario,
    Settings,
    SimConfigError,
    SiteDown,
    check_sites,
    expand,
    parse_sweep,
)
from moevit.sim.engine import World, _Channel, _Windows, arrival_times, run_scenario, sample_routing
from moevit.sim.sweep import run_local
from moevit.sim.trace import TraceError, TraceHeader, TraceImage, read_trace, write_trace

EXAMPLES = "examples/sites.yaml"


# ============================================================================================ fixtures


def one_expert_stats(**kw):
    """mobilevitv2_050's layer 8 as the only MoE layer, one expert, one class, 64 px: one patch per image
    (grid 1x1), dim 128, 4 pixel tokens per patch, expert MACs per token 2 x 128 x 64 = 16384, trunk
    4.8e8 x (64/256)^2 = 3.0e7 MACs."""
    return parse_stats(synthetic_stats(layers=(8,), num_experts=1, expert_hidden=64, num_classes=1, image_size=64,
                                       **kw), "<one expert>")


def two_site_topology(*, bandwidth=1.0, latency=10.0, loss=0.0, duty=1.0, fallback="fail", battery=None):
    return parse_topology({
        "coordinator": "cam", "fallback": fallback,
        "sites": {"cam": {"address": "10.0.0.1:1", "device": {"gflops": 10, "memory_mb": 512, "active_w": 4.0,
                                                              "idle_w": 1.0, "battery_wh": battery}},
                  "node": {"address": "10.0.0.2:1", "device": {"gflops": 2, "memory_mb": 512, "active_w": 3.0,
                                                               "idle_w": 0.5}}},
        "links": [{"between": ["cam", "node"], "bandwidth_mbps": bandwidth, "latency_ms": latency, "loss": loss,
                   "duty_cycle": duty, "tx_nj_per_bit": 100, "rx_nj_per_bit": 50}],
    }, "<two sites>")


def scenario(strategy="split", *, images=5, seed=0, arrival=None, failures=None, settings=None, condition=None):
    return Scenario(topology="t", condition=condition or LinkCondition(),
                    arrival=arrival or Arrival("every-1s", "periodic", rate_hz=1.0),
                    failures=failures or FailureSet(), strategy=strategy, seed=seed, images=images,
                    settings=settings or Settings(rpc_overhead_bytes=0))


def world_for(topology, stats, placement=None):
    placement = placement or Placement({(ls.layer, e): ("node",) for ls in stats.layers
                                        for e in range(ls.num_experts)})
    return World(topologies={"t": topology}, placements={"t": placement}, stats=stats)


@pytest.fixture(scope="module")
def demo_world():
    """The example topology with synthetic routing statistics of three MoE layers, 8 experts, 4 classes."""
    topo = load_topology(EXAMPLES)
    stats = parse_stats(synthetic_stats(layers=(1, 5, 8), num_experts=8, num_classes=4, image_size=128, seed=3),
                        "<demo stats>")
    return World(topologies={"t": topo}, placements={"t": default_placement(topo, stats.moe_layers())}, stats=stats)


# ============================================================================================ closed form


def test_one_link_one_expert_latency_and_energy_in_closed_form():
    stats = one_expert_stats()
    topo = two_site_topology(bandwidth=1.0, latency=10.0, battery=10.0)
    res = run_scenario(world_for(topo, stats), scenario(images=5))
    # Per image, one image at a time (arrivals 1 s apart, each done in ~40 ms: nobody waits):
    #   trunk on cam:      3.0e7 MACs x 2 FLOP / 10 GFLOP/s                  = 6.0 ms
    #   tokens out:        1 patch x 4 tokens x 128 dims x 2 B (fp16)        = 1024 B = 8192 bit
    #   transfer out:      8192 bit / 1 Mbit/s = 8.192 ms, + 10 ms latency    = 18.192 ms
    #   expert on node:    4 tokens x 16384 MACs x 2 / 2 GFLOP/s              = 0.065536 ms
    #   reply:             same bytes back                                    = 18.192 ms
    #   latency = 6 + 18.192 + 0.065536 + 18.192                             = 42.449536 ms
    expected = 6.0e-3 + 2 * (8192 / 1e6 + 10e-3) + 4 * 16384 * 2 / 2e9
    assert res.latency_mean_s == pytest.approx(expected, rel=1e-9)
    assert res.latency_max_s == pytest.approx(expected, rel=1e-9)
    assert res.ok == 5 and res.failed == 0 and res.wait_mean_s == pytest.approx(0.0, abs=1e-12)
    # The cost model gives the same number for the same image (no queueing, no loss, deterministic routing).
    cost = evaluate_placement(topo, stats, world_for(topo, stats).placements["t"])
    assert res.latency_mean_s == pytest.approx(cost.latency_s, rel=1e-9)
    # Bytes per image: 1024 each way.
    assert res.bytes_per_image == pytest.approx(2048)
    # Energy. Horizon = last arrival (4 s) + one latency. Per image:
    #   cam:  compute 6 ms x 4 W = 24 mJ; radio tx 8192 bit x 100 nJ + rx 8192 bit x 50 nJ = 1.2288 mJ
    #   node: compute 0.065536 ms x 3 W = 0.196608 mJ; radio rx 8192 x 50 nJ + tx 8192 x 100 nJ = 1.2288 mJ
    #   idle: idle_w x (horizon - busy time) over the whole run, per site.
    horizon = 4.0 + expected
    cam, node = res.sites["cam"], res.sites["node"]
    assert res.horizon_s == pytest.approx(horizon)
    assert cam.compute_j == pytest.approx(5 * 6e-3 * 4.0)
    assert cam.radio_j == pytest.approx(5 * 8192 * 150e-9)
    assert node.compute_j == pytest.approx(5 * 4 * 16384 * 2 / 2e9 * 3.0)
    assert node.radio_j == pytest.approx(5 * 8192 * 150e-9)
    assert cam.idle_j == pytest.approx((horizon - 5 * 6e-3) * 1.0)
    assert node.idle_j == pytest.approx((horizon - 5 * 4 * 16384 * 2 / 2e9) * 0.5)
    assert cam.active_j_per_image == pytest.approx(6e-3 * 4.0 + 8192 * 150e-9)
    # Battery: 10 Wh at the average power (energy / horizon) lasts 10 / P hours; mains sites have no lifetime.
    power = cam.energy_j / horizon
    assert cam.avg_power_w == pytest.approx(power)
    assert cam.lifetime_h == pytest.approx(10.0 / power)
    assert cam.soc_end == pytest.approx(1.0 - cam.energy_j / 3600 / 10.0)
    assert node.lifetime_h is None


def test_local_strategies_in_closed_form():
    stats = one_expert_stats()
    topo = two_site_topology()
    w = world_for(topo, stats)
    moe = run_scenario(w, scenario("local-moe"))
    dense = run_scenario(w, scenario("local-dense"))
    # local-moe: trunk + the one expert on cam = (3.0e7 + 4 x 16384) x 2 / 10e9
    assert moe.latency_mean_s == pytest.approx((3.0e7 + 4 * 16384) * 2 / 10e9)
    # local-dense: synthetic stats carry no dense count, so trunk + the dense MLP (4 dim^2 per token, 4 tokens)
    assert dense.latency_mean_s == pytest.approx((3.0e7 + 4 * 4 * 128 * 128) * 2 / 10e9)
    assert moe.bytes_per_image == dense.bytes_per_image == 0


def test_offload_image_in_closed_form():
    stats = one_expert_stats()
    topo = two_site_topology(bandwidth=1.0, latency=10.0)
    res = run_scenario(world_for(topo, stats), scenario("offload-image", settings=Settings(
        rpc_overhead_bytes=0, image_bytes=5000, result_bytes=100)))
    # 5000 B up (40 ms + 10 ms), the whole MoE model on node at 2 GFLOP/s, 100 B back (0.8 ms + 10 ms)
    compute = (3.0e7 + 4 * 16384) * 2 / 2e9
    assert res.offload_site == "node"
    assert res.latency_mean_s == pytest.approx(0.050 + compute + 0.0108)
    assert res.bytes_per_image == 5100


def test_duty_cycle_off_time_per_packet_closed_form():
    link = Link("a", "b", bandwidth_mbps=0.05, latency_ms=100, duty_cycle=0.1)
    ch = _Channel(link, 256, _Windows([]), np.random.default_rng(0))
    # 1024 B = 4 packets of 2048 bit; airtime 2048 / 50e3 = 40.96 ms each, 9 x that silent after each (duty 0.1):
    # the last bit leaves after 4 x 40.96 + 3 x 368.64 = 1269.76 ms and arrives 100 ms later.
    assert ch.send(0.0, 1024) == pytest.approx(1.26976 + 0.1)
    # The radio is free again only after the last packet's off-time; a message queued at once waits for it.
    assert ch.free_at == pytest.approx(1.26976 + 0.36864)
    assert ch.send(0.0, 256) == pytest.approx(1.26976 + 0.36864 + 0.04096 + 0.1)


def test_outage_pauses_the_radio():
    link = Link("a", "b", bandwidth_mbps=1.0, latency_ms=0.0)
    ch = _Channel(link, 1500, _Windows([(0.004, 1.0)]), np.random.default_rng(0))
    # 1000 B = 8 ms of airtime: 4 ms before the outage, the remaining 4 ms after it ends at 1 s.
    assert ch.send(0.0, 1000) == pytest.approx(1.004)


def test_loss_retransmits_about_one_over_one_minus_loss():
    link = Link("a", "b", bandwidth_mbps=10.0, latency_ms=5.0, loss=0.2)
    ch = _Channel(link, 1000, _Windows([]), np.random.default_rng(1))
    t = 0.0
    for _ in range(500):
        t = ch.send(t, 10_000)
    ratio = ch.bits / (500 * 10_000 * 8)
    assert ratio == pytest.approx(1 / 0.8, rel=0.05)
    # each retransmission round costs a round trip on top of the airtime
    assert t > 500 * (10_000 * 8 / 10e6 + 5e-3)


# ============================================================================================ determinism, strategies


def test_same_seed_same_result_and_strategies_share_the_workload(demo_world):
    arr = Arrival("p", "poisson", rate_hz=5.0)
    a = run_scenario(demo_world, scenario(images=200, seed=7, arrival=arr))
    b = run_scenario(demo_world, scenario(images=200, seed=7, arrival=arr))
    c = run_scenario(demo_world, scenario(images=200, seed=8, arrival=arr))
    strip = lambda r: {k: v for k, v in r.row().items() if k != "wall_s"}
    assert strip(a) == strip(b) and a.latencies_s == b.latencies_s
    assert a.latencies_s != c.latencies_s
    # the same seed gives every strategy the same arrivals
    local = run_scenario(demo_world, scenario("local-moe", images=200, seed=7, arrival=arr))
    assert local.horizon_s <= a.horizon_s and local.arrived == a.arrived == 200


def test_background_strategies_cut_bytes(demo_world):
    kw = dict(images=300, seed=1)
    split = run_scenario(demo_world, scenario("split", **kw))
    drop = run_scenario(demo_world, scenario("split-drop-background", **kw))
    keep = run_scenario(demo_world, scenario("split-local-background", **kw))
    assert drop.bytes_per_image < split.bytes_per_image
    assert drop.patches_dropped_per_image > 0 and keep.patches_kept_local_per_image > 0
    assert keep.bytes_per_image == pytest.approx(drop.bytes_per_image)
    assert keep.sites["camera-01"].busy_s > drop.sites["camera-01"].busy_s
    assert "assumed share 0.5" in split.routing_source


def test_arrival_processes():
    rng = np.random.default_rng(0)
    per = arrival_times(Arrival("p", "periodic", rate_hz=4.0), 5, rng)
    assert np.allclose(per, [0, 0.25, 0.5, 0.75, 1.0])
    trap = Arrival("t", "bursty", burst_size=4, burst_gap_s=0.5, idle_s=30.0)
    t = arrival_times(trap, 4000, rng)
    assert np.all(np.diff(t) >= 0)
    assert np.allclose(np.diff(t[:4]), 0.5)
    assert len(t) / t[-1] == pytest.approx(trap.mean_rate_hz, rel=0.1)


def test_queueing_when_the_link_is_saturated():
    stats = one_expert_stats()
    topo = two_site_topology(bandwidth=0.1, latency=1.0)  # 1024 B take 82 ms each way: ~6 images/s at most
    fast = run_scenario(world_for(topo, stats), scenario(images=50, arrival=Arrival("p", "periodic", rate_hz=20.0)))
    assert fast.wait_mean_s > 0.5 and fast.latency_p95_s > 5 * fast.service_mean_s


# ============================================================================================ failures


# One image of one_expert_stats on two_site_topology: the trunk before the MoE layer (98.6 % of 6 ms) and after it,
# the RPC each way at 1 Mbit/s (1024 B) + 10 ms, the expert on the node (2 GFLOP/s) or on cam (10 GFLOP/s).
BEFORE, AFTER = 0.006 * 0.986, 0.006 * 0.014
TRIP = 8192 / 1e6 + 0.010
EXPERT_NODE, EXPERT_CAM = 4 * 16384 * 2 / 2e9, 4 * 16384 * 2 / 10e9
SPLIT = BEFORE + 2 * TRIP + EXPERT_NODE + AFTER


def test_site_seen_down_fails_at_once_naming_it_then_rejoins():
    stats = one_expert_stats()
    topo = two_site_topology()
    st = Settings(rpc_overhead_bytes=0, deadline_s=2.0, reconnect_s=1.0, detect_s=0.2)
    down = FailureSet("node-down", site_downs=(SiteDown("node", 2.5, 5.5),))
    res = run_scenario(world_for(topo, stats), scenario(images=10, failures=down, settings=st))
    # The coordinator sees the node down from 2.7 s (2.5 + detect_s) until its channel is back at 6.5 s (5.5 +
    # reconnect_s): the images of 3, 4, 5 and 6 s find no replica up and fail at once (no deadline wait), so nobody
    # queues; the image of 7 s is served as usual.
    assert res.failed == 4 and res.ok == 6
    assert res.failures_by_reason == {"node down, no replica up (fallback fail)": 4}
    assert res.latency_max_s == pytest.approx(SPLIT, rel=1e-9) and res.wait_mean_s == pytest.approx(0, abs=1e-12)
    assert res.links["node"].bytes_up == 6 * 1024


def test_rpc_in_flight_when_the_site_dies_waits_the_deadline():
    stats = one_expert_stats()
    topo = two_site_topology()
    st = Settings(rpc_overhead_bytes=0, deadline_s=2.0, detect_s=0.2)
    down = FailureSet("node-dies", site_downs=(SiteDown("node", 2.01, None),))
    res = run_scenario(world_for(topo, stats), scenario(images=6, failures=down, settings=st))
    # The image of 2 s sends at 2.0059 s, before the node dies: its request is lost and the layer's deadline (4.0059 s)
    # ends it; the image of 3 s starts then, sees the node down and fails at once; so do the later ones.
    assert res.failed == 4 and res.ok == 2
    assert res.failures_by_reason == {"node no reply within 2 s (fallback fail)": 1,
                                      "node down, no replica up (fallback fail)": 3}


@pytest.mark.parametrize("fallback, patch", [("local", EXPERT_CAM), ("skip", 0.0)])
def test_fallback_local_and_skip_degrade_at_once_once_the_site_is_seen_down(fallback, patch):
    stats = one_expert_stats()
    topo = two_site_topology(fallback=fallback)
    st = Settings(rpc_overhead_bytes=0, deadline_s=2.0, detect_s=0.2)
    down = FailureSet("node-dies", site_downs=(SiteDown("node", 2.01, None),))
    res = run_scenario(world_for(topo, stats), scenario(images=6, failures=down, settings=st))
    assert res.failed == 0 and res.ok == 2 and res.degraded == 4
    lat = res.latencies_s
    assert lat[:2] == pytest.approx([SPLIT, SPLIT], rel=1e-9)
    # in flight when the node died: the whole deadline, then the fallback (the coordinator's expert, or nothing)
    assert lat[2] == pytest.approx(BEFORE + 2.0 + patch + AFTER, rel=1e-9)
    # queued behind it, then degraded at once: the node is seen down
    assert lat[3] == pytest.approx(lat[2] - 1.0 + BEFORE + patch + AFTER, rel=1e-9)
    assert lat[4] == pytest.approx(lat[3] - 1.0 + BEFORE + patch + AFTER, rel=1e-9)
    assert lat[5] == pytest.approx(BEFORE + patch + AFTER, rel=1e-9)


def test_detect_s_is_the_blind_window():
    stats = one_expert_stats()
    topo = two_site_topology(fallback="skip")
    down = FailureSet("node-dies", site_downs=(SiteDown("node", 2.5, None),))
    quick = run_scenario(world_for(topo, stats), scenario(images=4, failures=down, settings=Settings(
        rpc_overhead_bytes=0, deadline_s=2.0, detect_s=0.2)))
    slow = run_scenario(world_for(topo, stats), scenario(images=4, failures=down, settings=Settings(
        rpc_overhead_bytes=0, deadline_s=2.0, detect_s=1.0)))
    # seen down at 2.7 s: the image of 3 s skips at once; seen down only at 3.5 s: it is sent and waits the deadline
    assert quick.latencies_s[3] == pytest.approx(0.006, rel=1e-9)
    assert slow.latencies_s[3] == pytest.approx(BEFORE + 2.0 + AFTER, rel=1e-9)


def three_site_topology(fallback="fail", *, experts=1):
    doc = {"coordinator": "cam", "fallback": fallback,
           "sites": {n: {"address": f"10.0.0.{i}:1", "device": {"gflops": 10, "memory_mb": 512, "active_w": 4.0,
                                                                "idle_w": 1.0}}
                     for i, n in enumerate(("cam", "near", "far"), 1)},
           "links": [{"between": ["cam", "near"], "bandwidth_mbps": 1, "latency_ms": 10},
                     {"between": ["cam", "far"], "bandwidth_mbps": 1, "latency_ms": 30}]}
    return parse_topology(doc, "<three sites>")


def test_failover_to_an_up_replica_is_not_degraded_and_waits_no_deadline():
    stats = one_expert_stats()
    topo = three_site_topology("fail")
    placement = Placement({(8, 0): ("far", "near")})  # replicated; the coordinator uses the first copy ("far")
    st = Settings(rpc_overhead_bytes=0, deadline_s=2.0, reconnect_s=1.0, detect_s=0.2)
    down = FailureSet("far-down", site_downs=(SiteDown("far", 0.5, 2.5),))
    res = run_scenario(world_for(topo, stats, placement), scenario(images=6, failures=down, settings=st))
    # far is seen down from 0.7 s to 3.5 s: images 1, 2 and 3 go to near (10 ms instead of 30 ms each way): the
    # same expert, so not degraded, and nothing waits for a deadline
    expert = 4 * 16384 * 2 / 10e9
    via_near = BEFORE + 2 * (8192 / 1e6 + 0.010) + expert + AFTER
    via_far = BEFORE + 2 * (8192 / 1e6 + 0.030) + expert + AFTER
    assert res.failed == 0 and res.degraded == 0 and res.ok == 6
    assert res.latencies_s == pytest.approx([via_far] + [via_near] * 3 + [via_far] * 2, rel=1e-9)
    assert res.links["far"].bytes_up == 3 * 1024 and res.links["near"].bytes_up == 3 * 1024


def test_a_missed_deadline_is_not_retried_at_another_replica():
    stats = one_expert_stats()
    topo = three_site_topology("local")
    placement = Placement({(8, 0): ("far", "near")})
    st = Settings(rpc_overhead_bytes=0, deadline_s=2.0, detect_s=0.2)
    down = FailureSet("far-dies", site_downs=(SiteDown("far", 1.01, None),))
    res = run_scenario(world_for(topo, stats, placement), scenario(images=3, failures=down, settings=st))
    expert = 4 * 16384 * 2 / 10e9
    # image 1's call was in flight when far died: the deadline is spent, near is not tried, the fallback computes
    # it on cam (degraded); image 2, queued behind it, goes to near (far is seen down by then): exact
    assert res.failed == 0 and res.degraded == 1 and res.ok == 2
    assert res.latencies_s[1] == pytest.approx(BEFORE + 2.0 + expert + AFTER, rel=1e-9)
    assert res.latencies_s[2] == pytest.approx(res.latencies_s[1] - 1.0 + BEFORE + 2 * (8192 / 1e6 + 0.010) + expert
                                               + AFTER, rel=1e-9)
    assert res.links["near"].bytes_up == 1024


def two_expert_stats():
    """Layer 8 with two experts at 128 px: 4 patches per image, 1024 B each on the wire (fp16)."""
    return parse_stats(synthetic_stats(layers=(8,), num_experts=2, expert_hidden=64, num_classes=2, image_size=128,
                                       concentration=5.0), "<two experts>")


def _routing(stats, images, seed=0):
    return sample_routing(stats, images, np.random.default_rng([seed, 2])).counts[0]


def test_fallback_nearest_substitutes_on_the_coordinator_and_never_fails():
    stats = two_expert_stats()
    topo = two_site_topology(fallback="nearest")
    st = Settings(rpc_overhead_bytes=0, deadline_s=2.0, detect_s=0.2)
    down = FailureSet("node-down", site_downs=(SiteDown("node", 0.5, None),))
    res = run_scenario(world_for(topo, stats, Placement({(8, 0): ("cam",), (8, 1): ("node",)})),
                       scenario(images=12, failures=down, settings=st))
    at_home = run_scenario(world_for(topo, stats, Placement({(8, 0): ("cam",), (8, 1): ("cam",)})),
                           scenario(images=12, settings=st))
    counts = _routing(stats, 12)
    used = counts[:, 1] > 0  # images with patches of expert 1 (node's)
    assert used[1:].sum() >= 4
    # from the image of 1 s on, node is seen down: expert 1's patches go to the coordinator's expert 0 at once,
    # costing what they would if the coordinator held expert 1 (degraded, never failed)
    assert res.failed == 0 and res.degraded == used[1:].sum() and res.ok == 12 - res.degraded
    assert res.latencies_s[1:] == pytest.approx(at_home.latencies_s[1:], rel=1e-9)
    assert res.links["node"].bytes_up == 1024 * counts[0, 1]


def test_fallback_nearest_substitutes_at_another_site_else_skips():
    stats = two_expert_stats()
    topo = three_site_topology("nearest")
    placement = Placement({(8, 0): ("near",), (8, 1): ("far",)})  # the coordinator holds no expert
    st = Settings(rpc_overhead_bytes=0, deadline_s=2.0, detect_s=0.2)
    down = FailureSet("both", site_downs=(SiteDown("near", 0.5, None), SiteDown("far", 2.5, None)))
    res = run_scenario(world_for(topo, stats, placement), scenario(images=5, failures=down, settings=st))
    counts = _routing(stats, 5)
    assert counts[1:3, 0].sum() > 0
    # images 1 and 2: near is seen down, its patches go to far (a second call, after the first is back); from 3 s
    # neither is up: everything is skipped (trunk only), degraded, never failed
    assert res.failed == 0 and res.ok == 1 and res.degraded == 4
    assert res.links["near"].bytes_up == 1024 * counts[0, 0]
    assert res.links["far"].bytes_up == 1024 * (counts[:3, 1].sum() + counts[1:3, 0].sum())
    trunk = stats.trunk_macs * 2 / 10e9
    assert res.latencies_s[3:] == pytest.approx([trunk, trunk], rel=1e-9)
    # the substitute call goes out once far's own call is back (the coordinator falls back after its calls return)
    trip = lambda k: 2 * (k * 8192 / 1e6 + 0.030) + k * 4 * 16384 * 2 / 10e9 if k else 0.0
    for i in (1, 2):
        assert res.latencies_s[i] == pytest.approx(trunk + trip(counts[i, 1]) + trip(counts[i, 0]), rel=1e-9)


def test_link_outage_delays_without_failing():
    stats = one_expert_stats()
    topo = two_site_topology()
    out = FailureSet("blip", link_outages=(LinkOutage("node", 1.0, 1.5),))
    res = run_scenario(world_for(topo, stats), scenario(images=4, failures=out))
    assert res.failed == 0 and 0.45 < res.latency_max_s < 0.6


def test_camera_down_drops_arrivals():
    stats = one_expert_stats()
    out = FailureSet("cam", site_downs=(SiteDown("cam", 1.5, 3.5),))
    res = run_scenario(world_for(two_site_topology(), stats), scenario("local-moe", images=6, failures=out))
    assert res.failed == 2 and res.failures_by_reason == {"camera site down": 2}


def test_a_scenario_that_raises_is_reported_and_the_sweep_goes_on(demo_world):
    good = scenario(images=3)
    bad = dataclasses.replace(good, topology="missing")
    results = run_local(demo_world, [good, bad, good])
    assert [r.error is None for r in results] == [True, False, True]
    assert "KeyError" in results[1].error and results[1].params["topology"] == "missing"


# ============================================================================================ sweep file


def test_sweep_parses_and_expands():
    sweep = parse_sweep(yaml.safe_load(open("examples/sweep.yaml")), "examples/sweep.yaml")
    topos = {v.name: load_topology(v.path) for v in sweep.topologies}
    check_sites(sweep, topos)
    sc = expand(sweep, list(topos))
    assert len(sc) == (len(topos) * len(sweep.conditions) * len(sweep.arrivals) * len(sweep.failures)
                       * len(sweep.seeds) * len(sweep.strategies))
    assert len({s.id for s in sc}) == len(sc)
    assert set(sweep.strategies) <= set(STRATEGIES)


@pytest.mark.parametrize("doc, key, words", [
    ({"strategies": ["split", "splitt"]}, "strategies[1]", "did you mean 'split'"),
    ({"conditions": [{"name": "x", "bandwidth_scale": 0}]}, "conditions[0].bandwidth_scale", "> 0"),
    ({"conditions": [{"name": "x", "bandwidth_mbps": 0}]}, "conditions[0].bandwidth_mbps", "> 0"),
    ({"arrivals": [{"kind": "poison", "rate_hz": 1}]}, "arrivals[0].kind", "did you mean 'poisson'"),
    ({"settings": {"wire": "int3"}}, "settings.wire", "unknown codec 'int3' (allowed: fp32, fp16"),
    ({"settings": {"wire_bytes_per_value": 0}}, "settings.wire_bytes_per_value", "expected"),
    ({"settings": {"detect_s": -0.1}}, "settings.detect_s", ">= 0"),
    ({"seedz": 3}, "seedz", "did you mean 'seeds'"),
])
def test_bad_sweeps_name_the_key(doc, key, words):
    with pytest.raises(SimConfigError) as e:
        parse_sweep(doc, "s.yaml")
    assert e.value.key == key and words in str(e.value)


def test_unknown_site_in_a_sweep():
    sweep = parse_sweep({"failures": [{"name": "f", "site_downs": [{"site": "pi-nort", "start_s": 1}]}]}, "s.yaml")
    with pytest.raises(SimConfigError, match=r"unknown site 'pi-nort'.*did you mean 'pi-north'"):
        check_sites(sweep, {"base": load_topology(EXAMPLES)})


# ============================================================================================ traces


def test_trace_round_trip_and_replay(tmp_path, demo_world):
    stats = demo_world.stats
    header = TraceHeader(fingerprint=stats.fingerprint, layers=stats.moe_layers(), confidence_threshold=0.5)
    rng = np.random.default_rng(0)
    recs = []
    for _ in range(4):
        counts = {ls.layer: rng.multinomial(ls.patches, np.full(8, 1 / 8)) for ls in stats.layers}
        recs.append(TraceImage(counts, {k: v // 2 for k, v in counts.items()}, label=1))
    path = write_trace(tmp_path / "t.jsonl", header, recs)
    tr = read_trace(path)
    assert tr.images == 4 and tr.header.confidence_threshold == 0.5
    for ls in stats.layers:
        assert np.array_equal(tr.patches[ls.layer], np.array([r.patches[ls.layer] for r in recs]))
    w = dataclasses.replace(demo_world, trace=tr)
    res = run_scenario(w, scenario(images=8))
    assert "recorded" in res.routing_source and res.ok == 8


def test_bad_trace_names_the_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"format": "moevit-trace/1", "fingerprint": "x", "layers": {"8": 2}}) + "\n"
                 + json.dumps({"patches": {"8": [1, 0]}}) + "\n" + json.dumps({"patches": {"8": [1]}}) + "\n")
    with pytest.raises(TraceError, match=r"line 3: patches.8: expected a list of 2"):
        read_trace(p)


# ============================================================================================ the CLI (no Ray)


def _stats_file(tmp_path, fingerprint="synthetic"):
    p = tmp_path / "stats.json"
    p.write_text(json.dumps(synthetic_stats(layers=(1, 5, 8), num_experts=8, num_classes=4, image_size=128,
                                            fingerprint=fingerprint)))
    return p


def _fake_checkpoint(path, fingerprint):
    """A file with a safetensors header carrying a fingerprint (all the fingerprint check reads)."""
    header = json.dumps({"__metadata__": {"fingerprint": fingerprint}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def _topology_file(tmp_path, model=None, bandwidth=20):
    doc = yaml.safe_load(open(EXAMPLES))
    doc["model"] = str(model) if model else None
    doc["links"][0]["bandwidth_mbps"] = bandwidth
    p = tmp_path / "sites.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_cli_runs_a_small_sweep_without_ray(tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"strategies": ["local-moe", "split"], "seeds": 1, "images": 20,
                                     "arrivals": [{"kind": "poisson", "rate_hz": 1}]}))
    out = tmp_path / "out"
    rc = main(["--topology", str(_topology_file(tmp_path)), "--stats", str(_stats_file(tmp_path)), "--sweep",
               str(sweep), "--out", str(out), "--no-ray"])
    assert rc == 0
    for name in ("results.csv", "results.json", "latency_cdf.png", "energy_per_image.png", "bytes_per_image.png",
                 "battery_lifetime.png"):
        assert (out / name).stat().st_size > 0
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["scenarios"]) == 2 and all(s["error"] is None for s in doc["scenarios"])
    assert "split" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["strategy", "site", "fingerprint", "zero-bandwidth", "no-model"])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    stats = _stats_file(tmp_path)
    topo = _topology_file(tmp_path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("images: 5\n")
    args = ["--topology", str(topo), "--stats", str(stats), "--out", str(tmp_path / "o"), "--no-ray"]
    if case == "strategy":
        sweep.write_text(yaml.safe_dump({"strategies": ["split", "split-everything"]}))
        want = "unknown strategy 'split-everything'"
    elif case == "site":
        sweep.write_text(yaml.safe_dump({"conditions": [{"name": "c", "sites": ["pi-west"], "loss": 0.1}]}))
        want = "unknown remote site 'pi-west'"
    elif case == "fingerprint":
        model = tmp_path / "moe.safetensors"
        _fake_checkpoint(model, "abc123")
        topo = _topology_file(tmp_path, model=model)
        args[1] = str(topo)
        want = "profiled from model synthetic, but the topology's model"
    elif case == "zero-bandwidth":
        args[1] = str(_topology_file(tmp_path, bandwidth=0))
        want = "bandwidth_mbps: expected a positive number, got 0"
    else:
        args = ["--topology", str(topo), "--out", str(tmp_path / "o"), "--no-ray"]
        want = "no --stats and the topology names no model"
    rc = main([*args, "--sweep", str(sweep)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("moe-sim: error: ")
    assert want in err[0]
    assert not (tmp_path / "o" / "results.csv").exists()


def test_conditions_apply_to_the_coordinator_links_only():
    topo = load_topology(EXAMPLES)
    t2 = LinkCondition("c", sites=("pi-south",), bandwidth_scale=0.5, extra_latency_ms=10, loss=0.1).apply(topo)
    north, south = t2.link_between("camera-01", "pi-north"), t2.link_between("camera-01", "pi-south")
    relay = t2.link_between("pi-north", "pi-south")
    assert north == topo.link_between("camera-01", "pi-north")
    assert south.bandwidth_mbps == 6 and south.latency_ms == 16 and south.loss == 0.1
    assert relay == topo.link_between("pi-north", "pi-south")
    assert math.isclose(Arrival("b", "bursty", burst_size=5, burst_gap_s=0.5, idle_s=60).mean_rate_hz, 5 / 62)
