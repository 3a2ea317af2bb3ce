"""Top-1 of each precision of the camera side (and of int8 experts) on a data set's held-out split.

For every model given: torch fp32 (BatchNorms folded, as the coordinator runs it), onnxruntime fp32, onnxruntime
int8 camera side (calibrated on ``--calibrate-images`` images of the train split), and onnxruntime int8 camera side
plus int8 experts (the worker's OnnxBackend: its default dynamic int8, and static int8 calibrated on the same images'
expert tokens). Also the largest logit difference of onnxruntime fp32 from torch and each variant's top-1 agreement
with torch fp32.

Run: ``nice -n 5 .venv/bin/python bench/onnx_accuracy.py --models runs/demo/moe.safetensors --data digits``
(writes ``bench/results/onnx_accuracy.json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import load_average, write_result  # noqa: E402


def evaluate_model(path: Path, data_spec: str, split: str, calibrate_images: int, cache: Path,
                   log) -> dict[str, Any]:
    import torch
    from moevit.worker.backends import OnnxBackend

    from moevit.checkpoint import load_checkpoint, model_fingerprint
    from moevit.data import open_dataset
    from moevit.fuse import folded_copy
    from moevit.moe.dispatcher import Dispatcher, DispatchPlan
    from moevit.onnx_camera import (
        OnnxCamera,
        OnnxCameraConfig,
        calibration_images,
        calibration_key,
        expert_tokens,
    )

    model = load_checkpoint(path)
    fp = model_fingerprint(model)
    folded = folded_copy(model)
    size = model.config.image_size
    data = open_dataset(data_spec, image_size=size, split=split)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([int(data[i][1]) for i in range(len(data))])
    t0 = time.perf_counter()
    fp32 = OnnxCamera(folded, fp, size, OnnxCameraConfig(cache))
    int8 = OnnxCamera(folded, fp, size, OnnxCameraConfig(cache, precision="int8", calibrate=data_spec,
                                                         calibrate_images=calibrate_images))
    banks = {i: layer.experts for i, layer in folded.moe_layers().items()}
    experts = OnnxBackend(banks, fp, cache, precision="int8")  # the worker's default: dynamic int8
    tokens = expert_tokens(folded, calibration_images(data_spec, size, calibrate_images))
    experts_static = OnnxBackend(banks, fp, cache, precision="int8", calibration=tokens,
                                 calibration_key=calibration_key(data_spec, calibrate_images))
    log(f"{path}: graphs ready in {time.perf_counter() - t0:.0f} s")

    class Int8Experts(Dispatcher):
        def __init__(self, backend) -> None:
            self.backend = backend

        def compute(self, layer_id: int, plan: DispatchPlan) -> list[torch.Tensor]:
            return self.backend.run_many(layer_id, list(zip(plan.experts, plan.chunks(), strict=True)))

    def run(fn) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([fn(b) for b in torch.split(x, 64)])

    logits = {"torch_fp32": run(folded), "ort_fp32": run(fp32), "ort_int8_camera": run(int8)}
    for name, backend in (("ort_int8_camera_and_experts", experts),
                          ("ort_int8_camera_and_static_experts", experts_static)):
        for layer in folded.moe_layers().values():
            layer.set_dispatcher(Int8Experts(backend))
        try:
            logits[name] = run(int8)
        finally:
            for layer in folded.moe_layers().values():
                layer.set_dispatcher(None)
    ref = logits["torch_fp32"]
    out: dict[str, Any] = {"model": str(path), "fingerprint": fp, "images": len(y), "image_size": size,
                           "top1": {}, "agreement_with_torch_fp32": {}}
    for k, v in logits.items():
        out["top1"][k] = float((v.argmax(1) == y).float().mean())
        out["agreement_with_torch_fp32"][k] = float((v.argmax(1) == ref.argmax(1)).float().mean())
    out["max_abs_logit_diff_ort_fp32"] = float((logits["ort_fp32"] - ref).abs().max())
    out["max_abs_logit_diff_ort_int8_camera"] = float((logits["ort_int8_camera"] - ref).abs().max())
    log(f"{path}: top-1 " + ", ".join(f"{k} {v:.4f}" for k, v in out["top1"].items())
        + f"; ort fp32 max |logit diff| {out['max_abs_logit_diff_ort_fp32']:.2e}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="comma-separated MoE checkpoints (e.g. one per seed)")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--split", default="eval")
    ap.add_argument("--calibrate-images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/onnx_accuracy.json")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    models = [Path(m) for m in args.models.split(",") if m]
    result: dict[str, Any] = {"benchmark": "onnx_accuracy", "data": args.data, "split": args.split,
                              "calibrate": f"{args.data} train split, {args.calibrate_images} images",
                              "loadavg_before": load_average(), "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            result["models"].append(evaluate_model(m, args.data, args.split, args.calibrate_images,
                                                   Path(tmp) / "cache", log))
    keys = list(result["models"][0]["top1"])
    result["summary"] = {k: {"mean_top1": statistics.fmean(r["top1"][k] for r in result["models"]),
                             "each": [r["top1"][k] for r in result["models"]]} for k in keys}
    result["summary_loss_points_vs_torch"] = {
        k: round(100 * (result["summary"]["torch_fp32"]["mean_top1"] - v["mean_top1"]), 3)
        for k, v in result["summary"].items()}
    path = write_result(args.out, result)
    log(f"{result['summary_loss_points_vs_torch']} (top-1 points lost vs torch fp32)\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
