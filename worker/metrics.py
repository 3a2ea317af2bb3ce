"""Prometheus metrics of an expert worker (``moe-worker --metrics-port [HOST:]PORT``).

Hooked from the outside: :func:`instrument` wraps the servicer's per-request ``answer`` (behind both ``RunExperts``
and ``RunExpertsStream``) and its ``Info`` handler of a :class:`~worker.server.WorkerServer` before it starts
(requests by gRPC status, latency, bytes, tokens per expert);
``moevit_worker_up`` reads the server's state at scrape time. Names are listed in ``docs/outputs.md``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

from moevit.worker.service import RequestError, expert_rows
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from moevit_rpc.metrics import LATENCY_BUCKETS, start_metrics_server

__all__ = ["WorkerMetrics", "instrument", "serve_worker_metrics"]

log = logging.getLogger(__name__)


class _StateCollector(Collector):
    def __init__(self, server: Any) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        s = self.server
        up = GaugeMetricFamily("moevit_worker_up", "1 while the worker serves (0 once it is shutting down)")
        up.add_metric([], 1.0 if s.port is not None and not getattr(s, "_stopping", False) else 0.0)
        info = GaugeMetricFamily("moevit_worker_info", "Constant 1, labelled with what this worker serves",
                                 labels=["site", "fingerprint", "backend"])
        info.add_metric([s.site or "", s.fingerprint, s.backend.name], 1.0)
        hosted = GaugeMetricFamily("moevit_worker_hosted_experts", "Experts hosted, per MoE layer", labels=["layer"])
        for layer, experts in sorted(s.backend.hosted.items()):
            hosted.add_metric([str(layer)], float(len(list(experts))))
        yield from (up, info, hosted)


class WorkerMetrics:
    """A worker's metrics on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("moevit_worker_requests",
                                "Requests by method and gRPC status code (RunExperts: every expert request, "
                                "call or stream message)", ["method", "code"], registry=r)
        self.latency = Histogram("moevit_worker_request_seconds", "RPC handling time, by method", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.received = Counter("moevit_worker_received_bytes", "Serialised RunExperts request bytes", registry=r)
        self.sent = Counter("moevit_worker_sent_bytes", "Serialised RunExperts response bytes", registry=r)
        self.tokens = Counter("moevit_worker_expert_tokens", "Tokens computed, per (layer, expert)",
                              ["layer", "expert"], registry=r)

    def instrument(self, server: Any) -> None:
        """Wrap the handlers of ``server``'s servicer; call before ``server.start()``."""
        servicer = server._servicer  # noqa: SLF001 - the hook point; the servicer's own code stays untouched
        answer, info = servicer.answer, servicer.Info

        # every expert request is counted here, whether it came as a RunExperts call or a RunExpertsStream message
        async def counted_answer(request: Any) -> Any:
            t0 = time.perf_counter()
            self.received.inc(request.ByteSize())
            code = "UNKNOWN"
            try:
                response = await answer(request)
                code = "OK"
                self.sent.inc(response.ByteSize())
                for expert, n in expert_rows(request):
                    self.tokens.labels(str(request.layer), str(expert)).inc(n)
                return response
            except RequestError as e:
                code = e.code.name
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                self.requests.labels("RunExperts", code).inc()
                self.latency.labels("RunExperts").observe(time.perf_counter() - t0)

        async def Info(request: Any, context: Any) -> Any:  # noqa: N802
            t0 = time.perf_counter()
            try:
                return await info(request, context)
            finally:
                self.requests.labels("Info", "OK").inc()
                self.latency.labels("Info").observe(time.perf_counter() - t0)

        servicer.answer, servicer.Info = counted_answer, Info
        # requests refused from their bytes or headers never reach answer(): counted as they are refused
        server.on_refused = lambda method, code: self.requests.labels(method, code).inc()
        self.registry.register(_StateCollector(server))


def instrument(server: Any, registry: CollectorRegistry | None = None) -> WorkerMetrics:
    m = WorkerMetrics(registry)
    m.instrument(server)
    return m


def serve_worker_metrics(server: Any, spec: str | int) -> WorkerMetrics:
    """Instrument ``server`` and serve its metrics on ``spec`` (``PORT`` on 127.0.0.1, or ``HOST:PORT``)."""
    m = instrument(server)
    host, port = start_metrics_server(m.registry, spec)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return m
