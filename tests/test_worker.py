"""The expert worker: a real ``moe-worker`` process over gRPC (parity with the in-process experts, malformed
requests, Info, graceful SIGTERM), the onnxruntime backend (parity, graph cache) and the CLI's bad-input handling.

Every client call carries a timeout and every wait a deadline, so a broken worker fails the test instead of
hanging it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moevit.coordinator.local import free_port, worker_command
from moevit.worker import cli
from moevit.worker.backends import OnnxBackend, TorchBackend
from moevit.worker.server import SERVICE_NAME, format_experts, load_hosted
from moevit.worker.service import RequestError, validate_and_run

import moevit
from moevit.checkpoint import load_checkpoint, model_fingerprint, save_checkpoint
from moevit.moe.experts import ExpertBank
from moevit_rpc.tensors import DTYPES, proto_to_tensor, tensor_to_proto
from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc
from tests.netutil import READY_CHANNEL_OPTIONS, exit_clock, log_time

REPO_ROOT = Path(__file__).resolve().parents[1]
HOSTED = {5: [2], 8: [0, 1]}
DIMS = {5: 96, 8: 128}  # token width of transformer layers 5 and 8 in mobilevitv2_050
MAX_TOKENS = 20_000
MAX_MESSAGE_MB = 8
CLIENT_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RPC_TIMEOUT = 10.0


# ------------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A small MoE model whose experts have non-trivial norm affines and corrections (zeros would hide bugs)."""
    torch.manual_seed(0)
    model = moevit.create_model("mobilevitv2_050", num_classes=5,
                                moe=moevit.MoEConfig(layers=(5, 8), num_experts=4, expert_hidden=16))
    with torch.no_grad():
        for layer in model.moe_layers().values():
            bank = layer.experts
            bank.norm_weight.normal_(1.0, 0.2)
            bank.norm_bias.normal_(0.0, 0.2)
            bank.correction.normal_(0.0, 0.2)
            bank.alpha.uniform_(0.5, 1.5)
    return save_checkpoint(model.eval(), tmp_path_factory.mktemp("model") / "moe.safetensors")


@pytest.fixture(scope="module")
def reference(model_file) -> tuple[dict[int, ExpertBank], str]:
    """The full model's expert banks (in-process reference) and its fingerprint."""
    model = load_checkpoint(model_file)
    return {layer: m.experts for layer, m in model.moe_layers().items()}, model_fingerprint(model)


def expected(bank: ExpertBank, expert: int, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return bank.forward_one(expert, x)


def request(fingerprint: str, layer: int, batches: list[tuple[int, torch.Tensor, str]],
            request_id: str = "") -> expert_pb2.RunExpertsRequest:
    return expert_pb2.RunExpertsRequest(
        model_fingerprint=fingerprint, layer=layer, request_id=request_id,
        batches=[expert_pb2.ExpertTokens(expert=e, tokens=tensor_to_proto(x, d)) for e, x, d in batches])


def packed_request(fingerprint: str, layer: int, batches: list[tuple[int, torch.Tensor]], wire: str = "fp32",
                   *, counts: list[int] | None = None) -> expert_pb2.RunExpertsRequest:
    """All experts' tokens in one tensor (``counts`` overrides the true row counts, to build bad requests)."""
    tokens = torch.cat([x for _, x in batches])
    packed = expert_pb2.PackedTokens(experts=[e for e, _ in batches],
                                     counts=[len(x) for _, x in batches] if counts is None else counts,
                                     tokens=tensor_to_proto(tokens, wire))
    return expert_pb2.RunExpertsRequest(model_fingerprint=fingerprint, layer=layer, packed=packed)


# ------------------------------------------------------------------------------------------ worker process


class WorkerProcess:
    """A ``moe-worker`` subprocess (the harness's command line) whose stderr is collected line by line in the
    background, so a test can assert on what it logs."""

    def __init__(self, args: list[str], address: str) -> None:
        self.address = address
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(worker_command(*args), cwd=REPO_ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_serving(self, timeout: float = 120.0) -> None:
        """Poll the health service until it says SERVING; fail with the worker's stderr otherwise."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address, options=READY_CHANNEL_OPTIONS) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"worker exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1.0).status
                    if status == SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        pytest.fail(f"worker not SERVING within {timeout} s:\n{self.log()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)


def start_worker(model_file: Path, *extra: str) -> WorkerProcess:
    address = f"127.0.0.1:{free_port()}"
    worker = WorkerProcess(["--listen", address, "--model", str(model_file), *extra], address)
    try:
        worker.wait_serving()  # 120 s, as tests/netutil.start_worker: a niced start-up took over 30 s at load 5
    except BaseException:
        worker.close()
        raise
    return worker


@pytest.fixture(scope="module")
def worker(model_file):
    proc = start_worker(model_file, "--experts", "8:0-1,5:2", "--site", "test-site", "--max-tokens", str(MAX_TOKENS),
                        "--max-message-mb", str(MAX_MESSAGE_MB))
    yield proc
    proc.close()


@pytest.fixture
async def channel(worker):
    async with grpc.aio.insecure_channel(worker.address, options=CLIENT_OPTIONS) as ch:
        yield ch


async def assert_still_serving(channel, reference) -> None:
    """A good request is answered correctly and health says SERVING."""
    banks, fingerprint = reference
    x = torch.randn(9, DIMS[8])
    resp = await expert_pb2_grpc.ExpertServiceStub(channel).RunExperts(
        request(fingerprint, 8, [(1, x, "fp32")]), timeout=RPC_TIMEOUT)
    torch.testing.assert_close(proto_to_tensor(resp.outputs[0].tokens), expected(banks[8], 1, x), atol=1e-6, rtol=0)
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                             timeout=RPC_TIMEOUT)
    assert health.status == SERVING


# ------------------------------------------------------------------------------------------- over gRPC


async def test_info_lists_exactly_the_hosted_experts(channel, reference):
    info = await expert_pb2_grpc.ExpertServiceStub(channel).Info(expert_pb2.InfoRequest(), timeout=RPC_TIMEOUT)
    assert info.model_fingerprint == reference[1]
    assert [(hl.layer, list(hl.experts), hl.dim) for hl in info.layers] == [(5, [2], 96), (8, [0, 1], 128)]
    assert (info.arch, info.backend, info.site, info.version) == ("mobilevitv2_050_moe", "torch-cpu", "test-site", "v1")
    assert set(info.features) == {"run_experts_stream", "packed_tokens", "request_headers"}


async def test_fp32_outputs_equal_the_in_process_experts(channel, reference):
    banks, fingerprint = reference
    stub = expert_pb2_grpc.ExpertServiceStub(channel)
    # Request order (1 before 0) must be kept; an empty batch gets an empty output.
    x8 = {1: torch.randn(37, 128), 0: torch.randn(64, 128)}
    resp = await stub.RunExperts(request(fingerprint, 8, [(e, x, "fp32") for e, x in x8.items()], "fp32-8"),
                                 timeout=RPC_TIMEOUT)
    assert [o.expert for o in resp.outputs] == [1, 0]
    assert resp.compute_ms > 0
    for out, (e, x) in zip(resp.outputs, x8.items(), strict=True):
        assert out.tokens.dtype == expert_pb2.FLOAT32
        torch.testing.assert_close(proto_to_tensor(out.tokens), expected(banks[8], e, x), atol=1e-6, rtol=0)

    x5 = torch.randn(1, 96)
    resp = await stub.RunExperts(request(fingerprint, 5, [(2, x5, "fp32")]), timeout=RPC_TIMEOUT)
    torch.testing.assert_close(proto_to_tensor(resp.outputs[0].tokens), expected(banks[5], 2, x5), atol=1e-6, rtol=0)

    resp = await stub.RunExperts(request(fingerprint, 8, [(0, torch.zeros(0, 128), "fp32")]), timeout=RPC_TIMEOUT)
    assert list(resp.outputs[0].tokens.shape) == [0, 128] and resp.outputs[0].tokens.data == b""


@pytest.mark.parametrize("wire", ["fp32", "fp16"])
async def test_packed_request_is_answered_packed_with_the_per_expert_outputs(channel, reference, wire):
    banks, fingerprint = reference
    stub = expert_pb2_grpc.ExpertServiceStub(channel)
    batches = [(1, torch.randn(37, 128)), (0, torch.randn(64, 128))]  # request order (1 before 0) is kept
    resp = await stub.RunExperts(packed_request(fingerprint, 8, batches, wire), timeout=RPC_TIMEOUT)
    assert not resp.outputs and list(resp.packed.experts) == [1, 0] and list(resp.packed.counts) == [37, 64]
    assert resp.packed.tokens.dtype == DTYPES[wire][0] and list(resp.packed.tokens.shape) == [101, 128]
    per_expert = await stub.RunExperts(request(fingerprint, 8, [(e, x, wire) for e, x in batches]),
                                       timeout=RPC_TIMEOUT)
    # bit-identical to the per-expert form: the same experts on the same (rounded) inputs
    assert torch.equal(proto_to_tensor(resp.packed.tokens),
                       torch.cat([proto_to_tensor(o.tokens) for o in per_expert.outputs]))
    if wire == "fp32":
        ys = torch.split(proto_to_tensor(resp.packed.tokens), [37, 64])
        for (e, x), y in zip(batches, ys, strict=True):
            torch.testing.assert_close(y, expected(banks[8], e, x), atol=1e-6, rtol=0)
    # an expert with no rows is allowed, even when no expert has any
    x = torch.randn(3, 128)
    resp = await stub.RunExperts(packed_request(fingerprint, 8, [(0, torch.zeros(0, 128)), (1, x)]),
                                 timeout=RPC_TIMEOUT)
    assert list(resp.packed.counts) == [0, 3]
    torch.testing.assert_close(proto_to_tensor(resp.packed.tokens), expected(banks[8], 1, x), atol=1e-6, rtol=0)
    resp = await stub.RunExperts(packed_request(fingerprint, 8, [(0, torch.zeros(0, 128))]), timeout=RPC_TIMEOUT)
    assert list(resp.packed.counts) == [0] and list(resp.packed.tokens.shape) == [0, 128]


@pytest.mark.parametrize("wire, tol", [("fp16", 2e-3), ("bf16", 2e-2)])
async def test_half_precision_wire_is_close_and_answered_in_kind(channel, reference, wire, tol):
    banks, fingerprint = reference
    x = torch.randn(50, 128)
    resp = await expert_pb2_grpc.ExpertServiceStub(channel).RunExperts(
        request(fingerprint, 8, [(0, x, wire)]), timeout=RPC_TIMEOUT)
    out = resp.outputs[0].tokens
    assert out.dtype == DTYPES[wire][0] and len(out.data) == 50 * 128 * 2
    # The worker sees the rounded input; its output is rounded once more on the way back.
    ref = expected(banks[8], 0, x.to(DTYPES[wire][1]).float())
    torch.testing.assert_close(proto_to_tensor(out), ref, atol=tol, rtol=tol)


def _tokens(data: bytes, shape: list[int], dtype: int) -> expert_pb2.Tensor:
    return expert_pb2.Tensor(data=data, shape=shape, dtype=dtype)


def _malformed(fingerprint: str, kind: str) -> expert_pb2.RunExpertsRequest:
    good = tensor_to_proto(torch.randn(4, 128), "fp32")
    nan = torch.randn(4, 128)
    nan[2, 3] = float("nan")
    batch = expert_pb2.ExpertTokens
    cases: dict[str, Callable[[], expert_pb2.RunExpertsRequest]] = {
        "fingerprint": lambda: request("0123456789abcdef", 8, [(0, torch.randn(4, 128), "fp32")]),
        "layer": lambda: request(fingerprint, 3, [(0, torch.randn(4, 128), "fp32")]),
        "expert": lambda: request(fingerprint, 8, [(2, torch.randn(4, 128), "fp32")]),
        "expert_of_other_layer": lambda: request(fingerprint, 5, [(0, torch.randn(4, 96), "fp32")]),
        "duplicate": lambda: request(fingerprint, 8, [(0, torch.randn(4, 128), "fp32"),
                                                      (1, torch.randn(4, 128), "fp32"),
                                                      (0, torch.randn(2, 128), "fp16")]),
        "no_tokens": lambda: expert_pb2.RunExpertsRequest(model_fingerprint=fingerprint, layer=8,
                                                          batches=[batch(expert=0)]),
        "dtype_unspecified": lambda: expert_pb2.RunExpertsRequest(
            model_fingerprint=fingerprint, layer=8,
            batches=[batch(expert=0, tokens=_tokens(good.data, [4, 128], expert_pb2.DTYPE_UNSPECIFIED))]),
        "dtype_unknown": lambda: expert_pb2.RunExpertsRequest(
            model_fingerprint=fingerprint, layer=8, batches=[batch(expert=0, tokens=_tokens(good.data, [4, 128], 7))]),
        "width": lambda: request(fingerprint, 8, [(0, torch.randn(4, 96), "fp32")]),
        "rank1": lambda: request(fingerprint, 8, [(0, torch.randn(512), "fp32")]),
        "rank3": lambda: request(fingerprint, 8, [(0, torch.randn(2, 2, 128), "fp32")]),
        "bytes": lambda: expert_pb2.RunExpertsRequest(
            model_fingerprint=fingerprint, layer=8,
            batches=[batch(expert=1, tokens=_tokens(good.data[:-4], [4, 128], expert_pb2.FLOAT32))]),
        "too_many_tokens": lambda: request(fingerprint, 8, [(0, torch.zeros(MAX_TOKENS // 2, 128), "fp16"),
                                                            (1, torch.zeros(MAX_TOKENS // 2 + 1, 128), "fp16")]),
        "nan": lambda: request(fingerprint, 8, [(0, torch.randn(4, 128), "fp32"), (1, nan, "fp32")]),
        "fp16_overflow": lambda: request(fingerprint, 8, [(0, torch.full((2, 128), 70000.0), "fp16")]),
        "packed_and_batches": lambda: _with_batches(packed_request(fingerprint, 8, [(0, torch.randn(4, 128))])),
        "packed_counts_length": lambda: packed_request(fingerprint, 8, [(0, torch.randn(4, 128))], counts=[2, 2]),
        "packed_counts_sum": lambda: packed_request(fingerprint, 8, [(0, torch.randn(4, 128)),
                                                                    (1, torch.randn(3, 128))], counts=[4, 4]),
        "packed_expert": lambda: packed_request(fingerprint, 8, [(0, torch.randn(4, 128)), (2, torch.randn(1, 128))]),
        "packed_duplicate": lambda: packed_request(fingerprint, 8, [(1, torch.randn(4, 128)),
                                                                    (1, torch.randn(1, 128))]),
        "packed_width": lambda: packed_request(fingerprint, 8, [(0, torch.randn(4, 96))]),
        "packed_no_tokens": lambda: expert_pb2.RunExpertsRequest(
            model_fingerprint=fingerprint, layer=8, packed=expert_pb2.PackedTokens(experts=[0], counts=[0])),
        "packed_nan": lambda: packed_request(fingerprint, 8, [(0, torch.randn(4, 128)), (1, nan)]),
        "packed_too_many_tokens": lambda: packed_request(fingerprint, 8, [(0, torch.zeros(MAX_TOKENS + 1, 128))],
                                                         "fp16"),
    }
    return cases[kind]()


MALFORMED = [
    ("fingerprint", grpc.StatusCode.FAILED_PRECONDITION, ["fingerprint mismatch", "0123456789abcdef", "{fp}"]),
    ("layer", grpc.StatusCode.INVALID_ARGUMENT, ["layer 3 is not hosted", "[5, 8]"]),
    ("expert", grpc.StatusCode.INVALID_ARGUMENT, ["expert 2 of layer 8 is not hosted", "[0, 1]"]),
    ("expert_of_other_layer", grpc.StatusCode.INVALID_ARGUMENT, ["expert 0 of layer 5 is not hosted", "[2]"]),
    ("duplicate", grpc.StatusCode.INVALID_ARGUMENT, ["expert 0 of layer 8", "more than once"]),
    ("no_tokens", grpc.StatusCode.INVALID_ARGUMENT, ["expert 0", "no tokens"]),
    ("dtype_unspecified", grpc.StatusCode.INVALID_ARGUMENT, ["expert 0", "DTYPE_UNSPECIFIED"]),
    ("dtype_unknown", grpc.StatusCode.INVALID_ARGUMENT, ["unsupported tensor dtype 7"]),
    ("width", grpc.StatusCode.INVALID_ARGUMENT, ["shape [4, 96]", "expected [n, 128]"]),
    ("rank1", grpc.StatusCode.INVALID_ARGUMENT, ["shape [512]", "expected [n, 128]"]),
    ("rank3", grpc.StatusCode.INVALID_ARGUMENT, ["shape [2, 2, 128]", "expected [n, 128]"]),
    ("bytes", grpc.StatusCode.INVALID_ARGUMENT, ["expert 1", "2044 bytes but shape [4, 128]"]),
    ("too_many_tokens", grpc.StatusCode.INVALID_ARGUMENT, [f"{MAX_TOKENS + 1} tokens", f"cap of {MAX_TOKENS}"]),
    ("nan", grpc.StatusCode.INVALID_ARGUMENT, ["expert 1", "1 non-finite"]),
    ("fp16_overflow", grpc.StatusCode.INVALID_ARGUMENT, ["expert 0", "256 non-finite"]),
    ("packed_and_batches", grpc.StatusCode.INVALID_ARGUMENT, ["both batches and packed tokens"]),
    ("packed_counts_length", grpc.StatusCode.INVALID_ARGUMENT, ["name 1 experts but give 2 counts"]),
    ("packed_counts_sum", grpc.StatusCode.INVALID_ARGUMENT, ["counts add up to 8 rows but the tensor has 7"]),
    ("packed_expert", grpc.StatusCode.INVALID_ARGUMENT, ["expert 2 of layer 8 is not hosted", "[0, 1]"]),
    ("packed_duplicate", grpc.StatusCode.INVALID_ARGUMENT, ["expert 1 of layer 8", "more than once"]),
    ("packed_width", grpc.StatusCode.INVALID_ARGUMENT, ["packed tokens", "shape [4, 96]", "expected [n, 128]"]),
    ("packed_no_tokens", grpc.StatusCode.INVALID_ARGUMENT, ["packed tokens", "no tokens"]),
    ("packed_nan", grpc.StatusCode.INVALID_ARGUMENT, ["packed tokens", "1 non-finite"]),
    ("packed_too_many_tokens", grpc.StatusCode.INVALID_ARGUMENT, [f"{MAX_TOKENS + 1} tokens", f"cap of {MAX_TOKENS}"]),
]


def _with_batches(req: expert_pb2.RunExpertsRequest) -> expert_pb2.RunExpertsRequest:
    req.batches.append(expert_pb2.ExpertTokens(expert=1, tokens=tensor_to_proto(torch.randn(2, 128), "fp32")))
    return req


@pytest.mark.parametrize("kind, code, words", MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_malformed_request_is_refused_and_the_worker_keeps_serving(channel, reference, kind, code, words):
    fingerprint = reference[1]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await expert_pb2_grpc.ExpertServiceStub(channel).RunExperts(_malformed(fingerprint, kind),
                                                                    timeout=RPC_TIMEOUT)
    assert err.value.code() == code, err.value.details()
    for word in words:
        assert word.format(fp=fingerprint) in err.value.details()
    await assert_still_serving(channel, reference)


async def test_message_over_the_size_cap_is_refused(channel, reference):
    too_big = torch.zeros((MAX_MESSAGE_MB << 20) // (128 * 4) + 8, 128)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await expert_pb2_grpc.ExpertServiceStub(channel).RunExperts(
            request(reference[1], 8, [(0, too_big, "fp32")]), timeout=RPC_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await assert_still_serving(channel, reference)


@pytest.mark.e2e
async def test_sigterm_lets_calls_in_flight_finish_then_exits_0(model_file, reference):
    banks, fingerprint = reference
    # Long enough for the three calls in flight to finish on a loaded machine (their wall time grows with the load:
    # 1.6-2.2 s from the signal to the last answer at load 9-11 for 0.1-0.3 s of compute each); whether the worker
    # then waits out the grace or stops at once is asserted on its own clock below.
    grace = 10.0
    worker = start_worker(model_file, "--experts", "8:0-1", "--grace", str(grace), "--log-level", "debug",
                          "--max-tokens", "100000")
    try:
        async with grpc.aio.insecure_channel(worker.address, options=CLIENT_OPTIONS) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert (await asyncio.wait_for(watch.read(), 10)).status == SERVING
            # Large requests queue behind each other on the worker's compute thread, so some are still being
            # computed when the signal arrives.
            x = torch.randn(50_000, 128)
            ids = [f"big-{i}" for i in range(3)]
            stub = expert_pb2_grpc.ExpertServiceStub(ch)
            calls = [stub.RunExperts(request(fingerprint, 8, [(i % 2, x, "fp32")], rid), timeout=30)
                     for i, rid in enumerate(ids)]
            deadline = time.monotonic() + 20
            while not all(f"start request_id={rid} " in worker.log() for rid in ids):
                assert time.monotonic() < deadline, f"requests never reached the worker:\n{worker.log()}"
                await asyncio.sleep(0.002)
            t_signal = time.monotonic()
            worker.proc.send_signal(signal.SIGTERM)
            exited_at = exit_clock(worker.proc)

            assert (await asyncio.wait_for(watch.read(), 10)).status == NOT_SERVING
            watch.cancel()
            responses = await asyncio.wait_for(asyncio.gather(*calls), 30)
            # The worker must exit while this client still holds its connection open (one that waited for its
            # callers to hang up would not), so the exit is awaited inside the channel's block; the time is taken
            # at the exit itself, not after checking the answers and closing the channel (that took the elapsed
            # time to 8-14 s at load 8-10).
            t_exit = await asyncio.to_thread(exited_at, grace + 5)
            for i, resp in enumerate(responses):
                torch.testing.assert_close(proto_to_tensor(resp.outputs[0].tokens), expected(banks[8], i % 2, x),
                                           atol=1e-6, rtol=0)
        log = worker.log()
        assert worker.proc.returncode == 0, log
        assert t_exit - t_signal < grace + 1.0, f"exited {t_exit - t_signal:.2f} s after SIGTERM\n{log}"
        # The last request was still being worked on when the worker got the signal, and it finished.
        assert log.index("received SIGTERM") < log.index(f"done request_id={ids[-1]} "), log
        assert "stopped" in log and "Traceback" not in log
        # Once the last call is answered the worker stops (after ANSWER_LINGER_S, 0.5 s, for the answer to reach its
        # caller) instead of waiting out the rest of the grace: timed on the worker's own log clock, which a loaded
        # machine slows only by event-loop delays (0.58-0.65 s at load 9-11); waiting out the grace would be ~8 s here.
        linger = log_time(log, "moevit.worker.server: stopped") - log_time(log, f"done request_id={ids[-1]} ")
        assert linger < 2.5, f"stopped {linger:.2f} s after the last call was done\n{log}"
    finally:
        worker.close()


# ---------------------------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "plain"])
def test_onnx_backend_matches_torch_and_reuses_its_cache(model_file, tmp_path, fold):
    banks, fingerprint, _ = load_hosted(model_file, HOSTED)
    torch_backend = TorchBackend(banks)
    cache = tmp_path / "onnx"
    onnx = OnnxBackend(banks, fingerprint, cache, threads=1, fold=fold)
    assert sorted(onnx.exported) == [(5, 2), (8, 0), (8, 1)] and onnx.reused == []
    assert onnx.hosted == {5: (2,), 8: (0, 1)} and onnx.dims == DIMS
    for layer, experts in HOSTED.items():
        for e in experts:
            for n in (1, 64, 300):
                x = torch.randn(n, DIMS[layer])
                torch.testing.assert_close(onnx.run(layer, e, x), torch_backend.run(layer, e, x), atol=1e-5, rtol=1e-5)

    graphs = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(graphs) == 3 and all(fingerprint in p.name for p in graphs)
    again = OnnxBackend(banks, fingerprint, cache, threads=2, fold=fold)
    assert again.exported == [] and sorted(again.reused) == [(5, 2), (8, 0), (8, 1)]
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == graphs  # nothing rewritten
    x = torch.randn(17, 128)
    torch.testing.assert_close(again.run(8, 1, x), torch_backend.run(8, 1, x), atol=1e-5, rtol=1e-5)


def test_onnx_cache_is_keyed_by_model_and_repairs_bad_files(model_file, tmp_path):
    banks, fingerprint, _ = load_hosted(model_file, {8: [0, 1]})
    cache = tmp_path / "onnx"
    first = OnnxBackend(banks, fingerprint, cache)
    first.graph_path(8, 0).write_bytes(b"truncated")
    # Another model (another fingerprint) never picks up these graphs; a corrupt graph is exported again.
    other = OnnxBackend(banks, "fedcba9876543210", cache)
    assert sorted(other.exported) == [(8, 0), (8, 1)]
    repaired = OnnxBackend(banks, fingerprint, cache)
    assert repaired.exported == [(8, 0)] and repaired.reused == [(8, 1)]
    x = torch.randn(8, 128)
    torch.testing.assert_close(repaired.run(8, 0, x), TorchBackend(banks).run(8, 0, x), atol=1e-5, rtol=1e-5)


def test_validate_and_run_with_the_onnx_backend(model_file, tmp_path, reference):
    banks, fingerprint, _ = load_hosted(model_file, HOSTED)
    backend = OnnxBackend(banks, fingerprint, tmp_path / "onnx")
    hosted = {layer: set(experts) for layer, experts in HOSTED.items()}
    x = torch.randn(64, 128)
    resp = validate_and_run(backend, hosted, fingerprint, request(fingerprint, 8, [(1, x, "fp32")]), max_tokens=100)
    torch.testing.assert_close(proto_to_tensor(resp.outputs[0].tokens), expected(reference[0][8], 1, x),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(RequestError) as err:
        validate_and_run(backend, hosted, fingerprint, request(fingerprint, 8, [(1, x, "fp32")]), max_tokens=63)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "cap of 63" in err.value.message


# ------------------------------------------------------------------------------------------------ loading, CLI


def test_load_hosted_keeps_only_the_hosted_experts(model_file, reference):
    banks, fingerprint, config = load_hosted(model_file, {8: [3, 1]})
    assert fingerprint == reference[1] and config.arch == "mobilevitv2_050"
    assert list(banks) == [8] and banks[8].expert_ids == [1, 3] and banks[8].fc1_weight.shape[0] == 2
    everything, _, _ = load_hosted(model_file, None)
    assert {layer: b.expert_ids for layer, b in everything.items()} == {5: [0, 1, 2, 3], 8: [0, 1, 2, 3]}
    assert format_experts({8: [0, 1, 2, 7], 5: [2]}) == "5:2,8:0-2,8:7"


def test_parse_experts():
    assert cli.parse_experts("8:0-3,8:7,5:1") == {5: [1], 8: [0, 1, 2, 3, 7]}
    assert cli.parse_experts(" 8:2 , 8:1-2 ") == {8: [1, 2]}
    assert cli.parse_experts("all") is None
    for bad in ("", "8", "8:", "8:a", "8:1-", "x:1", "8:3-1", "8:1,,5:2", "-1:0"):
        with pytest.raises(cli.CliError):
            cli.parse_experts(bad)


@pytest.mark.parametrize("argv, words", [
    (["--experts", "8:0-x"], ["bad --experts item '8:0-x'"]),
    (["--experts", "8:0,3:1,5:9"], ["layer 3 is not an MoE layer", "layer 5 has no expert(s) [9]"]),
    (["--experts", "8:0", "--model", "{missing}"], ["no such model file"]),
    (["--experts", "8:0", "--threads", "0"], ["--threads must be >= 1"]),
], ids=["syntax", "not-in-model", "missing-model", "threads"])
def test_cli_bad_input_is_one_line_and_exit_2(model_file, tmp_path, capsys, argv, words):
    argv = [a.format(missing=tmp_path / "missing.safetensors") for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(model_file)]
    assert cli.main(["--listen", "127.0.0.1:0", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-worker: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for word in words:
        assert word in err


def _write_topology(tmp_path: Path, model_file: Path, port: int) -> Path:
    path = tmp_path / "sites.yaml"
    device = "{gflops: 10, memory_mb: 128, active_w: 3, idle_w: 1}"
    path.write_text(f"""\
model: {model_file}
coordinator: camera-01
sites:
  camera-01: {{address: "127.0.0.1:{free_port()}", device: {device}}}
  pi-north: {{address: "127.0.0.1:{port}", device: {device}}}
  pi-south: {{address: "127.0.0.1:{free_port()}", device: {device}}}
links:
  - {{between: [camera-01, pi-north], bandwidth_mbps: 20, latency_ms: 4}}
  - {{between: [camera-01, pi-south], bandwidth_mbps: 20, latency_ms: 4}}
""")
    return path


def test_cli_unknown_site_is_exit_2(model_file, tmp_path, capsys):
    topology = _write_topology(tmp_path, model_file, free_port())
    assert cli.main(["--topology", str(topology), "--site", "pi-west"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown site 'pi-west'" in err and "pi-north" in err


def test_cli_missing_model_exits_2_as_a_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moevit.worker.cli", "--listen", "127.0.0.1:0", "--model",
                           str(tmp_path / "nope.safetensors"), "--experts", "8:0"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == f"moe-worker: error: {tmp_path / 'nope.safetensors'}: no such model file\n"


@pytest.mark.e2e
def test_topology_mode_serves_the_sites_share_of_the_default_placement(model_file, tmp_path, reference):
    port = free_port()
    topology = _write_topology(tmp_path, model_file, port)
    worker = WorkerProcess(["--topology", str(topology), "--site", "pi-north"], f"127.0.0.1:{port}")
    try:
        worker.wait_serving()
        with grpc.insecure_channel(worker.address) as ch:
            info = expert_pb2_grpc.ExpertServiceStub(ch).Info(expert_pb2.InfoRequest(), timeout=RPC_TIMEOUT)
        # Default placement: expert e on the (e mod 3)-th site by name -> pi-north holds expert 1 of each layer.
        assert [(hl.layer, list(hl.experts)) for hl in info.layers] == [(5, [1]), (8, [1])]
        assert info.site == "pi-north" and info.model_fingerprint == reference[1]
        worker.proc.send_signal(signal.SIGINT)
        assert worker.proc.wait(timeout=10) == 0
    finally:
        worker.close()


def test_second_worker_on_the_same_port_is_refused(worker, model_file):
    # gRPC's default SO_REUSEPORT would let it bind and steal connections; the worker turns that off.
    proc = subprocess.run([sys.executable, "-m", "moevit.worker.cli", "--listen", worker.address, "--model",
                           str(model_file), "--experts", "8:0"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "GRPC_VERBOSITY": "NONE"})
    assert proc.returncode == 2  # checked before the model loads: one line, a usage error (issue 22)
    port = worker.address.rsplit(":", 1)[1]
    assert f"moe-worker: error: --listen {worker.address}: cannot listen there: port {port} is in use" in proc.stderr
