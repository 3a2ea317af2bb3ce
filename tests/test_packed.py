"""Packed tokens (``RunExpertsRequest.packed``): a request carries all its experts' tokens in one tensor.

Against a real ``moe-worker`` process on loopback: the coordinator's client gets the same outputs packed as with one
tensor per expert, over the stream and over unary calls, in fewer bytes. In-process: a worker that predates packed
tokens (it ignores the field, as an older parser does, and does not list the feature) is noticed: its empty answer
is an error naming the site rather than a silent result, and after ``use_features(info.features)`` the client sends
it one tensor per expert.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch

from coordinator.sites import SiteClient, SiteError
from moevit.checkpoint import load_checkpoint, model_fingerprint, save_checkpoint
from tests.deploy import small_moe_model
from tests.netutil import free_port, start_worker, stop
from worker.backends import TorchBackend
from worker.server import WorkerServer, load_hosted
from worker.service import ExpertServicer

LAYER, DIM = 8, 128


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    model = small_moe_model((5, 8), num_experts=4, calib_size=64)
    return save_checkpoint(model, tmp_path_factory.mktemp("packed") / "moe.safetensors")


@pytest.fixture(scope="module")
def reference(model_path):
    model = load_checkpoint(model_path)
    return model.moe_layers()[LAYER].experts, model_fingerprint(model)


@pytest.fixture(scope="module")
def worker(model_path):
    address = f"127.0.0.1:{free_port()}"
    proc = start_worker(str(model_path), address, "8:0-3")
    yield address
    stop(proc)


def _client(address: str, fingerprint: str, wire: str = "fp32", **kw) -> SiteClient:
    return SiteClient("w", address, fingerprint=fingerprint, wire=wire, deadline_s=10.0, watch=False, **kw)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
@pytest.mark.parametrize("wire", ["fp32", "fp16"])
def test_packed_requests_get_the_per_expert_outputs_in_fewer_bytes(worker, reference, stream, wire):
    bank, fp = reference
    packed = _client(worker, fp, wire, stream=stream)
    per_expert = _client(worker, fp, wire, stream=stream, packed=False)
    try:
        for counts in ([1, 0, 5, 2], [64, 3, 0, 17], [0, 0, 0, 9]):
            batches = [(e, torch.randn(n, DIM)) for e, n in zip((3, 0, 2, 1), counts, strict=True)]
            ys = packed.start(LAYER, batches).result()
            us = per_expert.start(LAYER, batches).result()
            assert [len(y) for y in ys] == counts
            for (e, x), y, u in zip(batches, ys, us, strict=True):
                assert torch.equal(y, u)
                if wire == "fp32":
                    torch.testing.assert_close(y, bank.forward_one(e, x), atol=1e-5, rtol=0)
        assert packed.traffic.calls == per_expert.traffic.calls == 3
        assert packed.traffic.bytes_sent < per_expert.traffic.bytes_sent
        assert packed.traffic.bytes_received < per_expert.traffic.bytes_received
    finally:
        packed.close()
        per_expert.close()


class _BeforePacking(ExpertServicer):
    """A v1 worker from before packed tokens: its parser drops the unknown field, its Info lists no such feature."""

    async def answer(self, request):
        request.ClearField("packed")
        return await super().answer(request)


@pytest.fixture
def old_worker(model_path):
    banks, fingerprint, _ = load_hosted(model_path, {LAYER: [0, 1]})
    server = WorkerServer(TorchBackend(banks), fingerprint, arch="test")
    server._servicer.__class__ = _BeforePacking
    server._servicer._info.features.remove("packed_tokens")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    yield f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)


def test_a_worker_without_packed_tokens_is_noticed_and_sent_one_tensor_per_expert(old_worker, reference):
    bank, fp = reference
    client = _client(old_worker, fp)
    try:
        x = torch.randn(6, DIM)
        with pytest.raises(SiteError) as err:  # the old worker answers with no outputs: never taken as a result
            client.start(LAYER, [(1, x)]).result()
        assert err.value.code == grpc.StatusCode.INTERNAL and "site w" in str(err.value)
        assert "unusable answer" in str(err.value)
        info = client.info()
        client.use_features(list(info.features))
        assert client.packed is False and client.stream is True
        ys = client.start(LAYER, [(1, x), (0, x[:2])]).result()
        torch.testing.assert_close(ys[0], bank.forward_one(1, x), atol=1e-5, rtol=0)
        torch.testing.assert_close(ys[1], bank.forward_one(0, x[:2]), atol=1e-5, rtol=0)
    finally:
        client.close()
