"""Clients of the expert workers: one channel per site, with traffic counters."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.channels import DEFAULT_MAX_MESSAGE_MB, channel_options
from moevit_rpc.tensors import proto_to_tensor, tensor_to_proto
from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc


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
    rpc_ms: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, sent: int, received: int, tokens: int, ms: float) -> None:
        with self.lock:
            self.calls += 1
            self.bytes_sent += sent
            self.bytes_received += received
            self.tokens += tokens
            self.rpc_ms.append(ms)


class PendingCall:
    """An RPC in flight; :meth:`result` decodes the outputs (float32 [n, C] each, request order)."""

    def __init__(self, client: SiteClient, future: concurrent.futures.Future, sent: int, tokens: int,
                 t0: float) -> None:
        self.client, self.future, self.sent, self.tokens, self.t0 = client, future, sent, tokens, t0

    def result(self) -> list[torch.Tensor]:
        c = self.client
        try:
            resp = self.future.result()
        except grpc.RpcError as e:
            with c.traffic.lock:
                c.traffic.failures += 1
            raise SiteError(c.name, f"{e.code().name}: {e.details()}", e.code()) from None
        except concurrent.futures.CancelledError:  # close() before the call started
            raise SiteError(c.name, "CANCELLED: the client was closed", grpc.StatusCode.CANCELLED) from None
        c.traffic.add(self.sent, resp.ByteSize(), self.tokens, (time.perf_counter() - self.t0) * 1e3)
        return [proto_to_tensor(o.tokens) for o in resp.outputs]


class SiteClient:
    """Expert and health stubs of one worker site."""

    def __init__(self, name: str, address: str, *, fingerprint: str, wire: str = "fp16",
                 deadline_s: float = 10.0, max_message_mb: float = DEFAULT_MAX_MESSAGE_MB) -> None:
        self.name, self.address, self.fingerprint, self.wire, self.deadline_s = name, address, fingerprint, wire, \
            deadline_s
        self.channel = grpc.insecure_channel(address, options=channel_options(max_message_mb))
        self.stub = expert_pb2_grpc.ExpertServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.traffic = Traffic()
        self._seq = 0
        # Calls in flight run as blocking calls on these threads rather than as grpc futures: a sync-API future
        # needs the channel's "spin" thread, which grpc stops whenever no call is in flight and starts again for
        # the next one, so one MoE layer after another paid a thread start per site (measured: ~0.13 ms of the
        # coordinator's CPU per call, ~0.4 ms per layer over three sites). Idle threads are reused; more than
        # one lets concurrent forwards (several runtimes, threads) still overlap their calls to a site.
        self._calls = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"site-{name}")

    def health(self, timeout: float = 1.0) -> str:
        """``SERVING``, ``NOT_SERVING``, … or ``UNREACHABLE``."""
        try:
            resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def info(self, timeout: float = 5.0) -> expert_pb2.InfoResponse:
        try:
            return self.stub.Info(expert_pb2.InfoRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise SiteError(self.name, f"Info failed at {self.address}: {e.code().name}: {e.details()}",
                            e.code()) from None

    def start(self, layer: int, batches: list[tuple[int, torch.Tensor]]) -> PendingCall:
        """Send the tokens of several experts of one layer in one RPC; returns at once."""
        self._seq += 1
        req = expert_pb2.RunExpertsRequest(
            model_fingerprint=self.fingerprint, layer=layer, request_id=f"{self.name}-{self._seq}",
            batches=[expert_pb2.ExpertTokens(expert=e, tokens=tensor_to_proto(x, self.wire)) for e, x in batches])
        t0 = time.perf_counter()
        try:
            fut = self._calls.submit(self.stub.RunExperts, req, timeout=self.deadline_s)
        except RuntimeError:  # submit after close()
            raise SiteError(self.name, "the client is closed") from None
        return PendingCall(self, fut, req.ByteSize(), sum(len(x) for _, x in batches), t0)

    def close(self) -> None:
        self._calls.shutdown(wait=False, cancel_futures=True)
        self.channel.close()  # cancels calls still in flight: their threads return at once
