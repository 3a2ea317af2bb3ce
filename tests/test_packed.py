"""Packed tokens (``RunExpertsRequest.packed``): a request carries all its experts' tokens in one tensor.

Against a real ``moe-worker`` process on loopback: the coordinator's client gets the same outputs packed as with one
tensor per expert, over the stream and over unary calls, in fewer bytes. In-process: a worker that predates packed
tokens (it ignores the field, as an older parser does, and does not list the feature) is noticed: its empty answer
is an error naming the site rather than a silent result, and after ``use_features(info.features)`` the client sends
it one tensor per expert. An answer that does not fit its request is an error naming the site.
"""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest
import torch
from moevit.coordinator.sites import PendingCall, SiteError
from moevit.worker.service import ExpertServicer

from moevit_rpc.tensors import tensor_to_proto
from moevit_rpc.v1 import expert_pb2
from tests.netutil import in_process_worker, site_client

LAYER, DIM = 8, 128


# end to end through real worker/coordinator processes: make test runs it, make test-quick leaves it out
pytestmark = pytest.mark.e2e


@pytest.fixture
def worker(expert_worker):
    """A real worker process (the session's, hosting every expert; these tests call layer 8's 0-3)."""
    return expert_worker


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
@pytest.mark.parametrize("wire", ["fp32", "fp16"])
def test_packed_requests_get_the_per_expert_outputs_in_fewer_bytes(worker, layer8_reference, stream, wire):
    bank, fp = layer8_reference
    packed = site_client(worker, fp, wire=wire, stream=stream)
    per_expert = site_client(worker, fp, wire=wire, stream=stream, packed=False)
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


def _before_packing(servicer: ExpertServicer) -> None:
    servicer.__class__ = _BeforePacking
    servicer._info.features.remove("packed_tokens")


def test_a_worker_without_packed_tokens_is_noticed_and_sent_one_tensor_per_expert(expert_model_path,
                                                                                   layer8_reference):
    bank, fp = layer8_reference
    with in_process_worker(expert_model_path, {LAYER: [0, 1]}, _before_packing) as address:
        client = site_client(address, fp)
        try:
            x = torch.randn(6, DIM)
            with pytest.raises(SiteError) as err:  # the old worker answers with no outputs: never taken as a result
                client.start(LAYER, [(1, x)]).result()
            assert err.value.code == grpc.StatusCode.INTERNAL and "site w" in str(err.value)
            assert "unusable answer" in str(err.value)
            client.use_features(list(client.info().features))
            assert client.packed is False and client.stream is True
            ys = client.start(LAYER, [(1, x), (0, x[:2])]).result()
            torch.testing.assert_close(ys[0], bank.forward_one(1, x), atol=1e-5, rtol=0)
            torch.testing.assert_close(ys[1], bank.forward_one(0, x[:2]), atol=1e-5, rtol=0)
        finally:
            client.close()


def _answered(resp: expert_pb2.RunExpertsResponse, counts: list[int]) -> PendingCall:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_result(resp)
    client = site_client("127.0.0.1:1", "fp")  # never connects: the answer is already there
    return PendingCall(client, fut, 0, counts, time.perf_counter())


@pytest.mark.parametrize("answer_counts, rows, words", [
    ([2, 2], 5, "shape [5, 128], expected [4, C]"),
    ([3, 1], 4, "packed counts [3, 1] differ from the request's [2, 2]"),
    ([2, 2], None, "shape [4], expected [4, C]"),
], ids=["rows", "counts", "rank"])
def test_a_packed_answer_that_does_not_fit_the_request_is_an_error_naming_the_site(answer_counts, rows, words):
    tokens = torch.randn(rows, DIM) if rows is not None else torch.randn(4)
    resp = expert_pb2.RunExpertsResponse(packed=expert_pb2.PackedTokens(
        experts=[0, 1], counts=answer_counts, tokens=tensor_to_proto(tokens, "fp32")))
    call = _answered(resp, [2, 2])
    try:
        with pytest.raises(SiteError) as err:
            call.result()
        assert err.value.code == grpc.StatusCode.INTERNAL and "site w" in str(err.value) and words in str(err.value)
        assert call.client.traffic.failures == 1
    finally:
        call.client.close()
