from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_F32: _ClassVar[Precision]
    PRECISION_BF16: _ClassVar[Precision]
    PRECISION_F16: _ClassVar[Precision]

class Output(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_UNSPECIFIED: _ClassVar[Output]
    OUTPUT_DOCUMENT_EMBEDDING: _ClassVar[Output]
    OUTPUT_CHUNK_EMBEDDINGS: _ClassVar[Output]
    OUTPUT_HIDDEN_STATES: _ClassVar[Output]
    OUTPUT_LOG_PROBS: _ClassVar[Output]

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_UNSPECIFIED: _ClassVar[Pooling]
    POOLING_MEAN: _ClassVar[Pooling]
    POOLING_CLS: _ClassVar[Pooling]

class AttentionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTENTION_KIND_UNSPECIFIED: _ClassVar[AttentionKind]
    ATTENTION_KIND_DENSE: _ClassVar[AttentionKind]
    ATTENTION_KIND_WINDOW: _ClassVar[AttentionKind]
    ATTENTION_KIND_BLOCK_SPARSE: _ClassVar[AttentionKind]
    ATTENTION_KIND_FAVOR: _ClassVar[AttentionKind]
    ATTENTION_KIND_NATIVE: _ClassVar[AttentionKind]

class PositionExtension(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POSITION_EXTENSION_UNSPECIFIED: _ClassVar[PositionExtension]
    POSITION_EXTENSION_TILE: _ClassVar[PositionExtension]

class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_UNSPECIFIED: _ClassVar[Layout]
    LAYOUT_CONTIGUOUS: _ClassVar[Layout]
    LAYOUT_ZIGZAG: _ClassVar[Layout]

class ElementType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ELEMENT_TYPE_UNSPECIFIED: _ClassVar[ElementType]
    ELEMENT_TYPE_F32: _ClassVar[ElementType]
    ELEMENT_TYPE_F16: _ClassVar[ElementType]
    ELEMENT_TYPE_BF16: _ClassVar[ElementType]
    ELEMENT_TYPE_I64: _ClassVar[ElementType]
    ELEMENT_TYPE_U8: _ClassVar[ElementType]
    ELEMENT_TYPE_U32: _ClassVar[ElementType]
PRECISION_UNSPECIFIED: Precision
PRECISION_F32: Precision
PRECISION_BF16: Precision
PRECISION_F16: Precision
OUTPUT_UNSPECIFIED: Output
OUTPUT_DOCUMENT_EMBEDDING: Output
OUTPUT_CHUNK_EMBEDDINGS: Output
OUTPUT_HIDDEN_STATES: Output
OUTPUT_LOG_PROBS: Output
POOLING_UNSPECIFIED: Pooling
POOLING_MEAN: Pooling
POOLING_CLS: Pooling
ATTENTION_KIND_UNSPECIFIED: AttentionKind
ATTENTION_KIND_DENSE: AttentionKind
ATTENTION_KIND_WINDOW: AttentionKind
ATTENTION_KIND_BLOCK_SPARSE: AttentionKind
ATTENTION_KIND_FAVOR: AttentionKind
ATTENTION_KIND_NATIVE: AttentionKind
POSITION_EXTENSION_UNSPECIFIED: PositionExtension
POSITION_EXTENSION_TILE: PositionExtension
LAYOUT_UNSPECIFIED: Layout
LAYOUT_CONTIGUOUS: Layout
LAYOUT_ZIGZAG: Layout
ELEMENT_TYPE_UNSPECIFIED: ElementType
ELEMENT_TYPE_F32: ElementType
ELEMENT_TYPE_F16: ElementType
ELEMENT_TYPE_BF16: ElementType
ELEMENT_TYPE_I64: ElementType
ELEMENT_TYPE_U8: ElementType
ELEMENT_TYPE_U32: ElementType

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("version", "models", "default_ranks", "limits", "backend", "workers", "bf16_kernel", "gpus", "gpus_missing")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_RANKS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    BF16_KERNEL_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    GPUS_MISSING_FIELD_NUMBER: _ClassVar[int]
    version: str
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_ranks: int
    limits: Limits
    backend: str
    workers: _containers.RepeatedScalarFieldContainer[str]
    bf16_kernel: str
    gpus: _containers.RepeatedCompositeFieldContainer[GpuDevice]
    gpus_missing: str
    def __init__(self, version: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_ranks: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., backend: _Optional[str] = ..., workers: _Optional[_Iterable[str]] = ..., bf16_kernel: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[GpuDevice, _Mapping]]] = ..., gpus_missing: _Optional[str] = ...) -> None: ...

class GpuDevice(_message.Message):
    __slots__ = ("index", "name", "memory_bytes", "compute_capability")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    memory_bytes: int
    compute_capability: str
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., compute_capability: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "architecture", "hidden_size", "num_layers", "max_positions", "default_pooling", "layer_attention", "has_tokenizer", "causal", "precisions", "gpu_precisions", "gpu_footprints")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POOLING_FIELD_NUMBER: _ClassVar[int]
    LAYER_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    HAS_TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    CAUSAL_FIELD_NUMBER: _ClassVar[int]
    PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    GPU_PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    GPU_FOOTPRINTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    hidden_size: int
    num_layers: int
    max_positions: int
    default_pooling: str
    layer_attention: _containers.RepeatedScalarFieldContainer[str]
    has_tokenizer: bool
    causal: bool
    precisions: _containers.RepeatedScalarFieldContainer[str]
    gpu_precisions: _containers.RepeatedScalarFieldContainer[str]
    gpu_footprints: _containers.RepeatedCompositeFieldContainer[GpuFootprint]
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., max_positions: _Optional[int] = ..., default_pooling: _Optional[str] = ..., layer_attention: _Optional[_Iterable[str]] = ..., has_tokenizer: _Optional[bool] = ..., causal: _Optional[bool] = ..., precisions: _Optional[_Iterable[str]] = ..., gpu_precisions: _Optional[_Iterable[str]] = ..., gpu_footprints: _Optional[_Iterable[_Union[GpuFootprint, _Mapping]]] = ...) -> None: ...

class GpuFootprint(_message.Message):
    __slots__ = ("precision", "weight_bytes", "rank_base_bytes", "rank_bytes_per_token")
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RANK_BASE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RANK_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    precision: str
    weight_bytes: int
    rank_base_bytes: int
    rank_bytes_per_token: int
    def __init__(self, precision: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., rank_base_bytes: _Optional[int] = ..., rank_bytes_per_token: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_document_tokens", "max_document_bytes", "max_ranks", "max_concurrent_jobs", "max_tokens_in_flight", "max_queued_requests", "max_queued_tokens", "max_jobs_per_caller")
    MAX_DOCUMENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_DOCUMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_RANKS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_JOBS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_JOBS_PER_CALLER_FIELD_NUMBER: _ClassVar[int]
    max_document_tokens: int
    max_document_bytes: int
    max_ranks: int
    max_concurrent_jobs: int
    max_tokens_in_flight: int
    max_queued_requests: int
    max_queued_tokens: int
    max_jobs_per_caller: int
    def __init__(self, max_document_tokens: _Optional[int] = ..., max_document_bytes: _Optional[int] = ..., max_ranks: _Optional[int] = ..., max_concurrent_jobs: _Optional[int] = ..., max_tokens_in_flight: _Optional[int] = ..., max_queued_requests: _Optional[int] = ..., max_queued_tokens: _Optional[int] = ..., max_jobs_per_caller: _Optional[int] = ...) -> None: ...

class ProcessRequest(_message.Message):
    __slots__ = ("model", "text", "token_ids", "options")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: bytes
    token_ids: TokenIds
    options: ProcessOptions
    def __init__(self, model: _Optional[str] = ..., text: _Optional[bytes] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., options: _Optional[_Union[ProcessOptions, _Mapping]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ProcessOptions(_message.Message):
    __slots__ = ("outputs", "pooling", "normalize", "chunks", "attention", "position_extension", "ranks", "layout", "global_tokens", "hidden_dtype", "hidden_layer", "segment_len", "precision")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    POSITION_EXTENSION_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DTYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_LAYER_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_LEN_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedScalarFieldContainer[Output]
    pooling: Pooling
    normalize: bool
    chunks: ChunkSpec
    attention: AttentionOverride
    position_extension: PositionExtension
    ranks: int
    layout: Layout
    global_tokens: _containers.RepeatedScalarFieldContainer[int]
    hidden_dtype: ElementType
    hidden_layer: int
    segment_len: int
    precision: Precision
    def __init__(self, outputs: _Optional[_Iterable[_Union[Output, str]]] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., normalize: _Optional[bool] = ..., chunks: _Optional[_Union[ChunkSpec, _Mapping]] = ..., attention: _Optional[_Union[AttentionOverride, _Mapping]] = ..., position_extension: _Optional[_Union[PositionExtension, str]] = ..., ranks: _Optional[int] = ..., layout: _Optional[_Union[Layout, str]] = ..., global_tokens: _Optional[_Iterable[int]] = ..., hidden_dtype: _Optional[_Union[ElementType, str]] = ..., hidden_layer: _Optional[int] = ..., segment_len: _Optional[int] = ..., precision: _Optional[_Union[Precision, str]] = ...) -> None: ...

class ChunkSpec(_message.Message):
    __slots__ = ("tokens_per_chunk", "spans")
    TOKENS_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    tokens_per_chunk: int
    spans: TokenSpans
    def __init__(self, tokens_per_chunk: _Optional[int] = ..., spans: _Optional[_Union[TokenSpans, _Mapping]] = ...) -> None: ...

class TokenSpans(_message.Message):
    __slots__ = ("spans",)
    SPANS_FIELD_NUMBER: _ClassVar[int]
    spans: _containers.RepeatedCompositeFieldContainer[Span]
    def __init__(self, spans: _Optional[_Iterable[_Union[Span, _Mapping]]] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class AttentionOverride(_message.Message):
    __slots__ = ("kind", "window", "block_size", "random_blocks", "features", "causal", "native")
    KIND_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANDOM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    CAUSAL_FIELD_NUMBER: _ClassVar[int]
    NATIVE_FIELD_NUMBER: _ClassVar[int]
    kind: AttentionKind
    window: int
    block_size: int
    random_blocks: int
    features: int
    causal: bool
    native: str
    def __init__(self, kind: _Optional[_Union[AttentionKind, str]] = ..., window: _Optional[int] = ..., block_size: _Optional[int] = ..., random_blocks: _Optional[int] = ..., features: _Optional[int] = ..., causal: _Optional[bool] = ..., native: _Optional[str] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: ElementType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[ElementType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ProcessEvent(_message.Message):
    __slots__ = ("accepted", "progress", "chunk", "document", "hidden_states", "done", "log_probs")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    accepted: Accepted
    progress: Progress
    chunk: ChunkEmbedding
    document: DocumentEmbedding
    hidden_states: HiddenStates
    done: Done
    log_probs: LogProbs
    def __init__(self, accepted: _Optional[_Union[Accepted, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., chunk: _Optional[_Union[ChunkEmbedding, _Mapping]] = ..., document: _Optional[_Union[DocumentEmbedding, _Mapping]] = ..., hidden_states: _Optional[_Union[HiddenStates, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ..., log_probs: _Optional[_Union[LogProbs, _Mapping]] = ...) -> None: ...

class LogProbs(_message.Message):
    __slots__ = ("token_start", "values")
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    token_start: int
    values: Tensor
    def __init__(self, token_start: _Optional[int] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("job_id", "model", "tokens", "ranks", "layout", "shard_tokens", "layer_attention")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SHARD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYER_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model: str
    tokens: int
    ranks: int
    layout: Layout
    shard_tokens: _containers.RepeatedScalarFieldContainer[int]
    layer_attention: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., model: _Optional[str] = ..., tokens: _Optional[int] = ..., ranks: _Optional[int] = ..., layout: _Optional[_Union[Layout, str]] = ..., shard_tokens: _Optional[_Iterable[int]] = ..., layer_attention: _Optional[_Iterable[str]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("layers_done", "layers_total")
    LAYERS_DONE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    layers_done: int
    layers_total: int
    def __init__(self, layers_done: _Optional[int] = ..., layers_total: _Optional[int] = ...) -> None: ...

class ChunkEmbedding(_message.Message):
    __slots__ = ("index", "tokens", "chars", "embedding")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHARS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    index: int
    tokens: Span
    chars: Span
    embedding: Tensor
    def __init__(self, index: _Optional[int] = ..., tokens: _Optional[_Union[Span, _Mapping]] = ..., chars: _Optional[_Union[Span, _Mapping]] = ..., embedding: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DocumentEmbedding(_message.Message):
    __slots__ = ("embedding",)
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    embedding: Tensor
    def __init__(self, embedding: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class HiddenStates(_message.Message):
    __slots__ = ("token_start", "states")
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    token_start: int
    states: Tensor
    def __init__(self, token_start: _Optional[int] = ..., states: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("tokens", "tokenize_seconds", "compute_seconds", "total_seconds", "bytes_exchanged", "wire_bytes_exchanged", "perplexity")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_EXCHANGED_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_EXCHANGED_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    tokenize_seconds: float
    compute_seconds: float
    total_seconds: float
    bytes_exchanged: int
    wire_bytes_exchanged: int
    perplexity: float
    def __init__(self, tokens: _Optional[int] = ..., tokenize_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., bytes_exchanged: _Optional[int] = ..., wire_bytes_exchanged: _Optional[int] = ..., perplexity: _Optional[float] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("request", "text")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    request: ProcessRequest
    text: bytes
    def __init__(self, request: _Optional[_Union[ProcessRequest, _Mapping]] = ..., text: _Optional[bytes] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("model", "text")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: bytes
    def __init__(self, model: _Optional[str] = ..., text: _Optional[bytes] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("ids", "offsets")
    IDS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    offsets: _containers.RepeatedCompositeFieldContainer[Span]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., offsets: _Optional[_Iterable[_Union[Span, _Mapping]]] = ...) -> None: ...
