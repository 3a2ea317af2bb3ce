"""The camera side (folded trunk and routers, :mod:`moevit.segments`) exported to ONNX and run on onnxruntime,
in float32 or statically quantised int8.

Each segment between two dispatch points is one ONNX graph (dynamic batch, fixed image size), cached in a folder
under a name keyed by model fingerprint, image size, segment, graph version and precision; the fingerprint is also
stored in the graph's metadata and checked on load, so a graph of another model (a renamed or copied file) is
rebuilt, never run. The dispatch points stay in torch: :meth:`OnnxCamera.forward` hands each segment's tokens and
routing to the MoE layer's dispatcher (in-process or the coordinator's remote one), exactly as the torch model does.

int8 uses onnxruntime's static quantisation (``quantize_static``, QOperator format, int8 weights per output
channel, uint8 activations with min-max ranges; convolutions, matrix products and the elementwise ops between
them), calibrated on images of a data set (``calibrate``: a dataset spec; its ``train`` split, so evaluation on
``eval`` stays held out). The routers are kept in float32: their top-1 decision is a comparison of cosine
similarities that quantisation noise would flip.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moevit.deploy.files import atomic_path
from moevit.segments import CameraProgram, Segment

__all__ = ["GRAPH_VERSION", "INT8_OPS", "INT8_RECIPE", "OnnxCamera", "OnnxCameraConfig", "OnnxCameraError",
           "calibration_images", "calibration_key", "expert_tokens", "export_segment", "graph_key", "quantize_graph",
           "quantize_graph_dynamic", "slow_int8_convs"]

log = logging.getLogger(__name__)

#: bumped whenever the exported graphs change, so caches of an older version are not reused
GRAPH_VERSION = 2
DEFAULT_OPSET = 17
PRECISIONS = ("fp32", "int8")
#: op types quantised by default: convolutions and matrix products, and the elementwise ops between them (SiLU's
#: Sigmoid and Mul, residual Adds), so activations stay int8 from one convolution to the next instead of being
#: dequantised and quantised again around every float op (measured at 256 px, docs/onnx.md: SiLU in float cost
#: 16 % more time). Quantising the attention's Split, Relu and the data movers too was about 4 % faster but lost
#: 1.5 points of top-1 on digits (the query channel shares the Split's int8 scale with the keys and values).
INT8_OPS = ("Conv", "MatMul", "Gemm", "Add", "Mul", "Sigmoid")
#: bumped whenever quantize_graph's recipe changes (beyond the op types and format, which key the cache themselves)
INT8_RECIPE = 3
_META_FINGERPRINT = "moevit_fingerprint"
_META_KEY = "moevit_camera_key"


class OnnxCameraError(RuntimeError):
    """The camera side cannot run on this onnxruntime or with these settings; the message says why (one line)."""


@dataclass(frozen=True)
class OnnxCameraConfig:
    """How the camera side runs on onnxruntime.

    ``cache_dir``: folder of the graphs. ``precision``: ``fp32`` or ``int8``. ``threads``: onnxruntime intra-op
    threads. ``calibrate``: dataset spec whose ``train`` split calibrates int8 (required for int8),
    ``calibrate_images`` how many of its images (evenly spaced). ``exclude_routers``: keep router nodes in float.
    """

    cache_dir: Path
    precision: str = "fp32"
    threads: int = 1
    calibrate: str | None = None
    calibrate_images: int = 64
    opset: int = DEFAULT_OPSET
    exclude_routers: bool = True
    int8_ops: tuple[str, ...] = INT8_OPS
    int8_format: str = "qoperator"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.threads < 1:
            raise ValueError(f"onnxruntime threads must be >= 1, got {self.threads}")
        if self.precision == "int8" and not self.calibrate:
            raise ValueError("int8 needs calibration images: give --calibrate SPEC (e.g. the training data set)")
        if self.calibrate_images < 1:
            raise ValueError(f"calibrate_images must be >= 1, got {self.calibrate_images}")
        if self.opset < 17:
            raise ValueError(f"opset must be >= 17, got {self.opset}")
        if self.int8_format not in ("qoperator", "qdq"):
            raise ValueError(f"int8_format must be qoperator or qdq, got {self.int8_format!r}")


# --------------------------------------------------------------------------------------------------- export


def _probe_inputs(program: CameraProgram, image_size: int, batch: int = 2) -> list[tuple[torch.Tensor, ...]]:
    """Example inputs of every segment at ``image_size`` (zeros in place of expert outputs: only shapes matter),
    which also sets each block's patch grid for tracing."""
    g = torch.Generator().manual_seed(0)
    inputs: tuple[torch.Tensor, ...] = (torch.randn(batch, 3, image_size, image_size, generator=g),)
    out = []
    with torch.no_grad():
        for seg in program.segments:
            out.append(inputs)
            res = seg(*inputs)
            if seg.layer is not None:
                h, x_TPC = res[0], res[1]
                inputs = (h, torch.zeros_like(x_TPC))
    return out


def _dynamic_axes(seg: Segment) -> dict[str, dict[int, str]]:
    axes = {"image": {0: "B"}, "h_in": {0: "B"}, "h": {0: "B"}, "y_TPC": {0: "T"}, "x_TPC": {0: "T"},
            "expert_idx_TK": {0: "T"}, "gates_TK": {0: "T"}, "probs_TE": {0: "T"}, "logits": {0: "B"}}
    return {k: v for k, v in axes.items() if k in seg.input_names + seg.output_names}


def export_segment(seg: Segment, example: tuple[torch.Tensor, ...], path: Path, *, opset: int = DEFAULT_OPSET,
                   metadata: dict[str, str] | None = None) -> Path:
    """Write ``seg`` as an ONNX graph (atomically: a crash never leaves half a graph under the real name)."""
    import onnx

    with atomic_path(path) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated; its graphs are small and fast
            torch.onnx.export(seg, example, str(tmp), dynamo=False, opset_version=opset,
                              input_names=list(seg.input_names), output_names=list(seg.output_names),
                              dynamic_axes=_dynamic_axes(seg), do_constant_folding=True)
        if metadata:
            model = onnx.load(str(tmp))
            _set_metadata(model, metadata)
            onnx.save(model, str(tmp))
    return path


def _set_metadata(model: Any, metadata: dict[str, str]) -> None:
    import onnx

    keep = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in keep}, **metadata})


# ------------------------------------------------------------------------------------------------- int8


def calibration_images(spec: str, image_size: int, count: int) -> torch.Tensor:
    """``count`` images evenly spaced over the ``train`` split of dataset ``spec`` (never the eval holdout)."""
    from moevit.data import open_dataset

    data = open_dataset(spec, image_size=image_size, split="train")
    if len(data) == 0:
        raise ValueError(f"--calibrate {spec}: the train split has no images")
    idx = np.linspace(0, len(data) - 1, num=min(count, len(data))).round().astype(int)
    return torch.stack([data[int(i)][0] for i in dict.fromkeys(idx.tolist())])


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of input feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def quantize_graph(src: Path, dst: Path, feeds: Sequence[dict[str, np.ndarray]], *,
                   exclude: Callable[[str], bool] | None = None, metadata: dict[str, str] | None = None,
                   op_types: Sequence[str] = ("Conv", "MatMul", "Gemm"), fmt: str = "qoperator",
                   keep_slow_convs: bool = True) -> Path:
    """Static int8 quantisation of the graph ``src`` into ``dst`` (atomically), calibrated on ``feeds``.

    ``fmt`` qoperator (QLinearConv etc.: int8 kernels end to end) or qdq (QuantizeLinear/DequantizeLinear pairs
    around float ops, fused by onnxruntime where it can); per-channel int8 weights, uint8 activations, min-max
    calibration; only ``op_types`` are quantised; nodes for which ``exclude(name)`` holds stay float, and with
    ``keep_slow_convs`` so do the convolutions without a fast int8 kernel and their SiLU (:func:`slow_int8_convs`)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Reader, CalibrationDataReader):
        pass

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmpdir:
        pre = Path(tmpdir) / "pre.onnx"
        out = Path(tmpdir) / "int8.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre)).graph
        excluded = [n.name for n in graph.node if exclude is not None and exclude(n.name)]
        if keep_slow_convs:
            excluded += [n for n in slow_int8_convs(graph) if n not in excluded]
        quant_format = QuantFormat.QOperator if fmt == "qoperator" else QuantFormat.QDQ
        # reduce_range: 7-bit weights, so u8 x s8 products cannot saturate the int16 sums of AVX2 CPUs without VNNI
        # (an AMD EPYC here: up to 14 % of the output range off with 8-bit weights)
        quantize_static(str(pre), str(out), Reader(feeds), quant_format=quant_format, per_channel=True,
                        reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(op_types), nodes_to_exclude=excluded,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"CalibTensorRangeSymmetric": False})
        _finish(out, dst, metadata)
    return dst


def quantize_graph_dynamic(src: Path, dst: Path, *, metadata: dict[str, str] | None = None) -> Path:
    """Dynamic int8 quantisation of the graph ``src`` into ``dst`` (atomically): int8 weights per output channel,
    each matrix product's input quantised on the fly from its own range (onnxruntime's DynamicQuantizeMatMul), so
    no calibration data. For the experts: two matrix products on 64-ish tokens, where a call's fixed cost
    dominates and one fused node per product beats the static graph's six (docs/onnx.md)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmpdir:
        out = Path(tmpdir) / "int8.onnx"
        # reduce_range: 7-bit weights (see quantize_graph)
        quantize_dynamic(str(src), str(out), per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"], extra_options={"MatMulConstBOnly": True})
        _finish(out, dst, metadata)
    return dst


def _finish(out: Path, dst: Path, metadata: dict[str, str] | None) -> None:
    """Stamp a quantised graph ``out`` with ``metadata`` and move it into place as ``dst`` atomically."""
    import onnx

    if metadata:
        model = onnx.load(str(out))
        _set_metadata(model, metadata)
        onnx.save(model, str(out))
    with atomic_path(dst) as tmp:
        out.replace(tmp)


def slow_int8_convs(graph: Any) -> list[str]:
    """Names of the convolutions of ``graph`` that onnxruntime's int8 kernels run slower than float, and of the
    SiLU (Sigmoid, Mul) on their output.

    MLAS's fast int8 convolution (symmetric weights, NHWC, fused requantisation) needs the input channels of a
    non-grouped convolution in multiples of 4; otherwise onnxruntime falls back to im2col and a plain int8 GEMM.
    That is the stem (3 input channels, the image): in int8 it also needs the image quantised and moved to NHWC
    (a 3-channel transpose), and measured 0.9 ms against 0.4 ms in float at 256 px."""
    from onnx import numpy_helper

    weights = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out: list[str] = []
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weights:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        c_in = numpy_helper.to_array(weights[node.input[1]]).shape[1]
        if group != 1 or c_in % 4 == 0:
            continue
        out.append(node.name)
        act = consumers.get(node.output[0], [])
        sig = [n for n in act if n.op_type == "Sigmoid"]
        muls = [n for n in act if n.op_type == "Mul" and any(s.output[0] in n.input for s in sig)]
        out += [n.name for n in sig + muls]
    return out


def calibration_key(spec: str, count: int) -> str:
    """Short hash naming a calibration set in cache file names."""
    return "c" + hashlib.sha256(f"{spec}|{count}|train".encode()).hexdigest()[:10]


def expert_tokens(model: nn.Module, images: torch.Tensor, *,
                  batch_size: int = 8) -> dict[tuple[int, int], torch.Tensor]:
    """The pixel tokens [n, C] each expert receives when ``model`` (in-process experts) classifies ``images``:
    the calibration data of int8 experts, keyed by (layer, expert)."""
    from moevit.moe.dispatcher import DispatchPlan, LocalDispatcher

    sink: dict[tuple[int, int], list[torch.Tensor]] = {}

    class Recording(LocalDispatcher):
        def compute(self, layer_id: int, plan: DispatchPlan) -> list[torch.Tensor]:
            for e, x in zip(plan.experts, plan.chunks(), strict=True):
                sink.setdefault((layer_id, e), []).append(x.clone())
            return super().compute(layer_id, plan)

    layers = model.moe_layers()  # type: ignore[operator]
    before = {i: layer.dispatcher for i, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.set_dispatcher(Recording(layer.experts))
        with torch.no_grad():
            for batch in torch.split(images, batch_size):
                model(batch)
    finally:
        for i, layer in layers.items():
            layer.set_dispatcher(before[i])
    return {k: torch.cat(v) for k, v in sink.items()}


def _is_router_node(name: str) -> bool:
    return "/router/" in name or name.endswith("/router")


# ----------------------------------------------------------------------------------------------- runtime


def graph_key(fingerprint: str, image_size: int, index: int, num_segments: int, config: OnnxCameraConfig,
              precision: str) -> str:
    """Name (without ``.onnx``) of segment ``index``'s graph in the cache; also stored in the graph's metadata."""
    key = f"{fingerprint}-camera-{image_size}px-s{index}of{num_segments}-g{GRAPH_VERSION}-op{config.opset}"
    if precision == "int8":
        calib = hashlib.sha256(f"{config.calibrate}|{config.calibrate_images}|train|{config.exclude_routers}|"
                               f"{','.join(config.int8_ops)}|{config.int8_format}|r{INT8_RECIPE}".encode())
        key += f"-int8-c{calib.hexdigest()[:10]}"
    return key


#: onnxruntime's transpose optimiser merges the two cheap transposes of the token layout (moevit.segments) back
#: into one 4-d transpose that onnxruntime moves element by element; with it off the graphs measured no slower
#: elsewhere (the int8 layout change to NHWC cancels its own transposes)
DISABLED_OPTIMIZERS = ("TransposeOptimizer", "TransposeOptimizer_CPUExecutionProvider")


def _session(ort: Any, path: Path, options: Any) -> Any:
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))


def _session_options(ort: Any, threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    return options


class OnnxCamera(nn.Module):
    """The camera side of ``model`` (in eval mode, BatchNorms folded if it runs folded) on onnxruntime.

    ``fingerprint`` keys the cache (the checkpoint's, taken before folding). Graphs missing, unreadable, of
    another model or another layout are exported again; ``exported`` / ``reused`` list the segment indices of
    each kind. ``forward(x)`` gives the logits of images [B, 3, S, S] at the ``image_size`` exported for; the
    model's dispatchers, as installed when ``forward`` runs, serve the MoE layers.
    """

    def __init__(self, model: nn.Module, fingerprint: str, image_size: int, config: OnnxCameraConfig) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise OnnxCameraError(f"--backend onnx needs onnxruntime: {e}") from None
        if not fingerprint or any(c in fingerprint for c in "/\\:") or fingerprint.startswith("."):
            raise ValueError(f"fingerprint {fingerprint!r} cannot key a cache file name")
        self.program = CameraProgram(model)  # type: ignore[arg-type]
        self.fingerprint, self.image_size, self.config = fingerprint, int(image_size), config
        self.ort_version = ort.__version__
        self.exported: list[int] = []
        self.reused: list[int] = []
        try:
            config.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot create the ONNX cache folder {config.cache_dir}: {e.strerror or e}") from None
        options = _session_options(ort, config.threads)
        self._sessions = self._load_or_build(ort, options)

    # -- cache ------------------------------------------------------------------------------------------------
    @property
    def num_segments(self) -> int:
        return len(self.program.segments)

    def _key(self, index: int, precision: str) -> str:
        return graph_key(self.fingerprint, self.image_size, index, self.num_segments, self.config, precision)

    def graph_path(self, index: int, precision: str | None = None) -> Path:
        """Cache file of segment ``index``'s graph in ``precision`` (default: the configured one)."""
        return self.config.cache_dir / f"{self._key(index, precision or self.config.precision)}.onnx"

    def _metadata(self, index: int, precision: str) -> dict[str, str]:
        return {_META_FINGERPRINT: self.fingerprint, _META_KEY: self._key(index, precision)}

    def _open_cached(self, ort: Any, path: Path, index: int, precision: str, options: Any) -> Any:
        """A session for a cached graph, or None (logged in one line) when it is not this model's graph."""
        if not path.exists():
            return None
        try:
            session = _session(ort, path, options)
        except Exception as e:  # onnxruntime raises several types for bad files
            log.warning("rebuilding cached ONNX graph %s: onnxruntime cannot load it (%s)", path,
                        str(e).splitlines()[0][:200])
            return None
        meta = session.get_modelmeta().custom_metadata_map
        want = self._metadata(index, precision)
        if meta.get(_META_FINGERPRINT) != self.fingerprint or meta.get(_META_KEY) != want[_META_KEY]:
            log.warning("rebuilding cached ONNX graph %s: it is the graph of model %s (%s), not of %s", path,
                        meta.get(_META_FINGERPRINT, "unknown"), meta.get(_META_KEY, "no key"), want[_META_KEY])
            return None
        seg = self.program.segments[index]
        if ([i.name for i in session.get_inputs()] != list(seg.input_names)
                or [o.name for o in session.get_outputs()] != list(seg.output_names)):
            log.warning("rebuilding cached ONNX graph %s: its inputs/outputs are not segment %d's", path, index)
            return None
        return session

    def _open_new(self, ort: Any, path: Path, index: int, options: Any) -> Any:
        try:
            return _session(ort, path, options)
        except Exception as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise OnnxCameraError(f"onnxruntime {ort.__version__} cannot run camera segment {index} ({path.name}, "
                                  f"ONNX opset {self.config.opset}): {first}; install an onnxruntime build with "
                                  f"the standard CPU operators (onnxruntime>=1.20)") from None

    def _load_or_build(self, ort: Any, options: Any) -> list[Any]:
        precision = self.config.precision
        sessions: list[Any] = [self._open_cached(ort, self.graph_path(i, precision), i, precision, options)
                               for i in range(self.num_segments)]
        if all(s is not None for s in sessions):
            self.reused = list(range(self.num_segments))
            return sessions
        examples = _probe_inputs(self.program, self.image_size)
        fp32: list[Any] = []
        for i, seg in enumerate(self.program.segments):
            path = self.graph_path(i, "fp32")
            session = sessions[i] if precision == "fp32" else self._open_cached(ort, path, i, "fp32", options)
            if session is None:
                export_segment(seg, examples[i], path, opset=self.config.opset, metadata=self._metadata(i, "fp32"))
                session = self._open_new(ort, path, i, options)
                if precision == "fp32":
                    self.exported.append(i)
            elif precision == "fp32":
                self.reused.append(i)
            fp32.append(session)
        if precision == "fp32":
            return fp32
        feeds = self._calibration_feeds(fp32)
        for i in range(self.num_segments):
            if sessions[i] is not None:
                self.reused.append(i)
                continue
            path = self.graph_path(i, "int8")
            exclude = _is_router_node if self.config.exclude_routers else None
            try:
                quantize_graph(self.graph_path(i, "fp32"), path, feeds[i], exclude=exclude,
                               metadata=self._metadata(i, "int8"), op_types=self.config.int8_ops,
                               fmt=self.config.int8_format)
            except Exception as e:  # the quantiser raises many types; say which segment and why
                raise OnnxCameraError(f"int8 quantisation of camera segment {i} failed: "
                                      f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
            sessions[i] = self._open_new(ort, path, i, options)
            self.exported.append(i)
        self.reused.sort()
        return sessions

    def _calibration_feeds(self, fp32_sessions: list[Any]) -> list[list[dict[str, np.ndarray]]]:
        """Each segment's inputs on the calibration images, through the float32 graphs and the model's experts
        (run in-process: calibration happens before any remote dispatcher is installed)."""
        c = self.config
        assert c.calibrate is not None
        images = calibration_images(c.calibrate, self.image_size, c.calibrate_images)
        feeds: list[list[dict[str, np.ndarray]]] = [[] for _ in range(self.num_segments)]

        def record(seg: Segment, inputs: tuple[torch.Tensor, ...]) -> Any:
            feeds[seg.index].append({n: t.detach().contiguous().numpy().copy()
                                     for n, t in zip(seg.input_names, inputs, strict=True)})
            return self._run(fp32_sessions[seg.index], seg, inputs)

        with torch.no_grad():
            for batch in torch.split(images, 8):
                self.program.run(batch, record)
        return feeds

    # -- forward ----------------------------------------------------------------------------------------------
    @staticmethod
    def _run(session: Any, seg: Segment, inputs: tuple[torch.Tensor, ...]) -> Any:
        feed = {}
        for name, t in zip(seg.input_names, inputs, strict=True):
            if t.dtype != torch.float32 or not t.is_contiguous() or t.requires_grad:
                t = t.detach().float().contiguous()
            feed[name] = t.numpy()
        outs = [torch.from_numpy(o) for o in session.run(None, feed)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def run_segment(self, seg: Segment, inputs: tuple[torch.Tensor, ...]) -> Any:
        return self._run(self._sessions[seg.index], seg, inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"the ONNX camera graphs take {self.image_size}x{self.image_size} images, got "
                             f"{x.shape[2]}x{x.shape[3]}: run with --image-size {self.image_size} or export anew")
        return self.program.run(x, self.run_segment)

    def describe(self) -> str:
        return (f"camera side on onnxruntime {self.ort_version} ({self.config.precision}, {self.num_segments} "
                f"segments at {self.image_size}px, {self.config.threads} thread(s)); graphs in {self.config.cache_dir}"
                f" ({len(self.exported)} built, {len(self.reused)} reused)")
