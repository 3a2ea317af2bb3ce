"""Generated RPC code is fresh and works; the tensor codec round-trips and rejects malformed tensors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moevit_rpc.tensors import DTYPES, proto_to_tensor, tensor_to_proto
from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
GENERATE = REPO_ROOT / "proto" / "generate.py"
GENERATED = ["expert_pb2.py", "expert_pb2.pyi", "expert_pb2_grpc.py"]
SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name
FINGERPRINT = "sha256:test-model"


# --------------------------------------------------------------------------------------------- generated code


def test_generated_code_is_fresh():
    proc = subprocess.run([sys.executable, str(GENERATE), "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        "committed generated code is stale or the generator is misconfigured; "
        f"run `.venv/bin/python proto/generate.py`\n{proc.stdout}{proc.stderr}"
    )


def test_check_names_a_stale_file(tmp_path):
    """--check on a copy of the tree with one edited generated file exits 1 and names that file."""
    shutil.copytree(REPO_ROOT / "proto", tmp_path / "proto", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "moevit_rpc" / "v1").mkdir(parents=True)
    for name in GENERATED:
        shutil.copy(REPO_ROOT / "moevit_rpc" / "v1" / name, tmp_path / "moevit_rpc" / "v1" / name)
    stale = tmp_path / "moevit_rpc" / "v1" / "expert_pb2_grpc.py"
    stale.write_bytes(stale.read_bytes() + b"\n# hand edit\n")
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "moevit_rpc/v1/expert_pb2_grpc.py" in proc.stderr
    assert "expert_pb2.py " not in proc.stderr  # only the edited file is reported


def test_proto_folder_is_not_a_package():
    # proto-plus (via ray) owns the top-level module name `proto`; our proto/ folder must not shadow it.
    assert not (REPO_ROOT / "proto" / "__init__.py").exists()


# ---------------------------------------------------------------------------------------------- tensor codec


def test_fp32_round_trip_is_bit_exact():
    x = torch.randn(37, 64)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    x[1, 0] = torch.finfo(torch.float32).tiny / 8  # subnormal
    msg = tensor_to_proto(x, "fp32")
    assert msg.dtype == expert_pb2.FLOAT32
    assert list(msg.shape) == [37, 64]
    assert len(msg.data) == 37 * 64 * 4
    y = proto_to_tensor(msg)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))


@pytest.mark.parametrize("dtype, rtol", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_half_round_trips_within_precision(dtype, rtol):
    x = torch.randn(50, 96)
    msg = tensor_to_proto(x, dtype)
    assert msg.dtype == DTYPES[dtype][0]
    assert len(msg.data) == x.numel() * 2
    y = proto_to_tensor(msg)
    assert y.dtype == torch.float32 and y.shape == x.shape
    # Exactly torch's round-to-nearest conversion, hence within half an ulp of the format.
    assert torch.equal(y, x.to(DTYPES[dtype][1]).to(torch.float32))
    torch.testing.assert_close(y, x, rtol=rtol, atol=0.0)
    # Re-encoding a decoded tensor is lossless.
    assert tensor_to_proto(y, dtype).data == msg.data


def test_bf16_bytes_are_little_endian_upper_halves():
    x = torch.tensor([1.0, -2.0, 0.5])
    msg = tensor_to_proto(x, "bf16")
    # float32 1.0 = 0x3F800000 -> bf16 0x3F80, little-endian b"\x80\x3f".
    assert msg.data == b"\x80\x3f\x00\xc0\x00\x3f"


@pytest.mark.parametrize("shape", [(5,), (0, 8), (2, 3, 4), (1, 1)])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_shapes_round_trip(shape, dtype):
    x = torch.randn(shape)
    y = proto_to_tensor(tensor_to_proto(x, dtype))
    assert y.shape == x.shape and y.dtype == torch.float32


def test_encode_non_contiguous_and_other_dtypes():
    x = torch.randn(8, 6).t()  # non-contiguous view
    assert torch.equal(proto_to_tensor(tensor_to_proto(x, "fp32")), x)
    h = torch.randn(4, 4).half()
    assert torch.equal(proto_to_tensor(tensor_to_proto(h, "fp16")), h.float())


def test_decoded_tensor_owns_writable_memory():
    msg = tensor_to_proto(torch.zeros(4, 4), "fp32")
    data_before = bytes(msg.data)
    y = proto_to_tensor(msg)
    y += 1  # must neither raise nor write through to the message bytes
    assert msg.data == data_before


def test_encode_rejects_unknown_dtype_and_scalar():
    with pytest.raises(ValueError, match="unknown wire dtype"):
        tensor_to_proto(torch.zeros(2), "fp8")
    with pytest.raises(ValueError, match="0-d"):
        tensor_to_proto(torch.tensor(1.0), "fp32")


def test_byte_count_mismatch_is_rejected():
    msg = tensor_to_proto(torch.randn(4, 8), "fp16")
    bad = expert_pb2.Tensor(data=msg.data[:-2], shape=msg.shape, dtype=msg.dtype)
    with pytest.raises(ValueError, match=r"62 bytes but shape \[4, 8\] of FLOAT16 needs 32 x 2 = 64 bytes"):
        proto_to_tensor(bad)
    wrong_shape = expert_pb2.Tensor(data=msg.data, shape=[4, 9], dtype=msg.dtype)
    with pytest.raises(ValueError, match="bytes but shape"):
        proto_to_tensor(wrong_shape)
    wrong_dtype = expert_pb2.Tensor(data=msg.data, shape=[4, 8], dtype=expert_pb2.FLOAT32)
    with pytest.raises(ValueError, match="bytes but shape"):
        proto_to_tensor(wrong_dtype)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="shape is empty"):
        proto_to_tensor(expert_pb2.Tensor(data=b"\x00" * 4, shape=[], dtype=expert_pb2.FLOAT32))
    with pytest.raises(ValueError, match="negative dimension"):
        proto_to_tensor(expert_pb2.Tensor(data=b"", shape=[-1, 4], dtype=expert_pb2.FLOAT32))


@pytest.mark.parametrize("dtype_value, name", [(expert_pb2.DTYPE_UNSPECIFIED, "DTYPE_UNSPECIFIED"), (99, "99")])
def test_unknown_dtype_is_rejected(dtype_value, name):
    msg = expert_pb2.Tensor(data=b"\x00" * 8, shape=[2], dtype=dtype_value)
    with pytest.raises(ValueError, match=f"unsupported tensor dtype {name}"):
        proto_to_tensor(msg)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_is_rejected_when_checked(dtype, bad):
    x = torch.randn(3, 5)
    x[2, 4] = bad
    msg = tensor_to_proto(x, dtype)
    with pytest.raises(ValueError, match="1 non-finite"):
        proto_to_tensor(msg, check_finite=True)
    # Without the check the value passes through unchanged.
    y = proto_to_tensor(msg)
    assert torch.equal(torch.isfinite(y), torch.isfinite(x))


def test_fp16_overflow_is_caught_by_check_finite():
    msg = tensor_to_proto(torch.tensor([70000.0]), "fp16")  # beyond fp16 max (65504) -> inf
    with pytest.raises(ValueError, match="non-finite"):
        proto_to_tensor(msg, check_finite=True)


# --------------------------------------------------------------------------------- generated stubs over gRPC


class EchoExperts(expert_pb2_grpc.ExpertServiceServicer):
    """Trivial worker: every expert is the identity; decodes and re-encodes to exercise the codec."""

    async def RunExperts(self, request, context):
        if request.model_fingerprint != FINGERPRINT:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "model fingerprint mismatch")
        t0 = time.perf_counter()
        outputs = []
        for batch in request.batches:
            try:
                tokens = proto_to_tensor(batch.tokens, check_finite=True)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expert {batch.expert}: {exc}")
            wire = {v[0]: k for k, v in DTYPES.items()}[batch.tokens.dtype]
            outputs.append(expert_pb2.ExpertTokens(expert=batch.expert, tokens=tensor_to_proto(tokens, wire)))
        return expert_pb2.RunExpertsResponse(outputs=outputs, compute_ms=(time.perf_counter() - t0) * 1e3)

    async def Info(self, request, context):
        return expert_pb2.InfoResponse(
            model_fingerprint=FINGERPRINT,
            arch="mobilevitv2_moe",
            layers=[expert_pb2.HostedLayer(layer=3, experts=[0, 2], dim=128)],
            backend="torch-cpu",
            site="test",
            version="v1",
        )


@pytest.fixture
async def channel():
    server = grpc.aio.server()
    expert_pb2_grpc.add_ExpertServiceServicer_to_server(EchoExperts(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(grace=None)


async def test_health_service_reports_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_info(channel):
    info = await expert_pb2_grpc.ExpertServiceStub(channel).Info(expert_pb2.InfoRequest(), timeout=10)
    assert info.version == "v1"
    assert info.model_fingerprint == FINGERPRINT
    assert [(hl.layer, list(hl.experts), hl.dim) for hl in info.layers] == [(3, [0, 2], 128)]


async def test_run_experts_echo(channel):
    stub = expert_pb2_grpc.ExpertServiceStub(channel)
    inputs = {0: (torch.randn(7, 128), "fp32"), 2: (torch.randn(3, 128), "bf16"), 1: (torch.randn(0, 128), "fp16")}
    request = expert_pb2.RunExpertsRequest(
        model_fingerprint=FINGERPRINT,
        layer=3,
        request_id="req-1",
        batches=[expert_pb2.ExpertTokens(expert=e, tokens=tensor_to_proto(t, d)) for e, (t, d) in inputs.items()],
    )
    resp = await stub.RunExperts(request, timeout=10)
    assert [o.expert for o in resp.outputs] == list(inputs)  # same order as the request
    assert resp.compute_ms >= 0.0
    for out, (x, dtype) in zip(resp.outputs, inputs.values(), strict=True):
        assert torch.equal(proto_to_tensor(out.tokens), x.to(DTYPES[dtype][1]).float())


async def test_run_experts_errors_map_to_status_codes(channel):
    stub = expert_pb2_grpc.ExpertServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RunExperts(expert_pb2.RunExpertsRequest(model_fingerprint="other", layer=0), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    broken = expert_pb2.Tensor(data=b"\x00" * 5, shape=[2, 2], dtype=expert_pb2.FLOAT32)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RunExperts(
            expert_pb2.RunExpertsRequest(
                model_fingerprint=FINGERPRINT, layer=0, batches=[expert_pb2.ExpertTokens(expert=4, tokens=broken)]
            ),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expert 4" in err.value.details() and "5 bytes" in err.value.details()
