"""Partitioner benchmark: solve time at scale, heuristic vs MILP gap, and the chosen placement vs the baselines.

1. **Scale**: 9 MoE layers x 16 experts (synthetic mobilevitv2_050 statistics at 256 px, 4 classes, seeded) on
   seeded synthetic star topologies of 20 and 100 sites (``partition.costmodel.synthetic_topology``: the
   coordinator holds the trunk and a fifth of the experts, the other sites share 1.5x the experts' memory), for
   the latency and energy objectives: heuristic time and objective, MILP status, time, objective and dual bound
   within ``--milp-limit`` seconds.
2. **Gap** on instances the MILP solves to optimality (3 layers x 8 experts on 5 sites, seeded, every objective):
   heuristic objective over the MILP optimum, minus one. Gaps everywhere are taken on the part of the objective a
   placement can change (the trunk's time and energy, a constant, removed): otherwise the trunk, which is most of
   an image's latency, would make every placement look close.
3. **Examples**: ``examples/sites.yaml`` and ``examples/sites-lora.yaml``, with synthetic statistics and, when a
   trained model exists at ``runs/demo/moe.safetensors``, statistics profiled from it on digits; plus a variant of
   sites.yaml whose coordinator only has room for the trunk and a quarter of the experts (so the placement has
   to spread). Objective of the chosen placement beside round-robin, random and all-on-coordinator.

Run: ``.venv/bin/python bench/bench_partition.py [--out bench/results/partition.json] [--milp-limit 20]``
(about 2-3 minutes on 2 cores). Writes JSON through ``bench/common.write_result`` and prints the tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, load_average, write_result  # noqa: E402
from moevit.deploy.topology import Topology, load_topology, parse_topology  # noqa: E402
from moevit.partition.costmodel import (  # noqa: E402
    MB,
    OBJECTIVES,
    Stats,
    parse_stats,
    synthetic_stats,
    synthetic_topology,
)
from moevit.partition.placement import Problem, heuristic_assignment, milp_assignment, place  # noqa: E402

DEMO_MODEL = REPO_ROOT / "runs" / "demo" / "moe.safetensors"


def scale(milp_limit: float) -> list[dict[str, Any]]:
    stats = parse_stats(synthetic_stats(num_experts=16, num_classes=4, image_size=256, seed=1))
    rows = []
    for n_sites in (20, 100):
        topo = synthetic_topology(n_sites, stats, seed=0)
        for objective in ("latency", "energy"):
            p = Problem.build(topo, stats, objective=objective)
            t0 = time.perf_counter()
            h = heuristic_assignment(p, seed=0)
            h_s = time.perf_counter() - t0
            h_v = p.value(h) if h is not None else None
            m = milp_assignment(p, time_limit=milp_limit)
            row = {
                "sites": n_sites, "layers": 9, "experts_per_layer": 16, "objective": objective,
                "binaries": p.num_items * p.num_sites, "constant": p.const, "heuristic_s": h_s,
                "heuristic_value": h_v, "milp_status": m.status, "milp_s": m.seconds, "milp_value": m.value,
                "milp_bound": m.bound, "heuristic_vs_milp": _gap(h_v, m.value, p.const),
                "heuristic_vs_bound": _gap(h_v, m.bound, p.const),
            }
            rows.append(row)
            print(f"  {n_sites:>3} sites {objective:<8} heuristic {h_s:6.2f} s | MILP {m.status} {m.seconds:6.2f} s"
                  f" | heuristic/MILP-1 {_pct(row['heuristic_vs_milp'])} | heuristic/bound-1 "
                  f"{_pct(row['heuristic_vs_bound'])}", flush=True)
    return rows


def gap(seeds: int, milp_limit: float) -> list[dict[str, Any]]:
    rows = []
    for seed in range(seeds):
        stats = parse_stats(synthetic_stats(layers=(1, 5, 8), num_experts=8, num_classes=4, seed=seed))
        topo = synthetic_topology(5, stats, seed=seed, coordinator_share=0.3, memory_slack=1.3,
                                  bandwidth_mbps=(5.0, 200.0), coordinator_gflops=1.0)
        for objective in OBJECTIVES:
            p = Problem.build(topo, stats, objective=objective)
            t0 = time.perf_counter()
            h = heuristic_assignment(p, seed=0)
            h_s = time.perf_counter() - t0
            m = milp_assignment(p, time_limit=milp_limit)
            h_v = p.value(h) if h is not None else None
            rows.append({"seed": seed, "objective": objective, "heuristic_s": h_s, "milp_s": m.seconds,
                         "milp_status": m.status, "heuristic_value": h_v, "milp_value": m.value,
                         "milp_bound": m.bound, "constant": p.const,
                         "gap": _gap(h_v, m.value, p.const) if m.status == "optimal" else None})
    return rows


def _tight(topo: Topology, stats: Stats, share: float) -> Topology:
    """``topo`` with the coordinator's memory cut to the trunk, a buffer and ``share`` of the experts."""
    data: dict[str, Any] = {
        "coordinator": topo.coordinator,
        "sites": {n: {"address": s.address, "device": {
            "gflops": s.device.gflops, "memory_mb": s.device.memory_mb, "active_w": s.device.active_w,
            "idle_w": s.device.idle_w}} for n, s in topo.sites.items()},
        "links": [{"between": [lk.a, lk.b], "bandwidth_mbps": lk.bandwidth_mbps, "latency_ms": lk.latency_ms,
                   "loss": lk.loss, "tx_nj_per_bit": lk.tx_nj_per_bit, "rx_nj_per_bit": lk.rx_nj_per_bit,
                   "duty_cycle": lk.duty_cycle} for lk in topo.links],
    }
    need = stats.trunk_weight_bytes + stats.buffer_bytes + share * stats.expert_bytes_total
    data["sites"][topo.coordinator]["device"]["memory_mb"] = need / MB
    return parse_topology(data, f"{topo.path} (coordinator memory {need / MB:.2f} MB)")


def demo_stats() -> Stats | None:
    if not DEMO_MODEL.is_file():
        return None
    import torch
    from moevit.partition.profile import profile_model

    from moevit.checkpoint import load_checkpoint
    from moevit.data import open_dataset

    torch.set_num_threads(1)
    model = load_checkpoint(DEMO_MODEL)
    data = open_dataset("digits", image_size=model.config.image_size, split="eval", seed=0)
    return parse_stats(profile_model(model, data, images=256, count_dense=False), f"{DEMO_MODEL} on digits")


def examples(milp_limit: float) -> list[dict[str, Any]]:
    synth = parse_stats(synthetic_stats(num_experts=16, num_classes=4, image_size=256, seed=0), "synthetic")
    stats_sets = [("synthetic 9x16 @256px", synth)]
    real = demo_stats()
    if real is not None:
        stats_sets.append((f"runs/demo/moe.safetensors on digits ({len(real.layers)} MoE layers)", real))
    rows = []
    for stats_name, stats in stats_sets:
        sites = load_topology(REPO_ROOT / "examples" / "sites.yaml")
        topologies = [("examples/sites.yaml", sites),
                      ("examples/sites-lora.yaml", load_topology(REPO_ROOT / "examples" / "sites-lora.yaml")),
                      ("sites.yaml, coordinator fits 25% of experts", _tight(sites, stats, 0.25))]
        for topo_name, topo in topologies:
            for objective in ("latency", "energy", "bytes"):
                r = place(topo, stats, objective=objective, time_limit=milp_limit)
                row = {"topology": topo_name, "stats": stats_name, "objective": objective, "method": r.method,
                       "seconds": r.seconds, "chosen": r.value,
                       "chosen_latency_ms": r.cost.latency_s * 1e3, "chosen_energy_mj": r.cost.energy_j * 1e3,
                       "chosen_kb": r.cost.bytes / 1e3,
                       "experts_per_site": {s.site: s.experts for s in r.cost.sites.values()}}
                for b in r.baselines:
                    key = b.name.split(" ")[0]
                    row[key] = b.value if b.feasible else None
                    row[f"{key}_feasible"] = b.feasible
                rows.append(row)
    return rows


def _gap(value: float | None, reference: float | None, constant: float) -> float | None:
    """value / reference - 1 on the part of the objective a placement changes (the trunk's constant removed)."""
    if value is None or reference is None or reference - constant <= 0:
        return None
    return (value - reference) / (reference - constant)


def _pct(v: float | None) -> str:
    return "   n/a " if v is None else f"{100 * v:+6.2f}%"


def _fmt(objective: str, v: float | None) -> str:
    if v is None:
        return "infeasible"
    return {"latency": f"{v * 1e3:.2f} ms", "energy": f"{v * 1e3:.1f} mJ", "bytes": f"{v / 1e3:.1f} kB"}[objective]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "partition.json"))
    ap.add_argument("--milp-limit", type=float, default=15.0, help="MILP time limit at scale (s)")
    ap.add_argument("--gap-seeds", type=int, default=5)
    ap.add_argument("--gap-limit", type=float, default=15.0, help="MILP time limit on the gap instances (s)")
    args = ap.parse_args(argv)
    loadavg_before = load_average()
    t0 = time.perf_counter()
    print("1. scale: 9 layers x 16 experts")
    scale_rows = scale(args.milp_limit)
    print("2. heuristic vs MILP optimum: 3 layers x 8 experts on 5 sites")
    gap_rows = gap(args.gap_seeds, args.gap_limit)
    print("3. examples")
    example_rows = examples(10.0)

    lines = ["", "### Solve time, 9 MoE layers x 16 experts (synthetic, seeded)", "",
             "| sites | objective | heuristic s | MILP (limit) | MILP s | heuristic vs MILP | heuristic vs bound |",
             "|---:|---|---:|---|---:|---:|---:|"]
    for r in scale_rows:
        lines.append(f"| {r['sites']} | {r['objective']} | {r['heuristic_s']:.2f} | {r['milp_status']} | "
                     f"{r['milp_s']:.1f} | {_pct(r['heuristic_vs_milp'])} | {_pct(r['heuristic_vs_bound'])} |")
    solved = [r for r in gap_rows if r["gap"] is not None]
    lines += ["", f"### Heuristic vs MILP optimum ({len(solved)} of {len(gap_rows)} instances solved to optimality)",
              "", "| objective | instances | mean gap | max gap | heuristic s (mean) | MILP s (mean) |",
              "|---|---:|---:|---:|---:|---:|"]
    for objective in OBJECTIVES:
        rs = [r for r in solved if r["objective"] == objective]
        if rs:
            gaps = [r["gap"] for r in rs]
            lines.append(f"| {objective} | {len(rs)} | {_pct(sum(gaps) / len(gaps))} | {_pct(max(gaps))} | "
                         f"{sum(r['heuristic_s'] for r in rs) / len(rs):.2f} | "
                         f"{sum(r['milp_s'] for r in rs) / len(rs):.2f} |")
    lines += ["", "### Chosen placement vs baselines", "",
              "| topology | stats | objective | chosen | round-robin | random | all-on-coordinator | method |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for r in example_rows:
        o = r["objective"]
        lines.append(f"| {r['topology']} | {r['stats']} | {o} | {_fmt(o, r['chosen'])} | "
                     f"{_fmt(o, r['round-robin'])} | {_fmt(o, r['random'])} | {_fmt(o, r['all-on-coordinator'])} | "
                     f"{r['method']} |")
    table = "\n".join(lines)
    print(table)
    total = time.perf_counter() - t0
    out = write_result(args.out, {
        "benchmark": "partition", "seconds": total, "loadavg_before": loadavg_before,
        "settings": {"milp_limit_s": args.milp_limit, "gap_seeds": args.gap_seeds},
        "scale": scale_rows, "gap": gap_rows, "examples": example_rows, "table_md": table,
    })
    print(f"\nwrote {out} ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
