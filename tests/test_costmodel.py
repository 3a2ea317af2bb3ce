"""The cost model (partition/costmodel.py): closed-form figures on hand-sized cases, replicas, class scenarios,
memory, refusals, and the stats.json reader."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import numpy as np
import pytest
from moevit.deploy.topology import Placement, TopologyError, parse_topology
from moevit.partition.costmodel import (
    MB,
    StatsError,
    coefficients,
    evaluate_placement,
    load_stats,
    objective_value,
    parse_stats,
    parse_weights,
    save_stats,
    synthetic_stats,
    synthetic_topology,
)


def two_sites(**link: Any) -> Any:
    """cam (coordinator, 1 GFLOP/s, 2 W active, 1 W idle) and pi (2 GFLOP/s, 4 W, 1 W), one lossy duty-cycled link."""
    spec = {"between": ["cam", "pi"], "bandwidth_mbps": 8, "latency_ms": 5, "loss": 0.5, "tx_nj_per_bit": 10,
            "rx_nj_per_bit": 5, "duty_cycle": 0.5}
    spec.update(link)
    return parse_topology({
        "coordinator": "cam",
        "sites": {
            "cam": {"address": "127.0.0.1:50050",
                    "device": {"gflops": 1, "memory_mb": 100, "active_w": 2, "idle_w": 1}},
            "pi": {"address": "127.0.0.1:50051",
                   "device": {"gflops": 2, "memory_mb": 50, "active_w": 4, "idle_w": 1}},
        },
        "links": [spec],
    })


def tiny_stats(experts: int = 1, class_load: list[list[float]] | None = None) -> dict[str, Any]:
    """One MoE layer (8) of dim 8, K = 4 on a 2x2 grid (4 patches), top-1; trunk 10^6 MACs."""
    cl = class_load if class_load is not None else [[4.0 / experts] * experts]
    n_cls = len(cl)
    mean = np.mean(np.array(cl), axis=0).tolist()
    return {
        "format": "moevit-stats/1", "fingerprint": "abc", "arch": "mobilevitv2_050", "image_size": 4,
        "images": 10 * n_cls, "classes": [f"c{i}" for i in range(n_cls)], "class_images": [10] * n_cls,
        "pixels_per_patch": 4, "top_k": 1, "trunk_macs": 1_000_000, "trunk_weight_bytes": 1000,
        "total_macs": None, "dense_macs": None,
        "layers": [{
            "layer": 8, "dim": 8, "num_experts": experts, "expert_hidden": 4, "grid": [2, 2], "patches": 4,
            "expert_params": 100, "expert_weight_bytes": 400, "expert_macs_per_token": 64,
            "patches_per_expert": {"mean": mean, "p95": mean},
            "class_patches_per_expert": cl,
            "affinity": [[1.0 / experts] * experts] * n_cls,
        }],
        "coactivation": [],
    }


def test_closed_form_two_sites_one_expert_remote():
    topo, stats = two_sites(), parse_stats(tiny_stats())
    cost = evaluate_placement(topo, stats, Placement({(8, 0): ("pi",)}))
    # 4 patches x 4 pixel tokens x 8 dims x 2 bytes (fp16) = 256 B each way; on air 256*8/(1-0.5) = 4096 bits;
    # at 8 Mbit/s with a 0.5 duty cycle: 4096 / 4e6 = 1.024 ms, plus 5 ms latency, each way.
    send = 5e-3 + 4096 / 4e6
    # Expert compute: 16 tokens x 64 MACs x 2 FLOPs / 2e9 FLOP/s = 1.024 us; trunk: 1e6 x 2 / 1e9 = 2 ms.
    compute = 16 * 64 * 2 / 2e9
    trunk = 2e-3
    assert cost.trunk_s == pytest.approx(trunk)
    assert cost.latency_s == pytest.approx(trunk + 2 * send + compute, rel=1e-12)
    assert cost.latency_s == pytest.approx(14.049024e-3, rel=1e-12)
    assert cost.bytes == pytest.approx(512)
    pi, cam = cost.sites["pi"], cost.sites["cam"]
    assert (pi.bytes_in, pi.bytes_out, cam.bytes_in) == (256, 256, 0)
    assert pi.tokens == pytest.approx(16) and pi.patches == pytest.approx(4)
    assert pi.compute_s == pytest.approx(compute)
    # Radio: 4096 bits on air each way; out: cam tx 10 nJ, pi rx 5 nJ; back: pi tx 10, cam rx 5 -> 61.44 uJ each.
    assert pi.radio_j == pytest.approx(4096 * 15e-9) and cam.radio_j == pytest.approx(4096 * 15e-9)
    assert pi.compute_j == pytest.approx(4 * compute) and cam.compute_j == pytest.approx(2 * trunk)
    assert cost.energy_j == pytest.approx(2 * trunk + 4 * compute + 2 * 4096 * 15e-9)
    assert cost.energy_j == pytest.approx(4.126976e-3)
    assert cam.idle_j == pytest.approx(1 * (cost.latency_s - trunk))
    assert pi.idle_j == pytest.approx(1 * (cost.latency_s - compute))
    assert cost.idle_j == pytest.approx(cam.idle_j + pi.idle_j)
    link = cost.links["pi"]
    assert (link.bytes_out, link.bytes_back) == (256, 256)
    assert link.send_s == pytest.approx(send) and link.return_s == pytest.approx(send)
    # Memory: pi holds the expert (400 B) and the buffer 4 patches x 1 x 4 px x (2*8 + 4) x 4 B = 1280 B;
    # the coordinator the trunk (1000 B) and the buffer.
    assert pi.memory_bytes == 400 + 1280 and cam.memory_bytes == 1000 + 1280
    assert cost.feasible and pi.fits
    assert cost.layer_latency_s == {8: pytest.approx(2 * send + compute)}


def test_closed_form_expert_on_coordinator_and_fp32():
    topo, stats = two_sites(), parse_stats(tiny_stats())
    cost = evaluate_placement(topo, stats, Placement({(8, 0): ("cam",)}))
    compute = 16 * 64 * 2 / 1e9
    assert cost.latency_s == pytest.approx(2e-3 + compute)
    assert cost.bytes == 0 and cost.links["pi"].bytes_out == 0 and cost.links["pi"].send_s == 0
    assert cost.energy_j == pytest.approx(2 * (2e-3 + compute))
    assert cost.sites["pi"].memory_bytes == 0 and cost.sites["cam"].memory_bytes == 1000 + 1280 + 400
    fp32 = evaluate_placement(topo, stats, Placement({(8, 0): ("pi",)}), wire_bytes=4)
    assert fp32.bytes == 1024
    assert fp32.latency_s == pytest.approx(2e-3 + 2 * (5e-3 + 8192 / 4e6) + 16 * 64 * 2 / 2e9)


def test_replicas_split_and_best():
    topo, stats = two_sites(), parse_stats(tiny_stats())
    both = Placement({(8, 0): ("cam", "pi")})
    split = evaluate_placement(topo, stats, both, replica_policy="split")
    # Two patches each: pi 128 B each way -> 2048 bits on air -> 0.512 ms + 5 ms; compute 0.512 us;
    # the coordinator's own two patches: 8 tokens x 128 FLOPs / 1e9 = 1.024 us.
    pi_time = 2 * (5e-3 + 2048 / 4e6) + 8 * 128 / 2e9
    assert split.latency_s == pytest.approx(2e-3 + max(pi_time, 8 * 128 / 1e9))
    assert split.bytes == pytest.approx(256)
    assert split.sites["cam"].patches == pytest.approx(2) and split.sites["pi"].patches == pytest.approx(2)
    # local-first (the default, as moe-coordinator): the coordinator's own copy takes everything.
    best = evaluate_placement(topo, stats, both)
    only_cam = evaluate_placement(topo, stats, Placement({(8, 0): ("cam",)}))
    assert best.latency_s == pytest.approx(only_cam.latency_s) and best.bytes == 0
    # Both copies cost memory.
    assert best.sites["pi"].memory_bytes == 400 + 1280 and best.sites["cam"].memory_bytes == 1000 + 1280 + 400
    # Without a coordinator copy, local-first uses the first replica by site name.
    d = _as_dict(topo)
    d["sites"]["pa"] = {"address": "127.0.0.1:50052",
                        "device": {"gflops": 100, "memory_mb": 10, "active_w": 1, "idle_w": 1}}
    d["links"].append({"between": ["cam", "pa"], "bandwidth_mbps": 8, "latency_ms": 5})
    three = parse_topology(d)
    first = evaluate_placement(three, stats, Placement({(8, 0): ("pi", "pa")}))
    assert first.sites["pa"].patches == 4 and first.sites["pi"].patches == 0
    with pytest.raises(ValueError, match="replica_policy"):
        evaluate_placement(topo, stats, both, replica_policy="nearest")


def test_class_scenarios_charge_experts_busy_in_the_same_images():
    # Two classes; class 0 routes all 4 patches to expert 0, class 1 to expert 1. Mean loads: 2 and 2.
    topo = two_sites(loss=0.0, duty_cycle=1.0, latency_ms=0.0, bandwidth_mbps=1e6)
    stats = parse_stats(tiny_stats(experts=2, class_load=[[4.0, 0.0], [0.0, 4.0]]))
    pl = Placement({(8, 0): ("cam",), (8, 1): ("pi",)})
    cost = evaluate_placement(topo, stats, pl)
    unit_cam, unit_pi = 4 * 64 * 2 / 1e9, 4 * 64 * 2 / 2e9  # compute of one patch on each site
    xfer = 2 * 4 * 8 * 2 * 8 / 1e12  # one patch both ways at 1 Tbit/s
    # class 0: cam serves 4 patches; class 1: pi serves 4 -> mean of the two maxima.
    per_class = [4 * unit_cam, 4 * (unit_pi + xfer)]
    assert cost.layer_latency_s[8] == pytest.approx(np.mean(per_class))
    # The mean-load estimate sees 2 patches on each site: max(2 unit_cam, 2 (unit_pi + xfer)).
    mean = max(2 * unit_cam, 2 * (unit_pi + xfer))
    assert cost.latency_mean_load_s == pytest.approx(2e-3 + mean)
    assert evaluate_placement(topo, stats, pl, scenarios="mean").latency_s == pytest.approx(2e-3 + mean)
    # Both experts on one site: the scenarios see it busy for 4 patches either way; the mean-load estimate too.
    together = evaluate_placement(topo, stats, Placement({(8, 0): ("cam",), (8, 1): ("cam",)}))
    assert together.latency_s == pytest.approx(2e-3 + 4 * unit_cam)


def test_objectives_and_weights():
    topo, stats = two_sites(), parse_stats(tiny_stats())
    cost = evaluate_placement(topo, stats, Placement({(8, 0): ("pi",)}))
    assert objective_value(cost, "latency") == cost.latency_s
    assert objective_value(cost, "energy") == cost.energy_j
    assert objective_value(cost, "bytes") == cost.bytes
    w = {"latency": 2.0, "energy": 3.0, "bytes": 5.0}
    assert cost.objective("weighted", w) == pytest.approx(2 * cost.latency_s + 3 * cost.energy_j + 5 * 512 / MB)
    assert parse_weights("latency=2, bytes=0") == {"latency": 2.0, "energy": 1.0, "bytes": 0.0}
    for bad, msg in (("speed=1", "unknown name 'speed'"), ("latency", "not name=value"),
                     ("latency=x", "not a number"), ("latency=-1", ">= 0"),
                     ("latency=0,energy=0,bytes=0", "above zero")):
        with pytest.raises(ValueError, match=msg):
            parse_weights(bad)
    with pytest.raises(ValueError, match="not one of"):
        objective_value(cost, "speed")


def test_memory_overrun_is_reported_not_raised():
    topo = two_sites()
    raw = tiny_stats()
    raw["layers"][0]["expert_weight_bytes"] = 60 * MB  # pi has 50 MB
    cost = evaluate_placement(topo, parse_stats(raw), Placement({(8, 0): ("pi",)}))
    assert not cost.feasible and not cost.sites["pi"].fits
    assert cost.memory_shortfall() == [f"pi: needs {(60 * MB + 1280) / MB:.2f} MB, has 50.00 MB"]


def test_fallback_local_puts_every_expert_on_the_coordinator():
    raw = tiny_stats(experts=2)
    topo = two_sites()
    local = parse_topology({**_as_dict(topo), "fallback": "local"})
    stats = parse_stats(raw)
    pl = Placement({(8, 0): ("pi",), (8, 1): ("cam",)})
    assert evaluate_placement(topo, stats, pl).sites["cam"].memory_bytes == 1000 + 1280 + 400
    cost = evaluate_placement(local, stats, pl)
    assert cost.sites["cam"].memory_bytes == 1000 + 1280 + 800
    assert math.isinf(coefficients(local, stats).free_bytes[0])


def _as_dict(topo: Any) -> dict[str, Any]:
    return {
        "coordinator": topo.coordinator,
        "sites": {n: {"address": s.address, "device": {"gflops": s.device.gflops, "memory_mb": s.device.memory_mb,
                                                       "active_w": s.device.active_w, "idle_w": s.device.idle_w}}
                  for n, s in topo.sites.items()},
        "links": [{"between": [lk.a, lk.b], "bandwidth_mbps": lk.bandwidth_mbps, "latency_ms": lk.latency_ms,
                   "loss": lk.loss, "tx_nj_per_bit": lk.tx_nj_per_bit, "rx_nj_per_bit": lk.rx_nj_per_bit,
                   "duty_cycle": lk.duty_cycle} for lk in topo.links],
    }


def test_site_without_direct_link_is_refused():
    d = _as_dict(two_sites())
    d["sites"]["far"] = {"address": "127.0.0.1:50052",
                         "device": {"gflops": 1, "memory_mb": 10, "active_w": 1, "idle_w": 1}}
    d["links"].append({"between": ["pi", "far"], "bandwidth_mbps": 1, "latency_ms": 1})
    with pytest.raises(TopologyError, match="no link to the coordinator"):
        parse_topology(d)
    topo = parse_topology(d, require_coordinator_links=False)
    stats = parse_stats(tiny_stats(experts=2))
    with pytest.raises(TopologyError, match="sites.far: expert 1 of layer 8 is placed on 'far', which has no direct"):
        evaluate_placement(topo, stats, Placement({(8, 0): ("pi",), (8, 1): ("far",)}))
    ok = evaluate_placement(topo, stats, Placement({(8, 0): ("pi",), (8, 1): ("cam",)}))
    assert ok.sites["far"].experts == 0 and "far" not in ok.links


def test_incomplete_placement_is_refused():
    topo, stats = two_sites(), parse_stats(tiny_stats(experts=2))
    with pytest.raises(TopologyError, match="expert.*1 of layer 8 are not placed"):
        evaluate_placement(topo, stats, Placement({(8, 0): ("pi",)}))


def test_stats_reader_names_the_key(tmp_path):
    good = tiny_stats()
    path = save_stats(good, tmp_path / "s.json")
    assert load_stats(path).fingerprint == "abc"
    cases = [
        (lambda d: d.pop("fingerprint"), "fingerprint: missing"),
        (lambda d: d.update(format="other"), "format: expected"),
        (lambda d: d["layers"][0].update(dim=-1), r"layers\[0\].dim: expected an integer >= 1"),
        (lambda d: d["layers"][0]["patches_per_expert"].update(mean=[3.0]), "sums to 3, expected patches x top_k = 4"),
        (lambda d: d["layers"][0].update(affinity=[[1, 2]]), r"layers\[0\].affinity: expected shape \[1, 1\]"),
        (lambda d: d["layers"][0].update(patches=5), "not grid rows x cols"),
        (lambda d: d.update(top_k=2), "top_k: 2 exceeds"),
    ]
    for mutate, msg in cases:
        d = copy.deepcopy(good)
        mutate(d)
        with pytest.raises(StatsError, match=msg):
            parse_stats(d, "s.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StatsError, match="bad.json: not valid JSON"):
        load_stats(tmp_path / "bad.json")
    with pytest.raises(StatsError, match="file not found"):
        load_stats(tmp_path / "missing.json")
    json.loads(path.read_text())  # plain JSON on disk


def test_synthetic_inputs_are_consistent():
    stats = parse_stats(synthetic_stats(seed=3))
    assert [ls.layer for ls in stats.layers] == list(range(9))
    for ls in stats.layers:
        assert ls.load_mean.sum() == pytest.approx(ls.patches)
    for co in stats.coactivation:
        b = stats.layer(co.to_layer)
        assert co.patches.sum() == pytest.approx(b.patches)
        assert co.patches.sum(axis=0) == pytest.approx(b.load_mean)
    topo = synthetic_topology(20, stats, seed=1)
    assert len(topo.sites) == 20 and topo.coordinator == "cam"
    assert synthetic_topology(20, stats, seed=1) == topo
