"""Compute backends of the worker: what runs one expert of one MoE layer on its routed pixel tokens.

:class:`ExpertBackend` is the interface the service calls (``run`` / ``run_many``); :class:`TorchBackend` runs the
experts from their :class:`~moevit.moe.experts.ExpertBank` in-process, :class:`OnnxBackend` exports each hosted
expert to its own ONNX graph (cached on disk, keyed by model fingerprint) and runs it with onnxruntime.
"""

from __future__ import annotations

import logging
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from moevit.deploy.files import atomic_path
from torch import nn

from moevit.moe.experts import ExpertBank

__all__ = ["ExpertBackend", "OnnxBackend", "TorchBackend", "expert_module", "export_expert"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
_OUTPUT_NAMES = ["y"]
# Bumped whenever the exported graph changes, so caches written by an older worker are not reused.
_GRAPH_VERSION = 1
_INT8_VERSION = 4  # the int8 recipes (formats, op types) of moevit.onnx_camera's quantisers as called here


class ExpertBackend(ABC):
    """Runs hosted experts. ``name`` is reported in Info; ``dims[layer]`` is that layer's token width C;
    ``hosted[layer]`` lists the experts of the layer this backend can run (ascending)."""

    name: str
    dims: dict[int, int]
    hosted: dict[int, tuple[int, ...]]

    @abstractmethod
    def run(self, layer: int, expert: int, x_nC: torch.Tensor) -> torch.Tensor:
        """Expert ``expert`` of MoE layer ``layer`` on float32 tokens [n, C] -> float32 [n, C]."""

    def run_many(self, layer: int, items: Sequence[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """Several experts of one layer, outputs in the order of ``items``."""
        return [self.run(layer, expert, x) for expert, x in items]


def _describe_banks(banks: Mapping[int, ExpertBank]) -> tuple[dict[int, int], dict[int, tuple[int, ...]]]:
    if not banks:
        raise ValueError("no experts to host: the banks mapping is empty")
    dims = {int(layer): int(bank.dim) for layer, bank in sorted(banks.items())}
    hosted = {int(layer): tuple(sorted(bank.expert_ids)) for layer, bank in sorted(banks.items())}
    return dims, hosted


class TorchBackend(ExpertBackend):
    """Experts run by torch from their stacked weights (the same code as the in-process model)."""

    def __init__(self, banks: Mapping[int, ExpertBank]) -> None:
        self.dims, self.hosted = _describe_banks(banks)
        self.banks = {int(layer): bank.eval().requires_grad_(False) for layer, bank in banks.items()}
        self.name = "torch-cpu"
        # Each expert's rows of the stacked weights, taken once (views, no copies), and its α·v computed once:
        # ExpertBank.forward_one's arithmetic exactly (same ops, same order, bit-identical outputs) without its
        # seven indexing ops and one multiply per call, which cost more than the matmuls at tens of tokens.
        self._experts: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        with torch.no_grad():
            for layer, bank in self.banks.items():
                for expert in bank.expert_ids:
                    i = bank.slot(expert)
                    self._experts[(layer, expert)] = (
                        bank.norm_bias[i], bank.norm_weight[i], bank.fc1_weight[i], bank.fc1_bias[i],
                        bank.fc2_weight[i], bank.fc2_bias[i], bank.alpha[i] * bank.correction[i])

    def _forward(self, layer: int, expert: int, x_nC: torch.Tensor) -> torch.Tensor:
        try:
            norm_bias, norm_weight, w1, b1, w2, b2, shift = self._experts[(layer, expert)]
        except KeyError:
            raise KeyError(f"expert {expert} of layer {layer} is not hosted by this backend") from None
        h = torch.addcmul(norm_bias, x_nC, norm_weight)
        h = F.silu(F.linear(h, w1, b1), inplace=True)
        return F.linear(h, w2, b2).add_(shift)

    def run(self, layer: int, expert: int, x_nC: torch.Tensor) -> torch.Tensor:
        # inference_mode is thread-local, so it is entered per call: the server calls from an executor thread.
        with torch.inference_mode():
            return self._forward(layer, expert, x_nC)

    def run_many(self, layer: int, items: Sequence[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [self._forward(layer, expert, x) for expert, x in items]


# ------------------------------------------------------------------------------------------------ ONNX


class _PlainExpert(nn.Module):
    """One expert exactly as written: y = fc2(SiLU(fc1(x ⊙ γ + β))) + α·v."""

    def __init__(self, bank: ExpertBank, expert: int) -> None:
        super().__init__()
        i = bank.slot(expert)
        self.gamma = nn.Parameter(bank.norm_weight[i].detach().clone())
        self.beta = nn.Parameter(bank.norm_bias[i].detach().clone())
        self.fc1 = nn.Linear(bank.dim, bank.hidden)
        self.fc2 = nn.Linear(bank.hidden, bank.dim)
        self.shift = nn.Parameter((bank.alpha[i] * bank.correction[i]).detach().clone())
        with torch.no_grad():
            self.fc1.weight.copy_(bank.fc1_weight[i])
            self.fc1.bias.copy_(bank.fc1_bias[i])
            self.fc2.weight.copy_(bank.fc2_weight[i])
            self.fc2.bias.copy_(bank.fc2_bias[i])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x * self.gamma + self.beta))) + self.shift


class _FoldedExpert(nn.Module):
    """The same expert with the affine folded into fc1 and α·v into fc2's bias: y = fc2'(SiLU(fc1'(x))).

    fc1(x ⊙ γ + β) = x (W1 diag γ)ᵀ + (W1 β + b1) exactly in real arithmetic; the graph shrinks to two Gemms and
    a SiLU, which roughly halves onnxruntime's time at small token counts (the per-node overhead dominates).
    """

    def __init__(self, bank: ExpertBank, expert: int) -> None:
        super().__init__()
        i = bank.slot(expert)
        self.fc1 = nn.Linear(bank.dim, bank.hidden)
        self.fc2 = nn.Linear(bank.hidden, bank.dim)
        # Folded in float64 so the only float32 rounding is the final cast.
        w1 = bank.fc1_weight[i].detach().double()
        gamma, beta = bank.norm_weight[i].detach().double(), bank.norm_bias[i].detach().double()
        shift = bank.alpha[i].detach().double() * bank.correction[i].detach().double()
        with torch.no_grad():
            self.fc1.weight.copy_(w1 * gamma[None, :])
            self.fc1.bias.copy_(w1 @ beta + bank.fc1_bias[i].detach().double())
            self.fc2.weight.copy_(bank.fc2_weight[i])
            self.fc2.bias.copy_(bank.fc2_bias[i].detach().double() + shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


def expert_module(bank: ExpertBank, expert: int, *, fold: bool = True) -> nn.Module:
    """A standalone float32 module computing one expert of ``bank`` on [n, C] (what gets exported)."""
    module = _FoldedExpert(bank, expert) if fold else _PlainExpert(bank, expert)
    return module.float().eval().requires_grad_(False)


def export_expert(bank: ExpertBank, expert: int, path: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET,
                  fold: bool = True) -> Path:
    """Write one expert as an ONNX graph with input ``x`` [n, C] and output ``y`` [n, C] (n dynamic).

    The file appears atomically (written beside it, then renamed), so a crash never leaves half a graph that a
    later start would pick up.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = expert_module(bank, expert, fold=fold)
    example = torch.randn(8, bank.dim)
    with atomic_path(path) as tmp:
        _torch_onnx_export(module, example, tmp, opset)
    return path


def _torch_onnx_export(module: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    names = {"input_names": ["x"], "output_names": ["y"]}
    # The TorchScript exporter gives a small static graph quickly (~0.1 s); it is deprecated, so warnings are
    # silenced, and when a torch without it refuses, the torch.export-based exporter takes over (seconds, needs
    # onnxscript, emits opset >= 18).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                              dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, do_constant_folding=True, **names)
            return
        except Exception as legacy_error:  # any failure of the legacy path means: try the new one
            log.info("TorchScript ONNX exporter unavailable (%s); using the dynamo exporter", legacy_error)
        torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=max(opset, 18),
                          dynamic_shapes={"x": {0: torch.export.Dim("n")}}, external_data=False, **names)


class OnnxBackend(ExpertBackend):
    """Each hosted expert as its own ONNX graph, run by onnxruntime on the CPU.

    Graphs live in ``cache_dir`` under names keyed by model fingerprint, layer and expert (and the graph
    variant), so a different model never picks up stale graphs; a graph that is missing, unreadable or of the
    wrong width is (re-)exported. ``exported`` and ``reused`` list the (layer, expert) pairs of each kind.
    ``threads`` sets onnxruntime's intra-op threads; nodes run sequentially (the graphs are a chain anyway).
    ``fold`` folds the norm affine and the correction into the linear layers (exact up to float32 rounding).
    ``precision`` int8: with ``calibration`` (each expert's tokens) static quantisation calibrated on them;
    without, dynamic quantisation (int8 weights, each call's tokens quantised from their own range), which is
    faster at small token counts and closer to float (docs/onnx.md).
    """

    def __init__(self, banks: Mapping[int, ExpertBank], fingerprint: str, cache_dir: str | os.PathLike[str], *,
                 threads: int = 1, opset: int = DEFAULT_OPSET, fold: bool = True, precision: str = "fp32",
                 calibration: Mapping[tuple[int, int], torch.Tensor] | None = None,
                 calibration_key: str = "") -> None:
        import onnxruntime as ort  # imported here: the torch backend must not need onnxruntime

        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if opset < 17:
            raise ValueError(f"opset must be >= 17, got {opset}")
        if not fingerprint or any(c in fingerprint for c in "/\\:") or fingerprint.startswith("."):
            raise ValueError(f"fingerprint {fingerprint!r} cannot key a cache file name")
        if precision not in ("fp32", "int8"):
            raise ValueError(f"precision must be fp32 or int8, got {precision!r}")
        self.dims, self.hosted = _describe_banks(banks)
        self.name = "onnxruntime" if precision == "fp32" else "onnxruntime-int8"
        self.cache_dir = Path(cache_dir)
        self.fingerprint = fingerprint
        self.threads = threads
        self.precision = precision
        self._variant = f"g{_GRAPH_VERSION}-{'folded' if fold else 'plain'}-op{opset}"
        static = f"{self._variant}-int8q{_INT8_VERSION}-{calibration_key or 'c'}"
        self._int8_variant = static if calibration is not None else f"{self._variant}-int8dyn{_INT8_VERSION}"
        self.exported: list[tuple[int, int]] = []
        self.reused: list[tuple[int, int]] = []
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot create the ONNX cache folder {self.cache_dir}: {e.strerror or e}") from None

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers etc. are noise here

        self._sessions: dict[tuple[int, int], Any] = {}
        for layer, bank in sorted(banks.items()):
            for expert in sorted(bank.expert_ids):
                path = self.graph_path(layer, expert)
                session = self._open(ort, path, options, self.dims[layer]) if path.exists() else None
                if session is None:
                    export_expert(bank, expert, path, opset=opset, fold=fold)
                    session = self._open(ort, path, options, self.dims[layer])
                    if session is None:
                        raise RuntimeError(f"onnxruntime cannot load the graph just exported to {path}")
                    if precision == "fp32":
                        self.exported.append((layer, expert))
                elif precision == "fp32":
                    self.reused.append((layer, expert))
                if precision == "int8":
                    session = self._int8_session(ort, options, layer, expert, path, calibration)
                self._sessions[(layer, expert)] = session

    def _int8_session(self, ort: Any, options: Any, layer: int, expert: int, fp32_path: Path,
                      calibration: Mapping[tuple[int, int], torch.Tensor] | None) -> Any:
        """The expert's int8 graph (cached beside the float one): dynamic, or static calibrated on its own tokens."""
        from moevit.onnx_camera import INT8_OPS, quantize_graph, quantize_graph_dynamic

        path = self.graph_path(layer, expert, "int8")
        session = self._open(ort, path, options, self.dims[layer]) if path.exists() else None
        if session is not None:
            self.reused.append((layer, expert))
            return session
        if calibration is None:
            quantize_graph_dynamic(fp32_path, path)
            session = self._open(ort, path, options, self.dims[layer])
            if session is None:
                raise RuntimeError(f"onnxruntime cannot load the int8 graph just written to {path}")
            self.exported.append((layer, expert))
            return session
        tokens = calibration.get((layer, expert))
        if tokens is None or len(tokens) == 0:
            # an expert no calibration patch reached: its input range is unknown, so it stays float32
            log.warning("layer %d expert %d got no calibration tokens: it runs in float32", layer, expert)
            return self._open(ort, fp32_path, options, self.dims[layer])
        feeds = [{"x": c.detach().float().contiguous().numpy()} for c in torch.split(tokens, 1024)]
        quantize_graph(fp32_path, path, feeds, op_types=INT8_OPS)
        session = self._open(ort, path, options, self.dims[layer])
        if session is None:
            raise RuntimeError(f"onnxruntime cannot load the int8 graph just written to {path}")
        self.exported.append((layer, expert))
        return session

    def graph_path(self, layer: int, expert: int, precision: str = "fp32") -> Path:
        """Cache file of one expert's graph (the float one, or its int8 quantisation)."""
        variant = self._variant if precision == "fp32" else self._int8_variant
        return self.cache_dir / f"{self.fingerprint}-L{layer}-E{expert}-{variant}.onnx"

    @staticmethod
    def _open(ort: Any, path: Path, options: Any, dim: int) -> Any:
        """A session for ``path``, or None when the file is unusable (truncated, foreign, wrong width)."""
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises several exception types for bad files
            log.warning("ignoring unusable cached ONNX graph %s (%s); exporting it again", path, e)
            return None
        inputs, outputs = session.get_inputs(), session.get_outputs()
        ok = ([i.name for i in inputs] == ["x"] and [o.name for o in outputs] == ["y"]
              and len(inputs[0].shape) == 2 and inputs[0].shape[1] == dim)
        if not ok:
            log.warning("ignoring cached ONNX graph %s: it does not take x [n, %d]; exporting it again", path, dim)
            return None
        return session

    def run(self, layer: int, expert: int, x_nC: torch.Tensor) -> torch.Tensor:
        try:
            session = self._sessions[(layer, expert)]
        except KeyError:
            raise KeyError(f"expert {expert} of layer {layer} is not hosted by this backend") from None
        # At 64 tokens a call takes ~20 us, so the usual case (a decoded float32 CPU tensor) skips every copy.
        if x_nC.requires_grad or x_nC.dtype != torch.float32 or not x_nC.is_cpu or not x_nC.is_contiguous():
            x_nC = x_nC.detach().to(device="cpu", dtype=torch.float32).contiguous()
        (y,) = session.run(_OUTPUT_NAMES, {"x": x_nC.numpy()})  # named: run(None) lists them on every call
        return torch.from_numpy(y)
