"""``--serve ADDR``: the Classify RPC in front of the split model, batching concurrent requests.

Requests are decoded as they arrive, queued, and run in batches of up to ``max_batch`` (waiting at most
``max_wait_ms`` for a batch to fill) on one thread, since one forward uses every MoE layer's dispatcher.

When the topology gives the coordinator site ``tls`` and/or ``token_file``, the server listens with mutual TLS
only (clients need a certificate of the topology's CA) and/or requires ``authorization: Bearer <token>`` on
every call but health checks, as the workers do.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2
from moevit.coordinator.runtime import SplitRuntime
from moevit.coordinator.sites import SiteError

from moevit.data import MAX_IMAGE_PIXELS, UnreadableImageError, load_image
from moevit_rpc.channels import accept_keepalive_options, channel_options
from moevit_rpc.memory import HeapTrimmer
from moevit_rpc.messages import clip
from moevit_rpc.security import TokenAuthInterceptor
from moevit_rpc.serving import BoundedHealthServicer, add_service
from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc

log = logging.getLogger("moe-coordinator")
SERVICE = "moevit.rpc.v1.ClassifierService"
# How long a batch waits for the clients the previous batch answered (see ClassifyServicer._gather): this fraction
# of the previous forward's time, at most RETURN_WAIT_MAX_S.
RETURN_WAIT_FRACTION = 0.1
RETURN_WAIT_MAX_S = 0.05
# Bounds of the Classify server (issue 21): requests admitted at once (queued, decoding or in a batch) and the bytes
# of their images together; more get RESOURCE_EXHAUSTED at once. Measured: 16 concurrent 48 MiB junk requests took
# the server from 549 to 1,805 MB before these bounds (docs/reliability.md has the figure after).
DEFAULT_MAX_QUEUE = 32
DEFAULT_MAX_QUEUED_MB = 128.0
# Images over this many pixels, and progressive JPEGs (decoded once per scan), are decoded on a thread of their own
# (at most HEAVY_DECODES at once, more are refused) within DECODE_DEADLINE_S, so a request of a few hundred pixels
# never waits behind them on the forward thread.
HEAVY_PIXELS = 2_000_000
HEAVY_DECODES = 2
DECODE_DEADLINE_S = 10.0


_E = TypeVar("_E", bound=BaseException)


class _Busy(Exception):
    """A request refused by the server's bounds (RESOURCE_EXHAUSTED)."""


def _detached(e: _E) -> _E:
    """``e`` without its traceback and the exceptions it was raised from, to be kept as a value. Their tracebacks'
    frames link back (``f_back``) to the frame keeping ``e``, whose images they hold: a reference cycle that kept a
    flood's 48 MiB requests until a full garbage collection (hundreds of MB, docs/reliability.md)."""
    e.__cause__ = e.__context__ = None
    return e.with_traceback(None)


def _heavy(image: bytes) -> int:
    """The bytes decoding an image will take (its pixels, three bytes each) when it is costly to decode, else 0;
    judged from its header alone (a few microseconds)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as im:
            w, h = im.size
            progressive = im.format == "JPEG" and bool(im.info.get("progressive") or im.info.get("progression"))
    except Exception:  # noqa: BLE001 - not an image: the decode says why, cheaply
        return 0
    return 3 * w * h if progressive or w * h > HEAVY_PIXELS else 0


class ClassifyServicer(expert_pb2_grpc.ClassifierServiceServicer):
    def __init__(self, runtime: SplitRuntime, *, image_size: int, max_batch: int = 8, max_wait_ms: float = 2.0,
                 max_queue: int = DEFAULT_MAX_QUEUE, max_queued_mb: float = DEFAULT_MAX_QUEUED_MB,
                 on_unreadable: Callable[[], None] | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                 on_done: Callable[[int], None] | None = None) -> None:
        # with each request's size once it is answered, and a heavy decode's once it ends (HeapTrimmer.note)
        self.on_done = on_done
        self.runtime, self.image_size, self.max_batch, self.max_wait = runtime, image_size, max_batch, max_wait_ms
        self.max_pixels = max_pixels  # an image declaring more is refused from its header (--max-megapixels)
        self.max_queue, self.max_queued_bytes = max_queue, int(max_queued_mb * (1 << 20))
        self.on_unreadable = on_unreadable
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.decoder = concurrent.futures.ThreadPoolExecutor(max_workers=HEAVY_DECODES, thread_name_prefix="decode")
        self.admitted = self.queued_bytes = self.heavy = 0
        self.refused_busy = self.dropped_cancelled = 0
        self.labels = list(runtime.model.config.labels)
        self._task: asyncio.Task | None = None
        self.served = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        # the previous batch: its size, when it was answered, how long its forward took; requests since then
        self._last_size, self._answered_at, self._last_forward_s, self._returned = 0, 0.0, 0.0, 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._batcher())

    def close(self) -> None:
        """Stop batching and free the threads (after the server stopped taking calls)."""
        if self._task is not None:
            self._task.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.decoder.shutdown(wait=False, cancel_futures=True)

    async def Classify(self, request, context):  # noqa: N802 (gRPC method name)
        t0 = time.perf_counter()
        image = request.image  # each read of a bytes field copies it: once, not once per use
        size = len(image)
        problem, code = None, grpc.StatusCode.OK
        if not size:
            problem, code = "ClassifyRequest.image is empty", grpc.StatusCode.INVALID_ARGUMENT
        elif self.admitted >= self.max_queue or self.queued_bytes + size > self.max_queued_bytes:
            self.refused_busy += 1
            problem = (f"server busy: {self.admitted} requests ({self.queued_bytes >> 20} MiB) admitted, at most "
                       f"{self.max_queue} ({self.max_queued_bytes >> 20} MiB); try again later")
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
        if problem is None:
            self.admitted += 1
            self.queued_bytes += size
            try:
                outcome = await self._answer(image, context)
                if isinstance(outcome, Exception):
                    # the batcher's failure is a value, not raised here: raising it would put this frame (and the
                    # request) in its traceback and the traceback in the exception, a cycle until a full GC
                    failure, outcome = outcome, None
                    problem, code = self._problem(failure, request.name)
                else:
                    probs, degraded = outcome
            except _Busy as e:
                self.refused_busy += 1
                problem, code = str(e), grpc.StatusCode.RESOURCE_EXHAUSTED
            except TimeoutError:
                problem, code = (f"image {clip(request.name)} not decoded within {DECODE_DEADLINE_S:g} s",
                                 grpc.StatusCode.DEADLINE_EXCEEDED)
            finally:
                self.admitted -= 1
                self.queued_bytes -= size
        del image
        if self.on_done is not None:  # a queued request is freed now, possibly seconds after it arrived
            self.on_done(size)
        if problem is not None:
            # not context.abort(): its traceback would keep the request (and its image) alive until a full GC
            context.set_code(code)
            context.set_details(problem)
            return expert_pb2.ClassifyResponse()
        k = request.top_k or 5
        top = torch.topk(probs, min(k, len(probs)))
        self.served += 1
        return expert_pb2.ClassifyResponse(
            top=[expert_pb2.ClassPrediction(index=int(i), label=self.labels[i] if i < len(self.labels) else "",
                                            probability=float(p)) for p, i in zip(top.values, top.indices.tolist(),
                                                                                  strict=True)],
            degraded=bool(degraded), model_fingerprint=self.runtime.fingerprint,
            latency_ms=(time.perf_counter() - t0) * 1e3, name=request.name)

    def _problem(self, failure: Exception, name: str) -> tuple[str, grpc.StatusCode]:
        """The status of a request the batcher failed (an unreadable image, a site, a non-finite output)."""
        if isinstance(failure, UnreadableImageError):
            if self.on_unreadable is not None:
                self.on_unreadable()
            return f"image {clip(name)} is unreadable: {failure}", grpc.StatusCode.INVALID_ARGUMENT
        if isinstance(failure, FloatingPointError):
            return str(failure), grpc.StatusCode.INTERNAL
        return str(failure), grpc.StatusCode.UNAVAILABLE

    async def _answer(self, image: bytes, context: grpc.aio.ServicerContext
                      ) -> tuple[torch.Tensor, bool] | Exception:
        """Queue one image for the batcher (decoded first on the decode threads when it is heavy) and wait: the
        (probabilities, degraded) of the image, or the batcher's failure as a value."""
        loop = asyncio.get_running_loop()
        item: bytes | torch.Tensor = image
        decode_bytes = _heavy(image)
        if decode_bytes:
            if self.heavy >= HEAVY_DECODES:
                raise _Busy(f"server busy: {self.heavy} large or progressive images are being decoded "
                            f"(at most {HEAVY_DECODES}); try again later")
            gave_up = threading.Event()

            def decode() -> torch.Tensor | None:
                return None if gave_up.is_set() else load_image(image, self.image_size, self.max_pixels)

            def finished(_: object) -> None:  # on the decode thread: a decode given up on still holds its thread
                # a large decode leaves its free heap in the decode thread's arena: trimmed like a large request's
                # (a 117 KB PNG of 36 MP, decoded and given up on 73 times, left the server +238 MB without this)
                if self.on_done is not None:
                    self.on_done(decode_bytes)
                try:
                    loop.call_soon_threadsafe(self._heavy_done)
                except RuntimeError:  # the loop is closed: the server is gone
                    pass

            remaining = context.time_remaining()
            timeout = DECODE_DEADLINE_S if remaining is None else min(DECODE_DEADLINE_S, max(0.0, remaining))
            self.heavy += 1  # until the decode leaves its thread, not until the caller stops waiting
            job = self.decoder.submit(decode)
            job.add_done_callback(finished)
            try:
                item = await asyncio.wait_for(asyncio.wrap_future(job), timeout)
            except (TimeoutError, asyncio.CancelledError):
                gave_up.set()  # not started yet: never decoded; started: finishes on its thread, result dropped
                raise
            except UnreadableImageError as e:  # as a value, without the tracebacks that hold this frame's image
                return _detached(e)
        fut = loop.create_future()
        self._returned += 1
        self.queue.put_nowait((item, fut))
        try:
            return await fut
        except asyncio.CancelledError:  # the caller gave up: the batcher drops the request before decoding it
            fut.cancel()
            raise

    def _heavy_done(self) -> None:
        self.heavy -= 1

    async def _gather(self) -> list[tuple[bytes, asyncio.Future]]:
        """The next batch: the first request waiting, then those arriving within ``max_wait_ms`` of it, up to
        ``max_batch``. While the clients the previous batch answered have not all come back, it waits for them a
        little longer (a tenth of the previous forward's time, at most ``RETURN_WAIT_MAX_S``): closed-loop clients
        send their next request right after their answer, and cutting the batch before they do splits them into
        two half batches that alternate for good, each paying every MoE layer's expert calls. A lone client is
        never held: it is the one client the previous batch answered."""
        loop = asyncio.get_running_loop()
        items = [await self.queue.get()]
        first = loop.time()
        while len(items) < self.max_batch:
            if not self.queue.empty():
                items.append(self.queue.get_nowait())
                continue
            deadline = first + self.max_wait / 1e3
            if self._returned < self._last_size:
                wait = min(RETURN_WAIT_MAX_S, RETURN_WAIT_FRACTION * self._last_forward_s)
                deadline = max(deadline, self._answered_at + wait)
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        self.batch_sizes[len(items)] += 1
        return items

    def _run_batch(self, images: list[bytes | torch.Tensor]) -> list[tuple[torch.Tensor, bool] | Exception]:
        """On the forward thread: decode the batch's images, then one forward over those that decoded. Decoding
        here rather than on threads of its own keeps it from interleaving with the forward on a shared core: with
        8 clients (MoE [8], one core) the forward thread spent 69 ms of CPU per image with two decode threads
        beside it and 55 ms with the decodes on it, and the server answered 16.2 instead of 13.6 images/s."""
        outcomes: list[tuple[torch.Tensor, bool] | Exception | None] = [None] * len(images)
        decoded = []
        for i, data in enumerate(images):
            if isinstance(data, torch.Tensor):  # decoded already (a heavy image, on the decode threads)
                decoded.append((i, data))
                continue
            try:
                decoded.append((i, load_image(data, self.image_size, self.max_pixels)))
            except UnreadableImageError as e:
                # without its traceback and cause: they hold this frame, whose ``outcomes`` holds the error, a cycle
                # that kept the batch's images (up to the 64 MiB message cap each) until a full garbage collection
                outcomes[i] = _detached(e)
        if decoded:
            res = self.runtime.classify(torch.stack([x for _, x in decoded]))
            probs = self.runtime.calibration.probs(res.logits)  # moe-calibrate's temperature
            finite = torch.isfinite(probs).all(dim=1)
            for j, (i, _) in enumerate(decoded):
                outcomes[i] = ((probs[j], bool(res.degraded[j])) if finite[j] else
                               FloatingPointError("the model's output is not finite (NaN or infinity)"))
        return outcomes  # type: ignore[return-value]

    async def _batcher(self) -> None:
        while True:
            # one batch per call: the batch's images are freed when it returns. Held in this loop's locals they
            # stayed until the next request arrived (47-96 MB after a flood of 48 MiB junk requests, trims or not)
            await self._serve(await self._gather())

    async def _serve(self, items: list[tuple[bytes | torch.Tensor, asyncio.Future]]) -> None:
        """Run one batch and answer its requests (failures too, as values)."""
        loop = asyncio.get_running_loop()
        live = [item for item in items if not item[1].done()]  # callers that gave up: not decoded, not run
        self.dropped_cancelled += len(items) - len(live)
        if not live:
            return
        items = live
        t0 = loop.time()
        try:
            outcomes = await loop.run_in_executor(self.pool, self._run_batch, [data for data, _ in items])
        except Exception as e:  # a failed batch fails its requests; the server keeps serving
            failure = _detached(e) if isinstance(e, SiteError) else SiteError("coordinator", str(e))
            outcomes = [failure] * len(items)  # no traceback: it would hold this frame and the batch's images
        self._answered_at = loop.time()
        self._last_forward_s = self._answered_at - t0
        self._last_size, self._returned = len(items), 0
        for (_, fut), outcome in zip(items, outcomes, strict=True):
            if not fut.done():
                # failures too as results: a future raising them would tie each to its waiter's frames
                fut.set_result(outcome)


@dataclass
class ClassifyServer:
    """A started Classify server: ``address`` is the bound ``host:port``; :meth:`stop` drains and frees it."""

    server: grpc.aio.Server
    servicer: ClassifyServicer
    health: BoundedHealthServicer
    address: str
    trimmer: HeapTrimmer

    async def stop(self, grace: float | None = 5.0) -> None:
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        self.servicer.close()
        self.trimmer.stop()


async def start_server(runtime: SplitRuntime, address: str, *, image_size: int, max_batch: int = 8,
                       max_wait_ms: float = 2.0, credentials: grpc.ServerCredentials | None = None,
                       token: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
                       max_queued_mb: float = DEFAULT_MAX_QUEUED_MB,
                       on_unreadable: Callable[[], None] | None = None,
                       max_pixels: int = MAX_IMAGE_PIXELS) -> ClassifyServer:
    """Bind ``address`` and serve Classify and grpc.health.v1 on it. ``credentials``
    (:func:`moevit_rpc.security.server_credentials`): mutual TLS only; ``token``: required bearer token;
    ``max_pixels``: images declaring more are refused (INVALID_ARGUMENT) before they are decoded."""
    interceptors = [TokenAuthInterceptor(token)] if token else []
    # gRPC's own cap refuses calls beyond it before their messages are read: the admitted requests, the health
    # watches' budget (BoundedHealthServicer, 64) and room for calls about to be refused by the servicer
    # callers (offload-image, adaptive probes) keep their channels with keepalive pings: accept them, as workers do
    server = grpc.aio.server(options=[*channel_options(), *accept_keepalive_options()], interceptors=interceptors,
                             maximum_concurrent_rpcs=2 * max_queue + 96)
    # large requests, refused or not, leave free heap in glibc's arenas that it keeps: trimmed after them
    trimmer = HeapTrimmer()
    servicer = ClassifyServicer(runtime, image_size=image_size, max_batch=max_batch, max_wait_ms=max_wait_ms,
                                max_queue=max_queue, max_queued_mb=max_queued_mb, on_unreadable=on_unreadable,
                                max_pixels=max_pixels, on_done=trimmer.note)
    add_service(server, servicer, expert_pb2.DESCRIPTOR.services_by_name["ClassifierService"], on_bytes=trimmer.note)
    health_servicer = BoundedHealthServicer(token=token)
    add_service(server, health_servicer, health_pb2.DESCRIPTOR.services_by_name["Health"])
    try:
        # TLS configured -> only a TLS port, so plaintext clients cannot go around it
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError:  # grpc's message only points at an environment variable
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    servicer.start()
    trimmer.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    bound = f"{address.rsplit(':', 1)[0]}:{port}"
    log.warning("serving Classify on %s (batches up to %d) tls=%s token=%s", bound, max_batch,
                "on" if credentials is not None else "off", "on" if token else "off")
    if token and credentials is None:
        log.warning("a bearer token without TLS travels in clear text: anyone on the link can read and reuse it")
    return ClassifyServer(server, servicer, health_servicer, bound, trimmer)


async def serve(runtime: SplitRuntime, address: str, *, image_size: int, max_batch: int = 8,
                max_wait_ms: float = 2.0, grace: float = 5.0, ready=None,
                credentials: grpc.ServerCredentials | None = None, token: str | None = None,
                on_unreadable: Callable[[], None] | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Serve Classify (and grpc.health.v1) on ``address`` until SIGTERM/SIGINT (see :func:`start_server`)."""
    running = await start_server(runtime, address, image_size=image_size, max_batch=max_batch,
                                 max_wait_ms=max_wait_ms, credentials=credentials, token=token,
                                 on_unreadable=on_unreadable, max_pixels=max_pixels)
    if ready is not None:
        ready(running.address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop(grace)
