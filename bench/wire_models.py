#!/usr/bin/env python3
"""Trains the small MoE models bench_wire.py measures: per seed, a dense MobileViTV2-0.5, its conversion to MoE-8
at layers 1, 5 and 8 (as ``make demo``), and a short fine-tune, all with the project's CLIs.

    nice -n 5 .venv/bin/python bench/wire_models.py --seeds 0 1 2 --out runs/wire

Defaults are sized for a shared 2-core machine (a seed takes ~10-15 min of one core): ``synthetic`` at 32 px,
4 classes x 100 images. A model already in place (``OUT/s{seed}/moe.safetensors``) is kept.

``--recipe scenes`` trains as bench/scenes_results.py does (from the pretrained trunk ``--init``, its dense and
fine-tuning recipes, checkpoints chosen on ``val``, K within the dense model's parameters); ``--ft-image-size``
fine-tunes the MoE (and converts it) at another size than the dense model's, e.g. dense at 128 px, MoE at 256 px,
so that its routers decide on 256-px patches; ``--rescale-epochs N`` first trains the dense model N epochs more at
that size (2 MoE epochs at the fine-tuning learning rates do not adapt a 128-px trunk to 256 px: eval top-1 0.85 at
128 px became 0.66 at 256 px). Dense at 128 px, 2 epochs at 256, MoE-16 at [8] at 256 px:

    nice -n 5 .venv/bin/python bench/wire_models.py --recipe scenes --image-size 128 --ft-image-size 256 \
        --rescale-epochs 2 --layers 8 --experts 16 --threads 2 --out runs/wire-scenes256 \
        --data scenes:classes=10,per_class=200,size=256,split_seed=0,workers=2
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path


def step(args: list[str], log) -> None:
    print("$", " ".join(args), file=log, flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", *args], check=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"({time.perf_counter() - t0:.0f} s)", file=log, flush=True)


LAYERS, EXPERTS = (1, 5, 8), 8  # the default MoE; others are named by their tag beside it (OUT/s0/moe-<tag>...)


def recipes(recipe: str, epochs: int, ft_epochs: int, init: str | None,
            rescale_epochs: int = 0) -> tuple[list[str], list[str], list[str], list[str]]:
    """moe-train options: (every run, the dense run, the dense model's run at the fine-tuning size, the MoE's
    fine-tuning)."""
    if recipe == "scenes":
        from scenes_results import dense_recipe, ft_recipe

        return (["--select", "val"], [*(["--init", init] if init else []), *dense_recipe(epochs)],
                dense_recipe(rescale_epochs), ft_recipe(ft_epochs))
    return ([], ["--epochs", str(epochs), "--batch-size", "32", "--lr-rest", "2e-3"],
            ["--epochs", str(rescale_epochs), "--batch-size", "32", "--lr-rest", "2e-3"],
            ["--epochs", str(ft_epochs), "--batch-size", "32", "--lr-rest", "1e-4", "--lr-head", "2e-4",
             "--lr-moe", "3e-4", "--warmup-epochs", "0.2"])


def hidden(recipe: str, dense_path: Path, layers: tuple[int, ...], experts: int) -> int:
    """K: 64 (the digits runs), or under ``scenes`` the largest K within the dense model's parameters."""
    if recipe != "scenes":
        return 64
    from moevit.checkpoint import load_checkpoint
    from moevit.convert import hidden_within_budget

    return hidden_within_budget(load_checkpoint(dense_path), layers, experts)


def build(seed: int, out: Path, data: str, size: int, epochs: int, ft_epochs: int, threads: int, *,
          recipe: str = "digits", init: str | None = None, ft_size: int | None = None,
          layers: tuple[int, ...] = LAYERS, experts: int = EXPERTS, rescale_epochs: int = 0) -> Path:
    run = out / f"s{seed}"
    # the seed's dense model serves every MoE made from it
    tag = "" if (tuple(layers), experts) == (LAYERS, EXPERTS) else f"-{experts}-L{'-'.join(map(str, layers))}"
    tag += f"-rescaled{rescale_epochs}" if rescale_epochs else ""
    moe = run / f"moe{tag}.safetensors"
    if moe.exists():
        return moe
    run.mkdir(parents=True, exist_ok=True)
    ft_size = ft_size or size
    both, dense_args, rescale_args, ft_args = recipes(recipe, epochs, ft_epochs, init, rescale_epochs)
    common = ["--data", data, "--seed", str(seed), "--threads", str(threads), "--no-progress", *both]
    dense = run / "dense" / "best.safetensors"
    with open(run / "build.log", "a") as log:
        # moe-train resumes a run it finds stopped part-way; a finished one has its report (--select) or is kept
        if not (dense.parent / "report.json").exists() and not (dense.exists() and not both):
            step(["moevit.cli.train", "--model", "mobilevitv2_050", *common, "--image-size", str(size), *dense_args,
                  "--out", str(run / "dense")], log)
        if rescale_epochs:  # the dense model goes on at the fine-tuning size first: features at that scale
            rescaled = run / f"dense-{ft_size}px-e{rescale_epochs}"
            if not (rescaled / "report.json").exists() and not ((rescaled / "best.safetensors").exists() and not both):
                step(["moevit.cli.train", "--model", str(dense), *common, "--image-size", str(ft_size),
                      *rescale_args, "--out", str(rescaled)], log)
            dense = rescaled / "best.safetensors"
        k = hidden(recipe, dense, tuple(layers), experts)
        step(["moevit.cli.convert", "--dense", str(dense), "--data", data,
              "--layers", *map(str, layers), "--experts", str(experts), "--hidden", str(k),
              "--seed", str(seed), "--sizes", f"{ft_size}:{ft_size}", "--threads", str(threads),
              "--out", str(run / f"moe{tag}-converted.safetensors")], log)
        step(["moevit.cli.train", "--model", str(run / f"moe{tag}-converted.safetensors"), *common,
              "--image-size", str(ft_size), *ft_args, "--out", str(run / f"moe{tag}-ft")], log)
    shutil.copyfile(run / f"moe{tag}-ft" / "best.safetensors", moe)
    return moe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/wire")
    ap.add_argument("--data", default="synthetic:classes=4,per_class=100,size=32")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--recipe", choices=("digits", "scenes"), default="digits",
                    help="scenes: bench/scenes_results.py's recipes, chosen on val, K within the dense budget")
    ap.add_argument("--init", default=None, help="pretrained trunk of the dense model (--recipe scenes; default "
                    "weights/pretrain-mobilevitv2_050-96.safetensors)")
    ap.add_argument("--ft-image-size", type=int, default=None, help="convert and fine-tune the MoE at this size "
                    "(default: --image-size)")
    ap.add_argument("--layers", type=int, nargs="+", default=list(LAYERS), help="MoE layers (default 1 5 8)")
    ap.add_argument("--experts", type=int, default=EXPERTS, help="experts per MoE layer (default 8)")
    ap.add_argument("--rescale-epochs", type=int, default=0, help="train the dense model this many epochs more at "
                    "--ft-image-size (its dense recipe) before converting it (default 0)")
    args = ap.parse_args()
    init = args.init or ("weights/pretrain-mobilevitv2_050-96.safetensors" if args.recipe == "scenes" else None)
    for seed in args.seeds:
        print(build(seed, Path(args.out), args.data, args.image_size, args.epochs, args.ft_epochs, args.threads,
                    recipe=args.recipe, init=init, ft_size=args.ft_image_size, layers=tuple(args.layers),
                    experts=args.experts, rescale_epochs=args.rescale_epochs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
