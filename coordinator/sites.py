"""Clients of the expert workers: one channel per site, with a health watch and traffic counters."""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moevit.coordinator.health import HealthWatch
from moevit.coordinator.stream import ExpertStream
from moevit.deploy.topology import TLSFiles

from moevit_rpc.channels import DEFAULT_MAX_MESSAGE_MB, open_channel
from moevit_rpc.codecs import LEGACY_IDS, parse_codec, wire_ids
from moevit_rpc.headers import request_headers
from moevit_rpc.security import token_metadata
from moevit_rpc.tensors import proto_to_tensor, tensor_to_proto
from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc

RPC_MS_KEPT = 1 << 16


class SiteError(RuntimeError):
    """A site could not serve a call; the message names the site and the cause."""

    def __init__(self, site: str, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(f"site {site}: {message}")
        self.site, self.code = site, code


@dataclass
class Traffic:
    """Counters of one site: calls, payload bytes both ways (serialised messages), tokens, RPC time."""

    calls: int = 0
    failures: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    tokens: int = 0
    # the latest RPC times only: one float per call kept for the life of a process would grow without bound
    rpc_ms: deque[float] = field(default_factory=lambda: deque(maxlen=RPC_MS_KEPT))
    # per call too, as rpc_ms: the worker's reported compute time and the call's bytes both ways, so the link's
    # throughput is estimated from the time on the wire, not the experts' compute (coordinator/strategies.py)
    server_ms: deque[float] = field(default_factory=lambda: deque(maxlen=RPC_MS_KEPT))
    call_bytes: deque[int] = field(default_factory=lambda: deque(maxlen=RPC_MS_KEPT))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, sent: int, received: int, tokens: int, ms: float, server_ms: float = 0.0) -> None:
        with self.lock:
            self.calls += 1
            self.bytes_sent += sent
            self.bytes_received += received
            self.tokens += tokens
            self.rpc_ms.append(ms)
            self.server_ms.append(server_ms)
            self.call_bytes.append(sent + received)


class PendingCall:
    """A request in flight. :attr:`future` completes with the response (or the RPC error); :meth:`result` decodes
    the outputs (float32 [n, C] each, request order); :meth:`cancel` abandons it (and cancels the RPC itself when
    it was started cancellable). ``deadline`` (monotonic): when :meth:`result` stops waiting, for requests on a
    stream (a unary call carries its own deadline)."""

    def __init__(self, client: SiteClient, future: concurrent.futures.Future, sent: int, counts: list[int],
                 t0: float, rpc: grpc.Future | None = None, deadline: float | None = None,
                 dim: int | None = None) -> None:
        self.client, self.future, self.sent, self.counts, self.t0, self.rpc = client, future, sent, counts, t0, rpc
        self.deadline = deadline
        self.dim = dim  # the tokens' width: an expert's output has the width of its input

    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> None:
        if self.rpc is not None:
            self.rpc.cancel()
        self.future.cancel()

    def result(self) -> list[torch.Tensor]:
        c = self.client
        try:
            resp = self.future.result(None if self.deadline is None else max(0.0, self.deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            self.cancel()
            with c.traffic.lock:
                c.traffic.failures += 1
            raise SiteError(c.name, "DEADLINE_EXCEEDED: no answer on the expert stream before the deadline",
                            grpc.StatusCode.DEADLINE_EXCEEDED) from None
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            details = e.details() if hasattr(e, "details") else str(e)
            with c.traffic.lock:
                c.traffic.failures += 1
            raise SiteError(c.name, f"{code.name}: {details}", code) from None
        except concurrent.futures.CancelledError:  # cancelled, or close() before the call started
            raise SiteError(c.name, "CANCELLED: the call was cancelled", grpc.StatusCode.CANCELLED) from None
        c.traffic.add(self.sent, resp.ByteSize(), sum(self.counts), (time.perf_counter() - self.t0) * 1e3,
                      max(0.0, resp.compute_ms))
        try:
            return self._outputs(resp)
        except ValueError as e:  # the worker broke the protocol: its answer cannot be used
            with c.traffic.lock:
                c.traffic.failures += 1
            raise SiteError(c.name, f"INTERNAL: unusable answer: {e}", grpc.StatusCode.INTERNAL) from None

    def _outputs(self, resp: expert_pb2.RunExpertsResponse) -> list[torch.Tensor]:
        """The answer's outputs, one per request batch; ValueError when they do not match the request (rows,
        width) or hold a NaN or an infinity: a worker's answer is untrusted, and a bad one is the site's failure
        (the experts go to the next replica or the fallback), never a result."""
        ys = self._decoded(resp)
        for y in ys:
            if self.dim is not None and (y.dim() != 2 or y.shape[1] != self.dim):
                raise ValueError(f"outputs have shape {list(y.shape)}, expected [n, {self.dim}] as the request")
            if not bool(torch.isfinite(y).all()):
                raise ValueError("the outputs hold NaN or infinite values")
        return ys

    def _decoded(self, resp: expert_pb2.RunExpertsResponse) -> list[torch.Tensor]:
        if resp.HasField("packed"):
            if list(resp.packed.counts) != self.counts:
                raise ValueError(f"packed counts {list(resp.packed.counts)} differ from the request's {self.counts}")
            shape = list(resp.packed.tokens.shape[:4])
            if (len(resp.packed.tokens.shape) != 2 or shape[0] != sum(self.counts)  # before decoding: a compressed
                    or (self.dim is not None and shape[1] != self.dim)):  # answer is sized by its shape
                raise ValueError(f"packed outputs have shape {shape[:4]}, expected [{sum(self.counts)}, "
                                 f"{self.dim or 'C'}]")
            y = proto_to_tensor(resp.packed.tokens)
            if y.dim() != 2 or len(y) != sum(self.counts):
                raise ValueError(f"packed outputs have shape {list(y.shape)}, expected [{sum(self.counts)}, C]")
            return list(torch.split(y, self.counts)) if self.counts else []
        if len(resp.outputs) != len(self.counts):
            raise ValueError(f"{len(resp.outputs)} outputs for the request's {len(self.counts)} batches")
        rows = [o.tokens.shape[0] if len(o.tokens.shape) == 2 else -1 for o in resp.outputs]
        if rows != self.counts:
            raise ValueError(f"outputs have {rows} rows, the request {self.counts}")
        ys = [proto_to_tensor(o.tokens) for o in resp.outputs]
        if [len(y) for y in ys] != self.counts:
            raise ValueError(f"outputs have {[len(y) for y in ys]} rows, the request {self.counts}")
        return ys


def _transfer(rpc: grpc.Future | concurrent.futures.Future, fut: concurrent.futures.Future) -> None:
    """Completion of a (grpc or thread-pool) future → a concurrent.futures one (so calls can be waited on
    together)."""
    if rpc.cancelled() or fut.cancelled():
        fut.cancel()
        return
    err = rpc.exception()
    try:
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(rpc.result())
    except concurrent.futures.InvalidStateError:  # cancelled by the dispatcher while the answer arrived
        pass


class SiteClient:
    """Expert and health stubs of one worker site, over TLS when ``tls`` is given (the coordinator's own
    certificate, key and the CA), presenting ``token`` (the site's bearer token) on every expert call.

    With ``stream`` (the default) requests go over one long-lived ``RunExpertsStream`` call
    (:mod:`coordinator.stream`), opened at the first request and again after it ends; cancellable requests and
    every request once the worker turns out not to implement streams use unary ``RunExperts`` calls. With
    ``packed`` (the default; only for workers listing the "packed_tokens" feature) a request carries all its
    experts' tokens in one tensor."""

    def __init__(self, name: str, address: str, *, fingerprint: str, wire: str = "fp16",
                 deadline_s: float = 10.0, max_message_mb: float = DEFAULT_MAX_MESSAGE_MB,
                 tls: TLSFiles | None = None, token: str | None = None, watch: bool = True,
                 stream: bool = True, packed: bool = True) -> None:
        self.name, self.address, self.fingerprint, self.wire = name, address, fingerprint, parse_codec(wire).name
        self.stream, self.packed = stream, packed
        self._stream: ExpertStream | None = None
        self._stream_lock = threading.Lock()
        self.deadline_s = deadline_s
        self.channel = open_channel(address, tls=tls, max_message_mb=max_message_mb)
        self.metadata = token_metadata(token) or None
        # expert calls also say which model (and unary ones which layer and experts) they are for, so that a worker
        # refuses a mismatched call before receiving its tokens (moevit_rpc.headers)
        self._stream_metadata = (*token_metadata(token), *request_headers(fingerprint))
        self.stub = expert_pb2_grpc.ExpertServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.traffic = Traffic()
        # request ids must be unique per stream even when several threads send at once: next() on a count is
        # atomic, ``+= 1`` on an attribute is not
        self._seq = itertools.count(1)
        # Calls in flight run as blocking calls on these threads rather than as grpc futures: a sync-API future
        # needs the channel's "spin" thread, which grpc stops whenever no call is in flight and starts again for
        # the next one, so one MoE layer after another paid a thread start per site (measured: ~0.13 ms of the
        # coordinator's CPU per call, ~0.4 ms per layer over three sites). Idle threads are reused; more than
        # one lets concurrent forwards (several runtimes, threads) still overlap their calls to a site.
        # Calls that may have to be cancelled (hedged) are grpc futures instead: a blocking call cannot be.
        self._calls = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"site-{name}")
        self.watch = HealthWatch(name, self.channel, metadata=self.metadata) if watch else None
        self._closed = False

    def use_features(self, features: list[str] | tuple[str, ...]) -> None:
        """Fall back from what the worker's Info does not list: streams, packed tokens (older v1 workers)."""
        if "run_experts_stream" not in features:
            self.stream = False
        if "packed_tokens" not in features:
            self.packed = False

    def codec_problem(self, codecs: list[str] | tuple[str, ...]) -> str | None:
        """Why the worker cannot take this client's codec (``wire``), from the codecs its Info lists (none: an older
        worker, which speaks fp32, fp16 and bf16), or None when it can."""
        missing = sorted(wire_ids(parse_codec(self.wire)) - (set(codecs) or LEGACY_IDS))
        if not missing:
            return None
        spoken = ", ".join(codecs) if codecs else "fp32/1, fp16/1, bf16/1 (an older worker: no codec list)"
        return (f"does not speak the codec {self.wire!r} of its rpc.codec (missing wire format(s) "
                f"{', '.join(missing)}; it speaks {spoken}); upgrade the worker or choose one of those codecs")

    @property
    def up(self) -> bool:
        """Healthy as far as the health watch knows (always True without a watch)."""
        return self.watch.up if self.watch is not None else True

    def health(self, timeout: float = 1.0) -> str:
        """``SERVING``, ``NOT_SERVING``, … or ``UNREACHABLE``."""
        try:
            resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def info(self, timeout: float = 5.0) -> expert_pb2.InfoResponse:
        try:
            return self.stub.Info(expert_pb2.InfoRequest(), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise SiteError(self.name, f"Info failed at {self.address}: {e.code().name}: {e.details()}",
                            e.code()) from None

    def start(self, layer: int, batches: list[tuple[int, torch.Tensor]], *, timeout: float | None = None,
              cancellable: bool = False) -> PendingCall:
        """Send the tokens of several experts of one layer in one RPC; returns at once. ``timeout`` defaults to
        the client's deadline."""
        req = expert_pb2.RunExpertsRequest(model_fingerprint=self.fingerprint, layer=layer,
                                           request_id=f"{self.name}-{next(self._seq)}")
        counts = [len(x) for _, x in batches]
        dim = int(batches[0][1].shape[1]) if batches else None
        if self.packed and batches:  # one tensor: one conversion here and one decode at the worker, not one per expert
            tokens = torch.cat([x for _, x in batches]) if len(batches) > 1 else batches[0][1]
            req.packed.experts.extend(e for e, _ in batches)
            req.packed.counts.extend(counts)
            req.packed.tokens.CopyFrom(tensor_to_proto(tokens, self.wire))
        else:
            req.batches.extend(expert_pb2.ExpertTokens(expert=e, tokens=tensor_to_proto(x, self.wire))
                               for e, x in batches)
        timeout = self.deadline_s if timeout is None else max(timeout, 1e-3)
        t0 = time.perf_counter()
        rpc = None
        if self.stream and not cancellable:
            fut_or_none = self._submit_on_stream(req)
            if fut_or_none is not None:
                return PendingCall(self, fut_or_none, req.ByteSize(), counts, t0, deadline=time.monotonic() + timeout,
                                   dim=dim)
        try:
            if cancellable:
                rpc = self.stub.RunExperts.future(req, timeout=timeout, metadata=self._call_metadata(req))
                fut: concurrent.futures.Future = concurrent.futures.Future()
                rpc.add_done_callback(lambda r: _transfer(r, fut))
            else:
                fut = self._calls.submit(self.stub.RunExperts, req, timeout=timeout, metadata=self._call_metadata(req))
        except (RuntimeError, ValueError):  # submit after close(), or the channel is closed
            raise SiteError(self.name, "the client is closed", grpc.StatusCode.CANCELLED) from None
        return PendingCall(self, fut, req.ByteSize(), counts, t0, rpc, dim=dim)

    def _call_metadata(self, req: expert_pb2.RunExpertsRequest) -> tuple[tuple[str, str], ...]:
        """The token and the headers of a unary RunExperts call carrying ``req``."""
        experts = req.packed.experts if req.HasField("packed") else [b.expert for b in req.batches]
        return (*(self.metadata or ()), *request_headers(self.fingerprint, req.layer, experts))

    def _submit_on_stream(self, req: expert_pb2.RunExpertsRequest) -> concurrent.futures.Future | None:
        """The answer's future, on the open stream or a new one; None once the client is closed or streams are off."""
        with self._stream_lock:
            for _ in range(2):  # the stream may end between the check and the submit: then once more on a new one
                if not self.stream or self._closed:
                    return None
                fresh = self._stream is None or self._stream.ended
                if fresh:
                    try:
                        self._stream = ExpertStream(self.stub, name=self.name, metadata=self._stream_metadata,
                                                    on_unimplemented=self._resend_unary)
                    except ValueError:  # the channel is closed
                        return None
                fut = self._stream.submit(req)
                if fut is not None:
                    return fut
                error = self._stream.error
                if fresh and error is not None and error.code() != grpc.StatusCode.UNIMPLEMENTED:
                    # a new stream that ended before its first request (refused from its headers: wrong model,
                    # token): that is this request's answer, not a reason to try another stream and a unary call
                    failed: concurrent.futures.Future = concurrent.futures.Future()
                    failed.set_exception(error)
                    return failed
        return None

    def _resend_unary(self, pending: list[tuple[expert_pb2.RunExpertsRequest, concurrent.futures.Future]]) -> None:
        """The worker has no RunExpertsStream: stop using streams and send what was waiting as unary calls."""
        self.stream = False
        for req, fut in pending:
            if fut.cancelled():
                continue
            try:
                call = self._calls.submit(self.stub.RunExperts, req, timeout=self.deadline_s,
                                          metadata=self._call_metadata(req))
            except RuntimeError:  # closed meanwhile
                fut.cancel()
                continue
            call.add_done_callback(lambda c, fut=fut: _transfer(c, fut))

    def close(self) -> None:
        self._closed = True
        with self._stream_lock:
            if self._stream is not None:
                self._stream.close()
        if self.watch is not None:
            self.watch.close()
        self._calls.shutdown(wait=False, cancel_futures=True)
        self.channel.close()  # cancels calls still in flight: their threads return at once
