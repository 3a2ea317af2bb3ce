"""In-process CPU latency: dense mobilevitv2_050 vs per-patch MoE versions of it, batch 1 and batch 8.

    .venv/bin/python bench/bench_inprocess.py [--quick] [--out bench/results/inprocess.json]

Every model is built from a fixed seed with 10 classes, put in eval mode and channels_last, and run under
``torch.inference_mode`` on a 256×256 input (channels_last too). The MoE models use the default
:class:`~moevit.MoEConfig` (top-1, renorm gate, residual correction) with E = 16 experts of K = 64 hidden units in
the named transformer layers. Their routers are randomly initialised, so which expert a patch gets is arbitrary, but
each patch still runs exactly one expert of K units: the compute is what a trained model does. How many distinct
experts the input hits (each one a separate small matmul) is recorded per layer, as it can move latency a little.

Timing is interleaved: after warm-up, each round times one forward of every model (round-robin, the starting model
rotating), so load drift on a shared machine hits every model alike. Batch 1 and batch 8 are two such passes.
The JSON holds all raw timings, p50/p90/mean per (model, batch), MoE/dense ratios of the medians, parameters and
MACs per image (:func:`moevit.flops.count_macs` at 256), plus machine info (see ``bench/common.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

from moevit import MoEConfig, create_model
from moevit.flops import count_macs, count_params
from moevit.moe.routing import record_routing

try:  # ``python -m bench.bench_inprocess`` from the repo root
    from bench.common import load_average, summarize, time_interleaved, write_result
except ImportError:  # ``python bench/bench_inprocess.py``: bench/ is sys.path[0]
    from common import load_average, summarize, time_interleaved, write_result

ARCH = "mobilevitv2_050"
NUM_CLASSES = 10
IMAGE_SIZE = 256
NUM_EXPERTS = 16
EXPERT_HIDDEN = 64
MOE_LAYER_SETS: tuple[tuple[int, ...], ...] = ((8,), (1, 5, 8), (1, 3, 5, 7), (2, 4, 6, 8))
DENSE = "dense"
SEED = 0


def model_name(layers: tuple[int, ...] | None) -> str:
    return DENSE if layers is None else "moe[" + ",".join(str(i) for i in layers) + "]"


def build(layers: tuple[int, ...] | None) -> torch.nn.Module:
    torch.manual_seed(SEED)
    moe = None if layers is None else MoEConfig(layers=layers, num_experts=NUM_EXPERTS, expert_hidden=EXPERT_HIDDEN)
    return create_model(ARCH, num_classes=NUM_CLASSES, moe=moe).eval()


def experts_used(model: torch.nn.Module, x: torch.Tensor) -> dict[str, list[int]]:
    """Per MoE layer: how many distinct experts the patches of each image use, after one forward on ``x``."""
    if not hasattr(model, "moe_layers"):
        return {}
    with record_routing(model) as rec:
        model(x)
    out: dict[str, list[int]] = {}
    for i in model.moe_layers():
        r = rec.last.get(i)
        out[str(i)] = [] if r is None else [int(torch.unique(r.expert_idx_BNK[b]).numel()) for b in range(x.shape[0])]
    return out


def fmt_count(n: int) -> str:
    return f"{n / 1e9:.3f} G" if n >= 1e9 else f"{n / 1e6:.3f} M"


def markdown_table(rows: list[dict[str, Any]], batches: tuple[int, int]) -> str:
    b1, b8 = batches
    head = ["model", "params", "MACs/img", f"b{b1} p50 ms", f"b{b1} p90 ms", f"b{b8} p50 ms/batch",
            f"b{b1} ratio", f"b{b8} ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        s1, s8 = r["latency"][str(b1)], r["latency"][str(b8)]
        lines.append("| " + " | ".join([
            f"`{r['name']}`", fmt_count(r["params"]), fmt_count(r["macs_per_image"]),
            f"{s1['p50']:.2f}", f"{s1['p90']:.2f}", f"{s8['p50']:.1f}",
            f"{r['ratio_p50'][str(b1)]:.3f}", f"{r['ratio_p50'][str(b8)]:.3f}",
        ]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few rounds (smoke test, numbers are noisy)")
    p.add_argument("--out", default="bench/results/inprocess.json", help="JSON output path")
    p.add_argument("--rounds-b1", type=int, default=None, help="timed rounds at batch 1 (default 30, quick 5)")
    p.add_argument("--rounds-b8", type=int, default=None, help="timed rounds at batch 8 (default 10, quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds before each pass (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = p.parse_args(argv)

    rounds = {1: args.rounds_b1 or (5 if args.quick else 30), 8: args.rounds_b8 or (2 if args.quick else 10)}
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    loadavg_before = load_average()
    warnings: list[str] = []
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    if loadavg_before and loadavg_before[0] + threads > cores + 0.5:
        hint = "; multi-threaded timings stall when one thread is descheduled, try --threads 1" if threads > 1 else ""
        warnings.append(f"machine busy: 1-min load {loadavg_before[0]} with {cores} cores and {threads} torch "
                        f"thread(s), timings include waiting for the CPU{hint}")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)

    layer_sets: list[tuple[int, ...] | None] = [None, *MOE_LAYER_SETS]
    models = {model_name(ls): build(ls) for ls in layer_sets}
    # Counts on the NCHW model (count_macs makes its own input), before the channels_last conversion.
    params = {n: count_params(m) for n, m in models.items()}
    macs = {n: count_macs(m, IMAGE_SIZE) for n, m in models.items()}
    for m in models.values():
        m.to(memory_format=torch.channels_last)

    gen = torch.Generator().manual_seed(SEED)
    inputs = {b: torch.randn(b, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen).contiguous(memory_format=torch.channels_last)
              for b in rounds}

    times: dict[int, dict[str, list[float]]] = {}
    used: dict[str, dict[str, Any]] = {n: {} for n in models}
    passes: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for b, x in inputs.items():
            for n, m in models.items():
                used[n][str(b)] = experts_used(m, x)
            fns = {n: (lambda m=m, x=x: m(x)) for n, m in models.items()}
            print(f"batch {b}: {warmup} warm-up + {rounds[b]} timed rounds over {len(fns)} models ...",
                  file=sys.stderr, flush=True)
            la, wall0, cpu0 = load_average(), time.perf_counter(), time.process_time()
            times[b] = time_interleaved(fns, rounds=rounds[b], warmup=warmup)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            # CPU seconds this process got per wall second: well under the thread count = it was starved.
            passes[str(b)] = {"loadavg_before": la, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                              "cpu_per_wall": round(cpu / wall, 3)}

    stats = {b: {n: summarize(t) for n, t in per.items()} for b, per in times.items()}
    rows: list[dict[str, Any]] = []
    for ls in layer_sets:
        n = model_name(ls)
        rows.append({
            "name": n,
            "moe_layers": list(ls) if ls else [],
            "params": params[n],
            "macs_per_image": macs[n],
            "macs_ratio": macs[n] / macs[DENSE],
            "latency": {str(b): stats[b][n] for b in rounds},
            "ratio_p50": {str(b): stats[b][n]["p50"] / stats[b][DENSE]["p50"] for b in rounds},
            "experts_used_per_image": used[n],
            "times_ms": {str(b): [round(t, 4) for t in times[b][n]] for b in rounds},
        })

    table = markdown_table(rows, (1, 8))
    payload = {
        "benchmark": "inprocess",
        "description": "in-process CPU latency (ms per forward) of dense vs MoE mobilevitv2_050, eval, "
                       "channels_last, torch.inference_mode, interleaved rounds",
        "settings": {
            "arch": ARCH, "num_classes": NUM_CLASSES, "image_size": IMAGE_SIZE, "num_experts": NUM_EXPERTS,
            "expert_hidden": EXPERT_HIDDEN, "moe_config": MoEConfig(num_experts=NUM_EXPERTS,
                                                                    expert_hidden=EXPERT_HIDDEN).to_dict(),
            "moe_layer_sets": [list(s) for s in MOE_LAYER_SETS], "batches": list(rounds), "rounds": rounds,
            "warmup_rounds": warmup, "quick": args.quick, "seed": SEED, "memory_format": "channels_last",
            "mode": "eval + torch.inference_mode", "router": "randomly initialised (top-1 per patch)",
        },
        "loadavg_before": loadavg_before,
        "passes": passes,
        "warnings": warnings,
        "models": rows,
        "table_markdown": table,
    }
    out = write_result(args.out, payload)
    print(table)
    print(f"\nwrote {out} (load average before {loadavg_before}, after {load_average()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
