"""The link proxy: exact byte counts both ways, one-way latency, bandwidth shaping, outages and recovery."""

from __future__ import annotations

import asyncio
import socket
import socketserver
import struct
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from moevit.sim.linkproxy import LinkProxy, ThreadedLinkProxy, parse_address

from tests.netutil import free_port

HEADER = struct.Struct("<II")  # (bytes to answer, bytes of payload that follow)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(min(1 << 20, n - len(buf)))
        if not got:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += got
    return bytes(buf)


class _Handler(socketserver.BaseRequestHandler):
    """Repeats until EOF: read (answer, payload) header, read the payload, send ``answer`` bytes."""

    def handle(self) -> None:
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                try:
                    answer, payload = HEADER.unpack(_recv_exact(sock, HEADER.size))
                except ConnectionError:
                    return
                _recv_exact(sock, payload)
                sock.sendall(b"y" * answer)
        except OSError:
            return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def target():
    server = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _connect(address: str, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(parse_address(address), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _exchange(sock: socket.socket, answer: int, payload: int) -> float:
    """Send a request of ``payload`` bytes asking for ``answer`` bytes; seconds until the last byte came."""
    t0 = time.perf_counter()
    sock.sendall(HEADER.pack(answer, payload) + b"x" * payload)
    _recv_exact(sock, answer)
    return time.perf_counter() - t0


def _wait_for(cond, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_bytes_are_counted_exactly_both_ways(target):
    with ThreadedLinkProxy(target) as proxy:
        with _connect(proxy.address) as sock:
            _exchange(sock, answer=250_000, payload=100_000)
            _exchange(sock, answer=3, payload=70_000)
        up = 2 * HEADER.size + 170_000
        _wait_for(lambda: proxy.bytes_up == up and proxy.bytes_down == 250_003)
        assert (proxy.bytes_up, proxy.bytes_down) == (up, 250_003)
        _wait_for(lambda: proxy.proxy.open_connections == 0)  # a clean close is passed on to the target
        proxy.reset_counters()
        assert proxy.bytes_up == proxy.bytes_down == 0


def test_the_asyncio_proxy_counts_and_shapes_on_its_own_loop(target):
    async def main() -> tuple[int, int, float]:
        async with LinkProxy(target, latency_ms=20) as proxy:
            reader, writer = await asyncio.open_connection(*parse_address(proxy.address))
            t0 = time.perf_counter()
            writer.write(HEADER.pack(1000, 10) + b"x" * 10)
            await reader.readexactly(1000)
            rtt = time.perf_counter() - t0
            writer.close()
            await writer.wait_closed()
            return proxy.bytes_up, proxy.bytes_down, rtt

    up, down, rtt = asyncio.run(main())
    assert (up, down) == (HEADER.size + 10, 1000)
    assert rtt >= 0.040


def test_latency_adds_at_least_the_configured_one_way_delay(target):
    with ThreadedLinkProxy(target) as fast, ThreadedLinkProxy(target, latency_ms=30) as slow:
        with _connect(fast.address) as a, _connect(slow.address) as b:
            _exchange(a, 1, 1)
            _exchange(b, 1, 1)  # connections warm
            base = min(_exchange(a, 1, 1) for _ in range(5))
            rtts = [_exchange(b, 1, 1) for _ in range(5)]
    assert min(rtts) >= 0.060  # a round trip crosses the link twice
    assert min(rtts) < 0.060 + base + 0.030


@pytest.mark.parametrize("direction", ["down", "up"])
def test_bandwidth_shaping_sets_the_transfer_time(target, direction):
    mbps, size = 40.0, 1_000_000
    expected = size * 8 / (mbps * 1e6)  # 0.2 s
    with ThreadedLinkProxy(target, bandwidth_mbps=mbps) as proxy:
        with _connect(proxy.address) as sock:
            _exchange(sock, 1, 1)  # connection set up outside the timing
            time.sleep(expected)  # let the token bucket's debt from the warm-up go
            if direction == "down":
                took = _exchange(sock, size, 0)
            else:
                took = _exchange(sock, 1, size)
    assert abs(took - expected) <= 0.2 * expected, f"{size} B at {mbps} Mbit/s took {took:.3f} s"


def test_outage_resets_connections_and_the_link_recovers(target):
    with ThreadedLinkProxy(target) as proxy:
        sock = _connect(proxy.address)
        _exchange(sock, 10, 10)
        proxy.set_up(False)
        assert not proxy.is_up
        with pytest.raises(OSError):  # the open connection was reset
            for _ in range(3):
                _exchange(sock, 10, 10)
        sock.close()
        with pytest.raises(OSError):  # a new one is accepted and reset at once
            with _connect(proxy.address) as s2:
                _exchange(s2, 10, 10)
        proxy.set_up(True)
        with _connect(proxy.address) as s3:
            _exchange(s3, 10, 10)


def test_stall_outage_holds_traffic_until_the_link_is_back(target):
    with ThreadedLinkProxy(target, outage="stall") as proxy:
        with _connect(proxy.address) as sock:
            _exchange(sock, 10, 10)
            proxy.set_up(False)
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                _exchange(sock, 10, 10)  # nothing comes back while down
            new = _connect(proxy.address)  # accepted, held
            new.settimeout(0.2)
            with pytest.raises(TimeoutError):
                _exchange(new, 5, 5)
            proxy.set_up(True)
            sock.settimeout(2.0)
            new.settimeout(2.0)
            assert _recv_exact(sock, 10) == b"y" * 10  # the stalled request completes on the same connection
            assert _recv_exact(new, 5) == b"y" * 5
            new.close()


def test_a_dead_target_resets_the_client():
    with ThreadedLinkProxy(f"127.0.0.1:{free_port()}") as proxy:
        with pytest.raises(OSError), _connect(proxy.address) as sock:
            _exchange(sock, 1, 1)


def test_grpc_through_the_proxy_fails_fast_when_down_and_reconnects():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with ThreadedLinkProxy(f"127.0.0.1:{port}") as proxy:
            options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                       ("grpc.max_reconnect_backoff_ms", 200), ("grpc.enable_http_proxy", 0)]
            with grpc.insecure_channel(proxy.address, options=options) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                assert stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1
                assert proxy.bytes_up > 0 and proxy.bytes_down > 0
                proxy.set_up(False)
                t0 = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - t0 < 1.0
                proxy.set_up(True)
                deadline = time.monotonic() + 3
                while True:
                    try:
                        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1
                        break
                    except grpc.RpcError:
                        assert time.monotonic() < deadline, "not reconnected after the outage"
                        time.sleep(0.05)
    finally:
        server.stop(None)
