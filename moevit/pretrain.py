"""Pretraining of the trunk on a large procedurally generated corpus (``make pretrain``): the start of every scenes
experiment (``moe-train --init weights/...``), since ImageNet weights cannot be downloaded here and small data from
scratch does not learn.

The corpus is :mod:`moevit.scenes` with ``zoo=1``: species drawn at random from the trait space (body, head, ears,
legs, tail, pattern, colours), never the benchmark's named species, on the same kinds of backgrounds, day and
night, with blanks; frames are rendered up front in ``--render-workers`` processes and kept in memory (uint8,
1 GB for the default corpus), or on access with ``--render-workers 0`` (no memory, 2-3x slower per epoch). Labels
are the generator's species (supervised). Augmentation on top of the generator's own variety: random resized
crop, brightness / contrast jitter, random grey, horizontal flip, MixUp and label smoothing.

    python -m moevit.pretrain --out runs/pretrain96 --weights weights/pretrain-mobilevitv2_050-96.safetensors \\
        --image-size 96 --classes 64 --per-class 600 --epochs 3 --threads 2 --render-workers 2

``--budget-min`` times a few training steps first and sizes the corpus (one epoch = every image once) to fit the
budget; ``--per-class`` fixes it instead (the recipe JSON written beside the weights records both, so a rerun
with ``--per-class`` reproduces the same corpus). The run resumes from ``--out`` when interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

import moevit
from moevit.checkpoint import load_checkpoint, save_checkpoint
from moevit.data import open_dataset
from moevit.train import TrainConfig, Trainer, evaluate


class SceneAugment:
    """Random resized crop (area 0.55-1, aspect 3/4-4/3), brightness/contrast jitter and random grey on a
    normalised [3, S, S] tensor; draws from torch's global RNG (seeded per step by the Trainer)."""

    def __init__(self, scale: tuple[float, float] = (0.55, 1.0), jitter: float = 0.3, grey: float = 0.2) -> None:
        self.scale, self.jitter, self.grey = scale, jitter, grey

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w = x.shape
        area = float(torch.empty(1).uniform_(*self.scale)) * h * w
        ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3))))
        ch = min(h, max(8, int(round(math.sqrt(area / ratio)))))
        cw = min(w, max(8, int(round(math.sqrt(area * ratio)))))
        y0 = int(torch.randint(0, h - ch + 1, (1,)))
        x0 = int(torch.randint(0, w - cw + 1, (1,)))
        x = F.interpolate(x[None, :, y0:y0 + ch, x0:x0 + cw], size=(h, w), mode="bilinear", align_corners=False)[0]
        if float(torch.rand(1)) < self.grey:
            x = x.mean(dim=0, keepdim=True).expand(3, -1, -1).contiguous()
        c = 1.0 + float(torch.empty(1).uniform_(-self.jitter, self.jitter))
        b = float(torch.empty(1).uniform_(-self.jitter, self.jitter))
        return (x - x.mean()) * c + x.mean() + b

    def __repr__(self) -> str:
        return f"SceneAugment(scale={self.scale}, jitter={self.jitter}, grey={self.grey})"


def corpus_spec(classes: int, per_class: int, size: int, seed: int, render_workers: int = 0) -> str:
    """The corpus's data spec: rendered on access (``render_workers`` 0, no memory) or up front in that many
    processes and kept in memory (uint8; much faster per epoch, since a burst's background is drawn once)."""
    how = "lazy=1" if render_workers <= 0 else f"workers={render_workers}"
    return f"scenes:classes={classes},per_class={per_class},size={size},zoo=1,seed={seed},split_seed={seed},{how}"


def _probe(args: argparse.Namespace, cfg: TrainConfig) -> float:
    """Training images per second of this model at this size on this machine now (a few real steps)."""
    spec = corpus_spec(args.classes, 20, args.image_size, args.seed)
    data = open_dataset(spec, image_size=args.image_size, split="train", train_transform=SceneAugment())
    model = moevit.create_model(args.arch, num_classes=len(data.classes))
    trainer = Trainer(model, data, None, cfg, Path(args.out) / "probe", progress=False, log=lambda s: None)
    trainer.train_step(0, 0)
    t0 = time.perf_counter()
    steps = 6
    for i in range(1, steps + 1):
        trainer.train_step(0, i)
    shutil.rmtree(Path(args.out) / "probe", ignore_errors=True)
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moevit.pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="mobilevitv2_050")
    ap.add_argument("--out", default="runs/pretrain", help="run folder (resumed when it holds a run)")
    ap.add_argument("--weights", default="weights/pretrain-mobilevitv2_050-96.safetensors")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--classes", type=int, default=64, help="random species in the corpus (plus blank)")
    ap.add_argument("--per-class", type=int, default=None, help="images per species (default: from --budget-min)")
    ap.add_argument("--budget-min", type=float, default=40.0, help="wall-clock minutes of training to size for")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--render-workers", type=int, default=0,
                    help="render the corpus up front in N processes and keep it in memory (0: render on access)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr_moe=args.lr, lr_head=args.lr,
                      lr_rest=args.lr, wd_head=0.05, wd_rest=0.05, warmup_epochs=0.15, mixup=0.2, mixup_prob=0.5,
                      flip=0.5, label_smoothing=0.1, seed=args.seed, save_every=100)
    out = Path(args.out)
    recipe_path = out / "recipe.json"
    probe = None
    if args.per_class is None and recipe_path.exists():  # resuming: the corpus must not change size
        args.per_class = json.loads(recipe_path.read_text())["per_class"]
    if args.per_class is None:
        probe = _probe(args, cfg)
        total = probe * args.budget_min * 60 / args.epochs
        args.per_class = max(20, int(total / ((args.classes + 1) * 0.8)))  # the train split is 80 % of the corpus
        print(f"probe: {probe:.1f} training images/s -> {args.per_class} images per species "
              f"for {args.budget_min:g} min", flush=True)
    spec = corpus_spec(args.classes, args.per_class, args.image_size, args.seed, args.render_workers)
    out.mkdir(parents=True, exist_ok=True)
    recipe = {"command": "python -m moevit.pretrain " + " ".join(sys.argv[1:] if argv is None else argv),
              "corpus": spec, "per_class": args.per_class, "image_size": args.image_size, "arch": args.arch,
              "train": asdict(cfg), "augment": repr(SceneAugment()), "probe_images_per_s": probe,
              "eval_fraction": 0.03, "threads": args.threads, "host": platform.node()}
    recipe_path.write_text(json.dumps(recipe, indent=2))
    train = open_dataset(spec, image_size=args.image_size, split="train", eval_fraction=0.03,
                         train_transform=SceneAugment())
    held = open_dataset(spec, image_size=args.image_size, split="eval", eval_fraction=0.03)
    print(f"train: {train.describe()}\nheld out: {held.describe()}", flush=True)
    model = moevit.build_model(moevit.ModelConfig(arch=args.arch, num_classes=len(train.classes),
                                                  labels=tuple(train.classes), image_size=args.image_size))
    trainer = Trainer(model, train, held, cfg, out, progress=not args.no_progress)
    trainer.try_resume()
    t0 = time.perf_counter()
    trainer.fit()
    best = load_checkpoint(out / "best.safetensors")
    final = evaluate(best, held)
    weights = Path(args.weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(best, weights, extra={"recipe": json.dumps({k: recipe[k] for k in ("command", "corpus")})})
    recipe.update(held_out_top1=final["top1"], held_out_top5=final["top5"], held_out_images=final["n"],
                  history=trainer.history, train_seconds_this_session=time.perf_counter() - t0,
                  weights=str(weights), weights_bytes=weights.stat().st_size)
    weights.with_suffix(".json").write_text(json.dumps(recipe, indent=2) + "\n")
    print(json.dumps({"weights": str(weights), "held_out_top1": final["top1"], "held_out_top5": final["top5"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
