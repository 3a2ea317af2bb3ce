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
from moevit.coordinator.local import log_tail
from moevit.coordinator.sites import SiteError
from moevit.worker.service import ExpertServicer

from moevit_rpc.v1 import expert_pb2_grpc
from tests.netutil import exit_clock, free_port, in_process_worker, log_time, site_client, start_worker, stop

LAYER, DIM = 8, 128  # mobilevitv2_050's last transformer layer: tokens of 128 channels


# end to end through real worker/coordinator processes: make test runs it, make test-quick leaves it out
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def worker(expert_model_path):
    address = f"127.0.0.1:{free_port()}"
    proc = start_worker(str(expert_model_path), address, "8:0-2")
    yield address
    stop(proc)


def test_stream_answers_equal_the_in_process_experts_and_the_unary_calls(worker, layer8_reference):
    bank, fp = layer8_reference
    streamed, unary = site_client(worker, fp), site_client(worker, fp, stream=False)
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


def test_threads_sharing_one_stream_each_get_their_own_answers(worker, layer8_reference):
    bank, fp = layer8_reference
    client = site_client(worker, fp)

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


def test_a_refused_request_leaves_the_stream_open(worker, layer8_reference):
    bank, fp = layer8_reference
    client = site_client(worker, fp)
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
        other = site_client(worker, "another-model")
        with pytest.raises(SiteError, match="FAILED_PRECONDITION"):
            other.start(LAYER, [(0, x)]).result()
        other.close()
    finally:
        client.close()


@pytest.mark.slow
def test_a_caller_cancelling_mid_answer_leaves_no_traceback_in_the_worker_log(expert_model_path, layer8_reference):
    """Issue 21: a caller that cancels its stream while the worker writes the answer. The caller does not read, so
    the 10 MB answer's write waits on flow control until the cancel fails it. Before: the handler ended normally
    after the failed write and gRPC's status batch repeated the initial metadata the write had carried
    (``ExecuteBatchError ... GRPC_CALL_ERROR_TOO_MANY_OPERATIONS``, a traceback in the log for every write so
    failed: 2 of 2 in this test without the fix, 1 in the 180 s attack soak). The worker logs ``RunExperts done``
    (debug) just before it writes. Whether a cancel fails the write (this case) or cancels the handler first (a
    quiet end either way) is a race inside gRPC, about half and half here: cancels are repeated until two writes
    failed, eight at most."""
    from moevit_rpc.tensors import tensor_to_proto
    from moevit_rpc.v1 import expert_pb2

    bank, fp = layer8_reference
    address = f"127.0.0.1:{free_port()}"
    proc = start_worker(str(expert_model_path), address, "8:0", "--log-level", "debug")
    x = torch.randn(20_000, DIM)
    try:
        gone = "the caller went away while its answer was written"
        for i in range(8):
            if log_tail(proc, 10_000).count(gone) >= 2:
                break
            rid = f"mid-write-{i}"
            req = expert_pb2.RunExpertsRequest(model_fingerprint=fp, layer=LAYER, request_id=rid, packed=(
                expert_pb2.PackedTokens(experts=[0], counts=[len(x)], tokens=tensor_to_proto(x, "fp32"))))
            # a connection of its own each time: gRPC widens a connection's flow-control window as it carries
            # large messages, and a later 10 MB answer could be taken in whole without the caller reading
            with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20),
                                                         ("grpc.max_send_message_length", 64 << 20)]) as channel:
                call = expert_pb2_grpc.ExpertServiceStub(channel).RunExpertsStream(iter([req]), timeout=60)
                deadline = time.monotonic() + 50  # the call is never read
                while f"RunExperts done request_id={rid} " not in log_tail(proc, 10_000):
                    assert time.monotonic() < deadline and not call.done(), log_tail(proc, 30)
                    time.sleep(0.05)
                time.sleep(0.5)  # the answer is serialised and its write started
                call.cancel()
                time.sleep(0.5)
        # the worker goes on serving, on a new stream
        client = site_client(address, fp)
        try:
            small = torch.randn(3, DIM)
            (y,) = client.start(LAYER, [(0, small)]).result()
            torch.testing.assert_close(y, bank.forward_one(0, small), atol=1e-5, rtol=0)
        finally:
            client.close()
        log = log_tail(proc, 10_000)
        assert gone in log, log  # the sequence did what it is meant to: a write failed with its caller gone
        assert "Traceback" not in log and " ERROR " not in log, log
    finally:
        stop(proc)


def test_the_stream_needs_the_token(expert_model_path, layer8_reference, tmp_path):
    bank, fp = layer8_reference
    (tmp_path / "token").write_text("s3cret\n")
    address = f"127.0.0.1:{free_port()}"
    proc = start_worker(str(expert_model_path), address, "8:0", "--token-file", str(tmp_path / "token"))
    try:
        x = torch.randn(3, DIM)
        for token in (None, "wrong"):
            client = site_client(address, fp, token=token)
            with pytest.raises(SiteError, match="UNAUTHENTICATED"):
                client.start(LAYER, [(0, x)]).result()
            client.close()
        client = site_client(address, fp, token="s3cret")
        (y,) = client.start(LAYER, [(0, x)]).result()
        torch.testing.assert_close(y, bank.forward_one(0, x), atol=1e-5, rtol=0)
        client.close()
    finally:
        stop(proc)


def test_sigterm_ends_idle_streams_without_waiting_out_the_grace_period(expert_model_path, layer8_reference):
    bank, fp = layer8_reference
    address = f"127.0.0.1:{free_port()}"
    grace = 20.0
    proc = start_worker(str(expert_model_path), address, "8:0", "--grace", str(grace))
    client = site_client(address, fp)
    try:
        client.start(LAYER, [(0, torch.randn(2, DIM))]).result()  # the stream is open, and now idle
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        t_exit = exit_clock(proc)(grace + 10)
        assert proc.returncode == 0
        log = log_tail(proc, 50)
        # Not the 20 s grace: the idle stream was ended at once. Timed on the worker's own log clock from the signal
        # to the end of its shutdown (2-4 ms at load 12), not to the process's exit, which adds Python's teardown
        # (1.5-2.1 s at load 12; the 5 s bound on it failed on busier runs) and has nothing to do with the stream.
        held = log_time(log, "moevit.worker.server: stopped") - log_time(log, "moevit.worker.server: received SIGTERM")
        assert held < 2.0, f"stopped {held:.3f} s after SIGTERM\n{log}"
        assert t_exit - t0 < grace, f"exited {t_exit - t0:.2f} s after SIGTERM\n{log}"  # and exited within it
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


def test_a_worker_without_streams_is_used_through_unary_calls(expert_model_path, layer8_reference):
    bank, fp = layer8_reference

    def before_streams(servicer: ExpertServicer) -> None:
        servicer.__class__ = _UnaryOnly

    with in_process_worker(expert_model_path, {LAYER: [0, 1]}, before_streams) as address:
        client = site_client(address, fp)
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


def test_a_request_id_already_waiting_is_refused(worker, layer8_reference):
    """Answers are matched by request_id: a second request with the id of one still waiting is refused, not sent."""
    from moevit.coordinator.stream import ExpertStream

    from moevit_rpc.tensors import tensor_to_proto
    from moevit_rpc.v1 import expert_pb2

    bank, fp = layer8_reference
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
