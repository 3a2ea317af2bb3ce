"""The simulator's sweeps on a local Ray: one Ray session (2 CPUs) shared by every test here, since starting Ray
costs seconds and most of a gigabyte."""

from __future__ import annotations

import json

import pytest
import ray
import yaml
from moevit.deploy.topology import default_placement, load_topology
from moevit.partition.costmodel import parse_stats, synthetic_stats
from moevit.sim.cli import main
from moevit.sim.config import Arrival, FailureSet, LinkCondition, Scenario, Settings
from moevit.sim.engine import World
from moevit.sim.sweep import RaySession, run_local, run_sweep

# a local Ray cluster starts in each (ray.init alone takes seconds)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for every test here: ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False), shut
    down after this module (no other module uses Ray: left running to the end of the session, its GCS, raylet,
    agents and idle workers took CPU and most of a gigabyte from every test after this one)."""
    with RaySession(num_cpus=2, log_to_driver=False):
        yield


@pytest.fixture(scope="module")
def world():
    topo = load_topology("examples/sites.yaml")
    stats = parse_stats(synthetic_stats(layers=(1, 5, 8), num_experts=8, num_classes=4, image_size=128, seed=5),
                        "<ray test stats>")
    return World(topologies={"base": topo}, placements={"base": default_placement(topo, stats.moe_layers())},
                 stats=stats)


def _four():
    conds = (LinkCondition("nominal"), LinkCondition("slow", bandwidth_scale=0.05))
    return [Scenario("base", c, Arrival("p", "poisson", rate_hz=2.0), FailureSet(), s, 0, 150, Settings())
            for c in conds for s in ("split", "offload-image")]


def test_sweep_of_four_scenarios_on_local_ray(ray_cluster, world):
    scenarios = _four()
    results = run_sweep(world, scenarios, progress=False)
    assert [r.params["id"] for r in results] == [s.id for s in scenarios]
    assert all(r.error is None and r.ok == 150 for r in results)
    # the same scenarios in this process give the same numbers: runs are deterministic wherever they execute
    local = run_local(world, scenarios)
    for a, b in zip(results, local, strict=True):
        assert a.latencies_s == b.latencies_s and a.bytes_per_image == b.bytes_per_image
    slow_split, fast_split = results[2], results[0]
    assert slow_split.latency_mean_s > fast_split.latency_mean_s


def test_a_failing_task_is_reported_and_the_rest_finish(ray_cluster, world):
    good = _four()[0]
    bad = Scenario("nope", good.condition, good.arrival, good.failures, "split", 0, 10, Settings())
    results = run_sweep(world, [good, bad, good], progress=False)
    assert [r.error is None for r in results] == [True, False, True]
    assert "KeyError" in results[1].error and results[1].params["id"].startswith("nope/")


def test_cli_uses_the_running_ray(ray_cluster, tmp_path, capsys):
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps(synthetic_stats(layers=(1, 5, 8), num_experts=8, num_classes=4, image_size=128)))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"strategies": ["local-moe", "split"], "seeds": 2, "images": 30,
                                     "conditions": [{"name": "nominal"}, {"name": "lossy", "loss": 0.1}]}))
    topo = yaml.safe_load(open("examples/sites.yaml"))
    topo["model"] = None  # synthetic stats: no model file to check them against
    (tmp_path / "sites.yaml").write_text(yaml.safe_dump(topo))
    rc = main(["--topology", str(tmp_path / "sites.yaml"), "--stats", str(stats), "--sweep", str(sweep), "--out",
               str(tmp_path / "out"), "--no-plots"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "8 scenarios" in cap.err and "Ray (local, 2 CPUs)" in cap.out  # joined, not started
    assert ray.is_initialized()  # it joined the session and left it running
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(rows) == 9


def test_a_local_ray_that_times_out_at_startup_is_started_again_once(monkeypatch):
    """Ray's node sometimes times out during startup (its GCS did not answer within 30 s, once in a full test run
    here): RaySession starts it again once; any other failure, or a second timeout, is raised. Ray's own start is
    replaced here, since a startup timeout cannot be caused on demand."""
    from moevit.sim import sweep

    calls: list[str] = []
    timeout = Exception("The current node timed out during startup. This could happen because ...")

    def init(fails: list[Exception]):
        def fake(**kw):
            calls.append("init")
            if fails:
                raise fails.pop(0)
        return fake

    monkeypatch.setattr(sweep.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(sweep.ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(sweep.ray, "init", init([timeout]))
    with RaySession(num_cpus=1):
        assert calls == ["init", "shutdown", "init"]
    calls.clear()
    monkeypatch.setattr(sweep.ray, "init", init([timeout, timeout]))
    with pytest.raises(Exception, match="timed out during startup"), RaySession(num_cpus=1):
        pass
    assert calls == ["init", "shutdown", "init"]
    calls.clear()
    monkeypatch.setattr(sweep.ray, "init", init([RuntimeError("no space left on device")]))
    with pytest.raises(RuntimeError, match="no space"), RaySession(num_cpus=1):
        pass
    assert calls == ["init"]
