"""A TCP proxy that stands for one radio link between two sites: it counts the bytes both ways, delays and
rate-limits them like the link would, and can take the link down and bring it back.

    proxy = LinkProxy("127.0.0.1:50051", bandwidth_mbps=20, latency_ms=4)
    address = await proxy.start()        # e.g. "127.0.0.1:41234": point the coordinator's topology here
    ...
    proxy.bytes_up, proxy.bytes_down     # client -> target, target -> client (payload bytes forwarded)
    proxy.set_up(False); proxy.set_up(True)
    await proxy.stop()

:class:`ThreadedLinkProxy` runs one on its own event loop in a background thread, for synchronous code (the
benchmarks, the simulator's emulation mode, fault-tolerance tests).

Model of the link, per direction (up = client to target, down = target to client), shared by every connection
through the proxy as one radio is shared:

* serialisation: a token bucket filled at ``bandwidth_mbps`` (``burst_bytes`` deep, 0 by default, so a chunk of
  n bytes occupies the link for n / rate seconds after the chunks before it); ``None`` = unlimited;
* propagation: every chunk is delivered ``latency_ms`` after its serialisation ends (one-way delay; a round trip
  through the proxy pays it twice). Latency does not limit throughput: chunks are in flight together, as on a
  real link;
* chunks are forwarded in the order they were read, each connection's byte stream unchanged. At most
  ``buffer_chunks`` chunks of up to 64 KiB wait per direction of a connection; beyond that the proxy stops
  reading, so TCP flow control pushes back on the sender as a slow link would.

Schedules (``set_schedule([(from_s, bandwidth_mbps, latency_ms), ...], start=time.monotonic())``): the proxy
changes its own shaping at ``start + from_s`` on its event loop, as :meth:`LinkProxy.set_shaping` would, so a run's
links change mid-run without the driving code having to be there at the moment (``moe-sim --emulate`` with a
``link_schedule``); ``step`` says which step is in effect.

Counters (``bytes_up``, ``bytes_down``) count the TCP payload the proxy has *written* to the other side: what went
over the link, excluding TCP/IP headers, including every protocol byte above TCP (HTTP/2 frames, gRPC headers).

Outages (``set_up(False)``), one of two behaviours chosen by ``outage=``:

* ``"reset"`` (default): every open connection is reset at once (RST to the client, the target's side closed),
  data not yet forwarded is dropped, and a connection made while down is accepted and reset immediately. The
  client sees ``connection reset`` right away, as when the far daemon or its host is gone; gRPC reports
  UNAVAILABLE without waiting for a deadline and reconnects after ``set_up(True)``.
* ``"stall"``: nothing moves while down. Open connections stay open but no byte is forwarded (data already read
  waits in the proxy, then flow control stops the sender); new connections are accepted but not connected to the
  target until the link is back. This is a radio out of range: calls hit their deadlines, and TCP connections
  that survive the outage carry on where they stopped. Chunks read before or during the outage were charged their
  serialisation time when read, so the held backlog is released at once when the link comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import struct
import threading
from dataclasses import dataclass, field

__all__ = ["OUTAGE_MODES", "LinkProxy", "ThreadedLinkProxy", "parse_address"]

OUTAGE_MODES = ("reset", "stall")
CHUNK_BYTES = 64 * 1024


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``; ValueError naming the problem otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected 'host:port', got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    p = int(port)
    if not 0 <= p <= 65535:
        raise ValueError(f"port {p} of {address!r} is outside 0-65535")
    return host, p


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Shaper:
    """One direction of the link: token bucket (rate, burst) then a fixed one-way delay."""

    def __init__(self, bandwidth_mbps: float | None, latency_ms: float, burst_bytes: int) -> None:
        self.configure(bandwidth_mbps, latency_ms, burst_bytes)

    def configure(self, bandwidth_mbps: float | None, latency_ms: float, burst_bytes: int) -> None:
        if bandwidth_mbps is not None and not bandwidth_mbps > 0:
            raise ValueError(f"bandwidth_mbps must be positive or None, got {bandwidth_mbps!r}")
        if not latency_ms >= 0:
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms!r}")
        if burst_bytes < 0:
            raise ValueError(f"burst_bytes must be >= 0, got {burst_bytes!r}")
        self.rate = None if bandwidth_mbps is None else bandwidth_mbps * 1e6 / 8.0  # bytes per second
        self.delay = latency_ms / 1e3
        self.burst = float(burst_bytes)
        self.tokens = self.burst
        self.last: float | None = None

    @property
    def shaped(self) -> bool:
        return self.rate is not None or self.delay > 0

    def delivery_time(self, nbytes: int, now: float) -> float:
        """Loop time at which a chunk of ``nbytes`` read at ``now`` reaches the other end.

        The bucket may go into debt: the chunk then finishes serialising when the debt is paid back, and the
        next chunk queues behind it, so chunks leave in order at exactly ``rate`` on average.
        """
        done = now
        if self.rate is not None:
            if self.last is not None:
                self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= nbytes
            if self.tokens < 0:
                done = now - self.tokens / self.rate
        return done + self.delay


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close a connection abruptly: RST rather than FIN, unsent data dropped."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _cancel_on_failure(pump: asyncio.Task | None, sender: asyncio.Task) -> None:
    """A pump's sender failed (the far side is gone): stop the pump too, which tears the connection down."""
    if pump is not None and not sender.cancelled() and sender.exception() is not None:
        pump.cancel()


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    target: asyncio.StreamWriter | None = None
    task: asyncio.Task | None = None
    pumps: list[asyncio.Task] = field(default_factory=list)

    def reset(self) -> None:
        _reset(self.client)
        _reset(self.target)


class LinkProxy:
    """Forwards TCP connections made to ``listen`` on to ``target``, shaping and counting the traffic.

    ``bandwidth_mbps`` (Mbit/s, None = unlimited) and ``latency_ms`` (one-way) apply to each direction alone;
    ``burst_bytes`` is the token bucket's depth. ``outage`` picks what :meth:`set_up` ``(False)`` does (module
    docstring). Use from one event loop; :class:`ThreadedLinkProxy` wraps it for synchronous callers.
    """

    def __init__(self, target: str, *, listen: str = "127.0.0.1:0", bandwidth_mbps: float | None = None,
                 latency_ms: float = 0.0, burst_bytes: int = 0, outage: str = "reset",
                 buffer_chunks: int = 16) -> None:
        if outage not in OUTAGE_MODES:
            raise ValueError(f"outage must be one of {', '.join(OUTAGE_MODES)}, got {outage!r}")
        if buffer_chunks < 1:
            raise ValueError(f"buffer_chunks must be >= 1, got {buffer_chunks}")
        self.target = target
        self._target_host, self._target_port = parse_address(target)
        self._listen_host, self._listen_port = parse_address(listen)
        self.outage = outage
        self.buffer_chunks = buffer_chunks
        self._up_shaper = _Shaper(bandwidth_mbps, latency_ms, burst_bytes)
        self._down_shaper = _Shaper(bandwidth_mbps, latency_ms, burst_bytes)
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections_accepted = 0
        self.address: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Connection] = set()
        self._link_up: asyncio.Event | None = None
        self._is_up = True
        self._timers: list[asyncio.TimerHandle] = []
        self.step = -1  # the schedule's step in effect (-1: none yet, the shaping set by hand)

    # -- control ---------------------------------------------------------------------------------------------
    async def start(self) -> str:
        """Listen; returns the bound ``host:port`` (the real port when ``listen`` asked for port 0)."""
        if self._server is not None:
            raise RuntimeError("the proxy is already started")
        self._link_up = asyncio.Event()
        if self._is_up:
            self._link_up.set()
        self._server = await asyncio.start_server(self._on_client, self._listen_host, self._listen_port,
                                                  reuse_address=True)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = _format_address(host, port)
        return self.address

    async def stop(self) -> None:
        """Stop listening and reset every open connection."""
        for h in self._timers:
            h.cancel()
        self._timers = []
        if self._server is None:
            return
        self._server.close()
        conns = list(self._conns)
        for conn in conns:
            conn.reset()
        tasks = [t for c in conns for t in (c.task, *c.pumps) if t is not None and t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    @property
    def is_up(self) -> bool:
        return self._is_up

    def set_up(self, flag: bool) -> None:
        """Bring the link up (True) or take it down (False); see the module docstring for what down means."""
        flag = bool(flag)
        if flag == self._is_up:
            return
        self._is_up = flag
        if self._link_up is not None:
            if flag:
                self._link_up.set()
            else:
                self._link_up.clear()
        if not flag and self.outage == "reset":
            for conn in list(self._conns):
                conn.reset()

    def set_shaping(self, *, bandwidth_mbps: float | None = None, latency_ms: float = 0.0,
                    burst_bytes: int = 0) -> None:
        """Change the link's shaping; applies to chunks read from now on (both directions)."""
        self._up_shaper.configure(bandwidth_mbps, latency_ms, burst_bytes)
        self._down_shaper.configure(bandwidth_mbps, latency_ms, burst_bytes)

    def set_schedule(self, steps: list[tuple[float, float | None, float]], *, start: float | None = None) -> None:
        """Change the shaping at ``start + from_s`` (``time.monotonic()`` seconds; None: now) to each step's
        ``(bandwidth_mbps, latency_ms)``; replaces a schedule set before. Call on the proxy's loop, once started."""
        loop = asyncio.get_running_loop()
        prev = None
        for i, (t, mbps, ms) in enumerate(steps):
            if not (t >= 0 and (prev is None or t >= prev)):
                raise ValueError(f"schedule step {i}: from_s must be >= 0 and ascending, got {t!r}")
            if mbps is not None and not mbps > 0:
                raise ValueError(f"schedule step {i}: bandwidth_mbps must be positive or None, got {mbps!r}")
            if not ms >= 0:
                raise ValueError(f"schedule step {i}: latency_ms must be >= 0, got {ms!r}")
            prev = t
        for h in self._timers:
            h.cancel()
        self._timers = []
        t0 = loop.time() if start is None else start  # the default loop clock is time.monotonic()

        def apply(i: int, mbps: float | None, ms: float) -> None:
            self.set_shaping(bandwidth_mbps=mbps, latency_ms=ms)
            self.step = i

        for i, (t, mbps, ms) in enumerate(steps):
            self._timers.append(loop.call_at(t0 + t, apply, i, mbps, ms))

    def reset_counters(self) -> None:
        self.bytes_up = self.bytes_down = 0

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    async def __aenter__(self) -> LinkProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- forwarding ------------------------------------------------------------------------------------------
    async def _on_client(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        conn = _Connection(cwriter, task=asyncio.current_task())
        self._conns.add(conn)
        self.connections_accepted += 1
        try:
            assert self._link_up is not None
            if not self._is_up:
                if self.outage == "reset":
                    return
                await self._link_up.wait()  # stall: hold the connection until the link is back
            try:
                treader, twriter = await asyncio.open_connection(self._target_host, self._target_port)
            except OSError:  # nothing listens at the target: the client sees its connection reset
                return
            conn.target = twriter
            _nodelay(cwriter)
            _nodelay(twriter)
            conn.pumps = [asyncio.create_task(self._pump(creader, twriter, self._up_shaper, "bytes_up")),
                          asyncio.create_task(self._pump(treader, cwriter, self._down_shaper, "bytes_down"))]
            pending = set(conn.pumps)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(t.cancelled() or t.exception() is not None for t in done):
                    break  # one side failed: tear the whole connection down
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(conn)
            for t in conn.pumps:
                t.cancel()
            await asyncio.gather(*conn.pumps, return_exceptions=True)
            clean = all(not t.cancelled() and t.exception() is None for t in conn.pumps) and bool(conn.pumps)
            if clean:
                for w in (conn.client, conn.target):
                    if w is not None:
                        w.close()
            else:
                conn.reset()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shaper: _Shaper,
                    counter: str) -> None:
        """Copy one direction until EOF, then half-close the other side (write EOF)."""
        loop = asyncio.get_running_loop()
        link_up = self._link_up
        assert link_up is not None
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=self.buffer_chunks)
        sender: asyncio.Task | None = None
        pump = asyncio.current_task()
        queued = 0  # chunks handed to the sender and not yet written

        async def send_queued() -> None:
            nonlocal queued
            while True:
                item = await queue.get()
                if item is None:
                    return
                at, data = item
                while (delay := at - loop.time()) > 0:
                    await asyncio.sleep(delay)
                if not self._is_up:
                    if self.outage != "stall":
                        raise ConnectionResetError("the link is down")
                    await link_up.wait()
                writer.write(data)
                setattr(self, counter, getattr(self, counter) + len(data))
                queued -= 1
                await writer.drain()

        try:
            while True:
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    break
                now = loop.time()
                at = shaper.delivery_time(len(data), now) if shaper.shaped else now
                if queued == 0 and at <= now and self._is_up:  # nothing ahead of it and nothing to wait for
                    writer.write(data)
                    setattr(self, counter, getattr(self, counter) + len(data))
                    await writer.drain()
                    continue
                if sender is None:
                    sender = asyncio.create_task(send_queued())
                    sender.add_done_callback(functools.partial(_cancel_on_failure, pump))
                queued += 1
                await queue.put((at, data))
            if sender is not None:
                await queue.put(None)
                await sender
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
        finally:
            if sender is not None and not sender.done():
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)


class ThreadedLinkProxy:
    """A :class:`LinkProxy` on its own event loop in a daemon thread, driven from synchronous code.

    Same arguments as :class:`LinkProxy`; ``start()`` returns the bound address, ``stop()`` ends the proxy and the
    thread. Counters are read without locking (plain ints written by the proxy's thread).
    """

    def __init__(self, target: str, **kwargs: object) -> None:
        self.proxy = LinkProxy(target, **kwargs)  # type: ignore[arg-type]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> str:
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=self._run, args=(loop,), name=f"linkproxy-{self.proxy.target}",
                                        daemon=True)
        self._thread.start()
        try:
            return asyncio.run_coroutine_threadsafe(self.proxy.start(), loop).result(timeout)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.proxy.stop(), loop).result(timeout)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
        self._loop = self._thread = None

    def _call(self, fn, *args: object) -> object:
        """Run ``fn(*args)`` on the proxy's loop and wait for it (so a state change is in effect on return)."""
        if self._loop is None:
            return fn(*args)

        async def call() -> object:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(10.0)

    def set_up(self, flag: bool) -> None:
        self._call(self.proxy.set_up, flag)

    def set_shaping(self, *, bandwidth_mbps: float | None = None, latency_ms: float = 0.0,
                    burst_bytes: int = 0) -> None:
        self._call(lambda: self.proxy.set_shaping(bandwidth_mbps=bandwidth_mbps, latency_ms=latency_ms,
                                                  burst_bytes=burst_bytes))

    def reset_counters(self) -> None:
        self._call(self.proxy.reset_counters)

    def set_schedule(self, steps: list[tuple[float, float | None, float]], *, start: float | None = None) -> None:
        """See :meth:`LinkProxy.set_schedule` (``start``: a ``time.monotonic()`` value, shared by several proxies
        so their links change together)."""
        self._call(lambda: self.proxy.set_schedule(steps, start=start))

    @property
    def step(self) -> int:
        return self.proxy.step

    @property
    def address(self) -> str | None:
        return self.proxy.address

    @property
    def bytes_up(self) -> int:
        return self.proxy.bytes_up

    @property
    def bytes_down(self) -> int:
        return self.proxy.bytes_down

    @property
    def connections_accepted(self) -> int:
        return self.proxy.connections_accepted

    @property
    def is_up(self) -> bool:
        return self.proxy.is_up

    def __enter__(self) -> ThreadedLinkProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
