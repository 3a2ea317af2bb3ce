"""The Prometheus endpoint shared by the coordinator and the workers (``--metrics-port [HOST:]PORT``): the address
syntax, the one set of latency buckets, and the HTTP server. What each side exports lives with it
(``coordinator/metrics.py``, ``worker/metrics.py``); names are listed in ``docs/outputs.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["DEFAULT_HOST", "LATENCY_BUCKETS", "parse_listen", "start_metrics_server"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DEFAULT_HOST = "127.0.0.1"


def parse_listen(spec: str | int, default_host: str = DEFAULT_HOST) -> tuple[str, int]:
    """``'9100'`` -> ``('127.0.0.1', 9100)``; ``'0.0.0.0:9100'``, ``'[::1]:9100'`` -> that host and port."""
    s = str(spec).strip()
    host, sep, port = s.rpartition(":")
    if not sep:
        host, port = default_host, s
    host = host.strip("[]") or default_host
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"--metrics-port {spec!r}: expected PORT or HOST:PORT (e.g. 9100 or 0.0.0.0:9100)") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"--metrics-port {spec!r}: port {number} out of range 0-65535")
    return host, number


def start_metrics_server(registry: CollectorRegistry, spec: str | int) -> tuple[str, int]:
    """Serve ``registry`` at ``http://HOST:PORT/metrics`` in a daemon thread; returns the bound (host, port).

    Raises OSError naming the address when it cannot be bound."""
    from prometheus_client import start_http_server

    host, port = parse_listen(spec)
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise OSError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from None
    return host, int(server.server_port)
