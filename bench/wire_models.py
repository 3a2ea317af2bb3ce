#!/usr/bin/env python3
"""Trains the small MoE models bench_wire.py measures: per seed, a dense MobileViTV2-0.5, its conversion to MoE-8
at layers 1, 5 and 8 (as ``make demo``), and a short fine-tune, all with the project's CLIs.

    nice -n 5 .venv/bin/python bench/wire_models.py --seeds 0 1 2 --out runs/wire

Defaults are sized for a shared 2-core machine (a seed takes ~10-15 min of one core): ``synthetic`` at 32 px,
4 classes x 100 images. A model already in place (``OUT/s{seed}/moe.safetensors``) is kept.
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


def build(seed: int, out: Path, data: str, size: int, epochs: int, ft_epochs: int, threads: int) -> Path:
    run = out / f"s{seed}"
    moe = run / "moe.safetensors"
    if moe.exists():
        return moe
    run.mkdir(parents=True, exist_ok=True)
    common = ["--data", data, "--image-size", str(size), "--seed", str(seed), "--threads", str(threads),
              "--no-progress"]
    with open(run / "build.log", "a") as log:
        step(["moevit.cli.train", "--model", "mobilevitv2_050", *common, "--epochs", str(epochs),
              "--batch-size", "32", "--lr-rest", "2e-3", "--out", str(run / "dense")], log)
        step(["moevit.cli.convert", "--dense", str(run / "dense" / "best.safetensors"), "--data", data,
              "--layers", "1", "5", "8", "--experts", "8", "--hidden", "64", "--seed", str(seed),
              "--sizes", f"{size}:{size}", "--threads", str(threads),
              "--out", str(run / "moe-converted.safetensors")], log)
        step(["moevit.cli.train", "--model", str(run / "moe-converted.safetensors"), *common,
              "--epochs", str(ft_epochs), "--batch-size", "32", "--lr-rest", "1e-4", "--lr-head", "2e-4",
              "--lr-moe", "3e-4", "--warmup-epochs", "0.2", "--out", str(run / "moe-ft")], log)
    shutil.copyfile(run / "moe-ft" / "best.safetensors", moe)
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
    args = ap.parse_args()
    for seed in args.seeds:
        print(build(seed, Path(args.out), args.data, args.image_size, args.epochs, args.ft_epochs, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
