"""The partitioner (partition/placement.py, moe-partition): hand-solved optima, MILP vs brute force, heuristic vs
MILP on seeded instances, memory caps, determinism, replicas, and the CLI's errors."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from moevit.deploy.topology import load_placement, load_topology, parse_topology, validate_placement
from moevit.partition.cli import partition_main
from moevit.partition.costmodel import (
    MB,
    evaluate_placement,
    objective_value,
    parse_stats,
    save_stats,
    synthetic_stats,
    synthetic_topology,
)
from moevit.partition.placement import (
    Problem,
    add_replicas,
    background_experts,
    heuristic_assignment,
    milp_assignment,
    place,
    skip_fractions,
)

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ("latency", "energy", "bytes", "weighted")


def star(sites: dict[str, tuple[float, float]], *, bandwidth: float = 1e6, latency_ms: float = 0.0) -> Any:
    """Coordinator ``cam`` plus others, ``name: (gflops, memory_mb)``; identical links, 1 W active/idle."""
    return parse_topology({
        "coordinator": "cam",
        "sites": {n: {"address": f"127.0.0.1:{50050 + i}",
                      "device": {"gflops": g, "memory_mb": m, "active_w": 1, "idle_w": 1}}
                  for i, (n, (g, m)) in enumerate(sites.items())},
        "links": [{"between": ["cam", n], "bandwidth_mbps": bandwidth, "latency_ms": latency_ms}
                  for n in sites if n != "cam"],
    })


def stats_dict(loads: list[float], *, weight_mb: float = 1.0, classes: list[list[float]] | None = None) -> dict:
    """One MoE layer (8), dim 8, K 4, grid 2x2 (4 patches), top-1, expert weights ``weight_mb`` MB, trunk and buffer
    tiny (trunk 0.1 MB; buffer 4 x 4 x (16 + 4) x 4 B = 1280 B)."""
    cl = classes or [loads]
    return {
        "format": "moevit-stats/1", "fingerprint": "fp-test", "arch": "mobilevitv2_050", "image_size": 4,
        "images": 10 * len(cl), "classes": [f"c{i}" for i in range(len(cl))], "class_images": [10] * len(cl),
        "pixels_per_patch": 4, "top_k": 1, "trunk_macs": 1000, "trunk_weight_bytes": 100_000,
        "layers": [{
            "layer": 8, "dim": 8, "num_experts": len(loads), "expert_hidden": 4, "grid": [2, 2], "patches": 4,
            "expert_params": 10, "expert_weight_bytes": int(weight_mb * MB), "expert_macs_per_token": 1_000_000,
            "patches_per_expert": {"mean": list(np.mean(cl, axis=0)), "p95": list(np.max(cl, axis=0))},
            "class_patches_per_expert": cl, "affinity": [[1.0 / len(loads)] * len(loads)] * len(cl),
        }],
    }


def test_hand_solved_bytes_with_memory():
    # The coordinator has room for one 1 MB expert (2 MB - 0.1 MB trunk - buffer); loads 3 and 1 patches/image.
    # Bytes only count remote patches (4 px x 8 dims x 2 B = 64 B each way): the hot expert stays home and the
    # cold one travels: 1 patch x 64 B x 2 = 128 B. The other way round would cost 384 B.
    topo = star({"cam": (1, 2.0), "pi": (1, 10)})
    stats = parse_stats(stats_dict([3.0, 1.0]))
    result = place(topo, stats, objective="bytes")
    assert dict(result.placement.assignment) == {(8, 0): ("cam",), (8, 1): ("pi",)}
    assert result.value == pytest.approx(128)
    assert result.cost.feasible


def test_hand_solved_latency_balance():
    # Compute only (link at 1 Tbit/s, no latency): one patch = 4 tokens x 1e6 MACs x 2 = 8e6 FLOPs = 8 ms at
    # 1 GFLOP/s. Loads 2, 1, 1 on two equal 1 GFLOP/s sites: the best split is {2} | {1, 1}: 16 ms per layer, plus
    # 4 patches' transfer at 1 Tbit/s (~1 ns). Any other split puts >= 3 patches (24 ms) on one site.
    topo = star({"cam": (1, 100), "pi": (1, 100)})
    stats = parse_stats(stats_dict([2.0, 1.0, 1.0]))
    result = place(topo, stats, objective="latency")
    groups = sorted(sorted(e for (_, e), s in result.placement.assignment.items() if s == (site,))
                    for site in ("cam", "pi"))
    assert groups == [[0], [1, 2]]
    assert result.cost.layer_latency_s[8] == pytest.approx(16e-3, rel=1e-6)
    assert result.milp is not None and result.milp.status == "optimal"


def test_hand_solved_energy_prefers_the_frugal_device():
    # Energy per patch = active_w x compute time (+ radio at 0 nJ/bit... links default 50/25 nJ/bit: 64 B each way
    # is 512 bits -> 38.4 uJ per patch). A 4 GFLOP/s remote site spends a quarter of the coordinator's compute
    # energy (8 mJ vs 2 mJ at 1 W), so everything goes there though the latency would be lower at home.
    topo = star({"cam": (1, 100), "pi": (4, 100)})
    stats = parse_stats(stats_dict([2.0, 2.0]))
    result = place(topo, stats, objective="energy")
    assert set(result.placement.assignment.values()) == {("pi",)}
    per_patch = 8e6 / 4e9 + 2 * 512 * 75e-9
    assert result.value == pytest.approx(1000 * 2 / 1e9 + 4 * per_patch)


def random_instance(seed: int, n_sites: int = 3, layers: tuple[int, ...] = (6, 7), experts: int = 3):
    stats = parse_stats(synthetic_stats(layers=layers, num_experts=experts, num_classes=3, seed=seed))
    topo = synthetic_topology(n_sites, stats, seed=seed, coordinator_share=0.35, memory_slack=1.3,
                              bandwidth_mbps=(5.0, 200.0), coordinator_gflops=1.0)
    return topo, stats


def test_milp_is_exact_against_brute_force():
    for seed in range(2):
        topo, stats = random_instance(seed)
        for objective in OBJECTIVES:
            p = Problem.build(topo, stats, objective=objective)
            best = min(p.value(np.array(a)) for a in itertools.product(range(p.num_sites), repeat=p.num_items)
                       if p.memory_ok(np.array(a)))
            m = milp_assignment(p, time_limit=20)
            assert m.status == "optimal"
            assert m.value == pytest.approx(best, rel=1e-4)


def test_problem_value_is_the_cost_model():
    topo, stats = random_instance(5, n_sites=4)
    rng = np.random.default_rng(0)
    for objective in OBJECTIVES:
        p = Problem.build(topo, stats, objective=objective)
        for _ in range(5):
            a = rng.integers(0, p.num_sites, size=p.num_items)
            cost = evaluate_placement(topo, stats, p.to_placement(a))
            weights = p.weights if objective == "weighted" else None
            assert p.value(a) == pytest.approx(objective_value(cost, objective, weights), rel=1e-9)


@pytest.mark.slow
def test_heuristic_within_two_percent_of_milp():
    gaps = []
    for seed in range(6):
        topo, stats = random_instance(seed, n_sites=4, layers=(2, 6, 7), experts=4)
        for objective in OBJECTIVES:
            p = Problem.build(topo, stats, objective=objective)
            m = milp_assignment(p, time_limit=20)
            assert m.status == "optimal", (seed, objective, m.status)
            h = heuristic_assignment(p, seed=0)
            assert h is not None and p.memory_ok(h)
            # Measured on the part of the objective a placement can change (the trunk's time and energy are a
            # constant that would make any placement look within 2 %).
            gaps.append((p.value(h) - m.value) / (m.value - p.const))
            assert gaps[-1] <= 0.02, (seed, objective, gaps[-1])
    assert min(gaps) >= -1e-3  # the MILP is a true optimum (up to its 0.01 % gap)


def memory_used(topo: Any, stats: Any, placement: Any) -> dict[str, float]:
    """Recomputed here from first principles: weights held + buffer (+ trunk on the coordinator)."""
    used = {n: 0.0 for n in topo.sites}
    for (layer, _), sites in placement.assignment.items():
        for s in sites:
            used[s] += stats.layer(layer).expert_weight_bytes
    for n in used:
        if n == topo.coordinator:
            used[n] += stats.trunk_weight_bytes + stats.buffer_bytes
        elif used[n]:
            used[n] += stats.buffer_bytes
    return used


@pytest.mark.slow
def test_memory_caps_always_respected():
    for seed in range(3):
        topo, stats = random_instance(seed, n_sites=4, layers=(4, 8), experts=5)
        for objective in OBJECTIVES:
            for method in ("heuristic", "milp"):
                r = place(topo, stats, objective=objective, method=method, time_limit=5, replicas=2, seed=seed)
                used = memory_used(topo, stats, r.placement)
                for name, site in topo.sites.items():
                    assert used[name] <= site.device.memory_mb * MB + 1e-6, (seed, objective, name)
                assert r.cost.feasible
                validate_placement(r.placement, topo, stats.moe_layers())


@pytest.mark.slow
def test_same_inputs_same_placement():
    stats = parse_stats(synthetic_stats(num_classes=3, seed=2))
    topo = synthetic_topology(8, stats, seed=4)
    a = place(topo, stats, objective="latency", method="heuristic", replicas=1)
    b = place(topo, stats, objective="latency", method="heuristic", replicas=1)
    assert a.placement == b.placement and a.value == b.value
    topo2, stats2 = random_instance(1, n_sites=4, layers=(2, 6, 7), experts=4)
    c = place(topo2, stats2, objective="weighted")
    d = place(topo2, stats2, objective="weighted")
    assert c.placement == d.placement


def test_replicas_split_a_hot_background_expert_with_the_coordinator():
    # One expert takes every patch of every class (a background expert). Per patch: 8 ms of compute on the
    # 1 GFLOP/s coordinator, 4 ms on the 2 GFLOP/s remote plus 1 ms of round-trip latency once per layer.
    # Home: 4 x 8 = 32 ms; remote: 1 + 4 x 4 = 17 ms; split evenly: max(2 x 8, 1 + 2 x 4) = 16 ms.
    topo = star({"cam": (1, 100), "pi": (2, 100)}, latency_ms=0.5)
    raw = stats_dict([4.0, 0.0], classes=[[4.0, 0.0], [4.0, 0.0]])
    raw["layers"][0]["affinity"] = [[0.9, 0.1], [0.8, 0.2]]
    stats = parse_stats(raw)
    assert background_experts(stats, 8) == [0]
    plain = place(topo, stats, objective="latency")
    assert plain.placement.sites_for(8, 0) == ("pi",)
    assert plain.cost.layer_latency_s[8] == pytest.approx(17e-3, rel=1e-4)
    rep = place(topo, stats, objective="latency", replicas=1, replica_policy="split")
    assert rep.placement.sites_for(8, 0) == ("cam", "pi")
    assert rep.cost.layer_latency_s[8] == pytest.approx(16e-3, rel=1e-4)
    # local-first (moe-coordinator's rule): the coordinator's copy would take everything (32 ms), no copy added.
    best = add_replicas(topo, stats, plain.placement, per_layer=1, objective="latency", weights=None)
    assert best == plain.placement


def test_memory_too_small_names_the_totals():
    topo = star({"cam": (1, 1.0), "pi": (1, 2.0)})
    stats = parse_stats(stats_dict([1.0, 1.0, 1.0, 1.0], weight_mb=1.0))
    with pytest.raises(ValueError, match=r"experts need 4\.00 MB in total .* the sites have 2\.90 MB for experts"):
        place(topo, stats, objective="latency")
    tiny = star({"cam": (1, 0.05), "pi": (1, 20.0)})
    with pytest.raises(ValueError, match=r"the coordinator needs 0\.10 MB for the trunk and buffer, has 0\.05 MB"):
        place(tiny, stats, objective="latency")


def test_baselines_are_reported():
    topo = load_topology(ROOT / "examples" / "sites.yaml")
    stats = parse_stats(synthetic_stats(num_experts=8, seed=0))
    r = place(topo, stats, objective="latency")
    names = [b.name for b in r.baselines]
    assert names == ["round-robin", "random (seed 0)", "all-on-coordinator"]
    for b in r.baselines:
        if b.feasible:
            assert r.value <= b.value * (1 + 1e-9)
    # On a coordinator too small for every expert the all-on-coordinator baseline shows as infeasible.
    small = star({"cam": (1, 2.5), "pi": (1, 10)})
    s2 = parse_stats(stats_dict([2.0, 1.0, 1.0], weight_mb=1.0))
    r2 = place(small, s2, objective="bytes")
    allc = r2.baselines[-1]
    assert not allc.feasible and "cam: needs 3.10 MB, has 2.50 MB" in allc.cost.memory_shortfall()[0]


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture
def stats_file(tmp_path: Path) -> Path:
    return save_stats(synthetic_stats(num_experts=8, fingerprint="fp-synth"), tmp_path / "stats.json")


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = partition_main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_writes_placement_and_prints_tables(tmp_path, stats_file, capsys):
    out = tmp_path / "placement.yaml"
    rc, stdout, err = run_cli(capsys, "--topology", str(write_topology(tmp_path)), "--stats",
                              str(stats_file), "--objective", "latency", "--out", str(out), "--time-limit", "5")
    assert rc == 0, err
    assert "round-robin" in stdout and "all-on-coordinator" in stdout and "camera-01" in stdout
    placement = load_placement(out)
    assert placement.fingerprint == "fp-synth"
    topo = load_topology(ROOT / "examples" / "sites.yaml")
    validate_placement(placement, topo, parse_stats(json.loads(stats_file.read_text())).moe_layers())


def one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-partition: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def write_topology(tmp_path: Path, *, model: str | None = None, drop_link: bool = False,
                   memory_mb: float = 512) -> Path:
    text = (ROOT / "examples" / "sites.yaml").read_text()
    text = re.sub(r"(?m)^model:.*$", f"model: {model}" if model else "", text)
    text = text.replace("memory_mb: 512", f"memory_mb: {memory_mb}")
    if drop_link:
        text = text.replace("  - {between: [camera-01, pi-south]", "  # ")
    path = tmp_path / "sites.yaml"
    path.write_text(text)
    return path


def test_cli_errors_are_one_line_exit_2(tmp_path, stats_file, capsys):
    out = str(tmp_path / "p.yaml")
    sites = str(ROOT / "examples" / "sites.yaml")
    rc, _, err = run_cli(capsys, "--topology", sites, "--stats", str(stats_file), "--objective", "fast", "--out", out)
    one_line_error(rc, err, "--objective 'fast' is not one of latency, energy, bytes, weighted")
    rc, _, err = run_cli(capsys, "--topology", sites, "--stats", str(stats_file), "--objective", "latency",
                         "--weights", "latency=1", "--out", out)
    one_line_error(rc, err, "--weights applies only to --objective weighted")
    rc, _, err = run_cli(capsys, "--topology", sites, "--stats", str(stats_file), "--objective", "weighted",
                         "--weights", "speed=1", "--out", out)
    one_line_error(rc, err, "unknown name 'speed'")
    unlinked = write_topology(tmp_path, drop_link=True)
    rc, _, err = run_cli(capsys, "--topology", str(unlinked), "--stats", str(stats_file), "--objective", "latency",
                         "--out", out)
    one_line_error(rc, err, "sites.pi-south: no link to the coordinator 'camera-01'")
    rc, _, err = run_cli(capsys, "--topology", sites, "--stats", str(tmp_path / "nope.json"), "--objective",
                         "latency", "--out", out)
    one_line_error(rc, err, "nope.json: file not found")
    assert not Path(out).exists()


def test_cli_memory_too_small(tmp_path, capsys):
    # 9 layers x 16 experts of K = 64 need ~7.5 MB; the sites below have a fraction of a MB each.
    stats = save_stats(synthetic_stats(), tmp_path / "stats.json")
    # no model: the synthetic stats stand alone (the example's model, once `make demo` built it, is another one)
    text = re.sub(r"(?m)^model:.*$", "", (ROOT / "examples" / "sites.yaml").read_text())
    text = text.replace("memory_mb: 512", "memory_mb: 6").replace("memory_mb: 256", "memory_mb: 0.5")
    text = text.replace("memory_mb: 128", "memory_mb: 0.5")
    (tmp_path / "sites.yaml").write_text(text)
    rc, _, err = run_cli(capsys, "--topology", str(tmp_path / "sites.yaml"), "--stats", str(stats), "--objective",
                         "energy", "--out", str(tmp_path / "p.yaml"))
    one_line_error(rc, err, "not enough memory for any placement: the experts need", "MB in total")


def fake_checkpoint(path: Path, fingerprint: str) -> Path:
    """A valid safetensors file with no tensors, only the metadata moevit writes (enough for the fingerprint)."""
    header = json.dumps({"__metadata__": {"format": "moevit/1", "fingerprint": fingerprint}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    return path


def test_cli_refuses_stats_of_another_model(tmp_path, stats_file, capsys):
    fake_checkpoint(tmp_path / "moe.safetensors", "0123456789abcdef")
    topo = write_topology(tmp_path, model="moe.safetensors")
    rc, _, err = run_cli(capsys, "--topology", str(topo), "--stats", str(stats_file), "--objective", "latency",
                         "--out", str(tmp_path / "p.yaml"))
    one_line_error(rc, err, "profiled from model fp-synth", "is 0123456789abcdef", "run moe-profile")
    fake_checkpoint(tmp_path / "moe.safetensors", "fp-synth")
    rc, _, err = run_cli(capsys, "--topology", str(topo), "--stats", str(stats_file), "--objective", "latency",
                         "--out", str(tmp_path / "p.yaml"))
    assert rc == 0, err


@pytest.mark.parametrize("share,placed,value", [(0.75, {0: "pi", 1: "cam"}, 96.0), (0.5, {0: "cam", 1: "pi"}, 128.0),
                                                (1.0, {0: "pi", 1: "cam"}, 0.0)])
def test_hand_solved_bytes_with_background_skipping(share, placed, value):
    # test_hand_solved_bytes_with_memory's case (room at home for one of two 1 MB experts, 64 B per remote patch each
    # way) with expert 0 (3 patches per image) a background expert whose patches a skip rule keeps off the wire at
    # `share`: 3 x (1 - share) of its patches still travel, against expert 1's 1. At 0.75: 0.75 < 1, so expert 1
    # stays home and 0.75 x 128 B travel (96 B; the placement made without the rule, expert 0 home, costs 128 B
    # under it). At 0.5: 1.5 > 1, the rule changes nothing. At 1.0: nothing travels (the blind placement still sends
    # expert 1's patch: 128 B).
    topo = star({"cam": (1, 2.0), "pi": (1, 10)})
    raw = stats_dict([3.0, 1.0])
    raw["layers"][0]["affinity"] = [[0.9, 0.1]]
    stats = parse_stats(raw)
    assert background_experts(stats, 8) == [0]
    offwire = skip_fractions(stats, share=share)
    result = place(topo, stats, objective="bytes", offwire=offwire)
    assert dict(result.placement.assignment) == {(8, e): (site,) for e, site in placed.items()}
    assert result.value == pytest.approx(value)
    blind = place(topo, stats, objective="bytes").placement
    assert evaluate_placement(topo, stats, blind, offwire=offwire).bytes == pytest.approx(128.0)
    with pytest.raises(ValueError, match="offwire at layer 8: expected 2 shares in"):
        place(topo, stats, objective="bytes", offwire=[np.array([1.5, 0.0])])


def test_cli_skip_share_places_with_the_rule_and_refuses_bad_values(tmp_path, stats_file, capsys):
    out = tmp_path / "placement.yaml"
    common = ["--topology", str(write_topology(tmp_path)), "--stats", str(stats_file), "--objective", "bytes",
              "--out", str(out), "--time-limit", "5"]
    rc, stdout, err = run_cli(capsys, *common, "--skip-share", "0.6", "--skip-layers", "8")
    assert rc == 0, err
    assert "background skipping (residual): patches per image kept off the wire, by layer: 8: " in stdout
    assert out.exists()
    rc, _, err = run_cli(capsys, *common, "--skip-share", "1.5")
    one_line_error(rc, err, "--skip-share must be in [0, 1], got 1.5")
    rc, _, err = run_cli(capsys, *common, "--skip-layers", "8")
    one_line_error(rc, err, "--skip-layers applies only with --skip-share")
    with pytest.raises(SystemExit):
        run_cli(capsys, *common, "--skip-share", "0.5", "--skip-layers", "x")
    # argparse's usage error names the option and what is wrong (partition.cli._skip_layers), not "invalid value"
    assert "argument --skip-layers: 'x' is not a comma-separated list of layer numbers" in capsys.readouterr().err
