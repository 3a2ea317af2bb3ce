"""``make demo``: the whole system on one machine, as a user would run it.

1. train a dense MobileViTV2-0.5 on scikit-learn's bundled digits (64 px),
2. convert it to a per-patch MoE (Algorithm 1 + Ward + MoEfication) and fine-tune it briefly,
3. run ``moe-coordinator --topology examples/sites.yaml`` on the held-out digits: it starts a worker process for
   each loopback site, sends each MoE layer's tokens to the sites holding their experts, and prints predictions,
   accuracy and per-site traffic.

The model is built once under ``runs/demo/`` and reused; delete that folder to rebuild it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

RUNS = Path("runs/demo")
MOE = RUNS / "moe.safetensors"
TOPOLOGY = Path("examples/sites.yaml")


def step(title: str, args: list[str]) -> None:
    print(f"\n== {title}\n$ {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", *args], check=True)
    print(f"({time.perf_counter() - t0:.0f} s)", flush=True)


def build_model() -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    dense = RUNS / "dense"
    step("1/3 train the dense model on digits",
         ["moevit.cli.train", "--model", "mobilevitv2_050", "--data", "digits", "--image-size", "64",
          "--epochs", "8", "--batch-size", "32", "--seed", "0", "--out", str(dense)])
    step("2/3 convert to MoE-8 at layers 1, 5 and 8",
         ["moevit.cli.convert", "--dense", str(dense / "best.safetensors"), "--data", "digits", "--layers", "1,5,8",
          "--experts", "8", "--hidden", "64", "--out", str(RUNS / "moe-converted.safetensors"),
          "--report", str(RUNS / "convert-report.json")])
    step("   fine-tune the MoE model for 2 epochs",
         ["moevit.cli.train", "--model", str(RUNS / "moe-converted.safetensors"), "--data", "digits",
          "--image-size", "64", "--epochs", "2", "--lr-rest", "1e-4", "--lr-head", "2e-4", "--lr-moe", "3e-4",
          "--warmup-epochs", "0.2", "--out", str(RUNS / "moe-ft")])
    shutil.copyfile(RUNS / "moe-ft" / "best.safetensors", MOE)


def main() -> int:
    t0 = time.perf_counter()
    if MOE.exists():
        print(f"reusing {MOE} (delete {RUNS} to rebuild it)")
    else:
        build_model()
    step("3/3 split inference over gRPC: coordinator + a worker per site on loopback",
         ["moevit.coordinator.cli", "--topology", str(TOPOLOGY), "--data", "digits", "--batch-size", "1",
          "--out", str(RUNS / "results.jsonl")])
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s; per-image results in {RUNS / 'results.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
