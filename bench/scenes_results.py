"""Dense vs MoE on the scenes benchmark under the fair protocol of issue 17 (``make results``).

    python bench/scenes_results.py                       # reduced grid: MoE-16 at [8] vs dense, seeds 0 1 2
    python bench/scenes_results.py --full                # + Table 1 (E = 2, 8), Table 2's layer sets, batch sizes
                                                         #   and data subsets (--variants 8:16:b128 8:16:f0.5 ...)
    python bench/scenes_results.py --seeds 0 --dense-epochs 4 --ft-epochs 2   # the smallest honest version

Protocol, per training seed (the split seed is fixed separately, so every seed is scored on the same images):

1. dense: MobileViTV2-0.5 from the pretrained trunk (``--init``, see ``make pretrain``), trained on ``search-train``,
   the checkpoint chosen on ``val``, reported once on ``eval`` (``moe-train --select val``);
2. dense + extra epochs: the chosen dense model trained ``--ft-epochs`` more with the fine-tuning recipe, so dense
   gets the same budget as each MoE (equal budgets);
3. each MoE: converted from the chosen dense model (Ward + Algorithm 1, overlapping top-K units) with K the largest
   that keeps its parameters at or below the dense model's, fine-tuned ``--ft-epochs`` with the same recipe;
4. the table: top-1 on ``eval``, mean over seeds with a 95 % t-interval, the paired difference MoE − (dense +
   extra) with its interval, parameters, MACs and batch-1 CPU latency at the benchmark's size.

Also runs the gate (``bench/gate.py``: each layer's MLP zeroed on the dense models). Every step is skipped when its
output exists and ``moe-train`` resumes a cut run, so the script can be stopped and rerun (with more seeds, say).
Writes ``bench/results/scenes.json`` and ``bench/results/scenes.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from gate import gate  # noqa: E402

from moevit.checkpoint import load_checkpoint  # noqa: E402
from moevit.cli.analyze import main as analyze_main  # noqa: E402
from moevit.cli.convert import main as convert_main  # noqa: E402
from moevit.cli.train import main as train_main  # noqa: E402
from moevit.convert import hidden_within_budget  # noqa: E402
from moevit.data import open_dataset  # noqa: E402
from moevit.flops import count_macs, count_params  # noqa: E402

DATA = "scenes:classes=10,per_class=400,size=128,split_seed=0,workers=2"
INIT = "weights/pretrain-mobilevitv2_050-96.safetensors"
REDUCED = ["8:16"]
# Table 1 (E at [8]), MoE-16 at [2] (a layer that passes the gate), Table 2's layer sets, and its batch sizes and
# data subsets (at [8], E = 16: the paper's)
FULL = ["8:2", "8:8", "8:16", "2:16", "1,5,8:8", "1,3,5,7:8", "2,4,6,8:8", "8:16:b128", "8:16:b512", "8:16:f0.75",
        "8:16:f0.5"]


@dataclass(frozen=True)
class Variant:
    """One MoE row: ``LAYERS:E[:bBATCH][:fFRACTION]`` (fine-tuning batch size and share of the training data;
    default: the recipe's batch and all the data)."""

    layers: str
    experts: int
    batch: int | None = None
    fraction: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Variant:
        layers, experts, *rest = text.split(":")
        [int(i) for i in layers.split(",")]
        v = cls(layers, int(experts))
        for opt in rest:
            if opt[:1] == "b" and int(opt[1:]) >= 2:
                v = replace(v, batch=int(opt[1:]))
            elif opt[:1] == "f" and 0 < float(opt[1:]) <= 1:
                v = replace(v, fraction=float(opt[1:]))
            else:
                raise ValueError(opt)
        return v

    @property
    def name(self) -> str:
        return (f"MoE-{self.experts} [{self.layers}]" + (f" batch {self.batch}" if self.batch else "")
                + (f" data {self.fraction:g}" if self.fraction < 1 else ""))

    def tag(self, k: int) -> str:
        return (f"moe{self.experts}-L{self.layers.replace(',', '-')}-K{k}" + (f"-b{self.batch}" if self.batch else "")
                + (f"-f{self.fraction:g}" if self.fraction < 1 else ""))


def dense_recipe(epochs: int) -> list[str]:
    """moe-train options of the dense model (from the pretrained trunk)."""
    return ["--epochs", str(epochs), "--mixup", "0.2", "--dropout", "0.1", "--lr-rest", "1e-3", "--lr-head", "2e-3",
            "--warmup-epochs", "0.5"]


def ft_recipe(epochs: int) -> list[str]:
    """moe-train options of every fine-tuning: MoE models and the dense model's extra epochs (equal budgets)."""
    return ["--epochs", str(epochs), "--mixup", "0.2", "--lr-rest", "1e-4", "--lr-head", "2e-4", "--lr-moe", "5e-4",
            "--warmup-epochs", "0.2"]


def figures(jobs: list[tuple[str, str, str]], data: str, threads: int, work: Path, dest: Path) -> list[str]:
    """Class × expert affinity heatmaps (the paper's Fig. 2; ``moe-analyze``) of one fine-tuned model per job
    (name, run folder, conversion report), copied into ``dest`` as ``<name>_affinity_layerN.png`` and
    ``<name>_analysis.json``."""
    written = []
    dest.mkdir(parents=True, exist_ok=True)
    for name, run_dir, report in jobs:
        folder = work / "analysis" / name
        if not (folder / "analysis.json").exists():
            _run(analyze_main, ["--model", f"{run_dir}/best.safetensors", "--report", report, "--data", data,
                                "--out", str(folder), "--threads", str(threads)])
        for f in sorted(folder.iterdir()):
            if f.suffix in (".png", ".json"):
                shutil.copyfile(f, dest / f"{name}_{f.name}")
                written.append(str(dest / f"{name}_{f.name}"))
    return written


def _run(fn, argv: list[str]) -> None:
    print("$", fn.__module__.replace("moevit.cli.", "moe-"), " ".join(argv), flush=True)
    if fn(argv) != 0:
        raise SystemExit(f"step failed: {argv}")


def interval(values: list[float]) -> dict:
    """Mean and 95 % t-interval (None for a single value: one seed has no interval)."""
    from scipy.stats import t

    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": n, "values": values}
    half = float(t.ppf(0.975, n - 1)) * statistics.stdev(values) / n**0.5
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "values": values}


@torch.no_grad()
def latencies_ms(models: dict[str, torch.nn.Module], size: int, reps: int, rounds: int = 5) -> dict[str, dict]:
    """Batch-1 forward time of each model on the caller's threads, measured side by side: in each of ``rounds``
    rounds every model is timed ``reps`` times in turn, so a change in the machine's load falls on all of them.
    Per model: the median over rounds of each round's median (ms), and its ratio to ``dense`` in the same round
    (median, min, max over rounds)."""
    x = torch.randn(1, 3, size, size)
    for m in models.values():
        m.eval()
        for _ in range(3):
            m(x)
    per_round: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, m in models.items():
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                m(x)
                times.append(1000 * (time.perf_counter() - t0))
            per_round[name].append(statistics.median(times))
    out = {}
    for name, ms in per_round.items():
        ratios = [a / b for a, b in zip(ms, per_round["dense"], strict=True)]
        out[name] = {"ms": statistics.median(ms), "rounds_ms": ms, "vs_dense": statistics.median(ratios),
                     "vs_dense_min": min(ratios), "vs_dense_max": max(ratios)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--init", default=INIT, help="pretrained trunk (make pretrain)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dense-epochs", type=int, default=6)
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="Table 1 (E = 2, 8, 16 at [8]) and Table 2 (layer sets, "
                    "fine-tuning batch 128 and 512, data subsets 0.75 and 0.5)")
    ap.add_argument("--variants", nargs="+", metavar="LAYERS:E[:bB][:fF]", default=None,
                    help="MoE rows instead of the reduced or full grid, e.g. 8:16 2:16 (MoE-16 at [8] and at [2]); "
                    "b: fine-tuning batch size, f: share of each class of the training data (8:16:f0.5)")
    ap.add_argument("--images-per-class", type=int, default=32, help="conversion sample per class")
    ap.add_argument("--latency-reps", type=int, default=30, help="timed forwards per model and round; 0: skip the "
                    "latency column")
    ap.add_argument("--latency-rounds", type=int, default=5, help="rounds over all models (side by side)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of training and conversion")
    ap.add_argument("--latency-threads", type=int, default=1, help="torch threads of the batch-1 latency column "
                    "(default 1: a camera-class CPU core)")
    ap.add_argument("--out", default="runs/scenes")
    ap.add_argument("--figures", default="bench/results/analysis_scenes", help="class × expert affinity of the first "
                    "seed's model of each layers:E row (moe-analyze), copied here; '' skips them")
    ap.add_argument("--results", default="bench/results/scenes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t0 = time.perf_counter()
    size = str(args.image_size)
    common = ["--data", args.data, "--image-size", size, "--select", "val", "--threads", str(args.threads),
              "--no-progress"]
    dense_args = dense_recipe(args.dense_epochs)
    ft_args = ft_recipe(args.ft_epochs)
    try:
        variants = [Variant.parse(v) for v in args.variants or (FULL if args.full else REDUCED)]
    except (IndexError, ValueError):
        ap.error(f"--variants {' '.join(args.variants)}: each must be LAYERS:E[:bBATCH][:fFRACTION], e.g. 8:16, "
                 "1,5,8:8 or 8:16:f0.5")
    held = open_dataset(args.data, image_size=args.image_size, split="eval", seed=0)
    runs: dict[str, dict[int, str]] = {}
    k_of: dict[str, int] = {}
    conversions: dict[str, list[str]] = {}
    figure_jobs: list[tuple[str, str, str]] = []
    for seed in args.seeds:
        s = ["--seed", str(seed)]
        dense_dir = out / f"dense-e{args.dense_epochs}-s{seed}"
        _run(train_main, ["--model", "mobilevitv2_050", "--init", args.init, "--out", str(dense_dir), *common,
                          *dense_args, *s])
        dense_ck = dense_dir / "best.safetensors"
        runs.setdefault("dense", {})[seed] = str(dense_dir)
        gate_path = dense_dir / "gate.json"  # the gate first: it decides whether the MoE rows can mean anything
        if not gate_path.exists():
            print(f"gate: seed {seed}", flush=True)
            gate_path.write_text(json.dumps(gate(load_checkpoint(dense_ck), held)))
        extra = out / f"dense-e{args.dense_epochs}-extra{args.ft_epochs}-s{seed}"
        _run(train_main, ["--model", str(dense_ck), "--out", str(extra), *common, *ft_args, *s])
        runs.setdefault("dense + extra epochs", {})[seed] = str(extra)
        dense = load_checkpoint(dense_ck)
        for v in variants:
            name, layers, experts = v.name, v.layers, v.experts
            k = hidden_within_budget(dense, tuple(int(i) for i in layers.split(",")), experts)
            k_of[name] = k
            # the batch and data-subset rows fine-tune the same conversion as their base row
            run = f"-e{args.dense_epochs}-ft{args.ft_epochs}-s{seed}"
            conv = out / f"{Variant(layers, experts).tag(k)}{run}.safetensors"
            tag = f"{v.tag(k)}{run}"
            if not (conv.exists() and conv.with_suffix(".report.json").exists()):
                _run(convert_main, ["--dense", str(dense_ck), "--data", args.data, "--layers", layers, "--experts",
                                    str(experts), "--hidden", str(k), "--images-per-class",
                                    str(args.images_per_class), "--seed", str(seed), "--threads", str(args.threads),
                                    "--out", str(conv), "--report", str(conv.with_suffix(".report.json"))])
            extra_args = [*(["--batch-size", str(v.batch)] if v.batch else []),
                          *(["--train-fraction", f"{v.fraction:g}"] if v.fraction < 1 else [])]
            _run(train_main, ["--model", str(conv), "--out", str(out / f"{tag}-ft"), *common, *ft_args, *extra_args,
                              *s])
            runs.setdefault(name, {})[seed] = str(out / f"{tag}-ft")
            conversions.setdefault(name, []).append(str(conv.with_suffix(".report.json")))
            if seed == args.seeds[0] and v.batch is None and v.fraction == 1:
                figure_jobs.append((f"moe{experts}-{layers.replace(',', '')}-s{seed}", str(out / f"{tag}-ft"),
                                    str(conv.with_suffix(".report.json"))))
    written = figures(figure_jobs, args.data, args.threads, out, Path(args.figures)) if args.figures else []

    gates = [json.loads((Path(d) / "gate.json").read_text()) for d in runs["dense"].values()]
    gate_rows = [{"layer": i, **interval([g["rows"][i + 1]["drop_points"] for g in gates])} for i in range(9)]

    rows = []
    baseline = runs["dense + extra epochs"]
    models = {name: load_checkpoint(Path(next(iter(by_seed.values()))) / "best.safetensors")
              for name, by_seed in runs.items()}  # seed 0's: the latency of a row does not depend on its seed
    torch.set_num_threads(args.latency_threads)
    latency = latencies_ms(models, args.image_size, args.latency_reps, args.latency_rounds) if args.latency_reps else {}
    for name, by_seed in runs.items():
        reports = {s: json.loads((Path(d) / "report.json").read_text()) for s, d in by_seed.items()}
        model = models[name]
        row = {"model": name, "hidden": k_of.get(name), "params": count_params(model),
               "macs": count_macs(model, args.image_size), "latency": latency.get(name),
               "latency_ms": latency[name]["ms"] if latency else None,
               "top1": interval([r["eval_top1"] for r in reports.values()]),
               "val_top1": interval([r["val_top1"] for r in reports.values()])}
        if name.startswith("MoE"):
            base = {s: json.loads((Path(baseline[s]) / "report.json").read_text())["eval_top1"] for s in by_seed}
            row["minus_dense_extra"] = interval([reports[s]["eval_top1"] - base[s] for s in by_seed])
            conv_reports = [json.loads(Path(p).read_text()) for p in conversions[name]]
            row["agreement_before_ft"] = interval([r["agreement_top1"] for r in conv_reports])
            row["top1_before_ft"] = interval([r["top1_moe_before_finetune"] for r in conv_reports])
        rows.append(row)

    def pct(iv: dict | None) -> str:
        if iv is None:
            return "-"
        if iv["lo"] is None:
            return f"{100 * iv['mean']:.1f} (1 seed)"
        return f"{100 * iv['mean']:.1f} [{100 * iv['lo']:.1f}, {100 * iv['hi']:.1f}]"

    def pts(iv: dict | None) -> str:
        if iv is None:
            return "-"
        if iv["lo"] is None:
            return f"{100 * iv['mean']:+.1f} (1 seed)"
        return f"{100 * iv['mean']:+.1f} [{100 * iv['lo']:+.1f}, {100 * iv['hi']:+.1f}]"

    n = len(args.seeds)
    lines = [f"Scenes `{args.data}` at {size} px; {n} training seed(s) {args.seeds}; top-1 on `eval` (checkpoint "
             f"chosen on `val`), mean and 95 % t-interval; dense {args.dense_epochs} epochs from `{args.init}`, "
             f"then {args.ft_epochs} more for every row but `dense`.", "",
             "| model | K | parameters | MACs/image | batch-1 CPU latency, ms (vs dense) | top-1 (%) "
             "| vs dense + extra (points) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lat = "-" if r["latency"] is None else f"{r['latency']['ms']:.1f} ({r['latency']['vs_dense']:.2f}x)"
        lines.append(f"| {r['model']} | {r['hidden'] or '-'} | {r['params']:,} | {r['macs']:,} | {lat} | "
                     f"{pct(r['top1'])} | {pts(r.get('minus_dense_extra'))} |")
    lines += ["", "Gate: top-1 drop (points) with each transformer layer's MLP zeroed, dense models, `eval`:", "",
              "| layer | " + " | ".join(str(g["layer"]) for g in gate_rows) + " |",
              "|---|" + "---:|" * 9,
              "| drop | " + " | ".join(f"{g['mean']:.1f}" for g in gate_rows) + " |"]
    table = "\n".join(lines)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".md").write_text(table + "\n")
    write_result(results.with_suffix(".json"), {
        "data": args.data, "image_size": args.image_size, "init": args.init, "seeds": args.seeds,
        "dense_recipe": dense_args, "ft_recipe": ft_args, "rows": rows, "gate": gate_rows,
        "gate_runs": gates, "runs": runs, "figures": written, "threads": args.threads,
        "latency_threads": args.latency_threads,
        "seconds": time.perf_counter() - t0})
    print(table)
    print(f"\n{time.perf_counter() - t0:.0f} s; {results.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
