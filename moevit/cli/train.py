"""``moe-train``: train a dense or MoE MobileViTV2 with the paper's recipe, or random-search its hyperparameters.

    moe-train --model mobilevitv2_050 --data digits --epochs 12 --image-size 64 --out runs/dense
    moe-train --model runs/moe.safetensors --data digits --epochs 5 --out runs/moe-ft
    moe-train --model mobilevitv2_050 --data digits --search 8 --epochs 3 --out runs/search
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import moevit
from moevit.checkpoint import load_checkpoint, load_weights
from moevit.cli.common import run_cli, set_threads
from moevit.data import open_dataset
from moevit.deploy.config import mapping, read_yaml
from moevit.train import TrainConfig, Trainer, evaluate

# Named search space: name -> (kind, low, high) or ("choice", [values]).
SEARCH_SPACE: dict[str, tuple] = {
    "lr_moe": ("log", 1e-4, 5e-3),
    "lr_head": ("log", 3e-4, 1e-2),
    "lr_rest": ("log", 1e-4, 3e-3),
    "wd_moe": ("log", 1e-3, 1e-1),
    "wd_head": ("log", 1e-3, 1e-1),
    "wd_rest": ("log", 1e-3, 1e-1),
    "mixup": ("choice", [0.0, 0.2, 0.4]),
    "dropout": ("uniform", 0.0, 0.3),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moe-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilevitv2_050",
                    help="an architecture name (mobilevitv2_050 … _200) or a moevit .safetensors checkpoint")
    ap.add_argument("--init", help="start from these weights (timm or moevit safetensors); a new head when the "
                                   "class count differs")
    ap.add_argument("--data", required=True, help="dataset spec: digits | synthetic[:k=v,…] | folder:PATH | ssw60:PATH")
    ap.add_argument("--out", required=True, help="output folder (a run found there is resumed)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=None, help="default: a checkpoint's training size, a "
                    "synthetic spec's size=, else 256")
    ap.add_argument("--seed", type=int, default=0, help="training seed (batch order, augmentation, dropout)")
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the held-out splits, separate from --seed so "
                    "that runs of several training seeds are scored on the same images (default 0)")
    ap.add_argument("--train-fraction", type=float, default=1.0, metavar="F",
                    help="train on a seeded share F of each class of the training split (drawn with --split-seed, "
                         "so every training seed sees the same images): the paper's data-subset ablation")
    ap.add_argument("--select", choices=("eval", "val"), default="eval",
                    help="where the best checkpoint is chosen: 'val' trains on search-train, selects on val and "
                         "reports the chosen checkpoint once on eval (the fair protocol); 'eval' trains on train and "
                         "selects on eval (default, the paper's 80/20 holdout)")
    d = TrainConfig()
    for g in ("moe", "head", "rest"):
        ap.add_argument(f"--lr-{g}", type=float, default=None, help=f"learning rate of the {g} group "
                                                                      f"(default {getattr(d, 'lr_' + g)})")
        ap.add_argument(f"--wd-{g}", type=float, default=None, help=f"weight decay of the {g} group "
                                                                      f"(default {getattr(d, 'wd_' + g)})")
    ap.add_argument("--warmup-epochs", type=float, default=None, help=f"default {d.warmup_epochs}")
    ap.add_argument("--mixup", type=float, default=None, help="MixUp Beta(α, α); 0 disables (default 0)")
    ap.add_argument("--dropout", type=float, default=None, help="classifier dropout (default: the model's, 0)")
    ap.add_argument("--flip", type=float, default=None, help="horizontal flip probability (default 0.5)")
    ap.add_argument("--label-smoothing", type=float, default=None)
    ap.add_argument("--config", help="JSON or YAML of training options (e.g. best_config.json from --search); "
                                     "flags given on the command line win")
    ap.add_argument("--search", type=int, default=0, metavar="N", help="random search: N trials on a validation "
                                                                        "split carved from the training part")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _check_args(args: argparse.Namespace) -> None:
    """Refuse numbers that cannot make a run (before any data is read) and settle the image size."""
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not 0.0 < args.train_fraction <= 1.0:
        raise ValueError(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    if args.search < 0:
        raise ValueError(f"--search must be >= 0 trials, got {args.search}")
    if args.image_size is None:
        from moevit.data import parse_spec

        spec = parse_spec(args.data)
        if spec.kind == "synthetic":
            args.image_size = spec.size  # the images are drawn at that size: training at another only resamples
        elif args.model.endswith(".safetensors") or Path(args.model).is_file():
            from moevit.checkpoint import read_config

            config = read_config(args.model)
            args.image_size = config.image_size if config is not None and config.image_size else 256
        else:
            args.image_size = 256
    if not 8 <= args.image_size <= 2048:
        raise ValueError(f"--image-size must be 8-2048 pixels, got {args.image_size}")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """Training options: defaults < --config file < flags."""
    opts: dict[str, Any] = {}
    if args.config:
        # JSON is YAML: one strict reader for both (duplicate keys and Python tags refused, errors name the file).
        loaded = mapping(read_yaml(args.config), args.config, "", "a mapping of training options")
        opts.update(loaded.get("train", loaded))
    for key in ("epochs", "batch_size", "seed"):
        opts[key] = getattr(args, key)
    for key in ("lr_moe", "lr_head", "lr_rest", "wd_moe", "wd_head", "wd_rest", "warmup_epochs", "mixup", "flip",
                "label_smoothing", "dropout"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    return opts


def _make_model(args: argparse.Namespace, classes: list[str], dropout: float | None) -> moevit.MobileViTV2:
    if args.model.endswith(".safetensors") or Path(args.model).is_file():
        model = load_checkpoint(args.model)
        cfg = model.config
        new_cfg = replace(cfg, labels=tuple(classes), drop_rate=cfg.drop_rate if dropout is None else dropout,
                          num_classes=len(classes), image_size=args.image_size)
        if cfg.num_classes != len(classes):
            print(f"moe-train: {args.model} has {cfg.num_classes} classes, the data {len(classes)}: new head",
                  file=sys.stderr)
        fresh = moevit.build_model(new_cfg)
        state = {k: v for k, v in model.state_dict().items() if not (k.startswith("head.fc")
                                                                     and cfg.num_classes != len(classes))}
        fresh.load_state_dict(state, strict=False)
        model = fresh
    else:
        model = moevit.build_model(moevit.ModelConfig(arch=args.model, num_classes=len(classes),
                                                      drop_rate=dropout or 0.0, labels=tuple(classes),
                                                      image_size=args.image_size))
    if args.init:
        skipped = load_weights(model, args.init, new_head=True)
        if skipped:
            print(f"moe-train: {args.init}: class count differs, new head", file=sys.stderr)
    return model


def _train_once(args: argparse.Namespace, opts: dict[str, Any], train_split: str, eval_split: str,
                out: Path, progress: bool, search_trial: bool = False) -> dict[str, Any]:
    opts = dict(opts)
    dropout = opts.pop("dropout", None)
    cfg = TrainConfig.from_dict(opts)
    train_set = open_dataset(args.data, image_size=args.image_size, split=train_split, seed=args.split_seed)
    train_set = train_set.subset(args.train_fraction, seed=args.split_seed)
    eval_set = open_dataset(args.data, image_size=args.image_size, split=eval_split, seed=args.split_seed)
    model = _make_model(args, list(train_set.classes), dropout)
    trainer = Trainer(model, train_set, eval_set, cfg, out, progress=progress)
    if progress:
        print(f"train: {train_set.describe()}\neval:  {eval_set.describe()}")
    trainer.try_resume()
    last = trainer.fit()
    skipped = getattr(train_set, "skipped", []) + getattr(eval_set, "skipped", [])
    for path, reason in skipped:
        print(f"moe-train: skipped unreadable image {path}: {reason}", file=sys.stderr)
    result = {"best_top1": trainer.best, **{k: v for k, v in last.items() if k != "per_class"}}
    if eval_split == "val" and train_split == "search-train" and not search_trial:
        # the fair protocol: the checkpoint chosen on val is scored once on eval, which played no part in choosing
        report_path = out / "report.json"
        if not report_path.exists() or json.loads(report_path.read_text()).get("best_step") != trainer.best_step:
            held = open_dataset(args.data, image_size=args.image_size, split="eval", seed=args.split_seed)
            scored = evaluate(load_checkpoint(out / "best.safetensors"), held)
            report_path.write_text(json.dumps({
                "select": "val", "val_top1": trainer.best, "best_step": trainer.best_step,
                "eval_top1": scored["top1"], "eval_top5": scored["top5"], "eval_loss": scored["loss"],
                "eval_images": scored["n"], "eval_per_class": scored["per_class"], "data": args.data,
                "split_seed": args.split_seed, "seed": args.seed, "train_fraction": args.train_fraction,
                "train_images": len(train_set)}, indent=2))
        report = json.loads(report_path.read_text())
        result.update(val_top1=report["val_top1"], eval_top1=report["eval_top1"], eval_top5=report["eval_top5"])
    return result


def _sample(rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, spec in SEARCH_SPACE.items():
        if spec[0] == "log":
            out[name] = math.exp(rng.uniform(math.log(spec[1]), math.log(spec[2])))
        elif spec[0] == "uniform":
            out[name] = rng.uniform(spec[1], spec[2])
        else:
            out[name] = rng.choice(spec[1])
    return out


def search(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    out = Path(args.out)
    rng = random.Random(args.seed)
    rows = []
    for trial in range(args.search):
        params = _sample(rng)
        print(f"trial {trial + 1}/{args.search}: " + ", ".join(f"{k}={v:.3g}" for k, v in params.items()))
        res = _train_once(args, {**opts, **params}, "search-train", "val", out / f"trial-{trial:03d}",
                          progress=not args.no_progress, search_trial=True)
        rows.append({"trial": trial, **params, "val_top1": res.get("best_top1"), "val_top5": res.get("top5")})
    rows.sort(key=lambda r: -(r["val_top1"] or 0))
    with (out / "search.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    names = list(rows[0])
    print("  ".join(f"{n:>9}" for n in names))
    for r in rows:
        print("  ".join(f"{r[n]:>9.4g}" if isinstance(r[n], float) else f"{r[n]:>9}" for n in names))
    best = {**{k: v for k, v in opts.items() if k not in ("epochs", "batch_size", "seed")},
            **{k: rows[0][k] for k in SEARCH_SPACE}}
    (out / "best_config.json").write_text(json.dumps(best, indent=2))
    print(f"best val top-1 {rows[0]['val_top1']:.3f} (trial {rows[0]['trial']}); configuration in "
          f"{out / 'best_config.json'} (reuse with --config)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        _check_args(args)
        set_threads(args.threads)
        opts = _options(args)
        if args.search:
            return search(args, opts)
        train_split, select_split = ("search-train", "val") if args.select == "val" else ("train", "eval")
        res = _train_once(args, opts, train_split, select_split, Path(args.out), progress=not args.no_progress)
        print(json.dumps({"out": args.out, **res}))
        return 0

    return run_cli("moe-train", body)


if __name__ == "__main__":
    sys.exit(main())
