"""Tensor codec for the ``moevit.rpc.v1.Tensor`` message, shared by the coordinator and the workers.

Wire format: ``data`` holds the raw elements, C-contiguous (row-major) and little-endian; ``shape`` lists the
dimensions; ``dtype`` says the element type (FLOAT32, FLOAT16 or BFLOAT16). Decoding always yields float32.
The token codecs of :mod:`moevit_rpc.codecs` (``int8``, ``int4``, ``+zstd``) add ``scales``, ``group_size`` and
``compression``; :func:`tensor_to_proto` takes any codec name, :func:`codec_of` names a message's codec.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from moevit_rpc import codecs
from moevit_rpc.v1 import expert_pb2

__all__ = ["DTYPES", "codec_of", "tensor_to_proto", "proto_to_tensor"]

# Wire dtype name -> (enum value, torch dtype on the wire).
DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "fp32": (expert_pb2.FLOAT32, torch.float32),
    "fp16": (expert_pb2.FLOAT16, torch.float16),
    "bf16": (expert_pb2.BFLOAT16, torch.bfloat16),
}
_ENUM_TO_TORCH: dict[int, torch.dtype] = {enum: td for enum, td in DTYPES.values()}
_BASE_ENUM = {"fp32": expert_pb2.FLOAT32, "fp16": expert_pb2.FLOAT16, "bf16": expert_pb2.BFLOAT16,
              "int8": expert_pb2.INT8, "int4": expert_pb2.INT4}
_ENUM_BASE = {enum: base for base, enum in _BASE_ENUM.items()}

if sys.byteorder != "little":  # pragma: no cover - every supported edge device is little-endian
    raise ImportError("moevit_rpc.tensors assumes a little-endian host (wire format is little-endian)")


def tensor_to_proto(t: torch.Tensor, dtype: str = "fp32") -> expert_pb2.Tensor:
    """Encode ``t`` as a Tensor message with elements of ``dtype`` ('fp32', 'fp16' or 'bf16'), or with any codec
    of :mod:`moevit_rpc.codecs` ('int8', 'int4+zstd', ...; tokens [n, C], quantised per row or group of C).

    ``t`` may live on any device and have any floating or integer dtype; it is detached, moved to the CPU,
    converted (rounding to nearest for fp16/bf16) and made contiguous. fp32 is bit exact.
    """
    if dtype not in DTYPES:
        try:
            codec = codecs.parse_codec(dtype)
        except ValueError:
            raise ValueError(f"unknown wire dtype {dtype!r}; expected one of {list(codecs.CODEC_NAMES)}") from None
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError("cannot encode a 0-d tensor: the wire format needs a non-empty shape")
        enc = codecs.encode(t.detach().to(device="cpu", dtype=torch.float32).numpy(), codec)
        return expert_pb2.Tensor(data=enc.data, shape=list(enc.shape), dtype=_BASE_ENUM[codec.base],
                                 scales=enc.scales, group_size=codec.group,
                                 compression=expert_pb2.ZSTD if codec.zstd else expert_pb2.COMPRESSION_NONE)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 0:
        raise ValueError("cannot encode a 0-d tensor: the wire format needs a non-empty shape")
    enum, torch_dtype = DTYPES[dtype]
    wire = t.detach().to(device="cpu", dtype=torch_dtype).contiguous()
    # numpy has no bfloat16: reinterpret the 2-byte elements as int16 (same bytes) before taking them.
    raw = wire.view(torch.int16) if torch_dtype == torch.bfloat16 else wire
    return expert_pb2.Tensor(data=raw.numpy().tobytes(), shape=list(wire.shape), dtype=enum)


def proto_to_tensor(msg: expert_pb2.Tensor, *, check_finite: bool = False) -> torch.Tensor:
    """Decode a Tensor message into a float32 CPU tensor.

    Raises ValueError when the dtype is unknown or unspecified, the shape is empty or has a negative entry,
    the byte count differs from prod(shape) * element size, or (with ``check_finite``) any element is NaN/Inf.
    The result owns its memory (it never aliases the message's immutable ``bytes``) and is writable.
    """
    torch_dtype = _ENUM_TO_TORCH.get(msg.dtype)
    if torch_dtype is None and msg.dtype not in _ENUM_BASE:
        name = expert_pb2.DType.Name(msg.dtype) if msg.dtype in expert_pb2.DType.values() else str(msg.dtype)
        raise ValueError(f"unsupported tensor dtype {name}; expected one of FLOAT32, FLOAT16, BFLOAT16, INT8, INT4")
    shape = tuple(int(d) for d in msg.shape)
    if not shape:
        raise ValueError("tensor shape is empty; expected at least one dimension")
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {list(shape)} has a negative dimension")
    if torch_dtype is None or msg.compression or msg.scales or msg.group_size:
        out = _decode_codec(msg, shape)
        if check_finite and not np.isfinite(out.numpy()).all():
            bad = int((~torch.isfinite(out)).sum())
            raise ValueError(f"tensor of shape {list(shape)} has {bad} non-finite (NaN/Inf) element(s)")
        return out
    numel = math.prod(shape)
    itemsize = torch_dtype.itemsize
    data = msg.data
    if len(data) != numel * itemsize:
        raise ValueError(
            f"tensor data is {len(data)} bytes but shape {list(shape)} of {expert_pb2.DType.Name(msg.dtype)} "
            f"needs {numel} x {itemsize} = {numel * itemsize} bytes"
        )
    if numel == 0:
        return torch.empty(shape, dtype=torch.float32)
    out = _decode_float32(data, torch_dtype).view(shape)
    # numpy's isfinite on the same memory: a few microseconds where torch's reduction costs ~15 us per call, and
    # a worker checks every tensor of every request
    if check_finite and not np.isfinite(out.numpy()).all():
        bad = int((~torch.isfinite(out)).sum())
        raise ValueError(f"tensor of shape {list(shape)} has {bad} non-finite (NaN/Inf) element(s)")
    return out


def codec_of(msg: expert_pb2.Tensor) -> str:
    """The codec name of a Tensor message ('fp16', 'int8+zstd', ...): what a worker answers it in. ValueError for
    a dtype or compression this implementation does not know."""
    base = _ENUM_BASE.get(msg.dtype)
    if base is None or msg.compression not in (expert_pb2.COMPRESSION_NONE, expert_pb2.ZSTD):
        raise ValueError(f"unsupported tensor dtype {msg.dtype} / compression {msg.compression}")
    return base + ("+zstd" if msg.compression == expert_pb2.ZSTD else "")


def _decode_codec(msg: expert_pb2.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A message using scales, groups or compression, through :func:`moevit_rpc.codecs.decode`."""
    if msg.compression not in (expert_pb2.COMPRESSION_NONE, expert_pb2.ZSTD):
        raise ValueError(f"unsupported tensor compression {msg.compression}; expected COMPRESSION_NONE or ZSTD")
    base = _ENUM_BASE[msg.dtype]
    if base not in ("int8", "int4") and (msg.scales or msg.group_size):
        raise ValueError(f"a {expert_pb2.DType.Name(msg.dtype)} tensor carries scales or a group size; only "
                         "INT8 and INT4 have them")
    if len(shape) > 8 or math.prod(shape) > 1 << 31:
        raise ValueError(f"tensor shape {list(shape)} is too large to decode")
    codec = codecs.Codec(base, msg.compression == expert_pb2.ZSTD, int(msg.group_size))
    x = codecs.decode(codecs.Encoded(codec, shape, msg.data, msg.scales))
    return torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(shape))


# float16 payloads from this size up are widened by torch (vectorised) rather than numpy (crossover ~2K elements).
_TORCH_HALF_MIN_BYTES = 4096


def _decode_float32(data: bytes, torch_dtype: torch.dtype) -> torch.Tensor:
    """1-d float32 tensor, owning its memory, from little-endian raw elements.

    float32 and bfloat16 bytes are viewed in place (``np.frombuffer``, no copy) and converted straight into one
    new float32 buffer. numpy does the viewing because ``torch.frombuffer`` on immutable ``bytes`` warns about a
    non-writable buffer, and a tensor aliasing the message would be unsafe to modify. float16 goes through a
    writable copy and torch's vectorised conversion instead (see below).
    """
    if torch_dtype == torch.float32:
        return torch.from_numpy(np.frombuffer(data, dtype="<f4").copy())
    if torch_dtype == torch.float16:
        if len(data) < _TORCH_HALF_MIN_BYTES:  # small: numpy's lower fixed cost wins
            return torch.from_numpy(np.frombuffer(data, dtype="<f2").astype(np.float32))
        # torch widens half to float with SIMD; numpy converts one element at a time (4x slower at 16K elements,
        # the largest single cost of decoding a batch's tokens). torch only views writable memory without a
        # warning, so the bytes are first copied into a bytearray (a memcpy, cheap next to the conversion).
        return torch.frombuffer(bytearray(data), dtype=torch.float16).to(torch.float32)
    # bfloat16 is the upper 16 bits of a float32: widen to uint32 and shift (exact, NaN/Inf included).
    wide = np.frombuffer(data, dtype="<u2").astype(np.uint32)
    np.left_shift(wide, 16, out=wide)
    return torch.from_numpy(wide.view(np.float32))
