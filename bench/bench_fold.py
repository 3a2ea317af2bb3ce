"""BatchNorm folded into the convolutions (what the coordinator runs) vs the trainable model: forward time.

The seeded random MoE model of ``bench_split.py`` at 256×256 (channels-last, one torch thread, pinned to one core
when there are two), batch 1 and batch 8, interleaved rounds; plus the largest logit difference and the top-1
agreement between the two on the same random images, and on the demo model's held-out digits when it was built
(``make demo``).

Run: ``.venv/bin/python bench/bench_fold.py [--rounds 30]`` (about 2 minutes; writes ``bench/results/fold.json``).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import load_average, summarize, time_interleaved, write_result  # noqa: E402

DEMO_MODEL = Path("runs/demo/moe.safetensors")


def _agreement(a, b) -> dict[str, float]:
    return {"max_abs_logit_diff": float((a - b).abs().max()),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).float().mean()), "images": len(a)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds at batch 1 (batch 8: a third of them)")
    ap.add_argument("--layers", default="1,3,5,7", help="MoE layers of the random model")
    ap.add_argument("--out", default="bench/results/fold.json")
    args = ap.parse_args(argv)
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {0})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from bench.bench_split import IMAGE_SIZE, build_model, random_images
    from moevit.fuse import fold_batchnorm, folded_copy

    torch.set_num_threads(1)
    layers = tuple(int(i) for i in args.layers.split(","))
    plain = build_model(layers).eval().to(memory_format=torch.channels_last)
    folded = copy.deepcopy(plain)
    n_folded = fold_batchnorm(folded)
    xs = torch.stack(list(random_images(16, IMAGE_SIZE, seed=3))).contiguous(memory_format=torch.channels_last)
    result = {"benchmark": "fold", "settings": {"layers": list(layers), "image_size": IMAGE_SIZE, "threads": 1,
                                                "memory_format": "channels_last", "rounds": args.rounds},
              "batchnorms_folded": n_folded, "loadavg_before": load_average(), "batches": {}}
    with torch.inference_mode():
        result["random_model"] = _agreement(plain(xs), folded(xs))
        for batch, rounds in ((1, args.rounds), (8, max(3, args.rounds // 3))):
            x = xs[:batch]
            times = time_interleaved({"plain": lambda x=x: plain(x), "folded": lambda x=x: folded(x)}, rounds=rounds)
            result["batches"][str(batch)] = {
                "ms": {k: summarize(v) for k, v in times.items()},
                "ratio_folded_vs_plain": round(statistics.median(times["folded"]) / statistics.median(times["plain"]),
                                               4),
                "median_round_ratio": round(statistics.median(
                    f / p for f, p in zip(times["folded"], times["plain"], strict=True)), 4)}
        if DEMO_MODEL.exists():
            from moevit.checkpoint import load_checkpoint
            from moevit.data import open_dataset

            demo = load_checkpoint(DEMO_MODEL).eval()
            demo_folded = folded_copy(demo)
            ds = open_dataset("digits", image_size=demo.config.image_size, split="eval")
            x = torch.stack([ds[i][0] for i in range(len(ds))])
            result["demo_model_eval_digits"] = _agreement(demo(x), demo_folded(x))
    result["loadavg_after"] = load_average()
    path = write_result(args.out, result)
    for batch, r in result["batches"].items():
        print(f"batch {batch}: folded {r['ms']['folded']['p50']:.1f} ms vs {r['ms']['plain']['p50']:.1f} ms "
              f"(ratio {r['ratio_folded_vs_plain']:.3f})")
    for key in ("random_model", "demo_model_eval_digits"):
        if key in result:
            r = result[key]
            print(f"{key}: max |logit diff| {r['max_abs_logit_diff']:.2e}, top-1 agreement "
                  f"{100 * r['top1_agreement']:.2f} % of {r['images']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
