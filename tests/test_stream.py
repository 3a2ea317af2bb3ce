"""The expert stream (``RunExpertsStream``): one long-lived call per site carrying one request per MoE layer.

Against real ``moe-worker`` processes on loopback: answers equal the in-process experts and the unary calls',
answers are matched to requests when several threads share the stream, a refused request leaves the stream open,
a token is required on it as on unary calls, and SIGTERM ends idle streams at once instead of holding the grace
period open. In-process: a worker without the stream method is used through unary calls instead.
"""

from __future__ import annotations

import concurrent.futures
import signal
import time

import grpc
import pytest
import torch

from coordinator.sites import SiteClient, SiteError
from moevit.checkpoint import load_checkpoint, model_fingerprint, save_checkpoint
from moevit_rpc.v1 import expert_pb2_grpc
from tests.deploy import small_moe_model
from tests.netutil import free_port, start_worker, stop
from worker.backends import TorchBackend
from worker.server import WorkerServer
from worker.service import ExpertServicer

LAYER, DIM = 8, 128  # mobilevitv2_050's last transformer layer: tokens of 128 channels


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    model = small_moe_model((5, 8), num_experts=4, calib_size=64)
    return save_checkpoint(model, tmp_path_factory.mktemp("stream") / "moe.safetensors")


@pytest.fixture(scope="module")
def reference(model_path):
    model = load_checkpoint(model_path)
    return model.moe_layers()[LAYER].experts, model_fingerprint(model)


@pytest.fixture(scope="module")
def worker(model_path):
    address = f"127.0.0.1:{free_port()}"
    proc = start_worker(str(model_path), address, "8:0-2")
    yield address
    stop(proc)


def _client(address: str, fingerprint: str, **kw) -> SiteClient:
    return SiteClient("w", address, fingerprint=fingerprint, wire="fp32", deadline_s=10.0, watch=False, **kw)


def test_stream_answers_equal_the_in_process_experts_and_the_unary_calls(worker, reference):
    bank, fp = reference
    streamed, unary = _client(worker, fp), _client(worker, fp, stream=False)
    first = None
    try:
        for n in (1, 7, 64):
            batches = [(e, torch.randn(n, DIM)) for e in (0, 2)]
            ys = streamed.start(LAYER, batches).result()
            us = unary.start(LAYER, batches).result()
            for (e, x), y, u in zip(batches, ys, us, strict=True):
                torch.testing.assert_close(y, bank.forward_one(e, x), atol=1e-5, rtol=0)
                assert torch.equal(y, u)
            first = first or streamed._stream
            assert streamed._stream is first and not first.ended  # one stream carried every request
        assert unary._stream is None
        assert streamed.traffic.calls == unary.traffic.calls == 3
        assert streamed.traffic.bytes_sent == unary.traffic.bytes_sent  # the same messages either way
    finally:
        streamed.close()
        unary.close()


def test_threads_sharing_one_stream_each_get_their_own_answers(worker, reference):
    bank, fp = reference
    client = _client(worker, fp)

    def ask(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for i in range(8):
            x = torch.randn(1 + (seed + i) % 9, DIM, generator=g)
            e = (seed + i) % 3
            (y,) = client.start(LAYER, [(e, x)]).result()
            torch.testing.assert_close(y, bank.forward_one(e, x), atol=1e-5, rtol=0)

    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            for f in [pool.submit(ask, s) for s in range(6)]:
                f.result(timeout=60)
        assert client.traffic.calls == 48 and client.traffic.failures == 0
    finally:
        client.close()


def test_a_refused_request_leaves_the_stream_open(worker, reference):
    bank, fp = reference
    client = _client(worker, fp)
    try:
        with pytest.raises(SiteError, match=r"INVALID_ARGUMENT: expert 3 of layer 8 is not hosted"):
            client.start(LAYER, [(3, torch.randn(4, DIM))]).result()
        stream = client._stream
        with pytest.raises(SiteError, match=r"INVALID_ARGUMENT: .*shape \[4, 96\], expected \[n, 128\]"):
            client.start(LAYER, [(0, torch.randn(4, 96))]).result()
        x = torch.randn(5, DIM)
        (y,) = client.start(LAYER, [(1, x)]).result()
        torch.testing.assert_close(y, bank.forward_one(1, x), atol=1e-5, rtol=0)
        assert client._stream is stream and not stream.ended
        other = _client(worker, "another-model")
        with pytest.raises(SiteError, match="FAILED_PRECONDITION"):
            other.start(LAYER, [(0, x)]).result()
        other.close()
    finally:
        client.close()


def test_the_stream_needs_the_token(model_path, reference, tmp_path):
    bank, fp = reference
    (tmp_path / "token").write_text("s3cret\n")
    address = f"127.0.0.1:{free_port()}"
    proc = start_worker(str(model_path), address, "8:0", "--token-file", str(tmp_path / "token"))
    try:
        x = torch.randn(3, DIM)
        for token in (None, "wrong"):
            client = _client(address, fp, token=token)
            with pytest.raises(SiteError, match="UNAUTHENTICATED"):
                client.start(LAYER, [(0, x)]).result()
            client.close()
        client = _client(address, fp, token="s3cret")
        (y,) = client.start(LAYER, [(0, x)]).result()
        torch.testing.assert_close(y, bank.forward_one(0, x), atol=1e-5, rtol=0)
        client.close()
    finally:
        stop(proc)


def test_sigterm_ends_idle_streams_without_waiting_out_the_grace_period(model_path, reference):
    bank, fp = reference
    address = f"127.0.0.1:{free_port()}"
    grace = 20.0
    proc = start_worker(str(model_path), address, "8:0", "--grace", str(grace))
    client = _client(address, fp)
    try:
        client.start(LAYER, [(0, torch.randn(2, DIM))]).result()  # the stream is open, and now idle
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=grace + 10)
        assert rc == 0
        assert time.monotonic() - t0 < 5.0  # not the 20 s grace: the idle stream was ended at once
        deadline = time.monotonic() + 5
        while not client._stream.ended and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client._stream.ended
        with pytest.raises(SiteError, match="UNAVAILABLE"):  # a new stream finds nobody
            client.start(LAYER, [(0, torch.randn(2, DIM))], timeout=3.0).result()
    finally:
        client.close()
        stop(proc)


class _UnaryOnly(ExpertServicer):
    """A worker of before the stream: RunExpertsStream answers UNIMPLEMENTED."""

    RunExpertsStream = expert_pb2_grpc.ExpertServiceServicer.RunExpertsStream


def test_a_worker_without_streams_is_used_through_unary_calls(model_path, reference):
    import asyncio
    import threading

    from worker.server import load_hosted

    bank, fp = reference
    banks, fingerprint, _ = load_hosted(model_path, {LAYER: [0, 1]})
    server = WorkerServer(TorchBackend(banks), fingerprint, arch="test")
    server._servicer.__class__ = _UnaryOnly
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    client = _client(f"127.0.0.1:{port}", fp)
    try:
        x = torch.randn(6, DIM)
        (y,) = client.start(LAYER, [(1, x)]).result()  # sent on a stream, refused, then sent again unary
        torch.testing.assert_close(y, bank.forward_one(1, x), atol=1e-5, rtol=0)
        assert client.stream is False and client._stream.ended
        assert client._stream._ended.code() == grpc.StatusCode.UNIMPLEMENTED
        (y,) = client.start(LAYER, [(0, x)]).result()
        torch.testing.assert_close(y, bank.forward_one(0, x), atol=1e-5, rtol=0)
    finally:
        client.close()
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)


def test_a_request_id_already_waiting_is_refused(worker, reference):
    """Answers are matched by request_id: a second request with the id of one still waiting is refused, not sent."""
    from coordinator.stream import ExpertStream
    from moevit_rpc.tensors import tensor_to_proto
    from moevit_rpc.v1 import expert_pb2

    bank, fp = reference
    channel = grpc.insecure_channel(worker)
    stream = ExpertStream(expert_pb2_grpc.ExpertServiceStub(channel), name="w")
    x = torch.randn(3, DIM)
    req = expert_pb2.RunExpertsRequest(model_fingerprint=fp, layer=LAYER, request_id="same", batches=[
        expert_pb2.ExpertTokens(expert=0, tokens=tensor_to_proto(x, "fp32"))])
    try:
        first = stream.submit(req)
        with pytest.raises(ValueError, match="'same' is already waiting"):
            stream.submit(req)
        resp = first.result(timeout=10)
        assert resp.request_id == "same" and len(resp.outputs) == 1
        assert stream.submit(req).result(timeout=10).request_id == "same"  # answered: the id is free again
    finally:
        stream.close()
        channel.close()
