"""Prometheus metrics of the coordinator (``moe-coordinator --metrics-port [HOST:]PORT``); the endpoint itself is
:mod:`moevit_rpc.metrics`, shared with the worker.

The runtime is instrumented from the outside: :meth:`CoordinatorMetrics.instrument` wraps the runtime's
``classify`` (requests, latency, degraded images) and registers a collector that reads, at scrape time, the
counters the site clients and the forward context already keep (bytes and RPCs per site, tokens per expert) and
asks each site's health service (``moevit_coordinator_site_up``). Names are listed in ``docs/outputs.md``.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from moevit_rpc.metrics import LATENCY_BUCKETS, start_metrics_server

__all__ = ["CoordinatorMetrics"]

class _IncrementalHistogram:
    """Bucket counts of a growing list of samples, advanced at each scrape (the list is only appended to)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.seen = 0
        self.lock = threading.Lock()

    def advance(self, samples: Sequence[float], total: int, scale: float = 1.0) -> None:
        """Take in the samples added since the last call: the last ``total - seen`` of ``samples`` (the most
        recent ones, as far as ``samples`` still holds them: it is a bounded window)."""
        with self.lock:
            new = total - self.seen
            recent = list(samples)[-new:] if new > 0 else []
            for v in recent:
                x = float(v) * scale
                self.counts[bisect_left(self.buckets, x)] += 1
                self.sum += x
            self.seen = total

    def family_buckets(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts, strict=False):
            acc += c
            out.append((repr(float(b)), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out


class _RuntimeCollector(Collector):
    """Site traffic, tokens per expert and site health, read from a SplitRuntime at scrape time."""

    def __init__(self, runtime: Any, health_timeout: float = 0.25) -> None:
        self.runtime = runtime
        self.health_timeout = health_timeout
        self._rpc = {name: _IncrementalHistogram(LATENCY_BUCKETS) for name in runtime.clients}

    def _site_of(self, layer: int, expert: int) -> str:
        sites = self.runtime.placement.sites_for(layer, expert)
        return self.runtime.local_site if self.runtime.local_site in sites else sites[0]

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        calls = CounterMetricFamily("moevit_coordinator_site_rpcs",
                                    "Expert requests answered (calls or stream messages), per site", labels=["site"])
        fails = CounterMetricFamily("moevit_coordinator_site_rpc_failures", "Expert requests that failed, per site",
                                    labels=["site"])
        sent = CounterMetricFamily("moevit_coordinator_site_sent_bytes", "Serialised request bytes sent, per site",
                                   labels=["site"])
        recv = CounterMetricFamily("moevit_coordinator_site_received_bytes", "Serialised response bytes received, "
                                   "per site", labels=["site"])
        rpc = HistogramMetricFamily("moevit_coordinator_site_rpc_seconds", "Expert request latency, per site",
                                    labels=["site"])
        up = GaugeMetricFamily("moevit_coordinator_site_up", "1 when the site's health service answers SERVING",
                               labels=["site", "address"])
        for name, client in rt.clients.items():
            t = client.traffic
            calls.add_metric([name], t.calls)
            fails.add_metric([name], t.failures)
            sent.add_metric([name], t.bytes_sent)
            recv.add_metric([name], t.bytes_received)
            h = self._rpc[name]
            with t.lock:
                samples, total = list(t.rpc_ms), t.calls
            h.advance(samples, total, scale=1e-3)
            rpc.add_metric([name], h.family_buckets(), h.sum)
            up.add_metric([name, client.address], 1.0 if client.health(timeout=self.health_timeout) == "SERVING"
                          else 0.0)
        tokens = CounterMetricFamily("moevit_coordinator_expert_tokens", "Patch tokens routed to each expert "
                                     "(layer, expert) and the site that computed it",
                                     labels=["layer", "expert", "site"])
        for (layer, expert), n in sorted(list(rt.context.tokens.items())):
            tokens.add_metric([str(layer), str(expert), self._site_of(layer, expert)], n)
        yield from (calls, fails, sent, recv, rpc, up, tokens)


class CoordinatorMetrics:
    """The coordinator's metrics on their own registry (so tests can make several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("moevit_coordinator_requests", "Classify calls (batches) by outcome: ok, degraded "
                                "(a fallback was used), failed", ["outcome"], registry=r)
        self.latency = Histogram("moevit_coordinator_request_seconds", "Latency of one classify call (a batch)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("moevit_coordinator_images", "Images by outcome: ok, degraded, failed (site), "
                              "unreadable, reused (from a previous run's results), corrected (degraded, re-scored "
                              "once their sites were back)", ["outcome"], registry=r)
        self.degraded = Counter("moevit_coordinator_degraded_images", "Images classified with a fallback "
                                "(an expert computed locally or skipped)", registry=r)
        for outcome in ("ok", "degraded", "failed"):
            self.requests.labels(outcome)
        for outcome in ("ok", "degraded", "failed", "unreadable", "reused", "corrected"):
            self.images.labels(outcome)
        self._collector: _RuntimeCollector | None = None

    def instrument(self, runtime: Any) -> None:
        """Wrap ``runtime.classify`` and register the runtime collector (once per runtime)."""
        original = runtime.classify

        def classify(x: Any) -> Any:
            t0 = time.perf_counter()
            try:
                res = original(x)
            except BaseException:
                self.latency.observe(time.perf_counter() - t0)
                self.requests.labels("failed").inc()
                self.images.labels("failed").inc(len(x))
                raise
            self.latency.observe(time.perf_counter() - t0)
            n_degraded = int(res.degraded.sum())
            self.requests.labels("degraded" if n_degraded else "ok").inc()
            self.images.labels("ok").inc(len(x) - n_degraded)
            if n_degraded:
                self.images.labels("degraded").inc(n_degraded)
                self.degraded.inc(n_degraded)
            return res

        runtime.classify = classify
        self._collector = _RuntimeCollector(runtime)
        self.registry.register(self._collector)

    def serve(self, spec: str | int) -> tuple[str, int]:
        return start_metrics_server(self.registry, spec)
