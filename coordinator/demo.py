"""``make demo``: the whole system on one machine, as a user would run it.

1. train a dense MobileViTV2-0.5 on scikit-learn's bundled digits (64 px),
2. convert it to a per-patch MoE (Algorithm 1 + Ward + MoEfication) and fine-tune it briefly,
3. run ``moe-coordinator --topology examples/sites.yaml`` on the held-out digits: it starts a worker process for
   each loopback site, sends each MoE layer's tokens to the sites holding their experts, and prints predictions,
   accuracy and per-site traffic.

The model is built once under ``runs/demo/`` and reused; delete that folder to rebuild it. The routing statistics
``runs/demo/stats.json`` (moe-profile; what examples/sweep.yaml's moe-sim command reads) are written after it.

``make demo-split`` (``--split``) shows where the split pays off: examples/sites-split.yaml, a microcontroller camera
and relay neither of which can hold the model. moe-partition places the experts within their memory (and says why
the whole model cannot stay on the camera), moe-sim simulates every strategy on those devices (the whole-model ones
are reported as not fitting) and beside the same boards with memory to spare, and moe-coordinator runs it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

RUNS = Path("runs/demo")
MOE = RUNS / "moe.safetensors"
STATS = RUNS / "stats.json"
TOPOLOGY = Path("examples/sites.yaml")
SPLIT_TOPOLOGY = Path("examples/sites-split.yaml")
SPLIT_SWEEP = Path("examples/sweep-split.yaml")


def step(title: str, args: list[str]) -> None:
    """Run ``python -m args[0] ...``, or the console script ``args[0]`` when it names one (moe-profile, ...)."""
    print(f"\n== {title}\n$ {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    script = Path(sys.executable).parent / args[0]
    subprocess.run([str(script), *args[1:]] if "." not in args[0] else [sys.executable, "-m", *args], check=True)
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


def profile() -> None:
    if STATS.exists():
        print(f"reusing {STATS}")
        return
    step("   routing statistics for moe-partition and moe-sim",
         ["moe-profile", "--model", str(MOE), "--data", "digits", "--out", str(STATS)])


def split_demo() -> None:
    """examples/sites-split.yaml: placed, simulated beside the whole-model strategies, and run."""
    placement = RUNS / "placement-split.yaml"
    step("1/3 place the experts within the boards' memory (why the model cannot stay on the camera: the "
         "all-on-coordinator row)",
         ["moe-partition", "--topology", str(SPLIT_TOPOLOGY), "--stats", str(STATS),
          "--objective", "latency", "--out", str(placement)])
    topology = RUNS / "sites-split.yaml"  # the example plus the placement just made, as a user would add it
    topology.write_text(SPLIT_TOPOLOGY.read_text() + f"placement: {placement.name}\n")
    step("2/3 simulate every strategy on these boards and on the same boards with memory to spare",
         ["moevit.sim.cli", "--topology", str(topology), "--stats", str(STATS), "--placement", str(placement),
          "--sweep", str(SPLIT_SWEEP), "--out", str(RUNS / "sim-split"), "--no-ray", "--no-plots"])
    step("3/3 run it: coordinator on cam-mcu, a worker for relay-mcu, on loopback (this machine's speed, not an MCU's)",
         ["moevit.coordinator.cli", "--topology", str(topology), "--model", str(MOE), "--data", "digits",
          "--limit", "100", "--batch-size", "1", "--out", str(RUNS / "results-split.jsonl")])


def main(argv: list[str] | None = None) -> int:
    split = "--split" in (sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    if MOE.exists():
        print(f"reusing {MOE} (delete {RUNS} to rebuild it)")
    else:
        build_model()
    profile()
    if split:
        split_demo()
        print(f"\nsplit demo done in {time.perf_counter() - t0:.0f} s; README, 'When the split pays off', reads it")
        return 0
    step("3/3 split inference over gRPC: coordinator + a worker per site on loopback",
         ["moevit.coordinator.cli", "--topology", str(TOPOLOGY), "--data", "digits", "--batch-size", "1",
          "--out", str(RUNS / "results.jsonl")])
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s; per-image results in {RUNS / 'results.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
