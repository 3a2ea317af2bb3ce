"""Speed of the simulator: simulated images per second per core, and the speed-up of a Ray sweep on 2 cores over 1.

    .venv/bin/python bench/bench_sim.py [--quick] [--out bench/results/sim.json]
    .venv/bin/python bench/bench_sim.py --emulation-runs 5 [--emulation-out bench/results/sim_emulation.json]

Workload: ``examples/sites.yaml`` (camera + two Pi-class sites, Wi-Fi links) with synthetic routing statistics of a
mobilevitv2_050 MoE at 256 px (:func:`partition.costmodel.synthetic_stats`: MoE layers 1, 3, 5, 7, 16 experts each,
8 classes), default placement, Poisson arrivals at 1 image/s, no failures.

1. **Images per second per core**: one scenario of many images per strategy, in this process (one core), best of 3
   runs; events per second alongside (a split image is ~40 events at 4 MoE layers and 3 sites).
2. **Sweep speed-up**: the same sweep (conditions x seeds x strategies, a few thousand images each) on a local Ray
   started with ``num_cpus=1``, then, in a separate ``ray.init`` session, with ``num_cpus=2``; each session first
   runs a tiny warm-up sweep so worker start-up is not timed. Speed-up = wall time on 1 CPU / wall time on 2.
   The machine's load average before and after is recorded: a busy machine shrinks the speed-up.
3. With ``--emulation-runs N`` (instead of 1 and 2): ``moe-sim --emulate`` on ``examples/sites.yaml`` and the demo
   model (``make demo`` builds it), 40 digits images, links scaled to 2 Mbit/s, N times; every run's measured and
   simulated mean latency per strategy and the relative error go to ``bench/results/sim_emulation.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import ray
from moevit.deploy.topology import default_placement, load_topology
from moevit.partition.costmodel import parse_stats, synthetic_stats
from moevit.sim.config import STRATEGIES, Arrival, FailureSet, LinkCondition, Scenario, Settings
from moevit.sim.engine import World, run_scenario
from moevit.sim.sweep import run_sweep

try:  # ``python -m bench.bench_sim`` from the repo root
    from bench.common import load_average, write_result
except ImportError:  # ``python bench/bench_sim.py``: bench/ is sys.path[0]
    from common import load_average, write_result

ARRIVAL = Arrival("poisson-1hz", "poisson", rate_hz=1.0)


def make_world() -> World:
    topo = load_topology("examples/sites.yaml")
    stats = parse_stats(synthetic_stats(layers=(1, 3, 5, 7), num_experts=16, num_classes=8, image_size=256, seed=0),
                        "<bench stats>")
    return World(topologies={"base": topo}, placements={"base": default_placement(topo, stats.moe_layers())},
                 stats=stats)


def images_per_second(world: World, images: int, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for strategy in STRATEGIES:
        sc = Scenario("base", LinkCondition(), ARRIVAL, FailureSet(), strategy, 0, images, Settings())
        best = float("inf")
        events = 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = run_scenario(world, sc)
            best = min(best, time.perf_counter() - t0)
            events = res.events
        out[strategy] = {"images": images, "seconds": best, "images_per_s": images / best,
                         "events": events, "events_per_s": events / best}
        print(f"{strategy:<24} {images / best:>10.0f} images/s  {events / best:>10.0f} events/s", flush=True)
    return out


def sweep_scenarios(images: int, seeds: int) -> list[Scenario]:
    conds = (LinkCondition("nominal"), LinkCondition("bw-x0.1", bandwidth_scale=0.1),
             LinkCondition("lossy", loss=0.05))
    return [Scenario("base", c, ARRIVAL, FailureSet(), s, seed, images, Settings())
            for c in conds for seed in range(seeds) for s in ("split", "split-drop-background")]


def timed_sweep(world: World, scenarios: list[Scenario], cpus: int) -> float:
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        run_sweep(world, scenarios[: 2 * cpus], progress=False)  # warm-up: workers started, modules imported
        t0 = time.perf_counter()
        results = run_sweep(world, scenarios, progress=False)
        seconds = time.perf_counter() - t0
        assert all(r.error is None for r in results)
        return seconds
    finally:
        ray.shutdown()


def emulation_runs(runs: int, out: str, images: int = 40, bandwidth_mbps: float = 2.0) -> int:
    import dataclasses
    import tempfile

    from moevit.sim.emulate import EmulationOptions, emulate, format_report

    records = []
    for i in range(runs):
        load = load_average()
        with tempfile.TemporaryDirectory() as tmp:
            rep = emulate(EmulationOptions(topology="examples/sites.yaml", out=tmp, images=images,
                                           bandwidth_mbps=bandwidth_mbps), log=lambda s: None)
        print(f"run {i + 1}/{runs} (load {load}):\n{format_report(rep)}", flush=True)
        records.append({"loadavg_before": load, "checks": [dataclasses.asdict(c) for c in rep.checks],
                        "calibration": dataclasses.asdict(rep.calibration), "rpc_overhead_s": rep.rpc_overhead_s,
                        "rpc_overhead_bytes": rep.rpc_overhead_bytes, "links": rep.links})
    errors = {s: [next(c["rel_error"] for c in r["checks"] if c["strategy"] == s) for r in records]
              for s in ("split", "local-moe")}
    payload = {"benchmark": "sim-emulation", "topology": "examples/sites.yaml", "images": images,
               "bandwidth_mbps": bandwidth_mbps, "runs": records,
               "rel_error": {s: {"each": e, "mean_abs": sum(map(abs, e)) / len(e), "max_abs": max(map(abs, e))}
                             for s, e in errors.items()}}
    path = write_result(out, payload)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images (a smoke run, not for the record)")
    ap.add_argument("--out", default="bench/results/sim.json")
    ap.add_argument("--emulation-runs", type=int, default=0, help="run the emulation check N times instead")
    ap.add_argument("--emulation-out", default="bench/results/sim_emulation.json")
    args = ap.parse_args(argv)
    if args.emulation_runs:
        return emulation_runs(args.emulation_runs, args.emulation_out)
    world = make_world()
    n_single = 2_000 if args.quick else 20_000
    sweep_images, seeds = (300, 2) if args.quick else (3_000, 4)
    load_before = load_average()
    print(f"1. one scenario of {n_single} images per strategy, this process (one core):")
    single = images_per_second(world, n_single, 1 if args.quick else 3)
    scenarios = sweep_scenarios(sweep_images, seeds)
    print(f"2. a sweep of {len(scenarios)} scenarios x {sweep_images} images on a local Ray:")
    t1 = timed_sweep(world, scenarios, 1)
    print(f"   num_cpus=1: {t1:.2f} s", flush=True)
    t2 = timed_sweep(world, scenarios, 2)
    print(f"   num_cpus=2: {t2:.2f} s  -> speed-up {t1 / t2:.2f}x", flush=True)
    payload = {
        "benchmark": "sim",
        "workload": {"topology": "examples/sites.yaml", "stats": "synthetic_stats(layers=(1,3,5,7), num_experts=16, "
                     "num_classes=8, image_size=256, seed=0)", "arrival": "poisson 1 image/s", "placement": "default"},
        "images_per_s_per_core": single,
        "split_images_per_s_per_core": single["split"]["images_per_s"],
        "sweep": {"scenarios": len(scenarios), "images_each": sweep_images, "seconds_1cpu": t1,
                  "seconds_2cpu": t2, "speedup_2_over_1": t1 / t2},
        "loadavg_before": load_before,
        "quick": args.quick,
    }
    path = write_result(args.out, payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
