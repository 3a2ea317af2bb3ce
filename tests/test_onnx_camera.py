"""The camera side on onnxruntime (moevit.segments, moevit.onnx_camera): the segments are the model, the ONNX graphs
match torch, the cache is keyed by model fingerprint and never serves another model's graph, an onnxruntime that
cannot run a graph is one line, int8 keeps a trained model's top-1, and ``moe-coordinator --backend onnx`` agrees
with the torch backend end to end."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from moevit.checkpoint import load_checkpoint, model_fingerprint, save_checkpoint
from moevit.fuse import folded_copy
from moevit.onnx_camera import OnnxCamera, OnnxCameraConfig, OnnxCameraError, graph_key
from moevit.segments import CameraProgram
from tests.deploy import small_moe_model, write_topology
from tests.netutil import free_port

SIZE = 32


def _images(n, size=SIZE, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def small():
    """A folded random MoE model (layers 1, 5, 8: four segments), its fingerprint, its camera on onnxruntime."""
    model = small_moe_model((1, 5, 8), num_experts=4, calib_size=SIZE)
    fp = model_fingerprint(model)
    folded = folded_copy(model)
    cache = Path(__import__("tempfile").mkdtemp(prefix="onnxcam-"))
    cam = OnnxCamera(folded, fp, SIZE, OnnxCameraConfig(cache))
    yield {"model": model, "folded": folded, "fp": fp, "cache": cache, "camera": cam}
    shutil.rmtree(cache, ignore_errors=True)


def test_segments_chained_with_the_dispatchers_are_the_model():
    model = small_moe_model((2, 8), num_experts=3, calib_size=40).eval()
    program = CameraProgram(model)
    assert len(program.segments) == 3 and [layer.layer_id for layer in program.layers] == [2, 8]
    for size in (40, 42):  # 42: MobileViTV2 blocks resize to their patch grid
        x = _images(3, size)
        with torch.no_grad():
            assert torch.equal(program(x), model(x))  # same ops in the same order: bit-identical


def _routing(program, x, segment_fn):
    """Logits and the experts chosen at each dispatch point when ``segment_fn`` runs the segments."""
    chosen = []

    def run(seg, inputs):
        out = segment_fn(seg, inputs)
        if seg.layer is not None:
            chosen.append(out[2].clone())
        return out

    with torch.no_grad():
        return program.run(x, run), chosen


def test_onnx_fp32_matches_torch_with_the_same_routing(small):
    cam = small["camera"]
    x = _images(5, seed=1)
    ref, ref_routes = _routing(cam.program, x, lambda seg, inputs: seg(*inputs))
    got, routes = _routing(cam.program, x, cam.run_segment)
    with torch.no_grad():
        assert torch.equal(ref, small["folded"](x))  # the torch segments are the model
        assert torch.equal(got, cam(x))
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) < 1e-4
    assert len(routes) == 3 and all(torch.equal(a, b) for a, b in zip(routes, ref_routes, strict=True))
    assert cam.exported == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="take 32x32 images, got 48x48"):
        cam(_images(1, 48))


def test_export_leaves_a_model_with_dropout_in_eval_mode(tmp_path):
    # a model trained with classifier dropout (moe-train --dropout): exporting its segments once switched the shared
    # modules to training mode, so torch ran with dropout on and onnxruntime differed from it by ~0.25 per logit
    model = small_moe_model((8,), num_experts=2, calib_size=SIZE)
    model.head.drop.p = 0.5
    folded = folded_copy(model)
    x = _images(4, seed=3)
    with torch.no_grad():
        before = folded(x)
    cam = OnnxCamera(folded, model_fingerprint(model), SIZE, OnnxCameraConfig(tmp_path))
    assert cam.exported and not any(m.training for m in folded.modules())
    with torch.no_grad():
        assert torch.equal(folded(x), before)
        assert float((cam(x) - before).abs().max()) < 1e-4


def test_the_cache_is_reused_and_another_models_graph_is_rebuilt(small, caplog):
    again = OnnxCamera(small["folded"], small["fp"], SIZE, OnnxCameraConfig(small["cache"]))
    assert again.reused == [0, 1, 2, 3] and again.exported == []
    other = small_moe_model((1, 5, 8), num_experts=4, calib_size=SIZE, seed=1)
    other_fp = model_fingerprint(other)
    other_folded = folded_copy(other)
    cfg = OnnxCameraConfig(small["cache"])
    for i in range(4):  # the first model's graphs planted under the other model's names
        planted = cfg.cache_dir / f"{graph_key(other_fp, SIZE, i, 4, cfg, 'fp32')}.onnx"
        shutil.copyfile(small["camera"].graph_path(i), planted)
    with caplog.at_level(logging.WARNING, logger="moevit.onnx_camera"):
        cam = OnnxCamera(other_folded, other_fp, SIZE, cfg)
    assert cam.exported == [0, 1, 2, 3]
    assert sum(f"the graph of model {small['fp']}" in r.getMessage() for r in caplog.records) == 4
    x = _images(3, seed=2)
    with torch.no_grad():
        assert float((cam(x) - other_folded(x)).abs().max()) < 1e-4
    # a truncated cache file is rebuilt too
    path = cam.graph_path(2)
    path.write_bytes(path.read_bytes()[:100])
    cam = OnnxCamera(other_folded, other_fp, SIZE, cfg)
    assert cam.exported == [2] and cam.reused == [0, 1, 3]


def test_an_onnxruntime_without_an_operator_is_one_line(small, tmp_path, monkeypatch):
    import onnx
    from onnx import TensorProto, helper

    import moevit.onnx_camera as oc

    def export_unknown_op(seg, example, path, *, opset, metadata):
        # what an onnxruntime build without a kernel the graph needs sees: a node it has no implementation of
        node = helper.make_node("Conv", ["image", "w"], ["logits"], domain="com.example.missing")
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, None)],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                                  [helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.example.missing", 1)])
        onnx.save(model, str(path))
        return path

    monkeypatch.setattr(oc, "export_segment", export_unknown_op)
    with pytest.raises(OnnxCameraError) as err:
        OnnxCamera(small["folded"], small["fp"], SIZE, OnnxCameraConfig(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and "cannot run camera segment 0" in msg and "onnxruntime" in msg


def test_int8_needs_calibration_images():
    with pytest.raises(ValueError, match="--calibrate"):
        OnnxCameraConfig(Path("x"), precision="int8")


@pytest.mark.slow
def test_coordinator_backend_onnx_agrees_with_torch_end_to_end(tmp_path):
    model = small_moe_model((1, 5, 8), num_experts=4, num_classes=3, labels=("a", "b", "c"), image_size=SIZE,
                            calib_size=SIZE)
    path = save_checkpoint(model, tmp_path / "moe.safetensors")
    topo = write_topology(tmp_path, path, {"cam": free_port(), "north": free_port()})
    spec = "synthetic:classes=3,per_class=10,size=32"
    # the refusal below needs no worker: it runs beside the two runs (which start the same worker port, so in turn)
    beside = ThreadPoolExecutor(1)
    refusal = beside.submit(
        subprocess.run, [sys.executable, "-m", "moevit.coordinator.cli", "--topology", str(topo), "--data", spec,
                         "--precision", "int8"], capture_output=True, text=True, timeout=120)
    out = {}
    for backend in ("torch", "onnx"):
        r = subprocess.run([sys.executable, "-m", "moevit.coordinator.cli", "--topology", str(topo), "--data", spec,
                            "--threads", "1", "--wire", "fp32", "--backend", backend,
                            "--out", str(tmp_path / f"{backend}.jsonl")], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "p50" in r.stdout
        out[backend] = [json.loads(line) for line in (tmp_path / f"{backend}.jsonl").read_text().splitlines()]
        if backend == "onnx":
            assert "camera side on onnxruntime" in r.stderr and "4 built" in r.stderr
            assert (tmp_path / "moe.safetensors.onnx-cache").is_dir()
    assert len(out["onnx"]) == len(out["torch"]) == 6
    for a, b in zip(out["torch"], out["onnx"], strict=True):
        assert a["prediction"] == b["prediction"] and abs(a["confidence"] - b["confidence"]) < 1e-3
    r = refusal.result()
    beside.shutdown()
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith("need --backend onnx")


def test_int8_experts_stay_close_to_float_on_their_calibration_tokens(small, tmp_path):
    import onnx
    from moevit.worker.backends import OnnxBackend, TorchBackend

    from moevit.onnx_camera import calibration_key, expert_tokens

    folded = small["folded"]
    tokens = expert_tokens(folded, _images(8, seed=3))
    bank = folded.moe_layers()[8].experts
    banks = {8: bank.subset(list(bank.expert_ids))}
    calib = {k: v for k, v in tokens.items() if k[0] == 8}
    assert calib and all(v.shape[1] == bank.dim for v in calib.values())
    q = OnnxBackend(banks, small["fp"], tmp_path, precision="int8", calibration=calib,
                    calibration_key=calibration_key("random", 8))
    ref = TorchBackend(banks)
    assert q.name == "onnxruntime-int8"
    for (layer, e), x in calib.items():
        y, r = q.run(layer, e, x), ref.run(layer, e, x)
        assert float((y - r).abs().max()) <= 0.05 * float(r.abs().max()) + 1e-3  # int8: a few per cent of range
        ops = {n.op_type for n in onnx.load(str(q.graph_path(layer, e, "int8"))).graph.node}
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    again = OnnxBackend(banks, small["fp"], tmp_path, precision="int8", calibration=calib,
                        calibration_key=calibration_key("random", 8))
    assert sorted(again.reused) == sorted(calib) and again.exported == []


def test_int8_experts_without_calibration_are_dynamic_and_close_to_float(small, tmp_path):
    """The worker's default int8: int8 weights, each call's tokens quantised from their own range (no calibration
    data); measured faster and closer to float than the static graphs (docs/onnx.md)."""
    import onnx
    from moevit.worker.backends import OnnxBackend, TorchBackend

    from moevit.onnx_camera import expert_tokens

    folded = small["folded"]
    tokens = {k: v for k, v in expert_tokens(folded, _images(8, seed=3)).items() if k[0] == 8}
    bank = folded.moe_layers()[8].experts
    banks = {8: bank.subset(list(bank.expert_ids))}
    q, ref = OnnxBackend(banks, small["fp"], tmp_path, precision="int8"), TorchBackend(banks)
    assert q.name == "onnxruntime-int8" and sorted(q.exported) == [(8, e) for e in sorted(bank.expert_ids)]
    for (layer, e), x in tokens.items():
        y, r = q.run(layer, e, x), ref.run(layer, e, x)
        assert float((y - r).abs().max()) <= 0.05 * float(r.abs().max()) + 1e-3
        assert float((y - r).abs().max()) > 0  # the int8 graph really ran
        ops = {n.op_type for n in onnx.load(str(q.graph_path(layer, e, "int8"))).graph.node}
        assert "DynamicQuantizeLinear" in ops and "QuantizeLinear" not in ops
    again = OnnxBackend(banks, small["fp"], tmp_path, precision="int8")
    assert sorted(again.reused) == sorted(q.exported) and again.exported == []


def test_int8_worker_flags_need_onnx(small, tmp_path):
    path = save_checkpoint(small["model"], tmp_path / "moe.safetensors")
    for extra, words in ((["--precision", "int8"], "--precision int8 needs --backend onnx"),
                         (["--backend", "onnx", "--calibrate", "digits"], "--calibrate needs --backend onnx "
                                                                           "--precision int8")):
        r = subprocess.run([sys.executable, "-m", "moevit.worker.cli", "--listen", f"127.0.0.1:{free_port()}",
                            "--model", str(path), "--experts", "all", *extra],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and words in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_exported_graphs_move_patches_without_6d_transposes(small):
    """The unfold/fold and the token layout are written as SpaceToDepth, DepthToSpace and transposes of at most
    4 axes (onnxruntime moves a 6-d transpose element by element), and still match torch (the test above)."""
    import onnx

    cam = small["camera"]
    ops: dict[str, int] = {}
    for i in range(cam.num_segments):
        for node in onnx.load(str(cam.graph_path(i))).graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
            if node.op_type == "Transpose":
                assert len(node.attribute[0].ints) <= 4, (i, node.name, list(node.attribute[0].ints))
    assert ops.get("SpaceToDepth", 0) >= 1 and ops.get("DepthToSpace", 0) >= 1


def test_int8_camera_keeps_the_stem_in_float_and_the_rest_int8(small, tmp_path):
    """The stem convolution (3 input channels: no fast int8 kernel) and its SiLU stay float; the other
    convolutions become QLinearConv. (Top-1 under int8 needs a trained model: the slow demo test below.)"""
    import onnx

    from moevit.onnx_camera import slow_int8_convs

    cfg = OnnxCameraConfig(tmp_path, precision="int8", calibrate="synthetic:classes=3,per_class=4,size=32",
                           calibrate_images=12)
    cam = OnnxCamera(small["folded"], small["fp"], SIZE, cfg)
    g0 = onnx.load(str(cam.graph_path(0))).graph
    convs = [n for n in g0.node if n.op_type in ("Conv", "QLinearConv")]
    assert convs[0].op_type == "Conv" and convs[0].input[0] == "image"
    assert all(n.op_type == "QLinearConv" for n in convs[1:]) and len(convs) > 3
    fp32_graph = onnx.load(str(cam.graph_path(0, "fp32"))).graph
    slow = slow_int8_convs(fp32_graph)
    assert len(slow) == 3 and {n.op_type for n in fp32_graph.node if n.name in slow} == {"Conv", "Sigmoid", "Mul"}
    x = _images(4, seed=2)
    with torch.no_grad():
        got, ref = cam(x), small["folded"](x)
    assert got.shape == ref.shape and bool(torch.isfinite(got).all()) and float((got - ref).abs().max()) > 0


@pytest.mark.slow
def test_int8_keeps_the_demo_models_top1(tmp_path):
    """int8 needs a trained network: random weights give features whose image-to-image differences are far below
    int8's resolution (a random model's top-1 under int8 is noise), so this runs on the demo model (make demo)."""
    from moevit.data import open_dataset

    demo = Path(__file__).resolve().parent.parent / "runs" / "demo" / "moe.safetensors"
    if not demo.exists():
        pytest.skip("no runs/demo/moe.safetensors (make demo)")
    model = load_checkpoint(demo)
    size = model.config.image_size
    folded = folded_copy(model)
    data = open_dataset("digits", image_size=size, split="eval")
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([int(data[i][1]) for i in range(len(data))])
    cam = OnnxCamera(folded, model_fingerprint(model), size,
                     OnnxCameraConfig(tmp_path, precision="int8", calibrate="digits", calibrate_images=64))
    with torch.no_grad():
        ref, q = folded(x), torch.cat([cam(b) for b in torch.split(x, 64)])
    acc_fp32, acc_int8 = float((ref.argmax(1) == y).float().mean()), float((q.argmax(1) == y).float().mean())
    assert acc_int8 >= acc_fp32 - 0.01
    assert float((q.argmax(1) == ref.argmax(1)).float().mean()) >= 0.98
    assert float((q - ref).abs().max()) > 1e-4  # the int8 graphs really ran


@pytest.mark.slow
def test_moe_eval_backend_onnx_reports_the_torch_top1(small, tmp_path):
    path = save_checkpoint(small["model"], tmp_path / "moe.safetensors")
    spec = "synthetic:classes=5,per_class=8,size=32"
    commands = {backend: ["--image-size", str(SIZE), "--threads", "1", "--backend", backend, "--json"]
                for backend in ("torch", "onnx")}
    commands["int8"] = ["--backend", "onnx", "--precision", "int8"]
    # three independent processes (seconds of imports each): at once
    with ThreadPoolExecutor(3) as pool:
        runs = dict(zip(commands, pool.map(lambda args: subprocess.run(
            [sys.executable, "-m", "moevit.cli.eval", "--model", str(path), "--data", spec, *args],
            capture_output=True, text=True, timeout=300), commands.values()), strict=True))
    out = {}
    for backend in ("torch", "onnx"):
        r = runs[backend]
        assert r.returncode == 0, r.stderr[-2000:]
        out[backend] = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["onnx"]["backend"] == "onnxruntime fp32" and out["torch"]["backend"] == "torch"
    assert out["onnx"]["top1"] == out["torch"]["top1"] and out["onnx"]["n"] == out["torch"]["n"] > 0
    assert (tmp_path / "moe.safetensors.onnx-cache").is_dir()
    r = runs["int8"]
    assert r.returncode == 2 and "--calibrate" in r.stderr and len(r.stderr.strip().splitlines()) == 1


ONNX_FLAGS = ("--backend", "--precision", "--calibrate", "--calibrate-images", "--onnx-cache")


def _flags(parser) -> dict[str, tuple]:
    """What each ONNX flag of ``parser`` is: its help, choices, default, type."""
    return {a.option_strings[0]: (a.help, a.choices, a.default, a.type) for a in parser._actions
            if a.option_strings and a.option_strings[0] in ONNX_FLAGS}


def test_moe_eval_and_moe_coordinator_share_the_onnx_flags(tmp_path, capsys):
    """One definition (moevit.cli.common.add_onnx_camera_args) serves both: the same flags and help, and the same
    checks, made before the model loads (the model file here does not exist: the flag mistake is what is
    reported)."""
    from moevit.coordinator import cli as coordinator

    from moevit.cli import eval as moe_eval

    ev, co = _flags(moe_eval._parser()), _flags(coordinator._parser())
    assert sorted(ev) == sorted(co) == sorted(ONNX_FLAGS)
    assert {f: ev[f] for f in ONNX_FLAGS[1:]} == {f: co[f] for f in ONNX_FLAGS[1:]}
    assert ev["--backend"][0].startswith("what runs the model: torch (default) or onnxruntime")
    assert co["--backend"][0].startswith("what runs the camera side (trunk and routers;")
    assert co["--backend"][0].endswith(ev["--backend"][0].split(": ", 1)[1])
    assert ev["--backend"][1:] == co["--backend"][1:]
    missing = str(tmp_path / "none.safetensors")
    topo = write_topology(tmp_path, missing, {"cam": free_port()})
    runs = {"moe-eval": lambda extra: moe_eval.main(["--model", missing, "--data", "digits", *extra]),
            "moe-coordinator": lambda extra: coordinator.main(["--topology", str(topo), "--data", "digits",
                                                               "--out", str(tmp_path / "r.jsonl"), *extra])}
    for prog, run in runs.items():
        for extra, words in ((["--precision", "int8"], "--precision int8 and --calibrate need --backend onnx"),
                             (["--calibrate", "digits"], "--precision int8 and --calibrate need --backend onnx"),
                             (["--backend", "onnx", "--precision", "int8"], "int8 needs calibration images"),
                             (["--backend", "onnx", "--calibrate", "nosuch:x"], "nosuch"),
                             (["--backend", "onnx", "--calibrate-images", "0"], "calibrate_images must be >= 1")):
            assert run(extra) == 2, (prog, extra)
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"{prog}: error: ") and words in err[0], (prog, extra, err)
