"""Adaptive vs each fixed strategy under a link that changes mid-run, in the simulator (issue 19, step 4: the
simulator's side only; the emulated side on real processes is not done).

    python bench/bench_adaptive_sim.py                       # -> bench/results/adaptive_sim.json + .png

A camera of 2 GFLOP/s (Pi-Zero class, memory for the whole model) and one hub of 20 GFLOP/s, one link whose rate
and delay follow a schedule (20 Mbit/s 4 ms, then 0.3 Mbit/s 50 ms, then 20 Mbit/s 4 ms again, PHASE_S each),
one 256-px image a second, synthetic routing statistics of a mobilevitv2_050 MoE-8 at layers 1, 5, 8. Strategies:
local-moe, offload-image, split (default placement: experts round-robin over camera and hub) and adaptive
(``moevit.partition.policy`` with the topology's hysteresis, deciding on the link figures of the moment). Per phase
and over the run: p95 latency and the camera's active energy per image (compute + radio; idle power is paid
whatever the strategy); which strategy adaptive used per phase.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
try:
    from bench.common import load_average, write_result
except ImportError:  # run as a script from bench/
    from common import load_average, write_result

from moevit.deploy.topology import default_placement, parse_topology
from moevit.partition.costmodel import parse_stats, synthetic_stats
from moevit.sim.config import Arrival, FailureSet, LinkCondition, Scenario, Settings
from moevit.sim.engine import World, run_scenario

STRATEGIES = ("local-moe", "offload-image", "split", "adaptive")


def topology(margin: float, consecutive: int):
    return parse_topology({
        "coordinator": "camera", "fallback": "fail",
        "adaptive": {"objective": "latency", "margin": margin, "consecutive": consecutive},
        "sites": {"camera": {"address": "10.0.0.1:1", "device": {"gflops": 2, "memory_mb": 512, "active_w": 3.0,
                                                                 "idle_w": 0.8}},
                  "hub": {"address": "10.0.0.2:1", "device": {"gflops": 20, "memory_mb": 2048, "active_w": 10.0,
                                                              "idle_w": 3.0}}},
        "links": [{"between": ["camera", "hub"], "bandwidth_mbps": 20, "latency_ms": 4, "tx_nj_per_bit": 50,
                   "rx_nj_per_bit": 25}],
    }, "<adaptive bench>")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase-s", type=float, default=60.0)
    ap.add_argument("--slow-mbps", type=float, default=0.3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--margin", type=float, default=0.1)
    ap.add_argument("--consecutive", type=int, default=3)
    ap.add_argument("--out", default="bench/results/adaptive_sim.json")
    args = ap.parse_args()
    topo = topology(args.margin, args.consecutive)
    stats = parse_stats(synthetic_stats(layers=(1, 5, 8), num_experts=8, num_classes=4, image_size=256, seed=3),
                        "<synthetic mobilevitv2_050 MoE-8>")
    world = World(topologies={"t": topo}, placements={"t": default_placement(topo, stats.moe_layers())},
                  stats=stats)
    P = args.phase_s
    schedule = ((0.0, 20.0, 4.0), (P, args.slow_mbps, 50.0), (2 * P, 20.0, 4.0))
    phases = [(0.0, P, "20 Mbit/s 4 ms"), (P, 2 * P, f"{args.slow_mbps:g} Mbit/s 50 ms"), (2 * P, 3 * P,
                                                                                           "20 Mbit/s 4 ms")]
    settings = Settings(link_schedule=schedule)
    n = int(3 * P)  # one image a second
    runs: dict[str, list] = {}
    for strategy in STRATEGIES:
        runs[strategy] = [run_scenario(world, Scenario(
            topology="t", condition=LinkCondition(), arrival=Arrival("1-hz", "periodic", rate_hz=1.0),
            failures=FailureSet(), strategy=strategy, seed=seed, images=n, settings=settings))
            for seed in range(args.seeds)]

    def table(lo: float, hi: float) -> dict[str, dict]:
        out = {}
        for strategy, rs in runs.items():
            lat, used = [], {}
            for r in rs:
                for i, (t, v) in enumerate(zip(r.arrivals_s, r.latencies_s, strict=True)):
                    if lo <= t < hi:
                        lat.append(v)
                        if r.image_strategies:
                            used[r.image_strategies[i]] = used.get(r.image_strategies[i], 0) + 1
            out[strategy] = {"images": len(lat), "latency_p95_s": float(np.percentile(lat, 95)) if lat else None,
                             "latency_mean_s": float(np.mean(lat)) if lat else None,
                             **({"used": used} if used else {})}
        return out

    per_phase = [{"phase": name, "from_s": lo, "to_s": hi, "strategies": table(lo, hi)} for lo, hi, name in phases]
    whole = table(0.0, 3 * P)
    for strategy, rs in runs.items():
        whole[strategy]["camera_active_j_per_image"] = float(np.mean([r.sites["camera"].active_j_per_image
                                                                      for r in rs]))
        whole[strategy]["all_sites_active_j_per_image"] = float(np.mean(
            [sum(s.active_j_per_image for s in r.sites.values()) for r in rs]))
    fixed = [s for s in STRATEGIES if s != "adaptive"]
    checks = {
        "adaptive_within_5pct_of_best_fixed_per_phase": [
            ph["strategies"]["adaptive"]["latency_p95_s"] <= 1.05 * min(ph["strategies"][s]["latency_p95_s"]
                                                                        for s in fixed) for ph in per_phase],
        "adaptive_p95_beats_every_fixed_overall": whole["adaptive"]["latency_p95_s"] < min(
            whole[s]["latency_p95_s"] for s in fixed),
        "adaptive_all_sites_energy_beats_every_fixed": whole["adaptive"]["all_sites_active_j_per_image"] < min(
            whole[s]["all_sites_active_j_per_image"] for s in fixed),
    }
    payload = {"what": "adaptive vs fixed strategies under a link schedule, simulator only (moe-sim engine)",
               "command": "python bench/bench_adaptive_sim.py " + " ".join(sys.argv[1:]),
               "schedule": [{"from_s": a, "bandwidth_mbps": b, "latency_ms": c} for a, b, c in schedule],
               "seeds": args.seeds, "images_per_seed": n, "hysteresis": {"margin": args.margin,
                                                                         "consecutive": args.consecutive},
               "per_phase": per_phase, "whole_run": whole, "checks": checks, "load_average": load_average()}
    path = write_result(args.out, payload)
    for ph in per_phase:
        print(ph["phase"], {s: round(v["latency_p95_s"], 3) for s, v in ph["strategies"].items()},
              ph["strategies"]["adaptive"].get("used"))
    print("whole run p95", {s: round(v["latency_p95_s"], 3) for s, v in whole.items()})
    print("active J/img (all sites)", {s: round(v["all_sites_active_j_per_image"], 3) for s, v in whole.items()})
    print(checks)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4))
        for strategy, rs in runs.items():
            r = rs[0]
            ax.plot(r.arrivals_s, r.latencies_s, label=strategy, lw=1)
        for lo, _, _ in phases[1:]:
            ax.axvline(lo, color="grey", ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("latency per image (s)")
        ax.set_title(f"simulated: link 20 -> {args.slow_mbps:g} -> 20 Mbit/s, seed 0")
        ax.legend()
        fig.tight_layout()
        fig.savefig(Path(path).with_suffix(".png"), dpi=110)
    except ImportError:
        pass
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
