"""The token codecs (moevit_rpc.codecs) and their Tensor messages: figures derived by hand, error bounds, sizes,
refusals of corrupt payloads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zstandard

from moevit_rpc import codecs
from moevit_rpc.codecs import Codec, Encoded, decode, encode, max_abs_error, parse_codec, raw_sizes, wire_ids
from moevit_rpc.tensors import codec_of, proto_to_tensor, tensor_to_proto
from moevit_rpc.v1 import expert_pb2


def roundtrip(x: np.ndarray, name: str) -> tuple[np.ndarray, Encoded]:
    enc = encode(x, parse_codec(name))
    return decode(enc), enc


def test_int8_by_hand():
    # max |x| = 127 * 2^-7, so the scale is 2^-7 = 0.0078125 (exact in float16) and the codes are x / scale rounded
    x = np.array([[0.9921875, -0.5, 0.25, 0.001], [0.0, 0.0, 0.0, 0.0]], np.float32)
    y, enc = roundtrip(x, "int8")
    assert list(np.frombuffer(enc.data, np.int8)) == [127, -64, 32, 0, 0, 0, 0, 0]
    assert list(np.frombuffer(enc.scales, "<f2").astype(np.float32)) == [0.0078125, 0.0]
    np.testing.assert_array_equal(y, [[0.9921875, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert enc.nbytes == 2 * 4 + 2 * 2  # one byte per element + one float16 scale per token


def test_int4_by_hand():
    # one group of 4 (narrower than INT4_GROUP): max |x| = 7 * 0.125, scale 0.125, codes 7, -2 (-0.3/0.125=-2.4), 2, 0
    x = np.array([[0.875, -0.3, 0.3125, 0.05]], np.float32)
    y, enc = roundtrip(x, "int4")
    # stored +8, low nibble first: (7+8) | (-2+8) << 4 = 0x6F; (2+8) | (0+8) << 4 = 0x8A (0.3125/0.125 = 2.5 -> 2)
    assert enc.data == bytes([0x6F, 0x8A])
    np.testing.assert_array_equal(y, [[0.875, -0.25, 0.25, 0.0]])
    assert np.abs(y - x).max() <= 0.125 / 2


@pytest.mark.parametrize("name", ["int8", "int4", "int8+zstd", "int4+zstd"])
@pytest.mark.parametrize("spread", [1e-4, 1.0, 300.0])
def test_error_is_at_most_half_a_scale(name, spread):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((57, 96)) * spread * rng.uniform(0.1, 10, (57, 1))).astype(np.float32)
    x[5, 7] = 40 * spread  # an outlier widens its token's (group's) scale only
    y, enc = roundtrip(x, name)
    bound = max_abs_error(enc)  # per token (int8) or per group of 32 channels (int4)
    codec = parse_codec(name)
    per = bound.reshape(57, -1)
    groups = np.repeat(per, codec.group or 96, axis=1)[:, :96]
    assert (np.abs(y - x) <= groups * (1 + 1e-6)).all()
    # and the scale is the smallest float16 not below max|x| / qmax: no headroom wasted
    qmax = 127 if codec.base == "int8" else 7
    s = bound * 2
    amax = np.abs(x).reshape(57, -1, codec.group or 96).max(axis=2).reshape(-1)
    assert (s >= amax / qmax).all()
    assert (np.nextafter(s.astype(np.float16), np.float16(0)).astype(np.float32) < amax / qmax).all()


@pytest.mark.parametrize("shape", [(0, 64), (1, 1), (3, 33), (5, 64), (2, 100)])
@pytest.mark.parametrize("name", codecs.CODEC_NAMES)
def test_sizes_and_roundtrip_of_every_codec(shape, name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    y, enc = roundtrip(x, name)
    assert y.shape == shape and y.dtype == np.float32
    codec = parse_codec(name)
    rows, cols = shape
    if codec.base in ("fp32", "fp16", "bf16"):
        want = rows * cols * {"fp32": 4, "fp16": 2, "bf16": 2}[codec.base]
        scales = 0
    else:
        g = codec.group if codec.group and codec.group < cols else cols
        groups = math.ceil(cols / g)
        want = rows * groups * g if codec.base == "int8" else (rows * groups * g + 1) // 2
        scales = 2 * rows * groups
    assert raw_sizes(codec, shape) == (want, scales)
    assert len(enc.scales) == scales
    if not codec.zstd:
        assert len(enc.data) == want
    tol = {"fp32": 0, "fp16": 2e-3, "bf16": 8e-3, "int8": 0.02, "int4": 0.5}[codec.base]
    if x.size:
        assert np.abs(y - x).max() <= tol * max(1.0, np.abs(x).max())


def test_fp_codecs_match_the_legacy_encoding():
    x = torch.randn(20, 64)
    for name in ("fp32", "fp16", "bf16"):
        legacy = tensor_to_proto(x, name)
        enc = encode(x.numpy(), parse_codec(name))
        assert enc.data == legacy.data, name  # same bytes: an older worker reads them unchanged


def test_zstd_is_lossless_and_shrinks_redundant_tokens():
    x = np.zeros((64, 128), np.float32)
    x[:, :8] = np.random.default_rng(1).standard_normal((64, 8))
    for base in ("fp16", "int8"):
        plain, z = encode(x, parse_codec(base)), encode(x, parse_codec(base + "+zstd"))
        np.testing.assert_array_equal(decode(plain), decode(z))
        assert z.nbytes < plain.nbytes / 4


def test_parse_and_wire_ids():
    assert parse_codec("int8+zstd") == Codec("int8", True, 0)
    assert parse_codec("int4").group == codecs.INT4_GROUP
    assert wire_ids(parse_codec("int4+zstd")) == {"int4/1", "zstd/1"}
    assert wire_ids(parse_codec("fp16")) <= codecs.LEGACY_IDS
    for bad in ("int2", "int8+gzip", "int8+", "INT8", "", "zstd"):
        with pytest.raises(ValueError, match="unknown codec .*allowed: fp32, fp16"):
            parse_codec(bad)


def test_non_finite_or_out_of_range_tokens_are_refused():
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="NaN or Inf"):
            encode(np.array([[1.0, bad]], np.float32), parse_codec("int8"))
    with pytest.raises(ValueError, match="float16 scale range"):
        encode(np.array([[1e8, 0.0]], np.float32), parse_codec("int4"))


def _zstd_int8(x: np.ndarray) -> Encoded:
    return encode(x, parse_codec("int8+zstd"))


def test_corrupt_compressed_payloads_are_value_errors():
    x = np.random.default_rng(2).standard_normal((10, 64)).astype(np.float32)
    enc = _zstd_int8(x)
    frame = enc.data
    other = zstandard.ZstdCompressor().compress(bytes(11 * 64))  # a valid frame of another size
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(640))
    cases = {
        "not zstd": b"\x00" * 40,
        "empty": b"",
        "cut short": frame[:-3],
        "trailing bytes": frame + b"xx",
        "two frames": frame + frame,
        "another size": other,
        "size not stated": unsized,
    }
    for data in cases.values():
        with pytest.raises(ValueError, match="zstd"):
            decode(Encoded(enc.codec, enc.shape, data, enc.scales))
    for i in range(4, len(frame)):  # any flipped byte past the magic number: the checksum (or the frame) says so
        flipped = bytearray(frame)
        flipped[i] ^= 0x5A
        with pytest.raises(ValueError, match="zstd"):
            decode(Encoded(enc.codec, enc.shape, bytes(flipped), enc.scales))


def test_tensor_messages_carry_every_codec():
    x = torch.randn(7, 96)
    for name in codecs.CODEC_NAMES:
        msg = tensor_to_proto(x, name)
        assert codec_of(msg) == name
        again = expert_pb2.Tensor.FromString(msg.SerializeToString())
        y = proto_to_tensor(again, check_finite=True)
        assert y.shape == x.shape and y.dtype == torch.float32
    msg = tensor_to_proto(x, "int8")
    msg.scales = msg.scales[:-2]
    with pytest.raises(ValueError, match="scales are 12 bytes"):
        proto_to_tensor(msg)
    msg = tensor_to_proto(x, "fp16")
    msg.compression = 7
    with pytest.raises(ValueError, match="unsupported tensor compression 7"):
        proto_to_tensor(msg)
    msg = tensor_to_proto(x, "int8")
    msg.scales = np.array([np.inf] * 7, "<f2").tobytes()
    with pytest.raises(ValueError, match="non-finite"):
        proto_to_tensor(msg, check_finite=True)
