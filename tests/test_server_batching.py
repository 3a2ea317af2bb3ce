"""The Classify server's batcher: requests that arrived together form one batch even when their images finish
decoding one after another, and a lone request is not held back waiting for company."""

from __future__ import annotations

import asyncio
import io
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

import coordinator.server as server_mod
from coordinator.server import start_server
from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc


class _Runtime:
    """What the servicer uses of a SplitRuntime; batching is what is under test, not the model."""

    fingerprint = "stub"
    model = SimpleNamespace(config=SimpleNamespace(labels=("a", "b")))

    def classify(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(len(x), 2), degraded=torch.zeros(len(x), dtype=torch.bool))


def _noise_png(side: int, seed: int) -> bytes:
    """A PNG of noise: it does not compress, so decoding it takes a while (tens of ms at 1000 px)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


async def test_requests_still_decoding_join_the_batch(monkeypatch):
    # the limit on waiting for decodes is not what this test is about: make it long enough for a loaded machine
    monkeypatch.setattr(server_mod, "GATHER_LIMIT_MS", 20_000.0)
    running = await start_server(_Runtime(), "127.0.0.1:0", image_size=32, max_batch=8, max_wait_ms=2.0)
    images = [_noise_png(1000, s) for s in range(8)]
    try:
        async with server_mod.grpc.aio.insecure_channel(running.address, options=server_mod.channel_options()) as ch:
            stub = expert_pb2_grpc.ClassifierServiceStub(ch)
            await stub.Classify(expert_pb2.ClassifyRequest(image=images[0]), timeout=60)  # connection, warm-up
            running.servicer.batch_sizes.clear()
            # eight clients at once: two decode threads finish their images ~4 decodes apart, far over 2 ms
            await asyncio.gather(*(stub.Classify(expert_pb2.ClassifyRequest(image=im, name=str(i)), timeout=60)
                                   for i, im in enumerate(images)))
            assert dict(running.servicer.batch_sizes) == {8: 1}

            # one client at a time: each request runs alone, as soon as it is decoded
            running.servicer.batch_sizes.clear()
            small = _noise_png(64, 0)
            t0 = time.monotonic()
            for _ in range(5):
                await stub.Classify(expert_pb2.ClassifyRequest(image=small), timeout=60)
            assert dict(running.servicer.batch_sizes) == {1: 5}
            assert time.monotonic() - t0 < 5.0  # nobody waited for the 20 s limit
    finally:
        await running.stop(0)
