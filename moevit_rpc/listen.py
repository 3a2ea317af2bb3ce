"""Listen addresses of the servers (``moe-worker --listen``, ``moe-coordinator --serve``): parsed and checked
before anything is loaded, so a typo or a busy port is one line at once, not a gRPC log line after the model loads.

grpc would take ``127.0.0.1:70000`` as port 4464 (70000 mod 65536) and ``localhost`` without a port as :443.
"""

from __future__ import annotations

import errno
import socket

__all__ = ["check_free", "parse_address"]


def parse_address(spec: str, flag: str) -> tuple[str, int]:
    """``'HOST:PORT'`` or ``'[V6]:PORT'`` -> (host, port); ValueError naming ``flag`` when it is not one."""
    text = str(spec).strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"{flag} {spec!r}: no port; give HOST:PORT, e.g. 127.0.0.1:50051 (port 0 picks a free one)")
    if not host:
        raise ValueError(f"{flag} {spec!r}: no host; give HOST:PORT, e.g. 0.0.0.0:{port} for every interface")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port.isdigit():
        raise ValueError(f"{flag} {spec!r}: port {port!r} is not a number; give HOST:PORT, e.g. 127.0.0.1:50051")
    number = int(port)
    if number > 65535:
        raise ValueError(f"{flag} {spec!r}: port {number} is out of range 0-65535")
    return host, number


def check_free(spec: str, flag: str) -> tuple[str, int]:
    """Parse ``spec`` and check that it can be bound now (port 0 always can); ValueError naming what is wrong."""
    host, port = parse_address(spec, flag)
    if port == 0:
        return host, port
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"{flag} {spec!r}: unknown host {host!r} ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        # SO_REUSEADDR as grpc sets it: a port in TIME_WAIT is free, one with a listener is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            why = {errno.EADDRINUSE: f"port {port} is in use by another process",
                   errno.EADDRNOTAVAIL: f"{host} is not an address of this machine",
                   errno.EACCES: f"port {port} needs privileges"}.get(e.errno, e.strerror or str(e))
            raise ValueError(f"{flag} {spec}: cannot listen there: {why}") from None
    return host, port
