from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT4: _ClassVar[DType]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    ZSTD: _ClassVar[Compression]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
INT8: DType
INT4: DType
COMPRESSION_NONE: Compression
ZSTD: Compression

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype", "scales", "group_size", "compression")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    scales: bytes
    group_size: int
    compression: Compression
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., scales: _Optional[bytes] = ..., group_size: _Optional[int] = ..., compression: _Optional[_Union[Compression, str]] = ...) -> None: ...

class ExpertTokens(_message.Message):
    __slots__ = ("expert", "tokens")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    expert: int
    tokens: Tensor
    def __init__(self, expert: _Optional[int] = ..., tokens: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PackedTokens(_message.Message):
    __slots__ = ("experts", "counts", "tokens")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedScalarFieldContainer[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    tokens: Tensor
    def __init__(self, experts: _Optional[_Iterable[int]] = ..., counts: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class RunExpertsRequest(_message.Message):
    __slots__ = ("model_fingerprint", "layer", "batches", "request_id", "packed")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    layer: int
    batches: _containers.RepeatedCompositeFieldContainer[ExpertTokens]
    request_id: str
    packed: PackedTokens
    def __init__(self, model_fingerprint: _Optional[str] = ..., layer: _Optional[int] = ..., batches: _Optional[_Iterable[_Union[ExpertTokens, _Mapping]]] = ..., request_id: _Optional[str] = ..., packed: _Optional[_Union[PackedTokens, _Mapping]] = ...) -> None: ...

class RunExpertsResponse(_message.Message):
    __slots__ = ("outputs", "compute_ms", "request_id", "error_code", "error_message", "packed")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[ExpertTokens]
    compute_ms: float
    request_id: str
    error_code: int
    error_message: str
    packed: PackedTokens
    def __init__(self, outputs: _Optional[_Iterable[_Union[ExpertTokens, _Mapping]]] = ..., compute_ms: _Optional[float] = ..., request_id: _Optional[str] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ..., packed: _Optional[_Union[PackedTokens, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HostedLayer(_message.Message):
    __slots__ = ("layer", "experts", "dim")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    layer: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    dim: int
    def __init__(self, layer: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ..., dim: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_fingerprint", "arch", "layers", "backend", "site", "version", "features", "codecs")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    arch: str
    layers: _containers.RepeatedCompositeFieldContainer[HostedLayer]
    backend: str
    site: str
    version: str
    features: _containers.RepeatedScalarFieldContainer[str]
    codecs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_fingerprint: _Optional[str] = ..., arch: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[HostedLayer, _Mapping]]] = ..., backend: _Optional[str] = ..., site: _Optional[str] = ..., version: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ..., codecs: _Optional[_Iterable[str]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("image", "name", "top_k")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    name: str
    top_k: int
    def __init__(self, image: _Optional[bytes] = ..., name: _Optional[str] = ..., top_k: _Optional[int] = ...) -> None: ...

class ClassPrediction(_message.Message):
    __slots__ = ("index", "label", "probability")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    probability: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("top", "degraded", "model_fingerprint", "latency_ms", "name")
    TOP_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    top: _containers.RepeatedCompositeFieldContainer[ClassPrediction]
    degraded: bool
    model_fingerprint: str
    latency_ms: float
    name: str
    def __init__(self, top: _Optional[_Iterable[_Union[ClassPrediction, _Mapping]]] = ..., degraded: _Optional[bool] = ..., model_fingerprint: _Optional[str] = ..., latency_ms: _Optional[float] = ..., name: _Optional[str] = ...) -> None: ...
