"""The gate before any MoE claim (issue 17): top-1 of a dense model with each transformer layer's MLP zeroed in turn.

    python bench/gate.py --model runs/scenes/dense-s0/best.safetensors --data scenes:split_seed=0 --image-size 128

A benchmark only tests per-patch experts at a layer if that layer's MLP matters there: on scenes at 128 px,
zeroing layer 8's MLP must cost at least 5 points of top-1 (``--need``). Writes ``bench/results/gate.json``: per
layer the top-1 with that MLP's output replaced by zeros, the drop in points and the agreement with the intact
model's predictions, on the held-out split the model was not selected on (``eval``). Several ``--model`` files
(one per training seed) give each layer's mean drop too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from moevit.checkpoint import load_checkpoint  # noqa: E402
from moevit.data import open_dataset  # noqa: E402


@torch.no_grad()
def predictions(model: torch.nn.Module, data, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    preds, labels = [], []
    for i in range(0, len(data), batch):
        items = [data[j] for j in range(i, min(i + batch, len(data)))]
        x = torch.stack([x for x, _ in items])
        preds.append(model(x).argmax(dim=1))
        labels.append(torch.tensor([y for _, y in items]))
    return torch.cat(preds), torch.cat(labels)


def gate(model: torch.nn.Module, data) -> dict:
    base, y = predictions(model, data)
    rows = [{"layer": None, "top1": float((base == y).float().mean()), "agreement": 1.0}]
    for i, blk in enumerate(model.transformer_layers()):
        handle = blk.mlp.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
        try:
            pred, _ = predictions(model, data)
        finally:
            handle.remove()
        rows.append({"layer": i, "top1": float((pred == y).float().mean()),
                     "agreement": float((pred == base).float().mean())})
    for r in rows:
        r["drop_points"] = 100.0 * (rows[0]["top1"] - r["top1"])
    return {"rows": rows, "images": len(y)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", required=True, help="dense checkpoint(s), e.g. one per training seed")
    ap.add_argument("--data", required=True)
    ap.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's training size")
    ap.add_argument("--split", default="eval")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--layer", type=int, default=8, help="the layer the gate is about")
    ap.add_argument("--need", type=float, default=5.0, help="points its zeroing must cost")
    ap.add_argument("--out", default="bench/results/gate.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    runs = []
    for path in args.model:
        model = load_checkpoint(path)
        size = args.image_size or model.config.image_size
        data = open_dataset(args.data, image_size=size, split=args.split, seed=args.split_seed)
        res = gate(model, data)
        runs.append({"model": path, "image_size": size, **res})
        print(f"{path} ({res['images']} {args.split} images at {size} px): intact top-1 {res['rows'][0]['top1']:.4f}")
        for r in res["rows"][1:]:
            print(f"  layer {r['layer']} MLP zeroed: top-1 {r['top1']:.4f}  drop {r['drop_points']:+.1f} points  "
                  f"agreement {r['agreement']:.4f}")
    drops = [next(r["drop_points"] for r in run["rows"] if r["layer"] == args.layer) for run in runs]
    mean_drop = statistics.fmean(drops)
    verdict = "pass" if mean_drop >= args.need else "fail"
    per_layer = {str(i): statistics.fmean(next(r["drop_points"] for r in run["rows"] if r["layer"] == i)
                                          for run in runs) for i in range(9)}
    write_result(args.out, {"data": args.data, "split": args.split, "runs": runs, "layer": args.layer,
                            "need_points": args.need, "drop_points": drops, "mean_drop_points": mean_drop,
                            "mean_drop_per_layer": per_layer, "verdict": verdict,
                            "seconds": time.perf_counter() - t0})
    print(f"gate: zeroing layer {args.layer}'s MLP costs {mean_drop:.1f} points (need >= {args.need:g}): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
