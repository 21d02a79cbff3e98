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
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]

class Grouping(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GROUPING_POLICY: _ClassVar[Grouping]
    GROUPING_PREDICTED_LABEL: _ClassVar[Grouping]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
GROUPING_POLICY: Grouping
GROUPING_PREDICTED_LABEL: Grouping

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelFingerprint(_message.Message):
    __slots__ = ("architecture", "hidden_size", "vocab_size", "num_layers", "weights_sha256", "weights_sha256_by_dtype")
    class WeightsSha256ByDtypeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_BY_DTYPE_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    weights_sha256: str
    weights_sha256_by_dtype: _containers.ScalarMap[str, str]
    def __init__(self, architecture: _Optional[str] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., weights_sha256: _Optional[str] = ..., weights_sha256_by_dtype: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StatisticSpec(_message.Message):
    __slots__ = ("kind", "dim", "normalization", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    dim: int
    normalization: str
    params: _containers.ScalarMap[str, str]
    def __init__(self, kind: _Optional[str] = ..., dim: _Optional[int] = ..., normalization: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class TargetModule(_message.Message):
    __slots__ = ("name", "d_in", "d_out")
    NAME_FIELD_NUMBER: _ClassVar[int]
    D_IN_FIELD_NUMBER: _ClassVar[int]
    D_OUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    d_in: int
    d_out: int
    def __init__(self, name: _Optional[str] = ..., d_in: _Optional[int] = ..., d_out: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_rows", "max_clusters", "max_message_bytes")
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_rows: int
    max_clusters: int
    max_message_bytes: int
    def __init__(self, max_rows: _Optional[int] = ..., max_clusters: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("artifact_id", "artifact_sha256", "base_model", "statistic", "targets", "rank", "scaling", "dtypes", "limits", "mixture", "grouping")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MIXTURE_FIELD_NUMBER: _ClassVar[int]
    GROUPING_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    artifact_sha256: str
    base_model: ModelFingerprint
    statistic: StatisticSpec
    targets: _containers.RepeatedCompositeFieldContainer[TargetModule]
    rank: int
    scaling: float
    dtypes: _containers.RepeatedScalarFieldContainer[DType]
    limits: Limits
    mixture: MixtureLayout
    grouping: Grouping
    def __init__(self, artifact_id: _Optional[str] = ..., artifact_sha256: _Optional[str] = ..., base_model: _Optional[_Union[ModelFingerprint, _Mapping]] = ..., statistic: _Optional[_Union[StatisticSpec, _Mapping]] = ..., targets: _Optional[_Iterable[_Union[TargetModule, _Mapping]]] = ..., rank: _Optional[int] = ..., scaling: _Optional[float] = ..., dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., mixture: _Optional[_Union[MixtureLayout, _Mapping]] = ..., grouping: _Optional[_Union[Grouping, str]] = ...) -> None: ...

class MixtureLayout(_message.Message):
    __slots__ = ("bases",)
    BASES_FIELD_NUMBER: _ClassVar[int]
    bases: int
    def __init__(self, bases: _Optional[int] = ...) -> None: ...

class FixedK(_message.Message):
    __slots__ = ("k",)
    K_FIELD_NUMBER: _ClassVar[int]
    k: int
    def __init__(self, k: _Optional[int] = ...) -> None: ...

class AutoK(_message.Message):
    __slots__ = ("max_k", "min_cluster_size")
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MIN_CLUSTER_SIZE_FIELD_NUMBER: _ClassVar[int]
    max_k: int
    min_cluster_size: int
    def __init__(self, max_k: _Optional[int] = ..., min_cluster_size: _Optional[int] = ...) -> None: ...

class PerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusteringPolicy(_message.Message):
    __slots__ = ("fixed", "auto", "per_request")
    FIXED_FIELD_NUMBER: _ClassVar[int]
    AUTO_FIELD_NUMBER: _ClassVar[int]
    PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    fixed: FixedK
    auto: AutoK
    per_request: PerRequest
    def __init__(self, fixed: _Optional[_Union[FixedK, _Mapping]] = ..., auto: _Optional[_Union[AutoK, _Mapping]] = ..., per_request: _Optional[_Union[PerRequest, _Mapping]] = ...) -> None: ...

class AdaptRequest(_message.Message):
    __slots__ = ("request_ids", "statistics", "clustering", "dtype", "held_adapter_keys", "compact")
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    CLUSTERING_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HELD_ADAPTER_KEYS_FIELD_NUMBER: _ClassVar[int]
    COMPACT_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    statistics: Tensor
    clustering: ClusteringPolicy
    dtype: DType
    held_adapter_keys: _containers.RepeatedScalarFieldContainer[str]
    compact: bool
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ..., statistics: _Optional[_Union[Tensor, _Mapping]] = ..., clustering: _Optional[_Union[ClusteringPolicy, _Mapping]] = ..., dtype: _Optional[_Union[DType, str]] = ..., held_adapter_keys: _Optional[_Iterable[str]] = ..., compact: _Optional[bool] = ...) -> None: ...

class ModuleAdapter(_message.Message):
    __slots__ = ("module", "a", "b")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    module: str
    a: Tensor
    b: Tensor
    def __init__(self, module: _Optional[str] = ..., a: _Optional[_Union[Tensor, _Mapping]] = ..., b: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ClusterAdapter(_message.Message):
    __slots__ = ("index", "size", "adapter_key", "omitted", "modules", "basis_weights")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_KEY_FIELD_NUMBER: _ClassVar[int]
    OMITTED_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    BASIS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    size: int
    adapter_key: str
    omitted: bool
    modules: _containers.RepeatedCompositeFieldContainer[ModuleAdapter]
    basis_weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, index: _Optional[int] = ..., size: _Optional[int] = ..., adapter_key: _Optional[str] = ..., omitted: _Optional[bool] = ..., modules: _Optional[_Iterable[_Union[ModuleAdapter, _Mapping]]] = ..., basis_weights: _Optional[_Iterable[float]] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("decode", "cluster", "hypernetwork", "encode", "total")
    DECODE_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    HYPERNETWORK_FIELD_NUMBER: _ClassVar[int]
    ENCODE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    decode: float
    cluster: float
    hypernetwork: float
    encode: float
    total: float
    def __init__(self, decode: _Optional[float] = ..., cluster: _Optional[float] = ..., hypernetwork: _Optional[float] = ..., encode: _Optional[float] = ..., total: _Optional[float] = ...) -> None: ...

class AdaptResponse(_message.Message):
    __slots__ = ("assignments", "clusters", "timings", "artifact_id", "bases_key", "bases", "grouping")
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    BASES_KEY_FIELD_NUMBER: _ClassVar[int]
    BASES_FIELD_NUMBER: _ClassVar[int]
    GROUPING_FIELD_NUMBER: _ClassVar[int]
    assignments: _containers.RepeatedScalarFieldContainer[int]
    clusters: _containers.RepeatedCompositeFieldContainer[ClusterAdapter]
    timings: StageTimings
    artifact_id: str
    bases_key: str
    bases: _containers.RepeatedCompositeFieldContainer[ModuleAdapter]
    grouping: Grouping
    def __init__(self, assignments: _Optional[_Iterable[int]] = ..., clusters: _Optional[_Iterable[_Union[ClusterAdapter, _Mapping]]] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., artifact_id: _Optional[str] = ..., bases_key: _Optional[str] = ..., bases: _Optional[_Iterable[_Union[ModuleAdapter, _Mapping]]] = ..., grouping: _Optional[_Union[Grouping, str]] = ...) -> None: ...
