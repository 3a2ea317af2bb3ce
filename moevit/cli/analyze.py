"""``moe-analyze --model M.safetensors --data SPEC --out DIR``: the class × expert affinity of paper §4.2.2.

Writes per MoE layer a PNG heatmap (before fine-tuning, from Algorithm 1's representative patches through the
model's router; after, from routing softmax on held-out batches), and ``analysis.json`` with the matrices, the
classes grouped under each expert, background experts and expert-usage entropy. Prints a readable summary.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from moevit.analysis import plot_affinity, routing_by_class, summarize_layer
from moevit.checkpoint import load_checkpoint
from moevit.cli.common import StageBar, run_cli, set_threads
from moevit.convert import (
    ConvertConfig,
    affinity_from_samples,
    collect_layer,
    conversion_fingerprint,
    default_sizes,
    sample_class_images,
)
from moevit.data import open_dataset


def _read_report(path: str, model_path: str, conversion: str) -> dict:
    """moe-convert's report, checked to come from the conversion ``model_path`` descends from."""
    try:
        rep = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--report {path}: not JSON ({e})") from None
    if not isinstance(rep, dict) or not isinstance(rep.get("layers"), dict):
        raise ValueError(f"--report {path}: not a moe-convert report (no 'layers')")
    made = rep.get("conversion_fingerprint")
    if made is None:
        raise ValueError(f"--report {path} has no conversion fingerprint (an older moe-convert), so it cannot be "
                         "matched to the model; rerun moe-convert, or leave out --report to recompute")
    if made != conversion:
        raise ValueError(f"--report {path} is of conversion {made}, but {model_path} comes from conversion "
                         f"{conversion}: another model's report; give the report moe-convert wrote for this model, "
                         "or leave out --report to recompute")
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moe-analyze", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an MoE moevit checkpoint")
    ap.add_argument("--data", required=True, help="dataset spec")
    ap.add_argument("--out", required=True, help="output folder for PNGs and analysis.json")
    ap.add_argument("--report", help="moe-convert's report: take the before-fine-tuning affinity from it "
                                     "(otherwise recomputed from representative patches through this model)")
    ap.add_argument("--batches", type=int, default=50, help="held-out batches for the after affinity")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    def body() -> int:
        set_threads(args.threads)
        model = load_checkpoint(args.model)
        if model.config.moe is None:
            raise ValueError(f"{args.model}: a dense model has no experts to analyse")
        size = model.config.image_size
        held_out = open_dataset(args.data, image_size=size, split="eval", seed=args.seed)
        classes = list(held_out.classes)
        if len(classes) != model.config.num_classes:
            raise ValueError(f"{args.model} has {model.config.num_classes} classes but {args.data} has {len(classes)}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        layers = model.moe_layers()
        stages = StageBar(len(layers) + 2, "analyze")
        before: dict[int, torch.Tensor] = {}
        if args.report:
            rep = _read_report(args.report, args.model, conversion_fingerprint(model))
            before = {int(i): torch.tensor(v["affinity_before"]) for i, v in rep.get("layers", {}).items()}
        else:
            cfg = ConvertConfig(seed=args.seed)
            open_at = functools.lru_cache(maxsize=None)(
                lambda s: open_dataset(args.data, image_size=s, split="train", seed=args.seed))
            lo, hi = default_sizes(size)
            picks = sample_class_images(open_at, list(open_at(size).targets), len(classes), cfg,
                                        list(range(lo, hi + 1, 32)))
            for i, layer in layers.items():
                stages(f"layer {i}: representative patches")
                samples = collect_layer(model, i, picks, open_at, cfg)
                before[i] = affinity_from_samples(layer, samples, len(classes))
        stages("routing on held-out batches")
        after = routing_by_class(model, held_out, num_batches=args.batches, batch_size=args.batch_size,
                                 seed=args.seed)
        stages("plots")
        result = {"model": args.model, "data": args.data, "classes": classes, "layers": {}}
        for i in layers:
            summary = summarize_layer(after[i]["affinity"], after[i]["usage"], classes, patches=after[i]["patches"])
            b = before.get(i)
            png = out / f"affinity_layer{i}.png"
            plot_affinity(png, b, after[i]["affinity"], classes, i)
            result["layers"][str(i)] = {
                "affinity_before": b.tolist() if b is not None else None,
                "affinity_after": after[i]["affinity"].tolist(),
                "usage_after": after[i]["usage"].tolist(),
                **summary, "png": png.name,
            }
        stages.close()
        (out / "analysis.json").write_text(json.dumps(result, indent=2))
        for i, r in result["layers"].items():
            print(f"layer {i}: usage entropy {r['usage_entropy']:.3f}, background experts "
                  f"{r['background_experts'] or 'none'}")
            if r["classes_without_patches"]:
                print(f"  no held-out images of: {', '.join(r['classes_without_patches'])} (raise --batches)")
            for e, cls in r["classes_by_expert"].items():
                if cls:
                    print(f"  expert {e:>2}: {', '.join(cls)}")
        print(f"wrote {out / 'analysis.json'} and {len(layers)} heatmap(s)")
        return 0

    return run_cli("moe-analyze", body)


if __name__ == "__main__":
    sys.exit(main())
