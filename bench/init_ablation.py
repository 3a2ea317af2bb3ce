"""The initialisation ablation of issue 17 (item 6): every router initialisation × every unit split, per dense seed.

    python bench/init_ablation.py              # MoE-16 at [2] from `make results`' 3 dense models (runs/scenes), no FT
    python bench/init_ablation.py --finetune ward/overlap-topk linear/overlap-topk   # + fine-tuning of two combos
    python bench/init_ablation.py --runs runs/scenes400 --finetune all   # another scenes_results folder, all tuned
    python bench/init_ablation.py --dense D.safetensors --seeds 0 --data digits --image-size 64 --inits ward random \\
        --out runs/init-ablation-digits --results /tmp/init_ablation    # a tiny run

Router initialisations (``--inits``), each converted from the same dense checkpoint with the same sample:

- ``ward``: the paper's (Algorithm 1 on images at several sizes, Ward on the representative patches);
- ``ward-1size``: the same at the model's training size only (``--sizes S:S``), the multi-size sampling ablated;
- ``kmeans``: k-means on the same representative patches; ``class-means``: one expert per class or group of
  classes (``moe-convert --help`` says how classes are grouped when E differs from the number of classes);
  ``random``: E random representative patches as centroids (seeded);
- ``linear``: a linear router learned from a seeded random start, the experts still cut from Ward's clusters.

Unit splits (``--units``): ``overlap-topk`` (the K most important units per cluster; experts may share units) and
``disjoint-balanced`` (MoEfication's disjoint balanced split). K is the largest within the dense parameter budget
(``moevit.convert.hidden_within_budget``, computed for the cosine router; the linear router has E·(C+1) − (E·C + 1)
more parameters, 15 at E = 16).

Reported per combination: top-1 agreement with the dense model and top-1 on ``eval`` before fine-tuning, the
expert-usage entropy on ``eval`` (normalised by log E), mean and 95 % t-interval over the dense seeds
(``scenes_results.interval``); with ``--finetune``: top-1 on ``eval`` after fine-tuning with scenes_results' recipe
(checkpoint chosen on ``val``), the usage entropy after, the share of ``eval`` patches whose expert changed in
fine-tuning, and the per-seed differences of top-1 after fine-tuning from the paper's initialisation
(ward/overlap-topk, when fine-tuned) and from the dense model trained as many extra epochs (``--dense-extra``), each
with its interval: a difference whose interval holds 0 is a tie. Every conversion and fine-tuning whose output
exists is skipped, so the script can be stopped and rerun.
Writes ``<results>.json`` and ``<results>.md`` (default ``bench/results/init_ablation``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from statistics import fmean

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from scenes_results import DATA, _run, ft_recipe, interval  # noqa: E402

from moevit.checkpoint import load_checkpoint  # noqa: E402
from moevit.cli.convert import main as convert_main  # noqa: E402
from moevit.cli.convert import parse_layers  # noqa: E402
from moevit.cli.train import main as train_main  # noqa: E402
from moevit.convert import hidden_within_budget  # noqa: E402
from moevit.data import open_dataset  # noqa: E402
from moevit.moe.routing import record_routing  # noqa: E402
from moevit.moefy import UNIT_SPLITS  # noqa: E402

PAPER = "ward/overlap-topk"  # the paper's initialisation, as this project builds it: the row the others are held to
INITS = ("ward", "ward-1size", "kmeans", "class-means", "random", "linear")
RUNS = "runs/scenes"  # bench/scenes_results.py's default --out: the dense models of `make results`


def init_args(init: str, image_size: int) -> list[str]:
    """moe-convert options of one router initialisation."""
    if init == "ward-1size":
        return ["--sizes", f"{image_size}:{image_size}"]
    if init == "linear":
        return ["--router", "linear"]
    return ["--router-init", init]


def paired(rows: dict[int, dict], base: dict[int, dict] | None) -> dict | None:
    """Per-seed difference of top-1 after fine-tuning, ``rows`` − ``base``, with its interval (None without both)."""
    if not base or rows is base:
        return None
    seeds = [s for s in rows if "top1_after" in rows[s] and "top1_after" in base.get(s, {})]
    if not seeds:
        return None
    return interval([rows[s]["top1_after"] - base[s]["top1_after"] for s in seeds])


def entropy(load: list[float]) -> float:
    """Entropy of an expert-usage distribution normalised by log E: 1 = uniform use, 0 = one expert."""
    e = len(load)
    h = -sum(p * math.log(p) for p in load if p > 0)
    return h / math.log(e) if e > 1 else 0.0


@torch.no_grad()
def routes(model: torch.nn.Module, dataset, batch: int = 64) -> dict[int, torch.Tensor]:
    """Top-1 expert of every patch of ``dataset`` at each MoE layer: {layer: [images × patches]}."""
    model.eval()
    out: dict[int, list[torch.Tensor]] = {}
    for j in range(0, len(dataset), batch):
        x = torch.stack([dataset[i][0] for i in range(j, min(j + batch, len(dataset)))])
        with record_routing(model) as rec:
            model(x)
        for i in model.moe_layers():
            out.setdefault(i, []).append(rec[i].expert_idx_BNK[..., 0].reshape(-1))
    return {i: torch.cat(v) for i, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", nargs="+", default=None,
                    help="dense checkpoints, one per seed in --seeds order (default: --runs' dense-e6-sN)")
    ap.add_argument("--runs", default=RUNS, help="bench/scenes_results.py's --out folder: without --dense, the dense "
                    "models are its dense-e6-sN/best.safetensors and, without --dense-extra, the equal-budget "
                    "baselines its dense-e6-extraF-sN (F = --ft-epochs) where they exist")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="the dense models' training seeds; also the conversion and fine-tuning seeds")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--layers", default="2", help="MoE layers, e.g. 2 or 1,5,8 (default: 2, where the gate passes)")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    ap.add_argument("--units", nargs="+", default=list(UNIT_SPLITS), choices=UNIT_SPLITS)
    ap.add_argument("--images-per-class", type=int, default=32, help="conversion sample per class")
    ap.add_argument("--patches-per-class", type=int, default=64, help="K_c of Algorithm 1")
    ap.add_argument("--finetune", nargs="*", default=[], metavar="INIT/UNITS",
                    help="combinations to fine-tune, e.g. ward/overlap-topk linear/disjoint-balanced, or 'all'")
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--dense-extra", nargs="+", default=None, metavar="RUN_DIR",
                    help="the dense models trained the fine-tuning's epochs too (moe-train run folders, one per seed "
                         "in --seeds order, e.g. scenes_results' dense-e6-extra2-sN): every fine-tuned row is then "
                         "compared with them, paired by seed (equal budgets)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/init-ablation")
    ap.add_argument("--results", default="bench/results/init_ablation")
    args = ap.parse_args()
    dense_paths = args.dense or [f"{args.runs}/dense-e6-s{s}/best.safetensors" for s in args.seeds]
    if args.dense is None and args.dense_extra is None:
        extra_dirs = [f"{args.runs}/dense-e6-extra{args.ft_epochs}-s{s}" for s in args.seeds]
        if all((Path(d) / "report.json").exists() for d in extra_dirs):
            args.dense_extra = extra_dirs
    if len(dense_paths) != len(args.seeds):
        ap.error(f"--dense names {len(dense_paths)} checkpoints but --seeds {len(args.seeds)}; give one per seed")
    missing = [p for p in dense_paths if not Path(p).exists()]
    if missing:
        ap.error(f"dense checkpoint(s) not found: {', '.join(missing)}")
    try:
        layers = parse_layers([args.layers])
    except ValueError as e:
        ap.error(str(e))
    combos = [f"{i}/{u}" for i in args.inits for u in args.units]
    finetune = combos if args.finetune == ["all"] else args.finetune
    unknown = [c for c in finetune if c not in combos]
    if unknown:
        ap.error(f"--finetune {' '.join(unknown)}: not among the combinations run ({', '.join(combos)})")
    if args.dense_extra is not None and len(args.dense_extra) != len(args.seeds):
        ap.error(f"--dense-extra names {len(args.dense_extra)} runs but --seeds {len(args.seeds)}; give one per seed")
    extra_reports = [Path(d) / "report.json" for d in args.dense_extra or []]
    if missing := [str(r) for r in extra_reports if not r.exists()]:
        ap.error(f"--dense-extra: no report.json in {', '.join(missing)} (a finished moe-train --select val run?)")
    extra_top1 = {s: json.loads(r.read_text())["eval_top1"]
                  for s, r in zip(args.seeds, extra_reports, strict=True)} if extra_reports else {}
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = Path(args.out)
    held = None  # the eval split, opened only when routing before vs after fine-tuning is measured
    common = ["--data", args.data, "--image-size", str(args.image_size), "--select", "val", "--threads",
              str(args.threads), "--no-progress"]
    lay = ",".join(map(str, layers))
    per: dict[str, dict[int, dict]] = {c: {} for c in combos}
    ks: dict[int, int] = {}
    for seed, dense_path in zip(args.seeds, dense_paths, strict=True):
        dense = load_checkpoint(dense_path)
        k = ks[seed] = hidden_within_budget(dense, layers, args.experts)
        for combo in combos:
            init, units = combo.split("/")
            tag = f"{init}-{units}-L{lay.replace(',', '-')}-E{args.experts}-K{k}-s{seed}"
            conv = out / f"{tag}.safetensors"
            rpath = conv.with_suffix(".report.json")
            if not (conv.exists() and rpath.exists()):
                _run(convert_main, ["--dense", dense_path, "--data", args.data, "--layers", lay, "--experts",
                                    str(args.experts), "--hidden", str(k), "--images-per-class",
                                    str(args.images_per_class), "--patches-per-class", str(args.patches_per_class),
                                    "--units", units, *init_args(init, args.image_size), "--seed", str(seed),
                                    "--threads", str(args.threads), "--out", str(conv), "--report", str(rpath)])
            rep = json.loads(rpath.read_text())
            row = {"conversion": str(conv), "agreement": rep["agreement_top1"],
                   "top1_before": rep["top1_moe_before_finetune"], "top1_dense": rep["top1_dense"],
                   "entropy_before": fmean([entropy(v) for v in rep["expert_load"].values()]),
                   "mean_unit_jaccard": fmean([r["mean_unit_jaccard"] for r in rep["layers"].values()]),
                   "convert_seconds": rep["seconds"]["total"]}
            if combo in finetune:
                ft = out / f"{tag}-ft{args.ft_epochs}"
                if not (ft / "report.json").exists():
                    _run(train_main, ["--model", str(conv), "--out", str(ft), *common, *ft_recipe(args.ft_epochs),
                                      "--seed", str(seed)])
                done = json.loads((ft / "report.json").read_text())
                after_path = ft / "routing_after.json"
                if not after_path.exists():  # routing before vs after fine-tuning on eval
                    if held is None:
                        held = open_dataset(args.data, image_size=args.image_size, split="eval", seed=0)
                    before_r = routes(load_checkpoint(conv), held)
                    after_r = routes(load_checkpoint(ft / "best.safetensors"), held)
                    after_path.write_text(json.dumps({
                        "changed": fmean([float((before_r[i] != after_r[i]).float().mean())
                                                    for i in before_r]),
                        "entropy_after": fmean([entropy((torch.bincount(a, minlength=args.experts).float()
                                                                   / len(a)).tolist()) for a in after_r.values()])}))
                after = json.loads(after_path.read_text())
                row.update({"finetuned": str(ft), "top1_after": done["eval_top1"], "val_top1_after": done["val_top1"],
                            "patches_changed_expert": after["changed"], "entropy_after": after["entropy_after"]})
            per[combo][seed] = row

    keys = ("agreement", "top1_before", "entropy_before", "mean_unit_jaccard", "top1_after", "patches_changed_expert",
            "entropy_after")
    rows = []
    for combo, by_seed in per.items():
        row = {"combo": combo, "init": combo.split("/")[0], "units": combo.split("/")[1], "seeds": sorted(by_seed)}
        for key in keys:
            vals = [r[key] for r in by_seed.values() if key in r]
            row[key] = interval(vals) if vals else None
        row["vs_paper_init"] = paired(by_seed, per.get(PAPER))
        row["vs_dense_extra"] = paired(by_seed, {s: {"top1_after": v} for s, v in extra_top1.items()} or None)
        row["runs"] = by_seed
        rows.append(row)

    def fmt(iv: dict | None, scale: float = 100.0, digits: int = 1) -> str:
        if iv is None:
            return "-"
        if iv["lo"] is None:
            return f"{scale * iv['mean']:.{digits}f} (1 seed)"
        return f"{scale * iv['mean']:.{digits}f} [{scale * iv['lo']:.{digits}f}, {scale * iv['hi']:.{digits}f}]"

    lines = [f"Initialisation ablation: MoE-{args.experts} at {list(layers)}, K = {sorted(set(ks.values()))} (within "
             f"the dense parameter budget), `{args.data}` at {args.image_size} px; dense seeds {args.seeds}; mean and "
             f"95 % t-interval over seeds; on `eval`" + (f"; fine-tuned {args.ft_epochs} epochs with scenes_results' "
                                                         "recipe, checkpoint chosen on `val`" if finetune else "")
             + ".", "",
             "| init | units | agreement with dense (%) | top-1 before FT (%) | usage entropy before | unit Jaccard "
             "| top-1 after FT (%) | vs ward/overlap-topk after FT, paired (points) | vs dense + extra epochs, paired "
             "(points) | patches changing expert in FT (%) | usage entropy after |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['init']} | {r['units']} | {fmt(r['agreement'])} | {fmt(r['top1_before'])} | "
                     f"{fmt(r['entropy_before'], 1, 2)} | {fmt(r['mean_unit_jaccard'], 1, 2)} | "
                     f"{fmt(r['top1_after'])} | {fmt(r['vs_paper_init'])} | {fmt(r['vs_dense_extra'])} | "
                     f"{fmt(r['patches_changed_expert'])} | {fmt(r['entropy_after'], 1, 2)} |")
    dense_top1 = interval([per[combos[0]][s]["top1_dense"] for s in args.seeds])
    lines += ["", f"Dense top-1 on `eval`: {fmt(dense_top1)} %."]
    if extra_top1:
        lines[-1] += f" Dense + {args.ft_epochs} extra epochs: {fmt(interval(list(extra_top1.values())))} %."
    table = "\n".join(lines)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".md").write_text(table + "\n")
    write_result(results.with_suffix(".json"), {
        "data": args.data, "image_size": args.image_size, "layers": list(layers), "experts": args.experts,
        "hidden": ks, "seeds": args.seeds, "dense": dense_paths, "images_per_class": args.images_per_class,
        "patches_per_class": args.patches_per_class, "ft_recipe": ft_recipe(args.ft_epochs) if finetune else None,
        "finetuned": finetune, "dense_top1": dense_top1, "dense_extra": args.dense_extra,
        "dense_extra_top1": extra_top1, "rows": rows, "threads": args.threads,
        "argv": sys.argv[1:], "seconds": time.perf_counter() - t0})
    print(table)
    print(f"\n{time.perf_counter() - t0:.0f} s; {results.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
