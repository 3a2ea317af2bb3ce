"""Routing traces: the real routing decisions of a model, image by image, for the simulator to replay.

A trace is JSON Lines (UTF-8, one JSON object per line). The first line is the header, every further line one image::

    {"format": "moevit-trace/1", "fingerprint": "5462c318888ceb18", "pixels_per_patch": 4, "top_k": 1,
     "layers": {"1": 8, "5": 8, "8": 8}, "confidence_threshold": 0.5}
    {"image": 0, "class": 3, "patches": {"1": [2, 0, 5, 1, 0, 3, 4, 1], "5": [...], "8": [...]},
     "low_confidence": {"1": [0, 0, 2, 0, 0, 1, 0, 0], "5": [...], "8": [...]}}

* ``layers``: MoE layer -> number of experts; every image gives, per layer, one count per expert.
* ``patches[layer][e]``: patches of the image routed to expert e (each top-k slot counts once); the pixel tokens on
  the wire are that times ``pixels_per_patch``. This is what the coordinator's ``ForwardContext.tokens`` counts,
  divided by ``pixels_per_patch``.
* ``low_confidence`` (optional, all images or none): of those, the patches whose top-1 router probability was below
  the header's ``confidence_threshold`` (null in the header when the counts are absent).
* ``class`` (optional): the true or predicted class index, for reading; the simulator does not use it.
* ``fingerprint``: the model the routing came from (``moevit.checkpoint.model_fingerprint``); the simulator refuses
  a trace of another model than its stats.

:func:`write_trace` / :class:`TraceWriter` write the format, :func:`read_trace` reads and validates it, and
:func:`record_trace` records one by running a model (torch is imported only there).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["TRACE_FORMAT", "Trace", "TraceError", "TraceHeader", "TraceImage", "TraceWriter", "check_trace",
           "mean_patches", "read_trace", "record_trace", "write_trace"]

TRACE_FORMAT = "moevit-trace/1"
_MAX_TRACE_BYTES = 512 << 20
_MAX_LINE_BYTES = 1 << 20


class TraceError(ValueError):
    """A malformed trace; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class TraceHeader:
    fingerprint: str
    layers: Mapping[int, int]  # MoE layer -> number of experts
    pixels_per_patch: int = 4
    top_k: int = 1
    confidence_threshold: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": TRACE_FORMAT, "fingerprint": self.fingerprint, "pixels_per_patch": self.pixels_per_patch,
                "top_k": self.top_k, "layers": {str(k): int(v) for k, v in sorted(self.layers.items())},
                "confidence_threshold": self.confidence_threshold}


@dataclass(frozen=True)
class TraceImage:
    """One image: per MoE layer, patches per expert (and the low-confidence share of them, when recorded)."""

    patches: Mapping[int, Any]
    low_confidence: Mapping[int, Any] | None = None
    label: int | None = None


@dataclass(frozen=True, eq=False)
class Trace:
    """A read trace: ``patches[layer]`` and ``low_confidence[layer]`` are int arrays [images, experts]."""

    header: TraceHeader
    patches: Mapping[int, np.ndarray]
    low_confidence: Mapping[int, np.ndarray] | None = None
    labels: tuple[int | None, ...] = ()
    source: str = "<trace>"
    images: int = field(init=False)

    def __post_init__(self) -> None:
        first = next(iter(self.patches.values()))
        object.__setattr__(self, "images", int(first.shape[0]))


def _line(image: TraceImage, index: int, header: TraceHeader) -> str:
    rec: dict[str, Any] = {"image": index}
    if image.label is not None:
        rec["class"] = int(image.label)
    rec["patches"] = {str(k): [int(x) for x in np.asarray(image.patches[k]).reshape(-1)] for k in header.layers}
    if image.low_confidence is not None:
        rec["low_confidence"] = {str(k): [int(x) for x in np.asarray(image.low_confidence[k]).reshape(-1)]
                                 for k in header.layers}
    return json.dumps(rec, separators=(",", ":"))


class TraceWriter:
    """Append images to a trace file one at a time (what a coordinator recording live routing would use)::

        with TraceWriter(path, header) as w:
            w.write(TraceImage(patches={8: counts}))
    """

    def __init__(self, path: str | os.PathLike[str], header: TraceHeader) -> None:
        self.path, self.header, self.count = Path(path), header, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] | None = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._f.write(json.dumps(header.to_json(), separators=(",", ":")) + "\n")

    def write(self, image: TraceImage) -> None:
        if self._f is None:
            raise ValueError(f"{self.path}: the trace writer is closed")
        if (image.low_confidence is None) != (self.header.confidence_threshold is None):
            raise ValueError("low_confidence counts must be given exactly when the header has a confidence_threshold")
        self._f.write(_line(image, self.count, self.header) + "\n")
        self.count += 1

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_trace(path: str | os.PathLike[str], header: TraceHeader, images: Iterable[TraceImage]) -> Path:
    """Write a whole trace; returns the path."""
    with TraceWriter(path, header) as w:
        for im in images:
            w.write(im)
    return Path(path)


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if len(line) > _MAX_LINE_BYTES:
                raise TraceError(f"{path}: line {no}: longer than {_MAX_LINE_BYTES} bytes")
            if line.strip():
                yield no, line


def _counts(v: Any, n: int, src: str, key: str) -> list[int]:
    if not isinstance(v, list) or len(v) != n or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                         for x in v):
        raise TraceError(f"{src}: {key}: expected a list of {n} integers >= 0")
    return v


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Read and validate a trace file (see the module docstring); TraceError names the line that is wrong."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise TraceError(f"{p}: file not found") from None
    if size > _MAX_TRACE_BYTES:
        raise TraceError(f"{p}: larger than {_MAX_TRACE_BYTES} bytes")
    lines = _iter_lines(p)
    try:
        no, first = next(lines)
    except StopIteration:
        raise TraceError(f"{p}: empty file; expected a header line then one line per image") from None
    except UnicodeDecodeError as e:
        raise TraceError(f"{p}: not UTF-8 text ({e})") from None
    try:
        h = json.loads(first)
    except json.JSONDecodeError as e:
        raise TraceError(f"{p}: line {no}: not JSON: {e}") from None
    if not isinstance(h, dict) or h.get("format") != TRACE_FORMAT:
        raise TraceError(f"{p}: line {no}: expected a header with format {TRACE_FORMAT!r}")
    try:
        layers = {int(k): int(v) for k, v in dict(h["layers"]).items()}
        thr = h.get("confidence_threshold")
        header = TraceHeader(fingerprint=str(h["fingerprint"]), layers=dict(sorted(layers.items())),
                             pixels_per_patch=int(h.get("pixels_per_patch", 4)), top_k=int(h.get("top_k", 1)),
                             confidence_threshold=None if thr is None else float(thr))
    except (KeyError, TypeError, ValueError) as e:
        raise TraceError(f"{p}: line {no}: bad header ({type(e).__name__}: {e})") from None
    if not layers or any(v < 1 for v in layers.values()):
        raise TraceError(f"{p}: line {no}: header layers: expected layer -> number of experts (>= 1)")
    if header.confidence_threshold is not None and not 0 <= header.confidence_threshold <= 1:
        raise TraceError(f"{p}: line {no}: confidence_threshold must be in [0, 1]")
    has_low = header.confidence_threshold is not None
    patches: dict[int, list[list[int]]] = {k: [] for k in layers}
    low: dict[int, list[list[int]]] = {k: [] for k in layers}
    labels: list[int | None] = []
    try:
        for no, line in lines:
            src = f"{p}: line {no}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{src}: not JSON: {e}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("patches"), dict):
                raise TraceError(f"{src}: expected an object with 'patches'")
            for k, n in layers.items():
                pk = rec["patches"].get(str(k))
                counts = _counts(pk, n, src, f"patches.{k}")
                patches[k].append(counts)
                if has_low:
                    lc = rec.get("low_confidence")
                    if not isinstance(lc, dict):
                        raise TraceError(f"{src}: low_confidence: missing (the header has a confidence_threshold)")
                    lk = _counts(lc.get(str(k)), n, src, f"low_confidence.{k}")
                    if any(a > b for a, b in zip(lk, counts, strict=True)):
                        raise TraceError(f"{src}: low_confidence.{k}: more than the patches routed to an expert")
                    low[k].append(lk)
            c = rec.get("class")
            labels.append(c if isinstance(c, int) and not isinstance(c, bool) else None)
    except UnicodeDecodeError as e:
        raise TraceError(f"{p}: not UTF-8 text ({e})") from None
    if not labels:
        raise TraceError(f"{p}: no image lines after the header")
    return Trace(header=header, patches={k: np.asarray(v, dtype=np.int64) for k, v in patches.items()},
                 low_confidence={k: np.asarray(v, dtype=np.int64) for k, v in low.items()} if has_low else None,
                 labels=tuple(labels), source=str(p))


def record_trace(model: Any, images: Iterable[tuple[Any, int | None]], *, confidence_threshold: float = 0.5,
                 batch_size: int = 32) -> tuple[TraceHeader, list[TraceImage]]:
    """Run ``model`` (a moevit MoE model) on ``images`` (pairs of ``[3, S, S]`` tensors and labels or None) and
    record each image's routing: patches per expert per MoE layer, and how many of them had a top-1 router
    probability below ``confidence_threshold``."""
    import torch

    from moevit.checkpoint import model_fingerprint
    from moevit.moe.routing import record_routing
    from moevit.moe.skip import SkipRule

    moe = model.moe_layers()
    if not moe:
        raise ValueError("the model has no MoE layers: record a trace of a converted MoE checkpoint")
    layers = {i: moe[i].num_experts for i in sorted(moe)}
    tops = {moe[i].top_k for i in layers}
    header = TraceHeader(fingerprint=model_fingerprint(model), layers=layers, pixels_per_patch=4,
                         top_k=tops.pop() if len(tops) == 1 else 1, confidence_threshold=confidence_threshold)
    out: list[TraceImage] = []
    was_training = model.training
    model.eval()
    stack = ExitStack()  # the routing recorder's hooks, removed in the finally below
    try:
        rec = stack.enter_context(record_routing(model))
        batch: list[tuple[Any, int | None]] = []

        def flush() -> None:
            x = torch.stack([b[0] for b in batch])
            with torch.no_grad():
                model(x)
            per: list[dict[int, np.ndarray]] = [{} for _ in batch]
            low: list[dict[int, np.ndarray]] = [{} for _ in batch]
            for i, E in layers.items():
                r = rec[i]
                idx = r.expert_idx_BNK  # [B, N, K]
                top1 = r.probs_BNE.max(dim=-1).values  # [B, N]
                # the model's own skip rule (moevit.moe.skip) decides which patches count as low confidence, so the
                # simulator's drop/local-background strategies skip what the coordinator's --skip-threshold would
                # (with --skip-match all and the background experts)
                weak = torch.from_numpy(SkipRule(threshold=confidence_threshold).offwire(
                    idx[:, :, 0].numpy(), top1.numpy()))[:, :, None].expand_as(idx)
                for b in range(len(batch)):
                    per[b][i] = np.bincount(idx[b].reshape(-1).numpy(), minlength=E)
                    low[b][i] = np.bincount(idx[b][weak[b]].reshape(-1).numpy(), minlength=E)
            for b, (_, label) in enumerate(batch):
                out.append(TraceImage(per[b], low[b], None if label is None else int(label)))
            batch.clear()

        for item in images:
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        stack.close()
        model.train(was_training)
    if not out:
        raise ValueError("no images to record")
    return header, out


def check_trace(trace: Trace, stats_layers: Mapping[int, int], fingerprint: str) -> None:
    """Refuse a trace of another model or with other MoE layers than the stats."""
    if trace.header.fingerprint != fingerprint:
        raise TraceError(f"{trace.source}: recorded from model {trace.header.fingerprint}, but the stats are of model "
                         f"{fingerprint}; record the trace with the same model")
    if dict(trace.header.layers) != dict(stats_layers):
        raise TraceError(f"{trace.source}: MoE layers {dict(trace.header.layers)} (layer: experts) differ from the "
                         f"stats' {dict(stats_layers)}")


def mean_patches(trace: Trace) -> dict[int, float]:
    """Mean patches per image per layer (a sanity figure for reports)."""
    return {k: float(v.sum(axis=1).mean()) if len(v) else math.nan for k, v in trace.patches.items()}
