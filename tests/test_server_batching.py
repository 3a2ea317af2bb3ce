"""The Classify server's batcher: requests that arrive within ``max_wait_ms`` of each other form one batch, an
unreadable image in a batch fails alone, closed-loop clients coming back at different moments share full batches,
and a lone client is never held back."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import moevit.coordinator.server as server_mod
import numpy as np
import pytest
import torch
from moevit.coordinator.server import start_server
from PIL import Image

from moevit.calibration import default_for as default_calibration
from moevit_rpc.channels import channel_options
from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc


class _Runtime:
    """What the servicer uses of a SplitRuntime; batching is what is under test, not the model. Class 1 wins
    for every image; a forward takes ``seconds``."""

    fingerprint = "stub"
    model = SimpleNamespace(config=SimpleNamespace(labels=("a", "b")))
    calibration = default_calibration(("a", "b"))  # no temperature: softmax of the logits

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds

    def classify(self, x: torch.Tensor) -> SimpleNamespace:
        assert x.shape[1:] == (3, 32, 32)
        time.sleep(self.seconds)
        return SimpleNamespace(logits=torch.tensor([[0.0, 3.0]]).expand(len(x), 2),
                               degraded=torch.zeros(len(x), dtype=torch.bool))


def _png(side: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


async def _server(max_wait_ms: float, forward_s: float = 0.0, **kw):
    running = await start_server(_Runtime(forward_s), "127.0.0.1:0", image_size=32, max_batch=8,
                                 max_wait_ms=max_wait_ms, **kw)
    channel = grpc.aio.insecure_channel(running.address, options=channel_options())
    return running, channel, expert_pb2_grpc.ClassifierServiceStub(channel)


async def test_requests_arriving_together_form_one_batch_and_a_bad_image_fails_alone():
    running, channel, stub = await _server(max_wait_ms=1000.0)  # a window no loaded machine can miss
    try:
        await stub.Classify(expert_pb2.ClassifyRequest(image=_png(40, 0)), timeout=30)  # connection, warm-up
        running.servicer.batch_sizes.clear()
        images = [_png(40 + i, i) for i in range(7)] + [b"\x89PNG\r\n\x1a\n but not really"]
        calls = [stub.Classify(expert_pb2.ClassifyRequest(image=im, name=f"im{i}"), timeout=30)
                 for i, im in enumerate(images)]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        assert dict(running.servicer.batch_sizes) == {8: 1}
        for answer in answers[:7]:
            assert answer.top[0].label == "b" and not answer.degraded
        bad = answers[7]
        assert isinstance(bad, grpc.aio.AioRpcError) and bad.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "image 'im7' is unreadable" in bad.details()
        # the server keeps serving
        assert (await stub.Classify(expert_pb2.ClassifyRequest(image=images[0]), timeout=30)).top[0].label == "b"
    finally:
        await channel.close()
        await running.stop(0)


@pytest.fixture
def long_return_wait(monkeypatch):
    """The wait for returning clients: 10 forwards' time, up to 5 s (generous where the default is a tenth)."""
    monkeypatch.setattr(server_mod, "RETURN_WAIT_FRACTION", 10.0)
    monkeypatch.setattr(server_mod, "RETURN_WAIT_MAX_S", 5.0)


async def test_closed_loop_clients_coming_back_at_different_moments_share_full_batches(long_return_wait):
    running, channel, stub = await _server(max_wait_ms=2.0, forward_s=0.1)
    image = _png(32, 0)

    async def client(i: int) -> None:
        for _ in range(4):
            await stub.Classify(expert_pb2.ClassifyRequest(image=image), timeout=60)
            await asyncio.sleep(0.01 * i)  # back 0-70 ms after the answer: far over max_wait_ms

    try:
        await stub.Classify(expert_pb2.ClassifyRequest(image=image), timeout=30)
        running.servicer.batch_sizes.clear()
        await asyncio.gather(*(client(i) for i in range(8)))
        sizes = running.servicer.batch_sizes
        # the first round may split while clients connect; after it every batch waits for all eight
        assert sizes[8] >= 3, dict(sizes)
    finally:
        await channel.close()
        await running.stop(0)


async def test_a_lone_client_is_never_held_back(long_return_wait):
    """One client: the previous batch's one client is back as soon as its next request arrives, so no request
    waits for company (here the wait for returning clients would be a whole second)."""
    running, channel, stub = await _server(max_wait_ms=2.0, forward_s=0.1)
    try:
        image = _png(32, 0)
        await stub.Classify(expert_pb2.ClassifyRequest(image=image), timeout=30)
        running.servicer.batch_sizes.clear()
        t0 = time.monotonic()
        for _ in range(4):
            await stub.Classify(expert_pb2.ClassifyRequest(image=image), timeout=30)
        assert dict(running.servicer.batch_sizes) == {1: 4}
        assert time.monotonic() - t0 < 2.5  # 4 forwards of 0.1 s; held, it would be over 4 s
    finally:
        await channel.close()
        await running.stop(0)


async def test_images_over_max_pixels_are_refused_from_their_header_and_the_server_serves_on():
    """``--serve`` honours ``--max-megapixels`` as batch runs do (the 50 MP default was fixed before)."""
    running, channel, stub = await _server(max_wait_ms=2.0, max_pixels=2_000)
    try:
        assert (await stub.Classify(expert_pb2.ClassifyRequest(image=_png(44, 0)), timeout=30)).top[0].label == "b"
        for side in (45, 2000):  # 2,025 pixels; 4 MP, which goes to the decode threads (HEAVY_PIXELS)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Classify(expert_pb2.ClassifyRequest(image=_png(side, 1), name="big"), timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (f"image 'big' is unreadable: the image declares {side}x{side} pixels, more than the 2,000-pixel "
                    "limit (moe-coordinator --max-megapixels)") in refused.value.details()
        assert (await stub.Classify(expert_pb2.ClassifyRequest(image=_png(44, 2)), timeout=30)).top[0].label == "b"
    finally:
        await channel.close()
        await running.stop(0)


@pytest.mark.parametrize(("flag", "value", "words"), [("--max-wait-ms", "-1", "--max-wait-ms must be >= 0"),
                                                      ("--max-batch", "0", "--max-batch must be >= 1"),
                                                      ("--max-megapixels", "0", "--max-megapixels must be in (0, 100]"),
                                                      ("--max-megapixels", "101", "must be in (0, 100], got 101")])
def test_bad_batching_flags_are_one_line_errors(capsys, flag, value, words):
    from moevit.coordinator import cli

    sites = Path(__file__).resolve().parents[1] / "examples" / "sites.yaml"
    assert cli.main(["--topology", str(sites), "--serve", "127.0.0.1:0", flag, value]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


async def test_requests_beyond_the_queue_get_resource_exhausted_and_the_server_serves_on():
    """Issue 21 item 6, deterministically: with a slow forward the admitted requests wait for it, so of 48 sent at
    once the servicer admits its queue (32 by default) and answers the rest RESOURCE_EXHAUSTED at once, naming the
    bound; the admitted ones are answered and the server takes new requests after."""
    running, channel, stub = await _server(max_wait_ms=2.0, forward_s=1.0)
    image = _png(32, 0)
    try:
        await stub.Classify(expert_pb2.ClassifyRequest(image=image), timeout=30)
        calls = [stub.Classify(expert_pb2.ClassifyRequest(image=image), timeout=120) for _ in range(48)]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
        assert all(a.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for a in refused), refused[:1]
        assert len(refused) == 48 - server_mod.DEFAULT_MAX_QUEUE, len(refused)
        assert "server busy" in refused[0].details()
        assert (await stub.Classify(expert_pb2.ClassifyRequest(image=image), timeout=30)).top[0].label == "b"
    finally:
        await channel.close()
        await running.stop(0)


@pytest.mark.slow
async def test_an_idle_client_keeps_its_connection_through_its_keepalive_pings():
    # channel_options() pings every 2 s; a server on gRPC's defaults answers the third ping of an idle connection
    # with GOAWAY "too_many_pings" and the channel falls back to IDLE (what offload-image callers saw after ~6 s)
    running, channel, stub = await _server(max_wait_ms=1.0)
    try:
        await stub.Classify(expert_pb2.ClassifyRequest(image=_png(40, 0)), timeout=30)
        await asyncio.sleep(9.0)
        assert channel.get_state() == grpc.ChannelConnectivity.READY
    finally:
        await channel.close()
        await running.stop(0)
