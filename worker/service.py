"""The ExpertService of the worker: request validation and execution as pure functions, plus a thin servicer.

:func:`validate_and_run` checks a ``RunExpertsRequest`` completely (fingerprint, layer, experts, tensors, caps)
before computing anything and raises :class:`RequestError` with the gRPC status and a message naming the
problem. :class:`ExpertServicer` only maps that onto ``context.abort``; no exception ever escapes a handler.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Collection, Mapping
from concurrent.futures import Executor
from typing import Any

import grpc
import torch
from moevit.worker.backends import ExpertBackend

from moevit_rpc.codecs import all_wire_ids
from moevit_rpc.headers import EXPERTS, FINGERPRINT, LAYER
from moevit_rpc.headers import FEATURE as HEADERS_FEATURE
from moevit_rpc.messages import clip
from moevit_rpc.serving import Refused, Undecodable
from moevit_rpc.tensors import DTYPES, codec_of, proto_to_tensor, tensor_to_proto
from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc

__all__ = ["DEFAULT_MAX_TOKENS", "PROTOCOL_VERSION", "ExpertServicer", "RequestError", "expert_rows",
           "header_screen", "info_response", "validate_and_run"]

log = logging.getLogger(__name__)

PROTOCOL_VERSION = "v1"
# Optional parts of v1 this worker implements (InfoResponse.features).
FEATURES = ("run_experts_stream", "packed_tokens", HEADERS_FEATURE)
# Pixel tokens per request: a batch of 64 images at layer 0-1 resolution (32x32 pixels at 256 px input) is 64K;
# the cap bounds one request's memory and compute whatever the message size allows.
DEFAULT_MAX_TOKENS = 1 << 18

# Token elements (tokens x dim) up to which a request runs on the event loop rather than the executor:
# 2^18 elements is e.g. 2048 tokens of dim 128, about a millisecond of expert compute on one core.
DEFAULT_INLINE_ELEMENTS = 1 << 18

# What one repeated entry of a request (a batch, a packed expert or count, a shape entry) counts for in the estimate
# of its work (:func:`_elements`): parsing and checking an entry costs about what a few hundred token elements do.
ENTRY_ELEMENTS = 256

# More batches (or packed experts) than a layer has hosted experts cannot be valid, each expert appearing once; up to
# this many get the full validation's message naming the duplicate or unhosted expert, more are refused at once.
NAMED_SLACK = 64

# RunExperts calls a worker admits at once (computing or waiting for the compute thread); more get
# RESOURCE_EXHAUSTED at once, so the caller tries another replica instead of queueing behind them. Bounds the
# worker's memory to about this many requests of at most the message-size cap.
DEFAULT_MAX_QUEUE = 32

_EMPTY_RESPONSE = expert_pb2.RunExpertsResponse()
_WIRE_NAME = {enum: name for name, (enum, _) in DTYPES.items()}
_WIRE_ENUMS = {*_WIRE_NAME, expert_pb2.INT8, expert_pb2.INT4}  # token codecs (moevit_rpc.codecs) included
_DTYPE_NAMES = ", ".join(expert_pb2.DType.Name(enum) for enum in sorted(_WIRE_ENUMS))


class RequestError(Exception):
    """A request the worker refuses: ``code`` is the gRPC status to answer with, ``message`` says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _CallerGone(Exception):  # noqa: N818 - a condition, not an error of ours
    """A stream's answer could not be written: its caller went away (cancelled, deadline, connection gone)."""


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _fingerprint_mismatch(given: str, fingerprint: str) -> RequestError:
    return RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                        f"model fingerprint mismatch: the request is for model {clip(given)} but this worker serves "
                        f"model {fingerprint!r}; load the same checkpoint on both ends")


def _layer_not_hosted(layer: int, hosted: Mapping[int, Collection[int]]) -> RequestError:
    return _invalid(f"layer {layer} is not hosted by this worker (hosted layers: {sorted(hosted)})")


def _dtype_name(value: int) -> str:
    return expert_pb2.DType.Name(value) if value in expert_pb2.DType.values() else str(value)


def _elements(request: expert_pb2.RunExpertsRequest) -> int:
    """Work the request says it carries, in token elements (from the headers alone; validation comes later): the
    elements of its 2-d token shapes plus ``ENTRY_ELEMENTS`` per repeated entry (batch, packed expert or count,
    shape entry), so a request of millions of entries is not taken for a small one. Only called once
    :func:`precheck` passed, which bounds the number of batches, so the sum is over a few items at most."""
    entries = len(request.batches)
    if request.HasField("packed"):
        packed = request.packed
        entries += len(packed.experts) + len(packed.counts) + len(packed.tokens.shape)
        shapes = [packed.tokens.shape]
    else:
        shapes = [b.tokens.shape for b in request.batches]
        entries += sum(len(shape) for shape in shapes)
    return sum(shape[0] * shape[1] for shape in shapes if len(shape) == 2) + ENTRY_ELEMENTS * entries


def precheck(hosted: Mapping[int, Collection[int]], fingerprint: str, request: expert_pb2.RunExpertsRequest) -> None:
    """The refusals that cost O(1) whatever the request's size, run on the event loop before anything else: model
    fingerprint, layer, and more batches or packed experts than the layer has hosted experts (each may appear once),
    so a request of millions of entries is refused without walking them. Raises :class:`RequestError`."""
    if request.model_fingerprint != fingerprint:
        raise _fingerprint_mismatch(request.model_fingerprint, fingerprint)
    layer = request.layer
    if layer not in hosted:
        raise _layer_not_hosted(layer, hosted)
    n_hosted = len(hosted[layer])
    if request.HasField("packed"):
        named, what = len(request.packed.experts), "packed tokens name"
        if len(request.packed.counts) != named:
            raise _invalid(f"layer {layer}: packed tokens name {named} experts but give {len(request.packed.counts)} "
                           "counts; expected one count per expert")
    else:
        named, what = len(request.batches), "the request carries batches for"
    if named > max(n_hosted, NAMED_SLACK):  # a few too many get the full check's message (duplicate, not hosted)
        raise _invalid(f"layer {layer}: {what} {named} experts but this worker hosts {n_hosted} of layer {layer} "
                       f"(hosted: {sorted(hosted[layer])}) and each may appear once")


# Requests of at least this many bytes are screened from their bytes before they are parsed (see wire_screen);
# smaller ones parse in well under a millisecond.
SCREEN_MIN_BYTES = 1 << 20


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[i]  # IndexError at the end: the caller gives up and lets the parser judge
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def _fields(data: bytes, start: int, end: int, limit: int):
    """(field number, wire type, value or (offset, length)) of the top-level fields of ``data[start:end]``, at most
    ``limit`` of them (then one ``(None, None, None)``). IndexError/ValueError on bytes that are not protobuf."""
    i, n = start, 0
    while i < end:
        if n == limit:
            yield None, None, None
            return
        key, i = _varint(data, i)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, i = _varint(data, i)
            yield number, kind, value
        elif kind == 1:
            i += 8
            yield number, kind, None
        elif kind == 2:
            length, i = _varint(data, i)
            if i + length > end:
                raise ValueError("truncated")
            yield number, kind, (i, length)
            i += length
        elif kind == 5:
            i += 4
            yield number, kind, None
        else:  # groups: nothing v1 sends; let the parser judge
            raise ValueError("group")
        n += 1


def wire_screen(hosted: Mapping[int, Collection[int]], fingerprint: str):
    """A screen for :func:`moevit_rpc.serving.add_service`: refuses a large ``RunExpertsRequest`` from its bytes,
    before it is parsed on the event loop, for what :func:`precheck` would refuse it for (model fingerprint, layer,
    more batches or packed experts/counts than the layer can take). Walks the top-level fields and those of
    ``packed`` only, stopping after a few dozen, so a message of millions of entries costs microseconds; bytes it
    cannot follow are left to the parser."""
    from moevit_rpc.serving import Refused

    most = max((len(e) for e in hosted.values()), default=0)
    limit = 4 * max(most, NAMED_SLACK) + 16  # fields walked at most: batches, packed entries and the scalars

    def screen(data: bytes) -> Refused | None:  # noqa: C901 - one pass over the fields, kept together
        if len(data) < SCREEN_MIN_BYTES:
            return None
        fp = b""
        layer = batches = 0
        request_id = ""
        packed: list[tuple[int, int]] = []
        try:
            for number, kind, value in _fields(data, 0, len(data), limit):
                if number is None:
                    return Refused(grpc.StatusCode.INVALID_ARGUMENT, f"the request has more than {limit} fields; "
                                   "a valid one has at most one batch per hosted expert")
                if number == 1 and kind == 2:
                    fp = data[value[0]:value[0] + min(value[1], 200)]
                elif number == 2 and kind == 0:
                    layer = value
                elif number == 3 and kind == 2:
                    batches += 1
                elif number == 4 and kind == 2:
                    request_id = data[value[0]:value[0] + min(value[1], 200)].decode("utf-8", "replace")
                elif number == 5 and kind == 2:
                    packed.append(value)
            given = fp.decode("utf-8", "replace")
            problem = (_fingerprint_mismatch(given, fingerprint) if given != fingerprint else
                       _layer_not_hosted(layer, hosted) if layer not in hosted else None)
            if problem is not None:
                return Refused(problem.code, problem.message, request_id)
            cap = max(len(hosted[layer]), NAMED_SLACK)
            # a packed uint list of L bytes holds between L/10 and L entries: over 10 x cap bytes is over cap
            entries = {1: 0, 2: 0}
            for start, length in packed:
                for number, kind, value in _fields(data, start, start + length, limit):
                    if number is None:
                        return Refused(grpc.StatusCode.INVALID_ARGUMENT, f"layer {layer}: the packed tokens have "
                                       f"more than {limit} fields", request_id)
                    if number in entries:
                        entries[number] += value[1] // 10 if kind == 2 else 1
            named = max(batches, entries[1], entries[2])
            if named > cap:
                return Refused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"layer {layer}: the request names over {named} experts or counts but this worker "
                               f"hosts {len(hosted[layer])} of layer {layer} and each may appear once", request_id)
        except (IndexError, ValueError):
            return None
        return None

    return screen


def header_screen(hosted: Mapping[int, Collection[int]], fingerprint: str, *, stream: bool = False):
    """A header screen for :func:`moevit_rpc.serving.add_service`: refuses a ``RunExperts`` call (``stream``: a
    ``RunExpertsStream`` call) from the headers its client sent (:mod:`moevit_rpc.headers`) before its message is
    received: another model's fingerprint, a layer or an expert this worker does not host, an expert named twice,
    more experts than the layer can take; with the status and message the message's own checks give. A call
    without the headers (an older client) passes, and its message is checked as before; so is every message of a
    call that passes."""
    from moevit_rpc.serving import Refused

    def screen(metadata: tuple) -> Refused | None:
        given = {key: value for key, value in metadata if key.startswith("moevit-")}
        if not given:
            return None
        try:
            _check_headers(hosted, fingerprint, given, stream)
        except RequestError as e:
            return Refused(e.code, e.message)
        return None

    return screen


def _check_headers(hosted: Mapping[int, Collection[int]], fingerprint: str, given: Mapping[str, Any],
                   stream: bool) -> None:
    """What :func:`header_screen` refuses, raised as :class:`RequestError`."""
    given_fingerprint = given.get(FINGERPRINT)
    if given_fingerprint is not None and given_fingerprint != fingerprint:
        raise _fingerprint_mismatch(str(given_fingerprint), fingerprint)
    if stream or LAYER not in given:  # a stream's messages name their own layers
        return
    text = str(given[LAYER])
    try:
        layer = int(text)
    except ValueError:
        raise _invalid(f"the {LAYER} header {clip(text)} is not a layer number") from None
    if layer not in hosted:
        raise _layer_not_hosted(layer, hosted)
    text = given.get(EXPERTS)
    if text is None:
        return
    text = str(text)
    try:
        experts = [int(e) for e in text.split(",")] if text else []
    except ValueError:
        raise _invalid(f"the {EXPERTS} header {clip(text)} is not a comma-separated list of expert ids") from None
    if len(experts) > max(len(hosted[layer]), NAMED_SLACK):
        raise _invalid(f"layer {layer}: the {EXPERTS} header names {len(experts)} experts but this worker hosts "
                       f"{len(hosted[layer])} of layer {layer} (hosted: {sorted(hosted[layer])}) and each may appear "
                       "once")
    seen: set[int] = set()
    for expert in experts:
        _check_expert(expert, layer, hosted[layer], seen)


def expert_rows(request: expert_pb2.RunExpertsRequest) -> list[tuple[int, int]]:
    """(expert, tokens) pairs a request names, batches or packed alike, from the headers (for logs and metrics)."""
    if request.HasField("packed"):
        return list(zip(request.packed.experts, request.packed.counts, strict=False))
    return [(b.expert, b.tokens.shape[0] if b.tokens.shape else 0) for b in request.batches]


def _check_tensor(tokens: expert_pb2.Tensor, where: str, layer: int, dim: int) -> int:
    """Rows of a token tensor whose header (dtype, shape [n, dim]) is valid; bytes are checked when decoding."""
    if tokens.dtype not in _WIRE_ENUMS:
        raise _invalid(f"{where}: unsupported tensor dtype {_dtype_name(tokens.dtype)}; expected one of {_DTYPE_NAMES}")
    if len(tokens.shape) != 2 or tokens.shape[0] < 0 or tokens.shape[1] != dim:
        shape = tokens.shape[:4]  # a hostile shape may have millions of entries: show the first few
        shown = clip(str(list(shape))[:-1] + (", ...]" if len(tokens.shape) > 4 else "]")).strip("'")
        raise _invalid(f"{where}: tokens have shape {shown}, expected [n, {dim}] (layer {layer} has dim {dim})")
    return tokens.shape[0]


def _check_expert(expert: int, layer: int, experts: Collection[int], seen: set[int]) -> None:
    if expert not in experts:
        raise _invalid(f"expert {expert} of layer {layer} is not hosted by this worker "
                       f"(hosted on layer {layer}: {sorted(experts)})")
    if expert in seen:
        raise _invalid(f"expert {expert} of layer {layer} appears more than once in the request; "
                       "send all of an expert's tokens in one batch")
    seen.add(expert)


def _check_total(total: int, layer: int, max_tokens: int) -> None:
    if total > max_tokens:
        raise _invalid(f"layer {layer}: the request carries {total} tokens, over this worker's cap of "
                       f"{max_tokens} per request; split it into smaller requests")


def _decode(tokens: expert_pb2.Tensor, where: str, check_finite: bool) -> torch.Tensor:
    try:
        return proto_to_tensor(tokens, check_finite=check_finite)
    except ValueError as e:
        raise _invalid(f"{where}: {e}") from None


def _run_timed(backend: ExpertBackend, layer: int, work: list[tuple[int, torch.Tensor]]
               ) -> tuple[list[torch.Tensor], float]:
    """Outputs of the non-empty items of ``work`` (empty ones map to themselves) and the compute time in ms."""
    busy = [(expert, x) for expert, x in work if x.shape[0] > 0]
    t0 = time.perf_counter()
    results = iter(backend.run_many(layer, busy) if busy else [])
    compute_ms = (time.perf_counter() - t0) * 1e3
    outputs = []
    for expert, x in work:
        y = next(results) if x.shape[0] > 0 else x
        if tuple(y.shape) != tuple(x.shape):  # a backend bug, not the client's: surfaces as INTERNAL
            raise RuntimeError(f"backend {backend.name} returned shape {list(y.shape)} for layer {layer} expert "
                               f"{expert} on input {list(x.shape)}")
        outputs.append(y)
    return outputs, compute_ms


def validate_and_run(backend: ExpertBackend, hosted: Mapping[int, Collection[int]], fingerprint: str,
                     request: expert_pb2.RunExpertsRequest, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                     check_finite: bool = True) -> expert_pb2.RunExpertsResponse:
    """Run the request's experts and build the response, or raise :class:`RequestError`.

    Every batch is checked before any expert runs, so a bad batch costs no compute. Outputs come back in request
    order (a packed request gets a packed answer with the same experts and counts), each in the wire dtype its
    input came in; ``compute_ms`` covers the experts only.
    """
    precheck(hosted, fingerprint, request)
    layer = request.layer
    if request.HasField("packed"):
        if request.batches:
            raise _invalid(f"layer {layer}: the request carries both batches and packed tokens; send one or the other")
        return _run_packed(backend, hosted[layer], request, max_tokens=max_tokens, check_finite=check_finite)
    experts, dim = hosted[layer], backend.dims[layer]

    # Pass 1: structure only, from the message headers (no tensor bytes touched).
    seen: set[int] = set()
    total = 0
    for i, batch in enumerate(request.batches):
        _check_expert(batch.expert, layer, experts, seen)
        where = f"layer {layer} expert {batch.expert} (batch {i})"
        if not batch.HasField("tokens"):
            raise _invalid(f"{where}: no tokens tensor")
        total += _check_tensor(batch.tokens, where, layer, dim)
    _check_total(total, layer, max_tokens)

    # Pass 2: decode (byte counts, finiteness).
    work = [(batch.expert, _decode(batch.tokens, f"layer {layer} expert {batch.expert} (batch {i})", check_finite))
            for i, batch in enumerate(request.batches)]
    ys, compute_ms = _run_timed(backend, layer, work)
    outputs = [expert_pb2.ExpertTokens(expert=batch.expert,
                                       tokens=_encode(y, batch.tokens, f"layer {layer} expert {batch.expert}"))
               for batch, y in zip(request.batches, ys, strict=True)]
    return expert_pb2.RunExpertsResponse(outputs=outputs, compute_ms=compute_ms)


def _run_packed(backend: ExpertBackend, experts: Collection[int], request: expert_pb2.RunExpertsRequest, *,
                max_tokens: int, check_finite: bool) -> expert_pb2.RunExpertsResponse:
    """:func:`validate_and_run` for ``request.packed``: one tensor in, one out (the same rows)."""
    layer, packed = request.layer, request.packed
    ids, counts = list(packed.experts), list(packed.counts)
    if len(ids) != len(counts):
        raise _invalid(f"layer {layer}: packed tokens name {len(ids)} experts but give {len(counts)} counts; "
                       "expected one count per expert")
    seen: set[int] = set()
    for expert in ids:
        _check_expert(expert, layer, experts, seen)
    where = f"layer {layer} packed tokens"
    if not packed.HasField("tokens"):
        raise _invalid(f"{where}: no tokens tensor")
    rows = _check_tensor(packed.tokens, where, layer, backend.dims[layer])
    if sum(counts) != rows:  # counts are uint64: no negative entries to worry about
        raise _invalid(f"{where}: the counts add up to {sum(counts)} rows but the tensor has {rows}")
    _check_total(rows, layer, max_tokens)
    x = _decode(packed.tokens, where, check_finite)
    chunks = torch.split(x, counts) if ids else ()
    ys, compute_ms = _run_timed(backend, layer, list(zip(ids, chunks, strict=True)))
    y = torch.cat(ys) if ys else x
    out = expert_pb2.PackedTokens(experts=ids, counts=counts, tokens=_encode(y, packed.tokens, where))
    return expert_pb2.RunExpertsResponse(packed=out, compute_ms=compute_ms)


def _encode(y: torch.Tensor, like: expert_pb2.Tensor, where: str) -> expert_pb2.Tensor:
    """Outputs in the codec the tokens came in (decoded already, so the codec is known)."""
    try:
        return tensor_to_proto(y, codec_of(like))
    except ValueError as e:  # outputs beyond what the request's codec carries (e.g. int8 scales past float16)
        raise RequestError(grpc.StatusCode.OUT_OF_RANGE,
                           f"{where}: cannot answer in the request's codec: {e}") from None


def info_response(backend: ExpertBackend, fingerprint: str, *, arch: str, site: str) -> expert_pb2.InfoResponse:
    """What the worker hosts, for the Info RPC."""
    layers = [expert_pb2.HostedLayer(layer=layer, experts=list(experts), dim=backend.dims[layer])
              for layer, experts in sorted(backend.hosted.items())]
    return expert_pb2.InfoResponse(model_fingerprint=fingerprint, arch=arch, layers=layers, backend=backend.name,
                                   site=site, version=PROTOCOL_VERSION, features=list(FEATURES),
                                   codecs=all_wire_ids())


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    """Async ExpertService over one backend: ``RunExperts`` (one call per request) and ``RunExpertsStream`` (one
    long-lived call, one message per request) share :meth:`answer`.

    With an ``executor`` the computation of a large request runs there, so the event loop keeps answering
    health checks and accepting calls while experts compute; without one everything runs inline (tests,
    single-call use). Requests of at most ``inline_elements`` token elements (tokens x dim, summed over the
    batches) run inline even with an executor: they compute in well under a millisecond or two, less than
    the hop to the executor thread and back costs in CPU and latency (about 0.1 ms per call on a small core).
    """

    def __init__(self, backend: ExpertBackend, fingerprint: str, *, arch: str, site: str = "",
                 max_tokens: int = DEFAULT_MAX_TOKENS, check_finite: bool = True,
                 executor: Executor | None = None, inline_elements: int = DEFAULT_INLINE_ELEMENTS,
                 max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.backend = backend
        self.fingerprint = fingerprint
        self.hosted = {layer: frozenset(experts) for layer, experts in backend.hosted.items()}
        self.max_tokens = max_tokens
        self.check_finite = check_finite
        self.executor = executor
        self.inline_elements = inline_elements
        self.max_queue = max_queue
        self.active = 0  # requests admitted and not finished (calls and stream messages alike)
        self.refused_busy = 0  # requests refused with RESOURCE_EXHAUSTED
        self.cancelled = 0  # requests whose caller gave up (deadline, cancel) before the answer
        self._info = info_response(backend, fingerprint, arch=arch, site=site)
        self._draining = False
        self._idle_streams: set[asyncio.Task[Any]] = set()  # stream handlers waiting for their next request

    async def answer(self, request: expert_pb2.RunExpertsRequest) -> expert_pb2.RunExpertsResponse:
        """Validate and run one request. Raises :class:`RequestError` for a refusal or a failure (INTERNAL);
        :class:`asyncio.CancelledError` passes through (the caller gave up)."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("RunExperts start request_id=%s layer=%d experts=%s", request.request_id, request.layer,
                      [e for e, _ in expert_rows(request)])
        if self.active >= self.max_queue:
            self.refused_busy += 1
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"worker busy: {self.active} requests already admitted (cap {self.max_queue}); "
                               "try another replica")
        try:
            precheck(self.hosted, self.fingerprint, request)
        except RequestError as e:
            log.info("RunExperts request_id=%s refused (%s): %s", clip(request.request_id), e.code.name, e.message)
            raise
        run = functools.partial(validate_and_run, self.backend, self.hosted, self.fingerprint, request,
                                max_tokens=self.max_tokens, check_finite=self.check_finite)
        gave_up = threading.Event()

        def run_unless_abandoned() -> expert_pb2.RunExpertsResponse | None:
            # a call whose caller gave up while it waited for the compute thread is not computed at all
            return None if gave_up.is_set() else run()

        self.active += 1
        try:
            if self.executor is None or _elements(request) <= self.inline_elements:
                response = run()
            else:
                response = await asyncio.get_running_loop().run_in_executor(self.executor, run_unless_abandoned)
            log.debug("RunExperts done request_id=%s compute_ms=%.3f", request.request_id, response.compute_ms)
            response.request_id = request.request_id
            return response
        except asyncio.CancelledError:  # the caller's deadline passed or it cancelled (e.g. a hedge it lost)
            gave_up.set()
            self.cancelled += 1
            log.info("RunExperts request_id=%s cancelled by the caller (deadline or cancel)", request.request_id)
            raise
        except RequestError as e:
            log.info("RunExperts request_id=%s refused (%s): %s", request.request_id, e.code.name, e.message)
            raise
        except Exception as e:  # the worker keeps serving whatever one request does
            log.exception("RunExperts request_id=%s failed", request.request_id)
            raise RequestError(grpc.StatusCode.INTERNAL, f"worker error: {type(e).__name__}: {e}") from None
        finally:
            self.active -= 1

    async def RunExperts(self, request: expert_pb2.RunExpertsRequest,
                         context: grpc.aio.ServicerContext) -> expert_pb2.RunExpertsResponse:
        try:
            return await self.answer(request)
        except RequestError as e:
            code, message = e.code, e.message
        # Not context.abort(): its exception's traceback keeps this frame, and with it the request, alive in a
        # reference cycle until a full garbage collection (measured: +35-50 MB per refused 32 MiB request). A
        # status set on the context and an empty answer end the call the same way for the client.
        del request
        context.set_code(code)
        context.set_details(message)
        return _EMPTY_RESPONSE

    async def RunExpertsStream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        task = asyncio.current_task()
        try:
            while not self._draining:
                self._idle_streams.add(task)
                try:
                    request = await context.read()
                finally:
                    self._idle_streams.discard(task)
                if request is grpc.aio.EOF:  # the client closed its side
                    return
                if isinstance(request, Undecodable):  # no request id to answer in-band: the stream ends
                    log.info("RunExpertsStream refused (INVALID_ARGUMENT): %s", request.message)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                if isinstance(request, Refused):  # refused from its bytes (wire_screen): answered in-band
                    log.info("RunExpertsStream request_id=%s refused (%s): %s", clip(request.request_id),
                             request.code.name, request.message)
                    await self._write(context, expert_pb2.RunExpertsResponse(
                        request_id=request.request_id, error_code=request.code.value[0],
                        error_message=request.message))
                    continue
                try:
                    response = await self.answer(request)
                except RequestError as e:
                    response = expert_pb2.RunExpertsResponse(request_id=request.request_id,
                                                             error_code=e.code.value[0], error_message=e.message)
                await self._write(context, response)
        except _CallerGone:
            # End as gRPC ends a call its caller cancelled (logged at debug level), not by returning: after a
            # return gRPC sends the call's status, and when the failed write was the stream's first, that batch
            # repeats the initial metadata the write already carried (ExecuteBatchError
            # GRPC_CALL_ERROR_TOO_MANY_OPERATIONS, logged with a traceback: a caller cancelling mid-answer)
            raise asyncio.CancelledError from None
        except asyncio.CancelledError:
            if self._draining:  # drain() ended this idle stream: finish it cleanly, the client opens a new one
                return
            raise

    @staticmethod
    async def _write(context: grpc.aio.ServicerContext, response: expert_pb2.RunExpertsResponse) -> None:
        """Write one answer on a stream; :class:`_CallerGone` when the caller went away meanwhile (cancelled,
        connection gone): that ends the stream quietly, not with a traceback in the log."""
        try:
            await context.write(response)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - only a caller that is gone is let through, see below
            # gRPC fails a write's batch (cygrpc's ExecuteBatchError) on a call that has ended, which the context
            # may not show yet: seen as a traceback in 2 of 4 attack soaks, a caller cancelling mid-answer
            if not (context.cancelled() or context.done() or type(e).__name__ == "ExecuteBatchError"):
                raise
            log.info("RunExpertsStream request_id=%s: the caller went away while its answer was written (%s)",
                     clip(response.request_id), type(e).__name__)
            raise _CallerGone from None

    def drain(self) -> None:
        """Shutting down: streams waiting for their next request end now (OK); those computing end after it."""
        self._draining = True
        for task in list(self._idle_streams):
            task.cancel()

    async def Info(self, request: expert_pb2.InfoRequest, context: Any) -> expert_pb2.InfoResponse:
        return self._info
