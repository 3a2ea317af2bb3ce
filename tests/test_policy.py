"""The strategy policy (moevit.partition.policy): each strategy's predicted cost from figures worked out by hand, the
choice per objective, hysteresis, and the fallback when a site stops answering. Pure and fast."""

from __future__ import annotations

import pytest
from moevit.deploy.topology import ConfigError, Placement, parse_topology
from moevit.partition.policy import (
    LinkEstimate,
    ModelFigures,
    NoFeasibleStrategy,
    PolicyState,
    StrategyCost,
    choose,
    predict,
)

TOPO = {
    "coordinator": "cam",
    "sites": {
        "cam": {"address": "127.0.0.1:1", "device": {"gflops": 1, "memory_mb": 100, "active_w": 2, "idle_w": 1}},
        "a": {"address": "127.0.0.1:2", "device": {"gflops": 10, "memory_mb": 100, "active_w": 5, "idle_w": 1}},
    },
    # rtt 2 * 5 ms = 0.01 s, 8 Mbit/s, 50 + 25 nJ per bit
    "links": [{"between": ["cam", "a"], "bandwidth_mbps": 8, "latency_ms": 5, "tx_nj_per_bit": 50,
               "rx_nj_per_bit": 25}],
}
PLACEMENT = Placement({(1, 0): "cam", (1, 1): "a"})
ROUTING = {(1, 0): 100.0, (1, 1): 100.0}  # tokens per image
FIG = ModelFigures(trunk_flops=1e9, expert_flops_per_token={1: 1e6}, token_bytes={1: 100.0}, model_mb=10,
                   image_bytes=10_000, answer_bytes=100)


def _costs(links=None, topo=TOPO, fig=FIG, offload="a"):
    return predict(parse_topology(topo), PLACEMENT, ROUTING, links or {}, fig, offload_site=offload)


def test_each_strategy_costs_what_the_hand_figures_say():
    c = _costs()
    # local: (1e9 + 200 tokens * 1e6) / 1e9 FLOP/s = 1.2 s at 2 W
    assert c["local"].latency_s == pytest.approx(1.2)
    assert c["local"].energy_j == pytest.approx(2.4)
    assert c["local"].bytes == 0
    # offload: 0.01 rtt + 80,800 bits / 8e6 + 1.2e9 / 1e10 = 0.1401 s; 80,800 bits * 75 nJ + 5 W * 0.12 s
    assert c["offload-image"].latency_s == pytest.approx(0.1401)
    assert c["offload-image"].energy_j == pytest.approx(0.00606 + 0.6)
    assert c["offload-image"].bytes == 10_100
    # split: trunk 1 s; layer 1: max(camera 100 tokens 0.1 s, site a 0.01 + 160,000 bits / 8e6 + 0.01 = 0.04 s)
    assert c["split"].latency_s == pytest.approx(1.1)
    assert c["split"].energy_j == pytest.approx(2 + 0.2 + 0.05 + 160_000 * 75e-9)
    assert c["split"].bytes == 20_000


def test_measured_speeds_replace_the_topologys():
    """The coordinator passes its measured speeds beside the topology: the camera at 2 GFLOP/s halves local's 1.2 s
    and split's 1 s trunk; site a measured at 5 halves its speed in offload's and split's compute."""
    c = predict(parse_topology(TOPO), PLACEMENT, ROUTING, {}, FIG, offload_site="a", gflops={"cam": 2.0, "a": 5.0})
    assert c["local"].latency_s == pytest.approx(0.6)
    assert c["offload-image"].latency_s == pytest.approx(0.01 + 80_800 / 8e6 + 1.2e9 / 5e9)
    # split: trunk 0.5 s; layer 1: max(camera 100 tokens / 2e9 = 0.05 s, a 0.01 + 0.02 + 1e8 / 5e9 = 0.05 s)
    assert c["split"].latency_s == pytest.approx(0.55)
    assert _costs() == predict(parse_topology(TOPO), PLACEMENT, ROUTING, {}, FIG, offload_site="a", gflops={})


def test_the_choice_follows_the_objective_and_the_links():
    c = _costs()
    assert choose(c, "latency", PolicyState()).strategy == "offload-image"
    assert choose(c, "bytes", PolicyState()).strategy == "local"
    assert choose(c, "energy", PolicyState()).strategy == "offload-image"
    # the link measured at 50 kbit/s: offload's 80,800 bits take 1.6 s, split's 160,000 bits 3.2 s: local wins
    slow = {"a": LinkEstimate(rtt_s=0.01, throughput_bps=50e3)}
    c = _costs(slow)
    assert c["offload-image"].latency_s == pytest.approx(0.01 + 80_800 / 50e3 + 0.12)
    assert choose(c, "latency", PolicyState()).strategy == "local"


def test_memory_makes_a_strategy_infeasible():
    big = ModelFigures(**{**FIG.__dict__, "model_mb": 150})
    c = _costs(fig=big)
    assert not c["local"].feasible and "memory_mb 100" in c["local"].why
    assert not c["offload-image"].feasible
    assert choose(c, "latency", PolicyState()).strategy == "split"
    assert not _costs(offload=None)["offload-image"].feasible


def test_hysteresis_switches_only_after_n_decisions_past_the_margin():
    cur = StrategyCost(1.0, 1.0, 1.0)
    better = StrategyCost(0.85, 1.0, 1.0)  # 15 % cheaper: past a 10 % margin
    slightly = StrategyCost(0.95, 1.0, 1.0)  # 5 %: within it
    state = PolicyState("split")
    for _ in range(5):  # never switches for a gain within the margin
        d = choose({"split": cur, "local": slightly}, "latency", state, margin=0.1, consecutive=3)
        assert d.strategy == "split" and d.reason == "keep"
        state = d.state
    seen = []
    for _ in range(3):
        d = choose({"split": cur, "local": better}, "latency", state, margin=0.1, consecutive=3)
        seen.append(d.strategy)
        state = d.state
    assert seen == ["split", "split", "local"] and d.reason == "switch"
    assert d.predicted == better
    # an interruption resets the streak
    state = PolicyState("local")
    d1 = choose({"local": cur, "split": better}, "latency", state, consecutive=2)
    d2 = choose({"local": cur, "split": slightly}, "latency", d1.state, consecutive=2)
    d3 = choose({"local": cur, "split": better}, "latency", d2.state, consecutive=2)
    assert [d1.strategy, d2.strategy, d3.strategy] == ["local", "local", "local"]


def test_a_site_that_stops_answering_moves_the_policy_at_once():
    down = {"a": LinkEstimate(rtt_s=0.01, throughput_bps=8e6, up=False)}
    c = _costs(down)
    assert not c["split"].feasible and not c["offload-image"].feasible
    d = choose(c, "latency", PolicyState("offload-image"), consecutive=5)
    assert d.strategy == "local" and d.reason == "fallback"
    big = ModelFigures(**{**FIG.__dict__, "model_mb": 150})
    with pytest.raises(NoFeasibleStrategy, match="not reachable"):
        choose(_costs(down, fig=big), "latency", PolicyState("split"))


def test_sites_yaml_strategy_keys_are_validated():
    assert parse_topology(TOPO).strategy == "split"
    t = parse_topology({**TOPO, "strategy": "adaptive", "adaptive": {"objective": "energy", "consecutive": 2}})
    assert (t.strategy, t.adaptive.objective, t.adaptive.consecutive) == ("adaptive", "energy", 2)
    assert t.offload_address("a") == "127.0.0.1:1002"
    for bad, key in [({"strategy": "ofload"}, "strategy"), ({"adaptive": {"objective": "speed"}}, "adaptive.objective"),
                     ({"adaptive": {"consecutive": 0}}, "adaptive.consecutive"),
                     ({"offload": {"site": "cam"}}, "offload.site"), ({"offload": {"site": "b"}}, "offload.site"),
                     ({"offload": {"adress": "x:1"}}, "offload")]:
        with pytest.raises(ConfigError) as e:
            parse_topology({**TOPO, **bad}, "sites.yaml")
        msg = str(e.value)
        assert "\n" not in msg and f"sites.yaml: {key}" in msg, msg


# ------------------------------------------------------------------------------ the same policy in the simulator


def test_the_simulator_runs_adaptive_with_the_same_policy():
    from moevit.sim.config import FailureSet, Settings, SiteDown
    from moevit.sim.engine import run_scenario

    from tests.test_sim import one_expert_stats, scenario, two_site_topology, world_for

    stats = one_expert_stats()
    # fast camera: local-moe's 6.01 ms beats split's 42.4 ms and offload's link: the policy keeps local
    w = world_for(two_site_topology(bandwidth=1.0, latency=10.0), stats)
    res = run_scenario(w, scenario("adaptive", images=5))
    local = run_scenario(w, scenario("local-moe", images=5))
    assert res.strategy_images == {"local": 5}
    assert res.latency_mean_s == pytest.approx(local.latency_mean_s)
    # a camera 1000x slower (0.01 GFLOP/s: the trunk alone takes 6 s): offload-image to node wins (the whole model
    # in 0.03 s at 2 GFLOP/s plus 51 ms on the link); node dies at 2.5 s: once the health watch sees it (0.2 s),
    # every later image goes local (split needs node too), marked as the fallback rules say
    topo = two_site_topology(bandwidth=1.0, latency=10.0)
    slow = parse_topology({**_as_dict(topo), "sites": {**_as_dict(topo)["sites"], "cam": {
        "address": "10.0.0.1:1", "device": {"gflops": 0.01, "memory_mb": 512, "active_w": 4.0, "idle_w": 1.0}}},
        "adaptive": {"consecutive": 1}})
    down = FailureSet(name="node-dies", site_downs=(SiteDown("node", 2.5),))
    res = run_scenario(world_for(slow, stats), scenario("adaptive", images=6, failures=down, settings=Settings(
        rpc_overhead_bytes=0, image_bytes=5000, result_bytes=100)))
    assert res.strategy_images == {"offload-image": 3, "local": 3}
    # the link schedule instead: from 2.5 s the link carries 1 kbit/s (the 5000-B image would take 40 s): local
    sched = Settings(rpc_overhead_bytes=0, image_bytes=5000, result_bytes=100,
                     link_schedule=((0.0, 1.0, 10.0), (2.5, 0.001, 10.0)))
    res = run_scenario(world_for(slow, stats), scenario("adaptive", images=6, settings=sched))
    assert res.strategy_images == {"offload-image": 3, "local": 3}
    assert res.image_strategies[:3] == ["offload-image"] * 3


def _as_dict(topo):
    sites = {n: {"address": s.address, "device": {k: getattr(s.device, k) for k in
                                                   ("gflops", "memory_mb", "active_w", "idle_w")}}
             for n, s in topo.sites.items()}
    links = [{"between": [lk.a, lk.b], "bandwidth_mbps": lk.bandwidth_mbps, "latency_ms": lk.latency_ms}
             for lk in topo.links]
    return {"coordinator": topo.coordinator, "fallback": topo.fallback, "sites": sites, "links": links}
