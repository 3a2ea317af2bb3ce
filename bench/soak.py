"""Command line of the soak (``moevit.sim.soak``): many Classify requests through a replicated split deployment
under seeded random worker kills and link faults; writes one JSON file (``bench/common.py``'s ``write_result``) and
a plot next to it (``.png``).

    .venv/bin/python bench/soak.py [--requests 10000] [--seed 0] [--harsh] [--out bench/results/soak.json]

What is deployed, the faults and what is measured are described in :mod:`moevit.sim.soak`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # ``python bench/soak.py``: bench.common importable
    sys.path.insert(0, str(REPO_ROOT))

from moevit.sim.soak import KINDS, SoakConfig, format_summary, plot, run_soak  # noqa: E402

from bench.common import write_result  # noqa: E402


def _pair(text: str) -> tuple[float, float]:
    parts = [float(v) for v in text.split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or parts[0] > parts[1] or parts[0] < 0:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX seconds, got {text!r}")
    return parts[0], parts[1]


def _parser() -> argparse.ArgumentParser:
    d = SoakConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--requests", type=int, default=d.requests, help="requests in all")
    ap.add_argument("--clients", type=int, default=d.clients, help="closed-loop client threads")
    ap.add_argument("--seed", type=int, default=d.seed, help="seeds the fault schedule and the images")
    ap.add_argument("--fallback", default=d.fallback, choices=("fail", "local", "nearest", "skip"),
                    help="the topology's fallback")
    ap.add_argument("--deadline", type=float, default=d.deadline_s, help="per-layer RPC deadline (s)")
    ap.add_argument("--hedge-ms", type=float, default=None,
                    help="hedge calls still unanswered after this many ms; None: no hedging")
    ap.add_argument("--wire", default=d.wire, choices=("fp16", "fp32", "bf16"),
                    help="token dtype on the wire (fp32: answers comparable with the in-process model)")
    ap.add_argument("--max-batch", type=int, default=d.max_batch, help="the Classify server's batches")
    ap.add_argument("--model", help="MoE checkpoint; None: a seeded small_moe_model at 64 px")
    ap.add_argument("--image-size", type=int, default=None, help="default: 64, or the --model's own")
    ap.add_argument("--images", type=int, default=d.images, help="distinct input images, sent in turn")
    ap.add_argument("--threads", type=int, default=d.threads, help="torch threads of the coordinator")
    ap.add_argument("--harsh", action="store_true", help="faults overlap: both replicas of an expert may be down")
    ap.add_argument("--kinds", default=",".join(KINDS), help="fault kinds to draw from")
    ap.add_argument("--baseline", type=float, default=d.baseline_s, help="fault-free seconds at the start")
    ap.add_argument("--gap", type=_pair, default=d.gap_s, metavar="MIN,MAX", help="seconds between faults")
    ap.add_argument("--kill-down", type=_pair, default=d.kill_down_s, metavar="MIN,MAX",
                    help="seconds before a killed worker is restarted")
    ap.add_argument("--link-down", type=_pair, default=d.link_down_s, metavar="MIN,MAX",
                    help="seconds a link stays down")
    ap.add_argument("--min-faults", type=int, default=0,
                    help="keep sending past --requests until this many faults have ended, and 3 s more")
    ap.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "soak.json"),
                    help="the JSON; the plot goes next to it (.png)")
    ap.add_argument("--no-plot", action="store_true", help="no .png")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = SoakConfig(requests=args.requests, clients=args.clients, seed=args.seed, fallback=args.fallback,
                     deadline_s=args.deadline, hedge_ms=args.hedge_ms, wire=args.wire, max_batch=args.max_batch,
                     model=args.model, image_size=args.image_size, images=args.images, threads=args.threads,
                     harsh=args.harsh, kinds=tuple(k for k in args.kinds.split(",") if k),
                     baseline_s=args.baseline, gap_s=args.gap, kill_down_s=args.kill_down,
                     link_down_s=args.link_down, min_faults=args.min_faults)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the workers inherit it
    t_start = time.monotonic()
    res = run_soak(cfg)
    summary = res.summary
    summary["wall_s"] = round(time.monotonic() - t_start, 1)
    out = write_result(args.out, summary)
    print(format_summary(summary))
    print(f"soak: wrote {out} ({summary['wall_s']:.0f} s in all)")
    if not args.no_plot:
        print(f"soak: plot {plot(summary, Path(args.out).with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
