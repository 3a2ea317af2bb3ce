"""gRPC channel settings shared by the coordinator's clients: message-size caps, fast reconnect, no proxies."""

from __future__ import annotations

from typing import Any

DEFAULT_MAX_MESSAGE_MB = 64.0


def channel_options(max_message_mb: float = DEFAULT_MAX_MESSAGE_MB) -> list[tuple[str, Any]]:
    cap = int(max_message_mb * 1024 * 1024)
    return [
        ("grpc.max_send_message_length", cap),
        ("grpc.max_receive_message_length", cap),
        # a worker that restarts should be found again within a second, not after gRPC's default 1-120 s backoff
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # field sites talk to each other directly: never route through an HTTP proxy from the environment
        ("grpc.enable_http_proxy", 0),
    ]


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")
