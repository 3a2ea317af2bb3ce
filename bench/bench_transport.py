"""gRPC transport cost alone: one unary call per request vs one message on a long-lived stream (vs plain TCP).

Three echo servers (grpc.aio, the worker's server stack, no model) on ``--server-cpus`` stand for the three workers
(and three plain asyncio TCP echo servers, length-prefixed messages, for the floor without gRPC);
``--variants`` adds two other ways to run the same streams: ``sync_server`` (three servers on grpcio's
thread-pool server instead of grpc.aio) and ``aio_client`` (the client's three streams driven by one grpc.aio event
loop on a thread of its own instead of grpcio's blocking stubs, which serialise each request on a thread per stream);
this process, on ``--client-cpus``, sends one "layer" at a time: the same message to all three at once, then waits
for the three answers, as the coordinator does at each MoE layer. Measured per layer, in rounds that alternate the
transports: wall time, the servers' CPU (from /proc) and this process's CPU. ``--gap-ms`` sleeps between layers
as the trunk would (servers then wake cold).

Run: ``.venv/bin/python bench/bench_transport.py [--layers 1500] [--bytes 11000] [--gap-ms 0]``
(about 45 s; writes ``bench/results/transport.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import queue
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import load_average, write_result  # noqa: E402

SERVICE = "bench.Echo"


async def _serve(port: int) -> None:
    import grpc

    async def unary(request: bytes, context) -> bytes:
        return request

    async def stream(requests, context):
        async for request in requests:
            yield request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
    }),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def _serve_sync(port: int) -> None:
    """The same echo on grpcio's thread-pool server."""
    import grpc

    def stream(requests, context):
        yield from requests

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Stream": grpc.stream_stream_rpc_method_handler(stream)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


async def _serve_raw(port: int) -> None:
    """The floor: an asyncio TCP echo of length-prefixed messages, no gRPC, no HTTP/2."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(4)
                writer.write(header + await reader.readexactly(struct.unpack("<I", header)[0]))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", port)
    print("ready", flush=True)
    await server.serve_forever()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ratios(num: dict[str, float], den: dict[str, float]) -> dict[str, float | None]:
    """Per-figure ratios; None where the denominator is 0 (CPU times below the clock tick in a short run)."""
    return {k: round(num[k] / den[k], 3) if den[k] else None for k in den}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1500, help="layers timed per transport and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bytes", type=int, default=11000, help="message size (one site's tokens of one layer)")
    ap.add_argument("--gap-ms", type=float, default=0.0, help="sleep between layers (the trunk's time)")
    ap.add_argument("--client-cpus", default="0")
    ap.add_argument("--server-cpus", default="1")
    ap.add_argument("--out", default="bench/results/transport.json")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--variants", action="store_true", help="also time sync_server and aio_client streams")
    ap.add_argument("--serve-raw", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serve-sync", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return 0
    if args.serve_raw:
        asyncio.run(_serve_raw(args.serve_raw))
        return 0
    if args.serve_sync:
        _serve_sync(args.serve_sync)
        return 0

    import grpc
    from moevit.coordinator.local import free_port

    server_cpus = {int(c) for c in args.server_cpus.split(",")}
    os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    ports, raw_ports = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    sync_ports = [free_port() for _ in range(3)] if args.variants else []
    procs, raw_procs, sync_procs = [], [], []
    starts = [("--serve", p, procs) for p in ports] + [("--serve-raw", p, raw_procs) for p in raw_ports]
    starts += [("--serve-sync", p, sync_procs) for p in sync_ports]
    for flag, port, group in starts:
        p = subprocess.Popen([sys.executable, __file__, flag, str(port)], stdout=subprocess.PIPE)
        p.stdout.readline()
        os.sched_setaffinity(p.pid, server_cpus)
        group.append(p)
    payload = os.urandom(args.bytes)
    channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in ports]
    pool = concurrent.futures.ThreadPoolExecutor(4)
    unary = [ch.unary_unary(f"/{SERVICE}/Unary") for ch in channels]
    requests = [queue.SimpleQueue() for _ in channels]
    streams = [ch.stream_stream(f"/{SERVICE}/Stream")(iter(q.get, None))
               for ch, q in zip(channels, requests, strict=True)]

    def layer_unary() -> None:
        for f in [pool.submit(call, payload, timeout=10) for call in unary]:
            f.result()

    def layer_stream() -> None:
        for q in requests:
            q.put(payload)
        for s in streams:
            next(s)

    sockets = [socket.create_connection(("127.0.0.1", p)) for p in raw_ports]
    for sock in sockets:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    framed = struct.pack("<I", len(payload)) + payload

    def layer_raw() -> None:
        for sock in sockets:
            sock.sendall(framed)
        for sock in sockets:
            n = struct.unpack("<I", sock.recv(4, socket.MSG_WAITALL))[0]
            if len(sock.recv(n, socket.MSG_WAITALL)) != n:
                raise ConnectionError("raw echo server closed the connection")

    layers = {"unary": layer_unary, "stream": layer_stream, "raw_tcp": layer_raw}
    servers = {"unary": procs, "stream": procs, "raw_tcp": raw_procs}
    loop = None
    if args.variants:
        # the same blocking-stub streams to the thread-pool servers
        sync_requests = [queue.SimpleQueue() for _ in sync_ports]
        sync_channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in sync_ports]
        channels += sync_channels
        sync_streams = [ch.stream_stream(f"/{SERVICE}/Stream")(iter(q.get, None))
                        for ch, q in zip(sync_channels, sync_requests, strict=True)]
        requests += sync_requests

        def layer_sync_server() -> None:
            for q in sync_requests:
                q.put(payload)
            for s in sync_streams:
                next(s)

        # streams to the grpc.aio servers driven by one event loop on its own thread
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()

        async def open_aio() -> tuple[list, list]:
            chans = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in ports]
            return chans, [ch.stream_stream(f"/{SERVICE}/Stream")() for ch in chans]

        aio_channels, aio_calls = asyncio.run_coroutine_threadsafe(open_aio(), loop).result()

        async def close_aio() -> None:
            for ch in aio_channels:
                await ch.close()

        async def aio_layer() -> None:
            for c in aio_calls:
                await c.write(payload)
            await asyncio.gather(*(c.read() for c in aio_calls))

        def layer_aio_client() -> None:
            asyncio.run_coroutine_threadsafe(aio_layer(), loop).result()

        layers.update(sync_server=layer_sync_server, aio_client=layer_aio_client)
        servers.update(sync_server=sync_procs, aio_client=procs)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in layers}
    try:
        for fn in layers.values():  # warm-up: connections, first calls
            for _ in range(200):
                fn()
        for _ in range(args.rounds):
            for name, fn in layers.items():
                s0, c0 = sum(_cpu_s(p.pid) for p in servers[name]), time.process_time()
                busy = 0.0
                for _ in range(args.layers):
                    if args.gap_ms:
                        time.sleep(args.gap_ms / 1e3)
                    t1 = time.perf_counter()
                    fn()
                    busy += time.perf_counter() - t1
                n = args.layers
                samples[name].append({
                    "layer_ms": busy / n * 1e3,
                    "servers_cpu_ms": (sum(_cpu_s(p.pid) for p in servers[name]) - s0) / n * 1e3,
                    "client_cpu_ms": (time.process_time() - c0) / n * 1e3,
                })
    finally:
        for q in requests:
            q.put(None)
        for sock in sockets:
            sock.close()
        for p in procs + raw_procs + sync_procs:
            p.kill()
        for ch in channels:
            ch.close()
        if loop is not None:
            asyncio.run_coroutine_threadsafe(close_aio(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
    summary = {name: {k: round(statistics.median(s[k] for s in runs), 3) for k in runs[0]}
               for name, runs in samples.items()}
    result = {
        "benchmark": "transport",
        "description": "one layer = the same message to 3 echo servers at once: grpc.aio unary calls vs streams, "
                       "and a plain asyncio TCP echo (no gRPC) as the floor; with --variants also streams to "
                       "grpcio thread-pool servers (sync_server) and from one grpc.aio client loop (aio_client)",
        "settings": {k: getattr(args, k) for k in ("layers", "rounds", "bytes", "gap_ms", "client_cpus",
                                                   "server_cpus", "variants")},
        "loadavg_after": load_average(),
        "samples": samples,
        "median": summary,
        "stream_vs_unary": _ratios(summary["stream"], summary["unary"]),
        "stream_vs_raw_tcp": _ratios(summary["stream"], summary["raw_tcp"]),
    }
    path = write_result(args.out, result)
    for name, m in summary.items():
        print(f"{name:11s} layer {m['layer_ms']:.3f} ms, servers' CPU {m['servers_cpu_ms']:.3f} ms, "
              f"client CPU {m['client_cpu_ms']:.3f} ms")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
