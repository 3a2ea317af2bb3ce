"""Where the camera side's time goes on onnxruntime, fp32 beside int8: onnxruntime's own profiler per node.

The seeded random MoE [1,3,5,7] of ``bench_split.py`` at 256 px (as ``bench_onnx_camera.py``), batch 1, one thread:
each segment's session runs ``--runs`` times with profiling on (``SessionOptions.enable_profiling``); each node's
kernel time is its median over the runs after the first five, summed per category (pointwise convolutions, SiLU,
quantise/dequantise, depthwise convolutions, layout transposes, ...) and per op type. The profiler's own cost
inflates every node a little, and a loaded machine inflates them more: read the columns side by side, not as
absolute times. ``--int8-ops`` / ``--keep-stem-int8`` profile another int8 recipe beside the default.

Run: ``nice -n 5 .venv/bin/python bench/profile_onnx_camera.py`` (about a minute; writes
``bench/results/onnx_camera_profile.json``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import load_average, write_result  # noqa: E402

WARMUP = 5


def category(name: str, op: str) -> str:
    """The part of the network a node belongs to, from its op type and its (exported module path) name."""
    if op in ("QuantizeLinear", "DequantizeLinear"):
        return "quantise / dequantise"
    if op in ("Transpose", "ReorderInput", "ReorderOutput", "SpaceToDepth", "DepthToSpace"):
        return "layout (transposes, NCHWc reorders, patch unfold/fold)"
    if "Conv" in op or op in ("QGemm", "QLinearMatMul", "MatMul", "Gemm", "FusedMatMul", "MatMulInteger"):
        if "router" in name:
            return "router"
        if "conv2_kxk" in name or "conv_kxk" in name:
            return "depthwise convolutions"
        if op in ("Conv", "QLinearConv") and name.startswith("/steps.0/conv"):
            return "stem convolution (segment 0) or first conv"
        return "pointwise convolutions / matrix products"
    if "/act/" in name or op in ("QuickGelu", "QLinearSigmoid", "Sigmoid"):
        return "SiLU (Sigmoid, Mul)"
    if "router" in name:
        return "router"
    if "norm" in name or op == "InstanceNormalization":
        return "norms"
    if "attn" in name:
        return "attention (split, softmax, reduce, mul)"
    if op in ("Add", "QLinearAdd"):
        return "residual adds"
    return "other (shape, reshape, gather, ...)"


def profile(sessions: list[Any], feeds: list[dict[str, Any]], runs: int) -> dict[str, Any]:
    cats: collections.Counter[str] = collections.Counter()
    ops: collections.Counter[str] = collections.Counter()
    nodes = 0
    for sess, feed in zip(sessions, feeds, strict=True):
        for _ in range(runs):
            sess.run(None, feed)
        path = sess.end_profiling()
        events = json.loads(Path(path).read_text())
        os.remove(path)
        per: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per[e["name"][: -len("_kernel_time")]].append((e["dur"], e["args"]["op_name"]))
        for name, v in per.items():
            durs = sorted(d for d, _ in v[WARMUP:]) or [v[-1][0]]
            med = durs[len(durs) // 2]
            cats[category(name, v[0][1])] += med
            ops[v[0][1]] += med
            nodes += 1
    return {"total_us": round(sum(cats.values())), "nodes": nodes,
            "by_category_us": {k: round(v) for k, v in cats.most_common()},
            "by_op_type_us": {k: round(v) for k, v in ops.most_common()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30, help="profiled runs per segment (the first five are dropped)")
    ap.add_argument("--int8-ops", help="comma-separated op types for an extra int8 recipe (default: none)")
    ap.add_argument("--keep-stem-int8", action="store_true", help="the extra recipe quantises the stem too")
    ap.add_argument("--out", default="bench/results/onnx_camera_profile.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import onnxruntime as ort
    import torch

    import moevit.onnx_camera as oc
    from bench.bench_onnx_camera import CALIBRATE, LAYERS
    from bench.bench_split import IMAGE_SIZE, build_model, random_images
    from moevit.checkpoint import model_fingerprint
    from moevit.fuse import folded_copy

    torch.set_num_threads(1)
    model = build_model(LAYERS)
    fp, folded = model_fingerprint(model), folded_copy(model)
    recipes: dict[str, oc.OnnxCameraConfig] = {}
    result: dict[str, Any] = {"benchmark": "onnx_camera_profile", "loadavg_before": load_average(),
                              "settings": {"layers": list(LAYERS), "image_size": IMAGE_SIZE, "batch": 1, "threads": 1,
                                           "runs": args.runs, "calibrate": CALIBRATE, "calibrate_images": 32},
                              "recipes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        recipes["fp32"] = oc.OnnxCameraConfig(cache)
        recipes["int8"] = oc.OnnxCameraConfig(cache, precision="int8", calibrate=CALIBRATE, calibrate_images=32)
        cams = {k: oc.OnnxCamera(folded, fp, IMAGE_SIZE, c) for k, c in recipes.items()}
        if args.int8_ops:
            ops = tuple(args.int8_ops.split(","))
            cfg = oc.OnnxCameraConfig(Path(tmp) / "extra", precision="int8", calibrate=CALIBRATE,
                                      calibrate_images=32, int8_ops=ops)
            quantize = oc.quantize_graph

            def with_stem(*a, **kw):  # the extra recipe's stem choice (the default keeps it float)
                return quantize(*a, **kw, keep_slow_convs=not args.keep_stem_int8)

            oc.quantize_graph = with_stem
            try:
                cams["int8 " + args.int8_ops + (" +stem" if args.keep_stem_int8 else "")] = oc.OnnxCamera(
                    folded, fp, IMAGE_SIZE, cfg)
            finally:
                oc.quantize_graph = quantize
        feeds: list[dict[str, Any]] = []

        def record(seg, inputs):
            feeds.append({n: t.detach().contiguous().numpy() for n, t in zip(seg.input_names, inputs, strict=True)})
            return cams["fp32"].run_segment(seg, inputs)

        with torch.no_grad():
            cams["fp32"].program.run(random_images(1, IMAGE_SIZE, seed=3), record)
        for name, cam in cams.items():
            options = oc._session_options(ort, 1)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / "profile")
            sessions = [oc._session(ort, cam.graph_path(i), options) for i in range(cam.num_segments)]
            result["recipes"][name] = profile(sessions, feeds, args.runs)
    names = list(result["recipes"])
    cats = list(dict.fromkeys(c for r in result["recipes"].values() for c in r["by_category_us"]))
    print(f"{'category (us: sum of per-node medians)':56s}" + "".join(f"{n[:14]:>15s}" for n in names))
    for c in cats:
        print(f"{c[:56]:56s}" + "".join(f"{result['recipes'][n]['by_category_us'].get(c, 0):15d}" for n in names))
    print(f"{'total':56s}" + "".join(f"{result['recipes'][n]['total_us']:15d}" for n in names))
    result["loadavg_after"] = load_average()
    print(f"written {write_result(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
