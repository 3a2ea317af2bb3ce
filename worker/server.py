"""The worker's gRPC server: loads the hosted experts, serves ExpertService and the standard health service,
and shuts down gracefully on SIGTERM/SIGINT (health NOT_SERVING, calls in flight finish within the grace period).

With ``credentials`` (see :func:`moevit_rpc.security.server_credentials`) it listens with mutual TLS only: a
plaintext client, or one without a certificate of the topology's CA, fails the handshake. With ``token`` every
call but health checks must carry ``authorization: Bearer <token>`` (UNAUTHENTICATED otherwise).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from moevit.worker.backends import ExpertBackend
from moevit.worker.service import (
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_TOKENS,
    ExpertServicer,
    header_screen,
    wire_screen,
)

from moevit.checkpoint import load_checkpoint, model_fingerprint
from moevit.config import ModelConfig
from moevit.moe.experts import ExpertBank
from moevit_rpc.channels import accept_keepalive_options
from moevit_rpc.memory import HeapTrimmer
from moevit_rpc.security import TokenAuthInterceptor
from moevit_rpc.serving import BoundedHealthServicer, add_service
from moevit_rpc.v1 import expert_pb2

__all__ = ["DEFAULT_GRACE_S", "DEFAULT_MAX_MESSAGE_BYTES", "SERVICE_NAME", "WorkerConfigError", "WorkerServer",
           "format_experts", "load_hosted", "serve"]

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_GRACE_S = 5.0
# How long answers computed during a shutdown get to reach their callers before the connections close (within the
# grace period): tens of MB over loopback take tens of milliseconds.
ANSWER_LINGER_S = 0.5
DEFAULT_MAX_CONCURRENT_RPCS = 256
SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name


class WorkerConfigError(ValueError):
    """What the worker was asked to host does not fit the model (names the layer/expert and what exists)."""


# ------------------------------------------------------------------------------------------------ loading


def load_hosted(model_path: str | Path, hosted: Mapping[int, Sequence[int]] | None
                ) -> tuple[dict[int, ExpertBank], str, ModelConfig]:
    """The banks of the hosted experts (``layer -> experts``; None = every expert of every MoE layer), the model
    fingerprint and the model config. Only copies of the hosted experts are kept; the rest of the model is freed.

    Raises :class:`~moevit.checkpoint.CheckpointError` for an unusable file and :class:`WorkerConfigError` when
    a layer is not an MoE layer of the model or an expert index is out of range.
    """
    model = load_checkpoint(model_path)
    fingerprint = model_fingerprint(model)
    config = model.config
    moe = model.moe_layers()
    if not moe:
        raise WorkerConfigError(f"{model_path}: the model has no MoE layers, so there are no experts to serve")
    layout = ", ".join(f"layer {layer}: experts 0-{m.num_experts - 1}" for layer, m in sorted(moe.items()))
    if hosted is None:
        hosted = {layer: range(m.num_experts) for layer, m in moe.items()}
    if not hosted:
        raise WorkerConfigError("no experts to host were named")
    problems = []
    for layer, experts in sorted(hosted.items()):
        if layer not in moe:
            problems.append(f"layer {layer} is not an MoE layer of the model")
            continue
        if not list(experts):
            problems.append(f"layer {layer}: no experts named")
        bad = sorted({e for e in experts if not 0 <= e < moe[layer].num_experts})
        if bad:
            problems.append(f"layer {layer} has no expert(s) {bad}")
    if problems:
        raise WorkerConfigError(f"{model_path}: " + "; ".join(problems) + f" (the model has {layout})")
    banks = {int(layer): moe[layer].experts.subset(sorted({int(e) for e in experts}))
             for layer, experts in sorted(hosted.items())}
    # Drop the trunk, routers and the experts hosted elsewhere before serving (the banks hold copies).
    del model, moe
    gc.collect()
    return banks, fingerprint, config


def format_experts(hosted: Mapping[int, Iterable[int]]) -> str:
    """``{5: [2], 8: [0, 1, 2, 7]}`` -> ``'5:2,8:0-2,8:7'`` (the ``--experts`` syntax)."""
    parts = []
    for layer, experts in sorted(hosted.items()):
        vs = sorted(set(experts))
        i = 0
        while i < len(vs):
            j = i
            while j + 1 < len(vs) and vs[j + 1] == vs[j] + 1:
                j += 1
            parts.append(f"{layer}:{vs[i]}" if i == j else f"{layer}:{vs[i]}-{vs[j]}")
            i = j + 1
    return ",".join(parts)


def _bound_address(address: str, port: int) -> str:
    host, sep, requested = address.rpartition(":")
    return f"{host}:{port}" if sep and requested == "0" else address


# ------------------------------------------------------------------------------------------------- server


class WorkerServer:
    """ExpertService + health on one address. ``await start()`` binds and returns the port (0 picks a free one);
    ``await stop()`` drains; ``await run_until_signal()`` serves until SIGTERM/SIGINT and then stops.
    ``credentials``: listen with (mutual) TLS only; ``token``: require this bearer token on every call but health.
    """

    def __init__(self, backend: ExpertBackend, fingerprint: str, *, arch: str, address: str = "127.0.0.1:0",
                 site: str = "", max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_tokens: int = DEFAULT_MAX_TOKENS, grace: float = DEFAULT_GRACE_S,
                 check_finite: bool = True, credentials: grpc.ServerCredentials | None = None,
                 token: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
                 max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS) -> None:
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
        if grace < 0:
            raise ValueError(f"grace must be >= 0 seconds, got {grace}")
        self.backend, self.fingerprint, self.arch = backend, fingerprint, arch
        self.address, self.site, self.grace = address, site, grace
        self.max_message_bytes = max_message_bytes
        self.credentials, self.token = credentials, token
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.port: int | None = None
        # One compute thread: torch/onnxruntime already use the cores inside an op, and queued requests then run
        # one after another instead of fighting over the same cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experts")
        self._servicer = ExpertServicer(backend, fingerprint, arch=arch, site=site, max_tokens=max_tokens,
                                        check_finite=check_finite, executor=self._executor, max_queue=max_queue)
        # watches bounded (64, 8 without the token): they cannot take the 256 RPC slots from expert calls
        self._health = BoundedHealthServicer(token=token)
        # large requests, refused or not, leave free heap in glibc's arenas that it keeps: trimmed after them
        self._trimmer = HeapTrimmer()
        self._server: grpc.aio.Server | None = None
        self._stopping = False
        # told the status of each expert request refused before the servicer sees it (its bytes or its headers);
        # worker.metrics counts them beside the servicer's own answers
        self.on_refused: Callable[[str, str], None] | None = None

    def _counted(self, screen: Callable[[Any], Any], method: str = "RunExperts") -> Callable[[Any], Any]:
        def counted(arg: Any) -> Any:
            refused = screen(arg)
            if refused is not None and self.on_refused is not None:
                self.on_refused(method, refused.code.name)
            return refused

        return counted

    async def start(self) -> int:
        """Bind, start serving, report SERVING; returns the bound port."""
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # gRPC sets SO_REUSEPORT by default on Linux: a second worker on the same port would bind too and
            # silently take half the connections. Refuse instead.
            ("grpc.so_reuseport", 0),
            # Coordinators send keepalive pings every couple of seconds to notice a link that silently stopped
            # forwarding; accept them
            *accept_keepalive_options(),
        ]
        interceptors = [TokenAuthInterceptor(self.token)] if self.token else []
        # Every RPC beyond the cap (health watches and Info included) gets RESOURCE_EXHAUSTED from gRPC itself:
        # a hard bound on the worker's memory above the per-call queue cap of the servicer.
        server = grpc.aio.server(options=options, interceptors=interceptors,
                                 maximum_concurrent_rpcs=self.max_concurrent_rpcs)
        # not grpcio's generated add_ExpertServiceServicer_to_server: bytes that do not parse get INVALID_ARGUMENT
        screen = self._counted(wire_screen(self._servicer.hosted, self.fingerprint))  # large ones, before parsing
        # and calls whose headers say they would be refused, before their messages are received (moevit_rpc.headers)
        hosted, fp = self._servicer.hosted, self.fingerprint
        add_service(server, self._servicer, expert_pb2.DESCRIPTOR.services_by_name["ExpertService"],
                    screens={"RunExperts": screen, "RunExpertsStream": screen}, on_bytes=self._trimmer.note,
                    header_screens={"RunExperts": self._counted(header_screen(hosted, fp)),
                                    # a whole stream refused: a call, not an expert request
                                    "RunExpertsStream": self._counted(header_screen(hosted, fp, stream=True),
                                                                      "RunExpertsStream")})
        add_service(server, self._health, health_pb2.DESCRIPTOR.services_by_name["Health"])
        try:
            # TLS configured -> only a TLS port: a plaintext port beside it would let a client skip the check
            port = (server.add_secure_port(self.address, self.credentials) if self.credentials is not None
                    else server.add_insecure_port(self.address))
        except RuntimeError:  # grpc's message only points at an environment variable; say what is likely wrong
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {self.address}: the address is in use or not local to this machine")
        await server.start()
        self._server, self.port = server, port
        self._trimmer.start()
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        hosted = " ".join(f"{layer}:{list(experts)}" for layer, experts in sorted(self.backend.hosted.items()))
        tls, token = ("on" if self.credentials is not None else "off"), ("on" if self.token else "off")
        log.info("serving site=%s address=%s backend=%s experts=%s fingerprint=%s tls=%s token=%s",
                 self.site or "-", _bound_address(self.address, port), self.backend.name, hosted, self.fingerprint,
                 tls, token)
        if self.token and self.credentials is None:
            log.warning("a bearer token without TLS travels in clear text: anyone on the link can read and reuse it")
        return port

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let calls in flight finish for up to ``grace`` seconds."""
        if self._server is None or self._stopping:
            return
        self._stopping = True
        grace = self.grace if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        log.info("stopping: health NOT_SERVING, waiting up to %.1f s for calls in flight", grace)
        await self._health.enter_graceful_shutdown()
        self._servicer.drain()  # idle RunExpertsStream calls end now instead of holding the grace period open
        # grpc's stop() closes the connections as soon as the last handler returns, which can cut off the tail of
        # a large answer still on its way (the caller then gets UNAVAILABLE for a request the worker computed). So
        # requests being computed finish with the server fully up, and their answers get a moment to reach the
        # callers, all within the grace period; then grpc stops (calls still arriving get what is left of it).
        if self._servicer.active:
            while self._servicer.active and loop.time() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(max(0.0, min(ANSWER_LINGER_S, deadline - loop.time())))
        await self._server.stop(max(0.0, deadline - loop.time()))
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._trimmer.stop()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def run_until_signal(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Serve until one of ``signals`` arrives, then :meth:`stop`. A second signal cuts the grace short."""
        if self._server is None:
            await self.start()
        loop = asyncio.get_running_loop()
        requested = asyncio.Event()
        stop_task: list[asyncio.Task[None]] = []

        def on_signal(sig: signal.Signals) -> None:
            if not requested.is_set():
                log.info("received %s", sig.name)
                requested.set()
            elif self._server is not None and not stop_task:
                log.warning("received %s again: stopping now, cancelling calls in flight", sig.name)
                stop_task.append(loop.create_task(self._server.stop(None)))

        for sig in signals:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            await requested.wait()
            await self.stop()
            if stop_task:
                await stop_task[0]
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)


async def serve(backend: ExpertBackend, fingerprint: str, *, arch: str, address: str, site: str = "",
                max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_tokens: int = DEFAULT_MAX_TOKENS,
                grace: float = DEFAULT_GRACE_S, check_finite: bool = True, metrics: str | None = None,
                credentials: grpc.ServerCredentials | None = None, token: str | None = None,
                max_queue: int = DEFAULT_MAX_QUEUE) -> None:
    """Serve ``backend`` on ``address`` until SIGTERM/SIGINT, then shut down gracefully. ``metrics``
    (``PORT`` or ``HOST:PORT``) also serves Prometheus metrics there (see worker/metrics.py); ``credentials``
    and ``token`` as for :class:`WorkerServer`."""
    server = WorkerServer(backend, fingerprint, arch=arch, address=address, site=site,
                          max_message_bytes=max_message_bytes, max_tokens=max_tokens, grace=grace,
                          check_finite=check_finite, credentials=credentials, token=token, max_queue=max_queue)
    if metrics is not None:
        from moevit.worker.metrics import serve_worker_metrics

        serve_worker_metrics(server, metrics)
    await server.start()
    await server.run_until_signal()
