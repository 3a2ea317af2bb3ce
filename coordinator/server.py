"""``--serve ADDR``: the Classify RPC in front of the split model, batching concurrent requests.

Requests are decoded as they arrive, queued, and run in batches of up to ``max_batch`` (waiting at most
``max_wait_ms`` for a batch to fill) on one thread, since one forward uses every MoE layer's dispatcher.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import time

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.channels import channel_options
from coordinator.runtime import SplitRuntime
from coordinator.sites import SiteError
from moevit.data import UnreadableImageError, load_image
from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc

log = logging.getLogger("moe-coordinator")
SERVICE = "moevit.rpc.v1.ClassifierService"


class ClassifyServicer(expert_pb2_grpc.ClassifierServiceServicer):
    def __init__(self, runtime: SplitRuntime, *, image_size: int, max_batch: int = 8, max_wait_ms: float = 2.0
                 ) -> None:
        self.runtime, self.image_size, self.max_batch, self.max_wait = runtime, image_size, max_batch, max_wait_ms
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        self.labels = list(runtime.model.config.labels)
        self._task: asyncio.Task | None = None
        self.served = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._batcher())

    async def Classify(self, request, context):  # noqa: N802 (gRPC method name)
        t0 = time.perf_counter()
        if not request.image:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ClassifyRequest.image is empty")
        loop = asyncio.get_running_loop()
        try:
            x = await loop.run_in_executor(self.decode_pool, load_image, request.image, self.image_size)
        except UnreadableImageError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"image {request.name!r} is unreadable: {e}")
        fut = loop.create_future()
        await self.queue.put((x, fut))
        try:
            probs, degraded = await fut
        except SiteError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        k = request.top_k or 5
        top = torch.topk(probs, min(k, len(probs)))
        self.served += 1
        return expert_pb2.ClassifyResponse(
            top=[expert_pb2.ClassPrediction(index=int(i), label=self.labels[i] if i < len(self.labels) else "",
                                            probability=float(p)) for p, i in zip(top.values, top.indices.tolist(),
                                                                                  strict=True)],
            degraded=bool(degraded), model_fingerprint=self.runtime.fingerprint,
            latency_ms=(time.perf_counter() - t0) * 1e3, name=request.name)

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.max_wait / 1e3
            while len(items) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0 and self.queue.empty():
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), max(timeout, 0)))
                except TimeoutError:
                    break
            x = torch.stack([i[0] for i in items])
            try:
                res = await loop.run_in_executor(self.pool, self.runtime.classify, x)
            except Exception as e:  # a failed batch fails its requests; the server keeps serving
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(e if isinstance(e, SiteError) else SiteError("coordinator", str(e)))
                continue
            probs = res.logits.softmax(dim=1)
            for j, (_, fut) in enumerate(items):
                if not fut.done():
                    fut.set_result((probs[j], bool(res.degraded[j])))


async def serve(runtime: SplitRuntime, address: str, *, image_size: int, max_batch: int = 8,
                max_wait_ms: float = 2.0, grace: float = 5.0, ready=None) -> None:
    """Serve Classify (and grpc.health.v1) on ``address`` until SIGTERM/SIGINT."""
    server = grpc.aio.server(options=channel_options())
    servicer = ClassifyServicer(runtime, image_size=image_size, max_batch=max_batch, max_wait_ms=max_wait_ms)
    expert_pb2_grpc.add_ClassifierServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    servicer.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    bound = f"{address.rsplit(':', 1)[0]}:{port}"
    log.warning("serving Classify on %s (batches up to %d)", bound, max_batch)
    if ready is not None:
        ready(bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace)
