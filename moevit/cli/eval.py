"""``moe-eval --model FILE --data SPEC``: top-1, top-5 and per-class accuracy, parameters, MACs, latency per image;
for a checkpoint calibrated by moe-calibrate, its ECE without and with the stored temperature and its blank filter."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import TYPE_CHECKING

import torch

from moevit.calibration import collect_logits, evaluate_calibration, read_calibration
from moevit.checkpoint import load_checkpoint
from moevit.cli.common import add_onnx_camera_args, onnx_camera_config, run_cli, set_threads
from moevit.data import open_dataset
from moevit.flops import count_macs, count_params
from moevit.kinds import class_kinds
from moevit.train import scores

if TYPE_CHECKING:
    from moevit.onnx_camera import OnnxCameraConfig


@torch.no_grad()
def latency_ms(model, image_size: int, repeats: int = 20) -> dict[str, float]:
    """Batch-1 forward latency: median and p90 over ``repeats`` runs after 3 warm-up runs."""
    x = torch.randn(1, 3, image_size, image_size)
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {"p50": statistics.median(times), "p90": times[int(0.9 * (len(times) - 1))]}


def _runner(config: OnnxCameraConfig | None, model: torch.nn.Module, size: int) -> torch.nn.Module:
    """What computes the logits: the model (torch, ``config`` None) or its ONNX graphs on onnxruntime."""
    if config is None:
        return model
    from moevit.checkpoint import model_fingerprint
    from moevit.fuse import folded_copy
    from moevit.onnx_camera import OnnxCamera, OnnxCameraError

    try:
        return OnnxCamera(folded_copy(model), model_fingerprint(model), size, config)
    except OnnxCameraError as e:
        raise ValueError(str(e)) from None


def _describe(config: OnnxCameraConfig | None) -> str:
    return "torch" if config is None else f"onnxruntime {config.precision}"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moe-eval", description=__doc__)
    ap.add_argument("--model", required=True, help="a moevit .safetensors checkpoint")
    ap.add_argument("--data", required=True, help="dataset spec: digits | synthetic[:k=v,…] | folder:PATH | ssw60:PATH")
    ap.add_argument("--split", default="eval", help="eval (the seeded 20%% holdout, default) | test | train | val")
    ap.add_argument("--seed", type=int, default=0, help="seed of the holdout split (as in moe-train)")
    ap.add_argument("--image-size", type=int, default=None, help="default: the size the model was trained at")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print one JSON object (fractions, not percents)")
    add_onnx_camera_args(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def body() -> int:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.image_size is not None and not 8 <= args.image_size <= 2048:
            raise ValueError(f"--image-size must be 8-2048 pixels, got {args.image_size}")
        onnx = onnx_camera_config(args, args.model)
        set_threads(args.threads)
        model = load_checkpoint(args.model)
        size = args.image_size or model.config.image_size
        data = open_dataset(args.data, image_size=size, split=args.split, seed=args.seed)
        data.check_classes(model.config.num_classes, args.model)
        runner = _runner(onnx, model, size)
        # one pass, each image decoded once: unreadable files are left out and listed, never replaced by others
        z, y = collect_logits(runner, data, args.batch_size, drop_unreadable=True, progress=not args.json)
        skipped = data.skipped
        if not len(y):
            raise ValueError(f"{args.data} [{args.split}]: none of its {len(skipped)} images is readable")
        res = scores(z, y, model.config.num_classes)
        out = {"model": args.model, "data": args.data, "split": args.split, "image_size": size,
               "top1": res["top1"], "top5": res["top5"], "n": res["n"],
               "per_class": dict(zip(data.classes, res["per_class"], strict=True)),
               "params": count_params(model), "macs": count_macs(model, size),
               "latency_ms": latency_ms(runner, size), "backend": _describe(onnx),
               "skipped": [p for p, _ in skipped],
               "skipped_reasons": dict(skipped)}
        cal = read_calibration(args.model, model.config.labels)
        if cal.fitted_on is not None:  # stored by moe-calibrate: measure it on this split too
            out["calibration"] = evaluate_calibration(cal, z, y, class_kinds(model.config.labels))
        if args.json:
            print(json.dumps(out))
            return 0
        print(f"{args.model} on {data.describe()}")
        print(f"top-1 {out['top1']:.4f}   top-5 {out['top5']:.4f}   ({out['n']} images at {size}px"
              + (f"; {len(skipped)} unreadable left out)" if skipped else ")"))
        for path, reason in skipped:
            print(f"  unreadable, not evaluated: {path}: {reason}")
        print(f"parameters {out['params']:,}   MACs/image {out['macs']:,}   "
              f"latency/image p50 {out['latency_ms']['p50']:.1f} ms (batch 1, {out['backend']})")
        print("per class: " + ", ".join(f"{c} {a:.3f}" if a is not None else f"{c} -"
                                         for c, a in out["per_class"].items()))
        if "calibration" in out:
            c = out["calibration"]
            print(f"calibration (moe-calibrate, T={c['temperature']:.3f}, fitted on {c['fitted_on']}): ECE "
                  f"{c['ece_before']:.4f} -> {c['ece_after']:.4f}" + (
                      f"; blank filter P(blank) >= {c['blank_threshold']:.4f}: animal recall {c['animal_recall']}, "
                      f"blanks filtered {c['blanks_filtered']}" if c.get("blank_threshold") is not None else ""))
        return 0

    return run_cli("moe-eval", body)


if __name__ == "__main__":
    sys.exit(main())
