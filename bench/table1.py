"""The paper's Table 1 / Table 2 protocol at small scale, on scikit-learn's bundled digits (``make results``).

Trains the dense MobileViTV2-0.5 (64 px), converts it to MoE-2, MoE-8 and MoE-16 at layer 8 and to the layer sets
[1,5,8] and [2,4,6,8] (E = 8), fine-tunes each with the same budget, and writes a markdown table (model,
parameters, MACs, top-1 before and after fine-tuning) to ``bench/results/table1.md`` plus JSON beside it.
``--grid`` adds the conversion grid E ∈ {2, 8, 16} × K ∈ {16, 32, 64, 128} × correction ∈ {paper, residual} at
layer 8 (agreement with the dense model and top-1 before fine-tuning).
All through the project's own console-script entry points, as a user would run them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from moevit.checkpoint import load_checkpoint  # noqa: E402
from moevit.cli.convert import main as convert_main  # noqa: E402
from moevit.cli.train import main as train_main  # noqa: E402
from moevit.data import open_dataset  # noqa: E402
from moevit.flops import count_macs, count_params  # noqa: E402
from moevit.train import evaluate  # noqa: E402

VARIANTS = [  # name, layers, experts
    ("MoE-2 [8]", "8", 2),
    ("MoE-8 [8]", "8", 8),
    ("MoE-16 [8]", "8", 16),
    ("MoE-8 [1,5,8]", "1,5,8", 8),
    ("MoE-8 [2,4,6,8]", "2,4,6,8", 8),
]


def _run(fn, argv: list[str]) -> None:
    print("$", fn.__module__.replace("moevit.cli.", "moe-"), " ".join(argv), flush=True)
    if fn(argv) != 0:
        raise SystemExit(f"step failed: {argv}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/results")
    ap.add_argument("--dense-epochs", type=int, default=12)
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--grid", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    dense_dir = out / "dense"
    done = (dense_dir / "metrics.jsonl").read_text().splitlines() if (dense_dir / "metrics.jsonl").exists() else []
    if len(done) < args.dense_epochs:  # not run, or cut short: moe-train resumes from its last checkpoint
        _run(train_main, ["--model", "mobilevitv2_050", "--data", "digits", "--image-size", "64", "--epochs",
                          str(args.dense_epochs), "--seed", "0", "--out", str(dense_dir), "--no-progress"])
    dense_ck = dense_dir / "best.safetensors"
    held_out = open_dataset("digits", image_size=64, split="eval", seed=0)
    dense = load_checkpoint(dense_ck)
    rows = [{"model": "dense", "layers": "-", "experts": 0, "params": count_params(dense),
             "macs": count_macs(dense, 64), "top1_before": None, "top1_after": evaluate(dense, held_out)["top1"],
             "agreement": None}]
    ft = ["--epochs", str(args.ft_epochs), "--image-size", "64", "--lr-rest", "1e-4", "--lr-head", "2e-4",
          "--lr-moe", "3e-4", "--warmup-epochs", "0.2", "--seed", "0", "--no-progress"]
    for name, layers, experts in VARIANTS:
        tag = name.replace(" ", "").replace("[", "_").replace("]", "").replace(",", "-")
        conv, report = out / f"{tag}.safetensors", out / f"{tag}.report.json"
        if not (conv.exists() and report.exists()):  # a rerun (e.g. to add --grid) reuses finished work
            _run(convert_main, ["--dense", str(dense_ck), "--data", "digits", "--layers", layers, "--experts",
                                str(experts), "--hidden", str(args.hidden), "--out", str(conv), "--report",
                                str(report)])
        # moe-train resumes an interrupted run in the same folder and returns at once from a finished one
        _run(train_main, ["--model", str(conv), "--data", "digits", "--out", str(out / f"{tag}-ft"), *ft])
        rep = json.loads(report.read_text())
        tuned = load_checkpoint(out / f"{tag}-ft" / "best.safetensors")
        rows.append({"model": name, "layers": layers, "experts": experts, "params": count_params(tuned),
                     "macs": count_macs(tuned, 64), "top1_before": rep["top1_moe_before_finetune"],
                     "top1_after": evaluate(tuned, held_out)["top1"], "agreement": rep["agreement_top1"]})
    grid = []
    if args.grid:
        for correction in ("residual", "paper"):
            for e in (2, 8, 16):
                for k in (16, 32, 64, 128):
                    rp = out / "grid" / f"E{e}-K{k}-{correction}.json"
                    if not rp.exists():
                        _run(convert_main, ["--dense", str(dense_ck), "--data", "digits", "--layers", "8", "--experts",
                                            str(e), "--hidden", str(k), "--correction", correction,
                                            "--out", str(rp.with_suffix(".safetensors")), "--report", str(rp)])
                    rep = json.loads(rp.read_text())
                    grid.append({"experts": e, "hidden": k, "correction": correction,
                                 "agreement": rep["agreement_top1"], "top1_before": rep["top1_moe_before_finetune"],
                                 "seconds": rep["seconds"]})
    lines = ["| model | MoE layers | parameters | MACs/image (64 px) | top-1 before fine-tuning | "
             "top-1 after | agreement with dense before |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"| {r['model']} | {r['layers']} | {r['params']:,} | {r['macs']:,} | {fmt(r['top1_before'])} | "
                     f"{fmt(r['top1_after'])} | {fmt(r['agreement'])} |")
    if grid:
        lines += ["", "| E | K | correction | agreement | top-1 before fine-tuning |", "|---:|---:|---|---:|---:|"]
        lines += [f"| {g['experts']} | {g['hidden']} | {g['correction']} | {g['agreement']:.4f} | "
                  f"{g['top1_before']:.4f} |" for g in grid]
    table = "\n".join(lines)
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/table1.md").write_text(table + "\n")
    write_result("bench/results/table1.json", {"rows": rows, "grid": grid, "held_out_images": len(held_out),
                                               "fine_tune": ft, "seconds": time.perf_counter() - t0})
    print(table)
    print(f"\n{time.perf_counter() - t0:.0f} s; bench/results/table1.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
