"""The per-layer skip rule (``moe-coordinator --skip-layers``) in the simulator: ``settings.skip_layers`` keeps the
drop/local-background strategies to the MoE layers named, decided by the same function as the coordinator's rules
(moevit.moe.skip.skip_layers); hand-derived bytes per image, and the errors for layers that are not MoE layers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from moevit.deploy.topology import Placement, parse_topology
from moevit.partition.costmodel import evaluate_placement, parse_stats, synthetic_stats
from moevit.partition.placement import skip_fractions
from moevit.sim.cli import main
from moevit.sim.config import (
    Arrival,
    FailureSet,
    LinkCondition,
    Scenario,
    Settings,
    SimConfigError,
    check_skip_layers,
    parse_sweep,
)
from moevit.sim.engine import World, run_scenario
from moevit.sim.trace import Trace, TraceHeader

from moevit.moe.skip import SkipRule, rules_from_options
from moevit.offwire import skip_layers

TOPOLOGY = {
    "coordinator": "cam",
    "sites": {"cam": {"address": "10.0.0.1:1", "device": {"gflops": 10, "memory_mb": 512, "active_w": 4.0,
                                                          "idle_w": 1.0}},
              "node": {"address": "10.0.0.2:1", "device": {"gflops": 2, "memory_mb": 512, "active_w": 3.0,
                                                           "idle_w": 0.5}}},
    "links": [{"between": ["cam", "node"], "bandwidth_mbps": 10, "latency_ms": 5}],
}


def two_layer_world():
    """MoE layers 5 and 8 of mobilevitv2_050 at 128 px, one expert each (a background expert: the only one, so every
    class uses it), every expert on the remote site ``node``. Layer 5: dim 96, grid 4x4 = 16 patches; layer 8: dim
    128, grid 2x2 = 4 patches; 4 pixel tokens per patch. A trace of 3 images with low-confidence patches
    layer 5: 6, 2, 4 (mean 4) and layer 8: 1, 3, 2 (mean 2)."""
    stats = parse_stats(synthetic_stats(layers=(5, 8), num_experts=1, num_classes=1, image_size=128), "<2 layers>")
    topo = parse_topology(TOPOLOGY, "<two sites>")
    placement = Placement({(ls.layer, 0): ("node",) for ls in stats.layers})
    trace = Trace(header=TraceHeader(fingerprint=stats.fingerprint, layers=stats.moe_layers(),
                                     confidence_threshold=0.5),
                  patches={5: np.array([[16]] * 3), 8: np.array([[4]] * 3)},
                  low_confidence={5: np.array([[6], [2], [4]]), 8: np.array([[1], [3], [2]])},
                  labels=(None, None, None), source="<hand trace>")
    return World(topologies={"t": topo}, placements={"t": placement}, stats=stats, trace=trace)


def run(world, strategy, skip=None):
    sc = Scenario(topology="t", condition=LinkCondition(), arrival=Arrival("every-1s", "periodic", rate_hz=1.0),
                  failures=FailureSet(), strategy=strategy, seed=0, images=3,
                  settings=Settings(rpc_overhead_bytes=0, skip_layers=skip))
    res = run_scenario(world, sc)
    assert res.ok == 3 and res.error is None
    return res


def test_skipping_only_layer_8_saves_exactly_its_low_confidence_tokens():
    world = two_layer_world()
    # fp16: a layer-5 token is 96 x 2 = 192 B, a layer-8 token 128 x 2 = 256 B; every patch goes out and comes back.
    split = 2 * (16 * 4 * 192 + 4 * 4 * 256)
    assert split == 32768
    assert run(world, "split").bytes_per_image == pytest.approx(split)
    # Only layer 8: its mean 2 low-confidence patches = 8 tokens x 256 B, each way.
    only8 = run(world, "split-drop-background", skip=(8,))
    assert only8.bytes_per_image == pytest.approx(split - 2 * 8 * 256)  # 28672
    assert only8.patches_dropped_per_image == pytest.approx(2.0)
    # Only layer 5: mean 4 patches = 16 tokens x 192 B, each way.
    only5 = run(world, "split-drop-background", skip=(5,))
    assert only5.bytes_per_image == pytest.approx(split - 2 * 16 * 192)  # 26624
    assert only5.patches_dropped_per_image == pytest.approx(4.0)
    # Every MoE layer: the default (no skip_layers) and both named give the same, the sum of the two savings.
    every = run(world, "split-drop-background")
    assert every.bytes_per_image == pytest.approx(split - 2 * 8 * 256 - 2 * 16 * 192)  # 22528
    assert run(world, "split-drop-background", skip=(5, 8)).bytes_per_image == pytest.approx(every.bytes_per_image)
    # Kept local instead of dropped: the same bytes off the wire, the patches computed on the camera.
    local8 = run(world, "split-local-background", skip=(8,))
    assert local8.bytes_per_image == pytest.approx(only8.bytes_per_image)
    assert local8.patches_kept_local_per_image == pytest.approx(2.0) and local8.patches_dropped_per_image == 0
    # split itself is untouched by skip_layers.
    assert run(world, "split", skip=(8,)).bytes_per_image == pytest.approx(split)


def test_cost_model_skips_the_same_layers_in_expectation():
    world = two_layer_world()
    topo, stats, placement = world.topologies["t"], world.stats, world.placements["t"]
    split = evaluate_placement(topo, stats, placement)
    assert split.bytes == pytest.approx(32768)
    # share 0.5 of the background expert's patches, only at layer 8: 0.5 x 4 patches x 4 tokens x 256 B, each way
    only8 = skip_fractions(stats, share=0.5, layers=(8,))
    assert [f.tolist() for f in only8] == [[0.0], [0.5]]
    drop8 = evaluate_placement(topo, stats, placement, offwire=only8)
    assert drop8.bytes == pytest.approx(32768 - 2 * 8 * 256)
    assert drop8.sites["node"].patches == pytest.approx(16 + 2) and drop8.sites["cam"].patches == 0
    every = evaluate_placement(topo, stats, placement, offwire=skip_fractions(stats, share=0.5))
    assert every.bytes == pytest.approx(32768 - 2 * 8 * 256 - 2 * 32 * 192)
    local8 = evaluate_placement(topo, stats, placement, offwire=only8, offwire_action="local")
    assert local8.bytes == pytest.approx(drop8.bytes)
    assert local8.sites["cam"].patches == pytest.approx(2) and local8.sites["node"].patches == pytest.approx(18)
    with pytest.raises(ValueError, match=r"layer\(s\) 1 not MoE layers"):
        skip_fractions(stats, share=0.5, layers=(1,))
    # The simulator without a trace draws low_confidence_share of those patches per image: the same in the mean.
    stats_only = World(topologies=world.topologies, placements=world.placements, stats=stats)
    sc = Scenario(topology="t", condition=LinkCondition(), arrival=Arrival("every-1s", "periodic", rate_hz=1.0),
                  failures=FailureSet(), strategy="split-drop-background", seed=0, images=400,
                  settings=Settings(rpc_overhead_bytes=0, skip_layers=(8,), low_confidence_share=0.5))
    sim = run_scenario(stats_only, sc)
    assert sim.ok == 400 and sim.bytes_per_image == pytest.approx(drop8.bytes, rel=0.02)


def test_one_rule_for_coordinator_and_simulator():
    from moevit.moe import skip

    assert skip.skip_layers is skip_layers  # the coordinator's module, the simulator and the cost model: one function
    assert skip_layers(None, {1: 8, 5: 8, 8: 8}) == {1, 5, 8}
    assert skip_layers((5, 8), [1, 5, 8]) == {5, 8}
    with pytest.raises(ValueError, match=r"layer\(s\) 3 not MoE layers \(the MoE layers: 1, 5, 8\)"):
        skip_layers((3, 8), [1, 5, 8])
    # the coordinator's rules name exactly the layers skip_layers allows, with or without moe-analyze's background
    assert set(rules_from_options(threshold=0.3, layers=(5, 8))) == skip_layers((5, 8), [1, 5, 8])


def test_rules_from_analysis_keep_to_the_layers_named(tmp_path):
    analysis = tmp_path / "analysis.json"
    analysis.write_text(json.dumps({"layers": {"1": {"background_experts": [0]}, "5": {"background_experts": [2]},
                                               "8": {"background_experts": [1, 3]}}}))
    rules = rules_from_options(threshold=0.3, analysis=str(analysis), layers=(5, 8))
    assert rules == {5: SkipRule(threshold=0.3, background=frozenset({2})),
                     8: SkipRule(threshold=0.3, background=frozenset({1, 3}))}
    assert set(rules_from_options(analysis=str(analysis))) == {1, 5, 8}


@pytest.mark.parametrize("value, key, words", [
    (["x"], "settings.skip_layers[0]", "expected"),
    ([5, -1], "settings.skip_layers[1]", ">= 0"),
    ([8, 8], "settings.skip_layers", "layer 8 listed twice"),
    ([], "settings.skip_layers", ""),
    (5, "settings.skip_layers", ""),
])
def test_bad_skip_layers_name_the_key(value, key, words):
    with pytest.raises(SimConfigError) as e:
        parse_sweep({"settings": {"skip_layers": value}}, "s.yaml")
    assert e.value.key == key and words in str(e.value)
    assert "\n" not in str(e.value)


def test_skip_layers_parse_and_check_against_the_stats():
    sweep = parse_sweep({"settings": {"skip_layers": [8, 5]}}, "s.yaml")
    assert sweep.settings.skip_layers == (5, 8)
    assert parse_sweep({}, "s.yaml").settings.skip_layers is None
    check_skip_layers(sweep, [1, 5, 8])
    bad = parse_sweep({"settings": {"skip_layers": [1, 8]}}, "s.yaml")
    with pytest.raises(SimConfigError, match=r"settings\.skip_layers.*layer\(s\) 1 not MoE layers") as e:
        check_skip_layers(bad, [5, 8])
    assert e.value.key == "settings.skip_layers"


def moe_sim(tmp_path, skip):
    """``moe-sim --no-ray`` on a 2-site topology, stats of MoE layers 5 and 8 and a sweep with ``skip_layers``."""
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps(synthetic_stats(layers=(5, 8), num_experts=2, num_classes=2, image_size=64)))
    topo = tmp_path / "sites.yaml"
    topo.write_text(yaml.safe_dump(TOPOLOGY))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"images": 5, "strategies": ["split-drop-background"],
                                     "settings": {"skip_layers": skip}}))
    return main(["--topology", str(topo), "--stats", str(stats), "--sweep", str(sweep), "--out", str(tmp_path / "o"),
                 "--no-ray", "--no-plots"])


def test_cli_refuses_a_layer_that_is_not_an_moe_layer_of_the_stats(tmp_path, capsys):
    rc = moe_sim(tmp_path, [1, 8])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("moe-sim: error: ")
    assert "settings.skip_layers" in err[0] and "layer(s) 1 not MoE layers" in err[0] and "5, 8" in err[0]
    assert not (tmp_path / "o" / "results.csv").exists()


def test_cli_records_skip_layers_in_the_results(tmp_path):
    assert moe_sim(tmp_path, [8]) == 0
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert doc["meta"]["settings"]["skip_layers"] == [8]
