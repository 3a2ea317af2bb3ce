"""Adaptive vs each fixed strategy on the real coordinator and workers while a link changes mid-run, and the same
scenario in the simulator (issue 19, items 4 and 5): ``moe-sim --emulate --sweep`` on examples/sites-adaptive.yaml
(a camera that cannot hold the model, a relay for the experts it cannot hold, a hut that can hold it all, behind a
link that fades) and examples/sweep-adaptive.yaml (the hut's link 5 -> 0.25 -> 5 Mbit/s, 30 s each, an image
every 0.5 s).

    python bench/bench_adaptive_emulated.py        # -> bench/results/adaptive_emulated.json + .png (~3 min)

Writes the record of :func:`moevit.sim.emulate_schedule.emulate_schedule` (per phase: p50/p95 latency and energy
per image of every strategy, emulated and simulated, the errors both ways, the targets) and a plot of latency and
the camera's energy per image over time per strategy (emulated solid, simulated dashed). Needs the demo model and
its split placement (make demo, make demo-split). Measured on the shared 2-core machine under load: every figure
moves with it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
try:
    from bench.common import write_result
except ImportError:  # run as a script from bench/
    from common import write_result

from moevit.sim.emulate_schedule import ScheduleOptions, emulate_schedule, format_schedule_report

COLOURS = {"split": "tab:blue", "offload-image": "tab:orange", "local-moe": "tab:green", "adaptive": "tab:red"}


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for s, rows in record["emulated_images"].items():
        t = [r["t_s"] for r in rows]  # when it ran (a slot that started late ran late)
        ax1.plot(t, [r["latency_s"] * 1e3 for r in rows], color=COLOURS.get(s), lw=1, label=f"{s} (emulated)")
        cam = np.array([r["camera_j"] * 1e3 for r in rows])
        k = 5  # a moving mean over 5 images: per image the camera's busy time carries the machine's load
        smooth = np.convolve(cam, np.ones(k) / k, mode="same")
        ax2.plot(t, smooth, color=COLOURS.get(s), lw=1, label=f"{s} (emulated, mean of 5)")
    for s, r in record["simulated_images"].items():
        if s not in record["emulated_images"]:
            continue
        ax1.plot(r["arrival_s"], [v * 1e3 for v in r["latency_s"]], color=COLOURS.get(s), lw=1, ls="--",
                 label=f"{s} (simulated)")
        ax2.plot(r["arrival_s"], [v * 1e3 for v in r["camera_j"]], color=COLOURS.get(s), lw=1, ls="--")
    for row in record["per_phase"][1:-1]:  # the schedule's steps
        for ax in (ax1, ax2):
            ax.axvline(row["from_s"], color="grey", ls=":")
    ax1.set_yscale("log")
    ax1.set_ylabel("latency per image (ms)")
    ax2.set_ylabel("camera energy per image (mJ)")
    ax2.set_xlabel("time since the start of the measured run (s)")
    phases = " -> ".join(p["phase"] for p in record["per_phase"][:-1])
    ax1.set_title(f"{Path(record['topology']).name}: {phases}", fontsize=9)
    ax1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default="examples/sites-adaptive.yaml")
    ap.add_argument("--sweep", default="examples/sweep-adaptive.yaml")
    ap.add_argument("--placement", default="runs/demo/placement-split.yaml")
    ap.add_argument("--calibration-images", type=int, default=20)
    ap.add_argument("--work", default="runs/adaptive-emulated", help="folder for the trace and calibration.json")
    ap.add_argument("--out", default="bench/results/adaptive_emulated.json")
    args = ap.parse_args()
    record = emulate_schedule(ScheduleOptions(topology=args.topology, sweep=args.sweep, out=args.work,
                                              placement=args.placement, calibration_images=args.calibration_images),
                              log=lambda s: print(s, file=sys.stderr))
    record["command"] = "python bench/bench_adaptive_emulated.py " + " ".join(sys.argv[1:])
    path = write_result(args.out, record)
    print(format_schedule_report(record))
    plot(record, Path(path).with_suffix(".png"))
    print(f"wrote {path} and {Path(path).with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
