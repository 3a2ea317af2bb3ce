"""Token codecs of the wire: how a [n, C] float32 token matrix becomes bytes and back (pure numpy + zstandard).

A codec name is a base format, optionally followed by ``+zstd`` (a lossless zstandard stage over the element
bytes): ``fp32``, ``fp16``, ``bf16`` (as before: raw elements), ``int8`` (symmetric, one scale per token),
``int4`` (symmetric, one scale per group of :data:`INT4_GROUP` channels, two values per byte), e.g.
``int8+zstd`` (each zstd frame states its size and carries zstd's checksum of its content, so a corrupt payload
is refused rather than decoded into other tokens). Scales travel as float16, rounded *up* so that no value is
clipped: every decoded element is within ``scale / 2`` of the original (the rounding step of a uniform
quantiser), with ``scale = max|x| / 127`` per token for int8 and ``max|x| / 7`` per group for int4.

Each wire format carries a version in the identifiers a worker lists in ``InfoResponse.codecs``
(:func:`wire_ids`: ``int8/1``, ``zstd/1``, ...); a change to a format's bytes gets a new number, so a coordinator
never sends a format a worker would read differently. The functions here know nothing of protobuf or grpc: the
message mapping is :mod:`moevit_rpc.tensors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import zstandard

__all__ = ["BASES", "CODEC_NAMES", "INT4_GROUP", "LEGACY_IDS", "Codec", "Encoded", "decode", "encode",
           "max_abs_error", "nominal_bytes_per_value", "parse_codec", "wire_ids"]

# Base formats and their bytes per element before scales (int4: half a byte).
BASES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}
# Channels per scale of int4: 32 keeps an outlier channel from flattening the whole token (per-token int4 loses
# far more; measured in bench/bench_wire.py) at 1/16 byte of scale per value.
INT4_GROUP = 32
ZSTD_LEVEL = 1  # levels above 1 shrink quantised tokens by < 2 % here and cost 2-4x the CPU
_QMAX = {"int8": 127, "int4": 7}
# Identifiers of the wire formats (name/version). Workers that list no codecs speak the legacy three.
_IDS = {"fp32": "fp32/1", "fp16": "fp16/1", "bf16": "bf16/1", "int8": "int8/1", "int4": "int4/1"}
ZSTD_ID = "zstd/1"
LEGACY_IDS = frozenset({"fp32/1", "fp16/1", "bf16/1"})
CODEC_NAMES = tuple(b + z for z in ("", "+zstd") for b in BASES)
_F16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Codec:
    """A parsed codec name: ``base`` format, ``zstd`` stage, and ``group`` (channels per scale; 0 = per token)."""

    base: str
    zstd: bool = False
    group: int = 0

    @property
    def name(self) -> str:
        return self.base + ("+zstd" if self.zstd else "")

    @property
    def quantised(self) -> bool:
        return self.base in _QMAX

    def __str__(self) -> str:
        return self.name


def parse_codec(text: str) -> Codec:
    """The codec called ``text`` (e.g. ``int8+zstd``); ValueError naming the allowed names otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"expected a codec name (one of {', '.join(CODEC_NAMES)}), got {type(text).__name__}")
    base, plus, stage = text.partition("+")
    if base not in BASES or (plus and stage != "zstd"):
        raise ValueError(f"unknown codec {text!r} (allowed: {', '.join(CODEC_NAMES)})")
    return Codec(base, bool(plus), INT4_GROUP if base == "int4" else 0)


def wire_ids(codec: Codec) -> frozenset[str]:
    """The versioned wire-format identifiers a worker must list to take ``codec``."""
    return frozenset({_IDS[codec.base], *((ZSTD_ID,) if codec.zstd else ())})


def all_wire_ids() -> list[str]:
    """Every identifier this implementation speaks (what a worker lists in ``InfoResponse.codecs``)."""
    return [*_IDS.values(), ZSTD_ID]


def nominal_bytes_per_value(codec: Codec, dim: int) -> float:
    """Bytes per token element on the wire before any zstd stage (what zstd must beat), scales included, for
    tokens of ``dim`` channels: 4 (fp32), 2 (fp16, bf16), 1 + 2/dim (int8), 0.5 + 2/32 (int4, dim a multiple of
    32). The zstd stage's gain depends on the tokens: measure it (bench/bench_wire.py)."""
    elem, scales = raw_sizes(codec, (1, dim))
    return (elem + scales) / dim


@dataclass(frozen=True)
class Encoded:
    """A token matrix on the wire: ``data`` (elements, zstd-compressed when ``codec.zstd``), ``scales`` (float16, one
    per token or per group; empty for float formats), and the original ``shape``."""

    codec: Codec
    shape: tuple[int, ...]
    data: bytes
    scales: bytes = b""

    @property
    def nbytes(self) -> int:
        return len(self.data) + len(self.scales)


def _groups(codec: Codec, cols: int) -> tuple[int, int]:
    """(channels per group, groups per row)."""
    g = codec.group if codec.group and codec.group < cols else cols
    return g, max(1, math.ceil(cols / g)) if cols else 0


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """Tokens and channels: the first dimension and the product of the others (a 1-d tensor is one token)."""
    return (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, shape[0] if shape else 0)


def raw_sizes(codec: Codec, shape: tuple[int, ...]) -> tuple[int, int]:
    """(element bytes before compression, scale bytes) of a matrix of ``shape``."""
    rows, cols = _rows_cols(shape)
    if codec.base in ("fp32", "fp16", "bf16"):
        return int(rows * cols * BASES[codec.base]), 0
    g, ng = _groups(codec, cols)
    padded = rows * ng * g
    elem = padded if codec.base == "int8" else (padded + 1) // 2
    return elem, 2 * rows * ng


def _f16_scales_up(scale: np.ndarray) -> np.ndarray:
    """float16 scales not below ``scale`` (rounded up), so quantising with them never clips."""
    s16 = scale.astype(np.float16)
    low = s16.astype(np.float32) < scale
    if low.any():
        s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    return s16


def encode(x: np.ndarray, codec: Codec) -> Encoded:
    """Encode a float token matrix ``x`` ([n, C]; any float dtype) with ``codec``. ValueError when ``x`` holds
    NaN/Inf or values beyond what float16 scales can carry (|x| > 65504 x 127 for int8, x 7 for int4)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    shape = tuple(int(d) for d in x.shape)
    if codec.base == "fp32":
        raw, scales = x.tobytes(), b""
    elif codec.base == "fp16":
        raw, scales = x.astype("<f2").tobytes(), b""
    elif codec.base == "bf16":
        raw, scales = _to_bf16(x).tobytes(), b""
    else:
        q, s16 = _quantise(x.reshape(_rows_cols(shape)), codec)
        raw = (q.astype(np.int8) if codec.base == "int8" else _pack4(q)).tobytes()
        scales = s16.tobytes()
    if codec.zstd:
        raw = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=True).compress(raw)
    return Encoded(codec, shape, raw, scales)


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even bfloat16 bits of float32 ``x`` (NaN kept NaN)."""
    bits = x.view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def _quantise(x_rc: np.ndarray, codec: Codec) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes [rows, groups*g] (int8 range) and float16 scales [rows, groups]."""
    rows, cols = x_rc.shape
    qmax = _QMAX[codec.base]
    g, ng = _groups(codec, cols)
    if ng * g != cols:
        x_rc = np.pad(x_rc, ((0, 0), (0, ng * g - cols)))
    x_rgk = x_rc.reshape(rows, ng, g)
    amax = np.abs(x_rgk).max(axis=2) if g else np.zeros((rows, ng), np.float32)
    if not np.isfinite(amax).all():
        raise ValueError(f"cannot encode {codec.name}: the tokens hold NaN or Inf")
    if amax.size and float(amax.max()) > _F16_MAX * qmax:
        raise ValueError(f"cannot encode {codec.name}: |x| up to {float(amax.max()):.3g} exceeds the float16 scale "
                         f"range ({_F16_MAX * qmax:.3g}); use fp32 or fp16 on this link")
    s16 = _f16_scales_up(amax / qmax)
    s = s16.astype(np.float32)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
    q = np.rint(x_rgk * inv[:, :, None])
    np.clip(q, -qmax, qmax, out=q)  # only rounding noise can reach past qmax (scales are rounded up)
    return q.reshape(rows, ng * g), s16


def _pack4(q: np.ndarray) -> np.ndarray:
    """Two int4 codes (-7..7, stored +8 as 1..15) per byte, low nibble first."""
    flat = (q.reshape(-1) + 8).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(8))
    return flat[0::2] | (flat[1::2] << 4)


def _unpack4(b: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(b.size * 2, dtype=np.int8)
    out[0::2] = (b & 0x0F).view(np.int8)
    out[1::2] = (b >> 4).view(np.int8)
    out -= 8
    return out[:n]


def decode(enc: Encoded) -> np.ndarray:
    """float32 tokens of ``shape`` from an :class:`Encoded`; ValueError naming what is wrong (byte counts, a
    corrupt or oversized compressed payload, a zero-width group layout)."""
    codec, shape = enc.codec, enc.shape
    elem_bytes, scale_bytes = raw_sizes(codec, shape)
    raw = enc.data
    if codec.zstd:
        raw = _decompress(raw, elem_bytes)
    if len(raw) != elem_bytes:
        raise ValueError(f"{codec.base} data is {len(raw)} bytes but shape {list(shape)} needs {elem_bytes}")
    if len(enc.scales) != scale_bytes:
        raise ValueError(f"{codec.base} scales are {len(enc.scales)} bytes but shape {list(shape)} needs "
                         f"{scale_bytes} (float16, one per {'group' if codec.group else 'token'})")
    if codec.base == "fp32":
        return np.frombuffer(raw, dtype="<f4").reshape(shape).copy()
    if codec.base == "fp16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(shape)
    if codec.base == "bf16":
        wide = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
        np.left_shift(wide, 16, out=wide)
        return wide.view(np.float32).reshape(shape)
    rows, cols = _rows_cols(shape)
    g, ng = _groups(codec, cols)
    if codec.base == "int8":
        q = np.frombuffer(raw, dtype=np.int8)
    else:
        q = _unpack4(np.frombuffer(raw, dtype=np.uint8), rows * ng * g)
    s = np.frombuffer(enc.scales, dtype="<f2").astype(np.float32).reshape(rows, ng, 1)
    with np.errstate(invalid="ignore", over="ignore"):  # a hostile inf scale: the caller's finiteness check says so
        x = (q.reshape(rows, ng, g) * s).reshape(rows, ng * g)
    if ng * g != cols:
        x = x[:, :cols]
    return np.ascontiguousarray(x, dtype=np.float32).reshape(shape)


def _decompress(data: bytes, expected: int) -> bytes:
    """zstd frame -> exactly ``expected`` bytes; never allocates more than that (a frame claiming more, or data
    that is not one zstd frame, is a ValueError)."""
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as e:
        raise ValueError(f"corrupt zstd payload ({len(data)} bytes): {e}") from None
    if params.content_size != expected:
        claimed = "unknown" if params.content_size == zstandard.CONTENTSIZE_UNKNOWN else params.content_size
        raise ValueError(f"zstd payload decompresses to {claimed} bytes, the shape needs {expected}")
    # the frame's stated size was checked above, and zstd stops at a frame that runs past it
    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = dobj.decompress(data)
    except zstandard.ZstdError as e:
        raise ValueError(f"corrupt zstd payload ({len(data)} bytes): {e}") from None
    if not dobj.eof:
        raise ValueError(f"corrupt zstd payload ({len(data)} bytes): the frame is cut short")
    if dobj.unused_data:
        raise ValueError(f"zstd payload has {len(dobj.unused_data)} bytes after its frame; expected one frame")
    if len(out) != expected:
        raise ValueError(f"zstd payload decompressed to {len(out)} bytes, the shape needs {expected}")
    return out


def max_abs_error(enc: Encoded) -> np.ndarray:
    """Per token (int8) or per group (int4): the bound ``scale / 2`` on |x - decode(x)|; empty for float formats."""
    if not enc.codec.quantised:
        return np.zeros(0, np.float32)
    return np.frombuffer(enc.scales, dtype="<f2").astype(np.float32) / 2
