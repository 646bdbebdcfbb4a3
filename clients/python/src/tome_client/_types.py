"""The values the client takes and returns: options as Python enums (strings accepted too) and
replies as frozen dataclasses holding numpy arrays."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ._proto.tome.v1 import tome_pb2 as pb


class Pooling(str, enum.Enum):
    """How token states become an embedding (`ProcessOptions.pooling`)."""

    MEAN = "mean"
    CLS = "cls"


class Layout(str, enum.Enum):
    """How tokens are dealt to ranks (`ProcessOptions.layout`); zigzag balances causal models."""

    CONTIGUOUS = "contiguous"
    ZIGZAG = "zigzag"


class Positions(str, enum.Enum):
    """Documents longer than the model's learned positions (`ProcessOptions.position_extension`):
    refuse them, or tile the learned positions (token p uses position p mod max_positions)."""

    REFUSE = "refuse"
    TILE = "tile"


class Dtype(str, enum.Enum):
    """Element type of hidden states on the wire (`ProcessOptions.hidden_dtype`). The client
    returns f32 and bf16 as float32 arrays (bf16 widened exactly), f16 as float16."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"


class Precision(str, enum.Enum):
    """The arithmetic of the computation (`ProcessOptions.precision`; not the element type of
    outputs, which is `Dtype`): f32 is exact; bf16 stores weights and attention inputs in
    bfloat16 with f32 accumulation; f16 does so in IEEE half precision, on GPU ranks only. A
    model that does not implement it refuses the request (INVALID_ARGUMENT);
    `ModelInfo.precisions` and `ModelInfo.gpu_precisions` list what each model runs in."""

    F32 = "f32"
    BF16 = "bf16"
    F16 = "f16"


class AttentionKind(str, enum.Enum):
    """`AttentionOverride.kind`. Requests override with dense or window; the others are what
    checkpoints select, and servers refuse them as overrides."""

    DENSE = "dense"
    WINDOW = "window"
    BLOCK_SPARSE = "block_sparse"
    FAVOR = "favor"
    NATIVE = "native"


E = TypeVar("E", bound=enum.Enum)


def parse_enum(kind: type[E], value: E | str, what: str) -> E:
    """`value` as a member of `kind`: the member itself, or its value or name in any case."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        wanted = value.strip().lower().replace("-", "_")
        for member in kind:
            if wanted in (str(member.value).lower(), member.name.lower()):
                return member
    choices = ", ".join(repr(m.value) for m in kind)
    raise ValueError(f"{what}: {value!r} is not one of {choices}")


POOLING_PB = {Pooling.MEAN: pb.POOLING_MEAN, Pooling.CLS: pb.POOLING_CLS}
LAYOUT_PB = {Layout.CONTIGUOUS: pb.LAYOUT_CONTIGUOUS, Layout.ZIGZAG: pb.LAYOUT_ZIGZAG}
POSITIONS_PB = {Positions.REFUSE: pb.POSITION_EXTENSION_UNSPECIFIED, Positions.TILE: pb.POSITION_EXTENSION_TILE}
DTYPE_PB = {Dtype.F32: pb.ELEMENT_TYPE_F32, Dtype.F16: pb.ELEMENT_TYPE_F16, Dtype.BF16: pb.ELEMENT_TYPE_BF16}
PRECISION_PB = {Precision.F32: pb.PRECISION_F32, Precision.BF16: pb.PRECISION_BF16, Precision.F16: pb.PRECISION_F16}
ATTENTION_PB = {
    AttentionKind.DENSE: pb.ATTENTION_KIND_DENSE,
    AttentionKind.WINDOW: pb.ATTENTION_KIND_WINDOW,
    AttentionKind.BLOCK_SPARSE: pb.ATTENTION_KIND_BLOCK_SPARSE,
    AttentionKind.FAVOR: pb.ATTENTION_KIND_FAVOR,
    AttentionKind.NATIVE: pb.ATTENTION_KIND_NATIVE,
}
LAYOUT_NAMES = {pb.LAYOUT_UNSPECIFIED: "", pb.LAYOUT_CONTIGUOUS: "contiguous", pb.LAYOUT_ZIGZAG: "zigzag"}


@dataclass(frozen=True)
class Attention:
    """An attention override for every layer (`ProcessOptions.attention`).

    `Attention.parse("dense")`, `Attention.parse("window:512")` (each token sees 256 tokens on
    either side), or the fields themselves for what a string cannot say.
    """

    kind: AttentionKind
    window: int = 0
    block_size: int = 0
    random_blocks: int = 0
    features: int = 0
    causal: bool = False
    native: str = ""

    @classmethod
    def parse(cls, spec: Attention | str) -> Attention:
        """`"dense"`, `"window:W"` (W even), or another kind's name; an Attention as it is."""
        if isinstance(spec, Attention):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"attention: expected a string such as 'window:512' or an Attention, got {type(spec).__name__}")
        name, _, arg = spec.strip().partition(":")
        kind = parse_enum(AttentionKind, name, "attention")
        if kind is AttentionKind.WINDOW:
            if not arg.isdigit() or int(arg) <= 0:
                raise ValueError(f"attention: {spec!r} needs a positive window, e.g. 'window:512'")
            return cls(kind, window=int(arg))
        if arg:
            raise ValueError(f"attention: {spec!r} takes no ':' argument (only 'window:W' does)")
        return cls(kind)

    def to_pb(self) -> pb.AttentionOverride:
        return pb.AttentionOverride(
            kind=ATTENTION_PB[parse_enum(AttentionKind, self.kind, "attention")],
            window=self.window,
            block_size=self.block_size,
            random_blocks=self.random_blocks,
            features=self.features,
            causal=self.causal,
            native=self.native,
        )


@dataclass(frozen=True)
class Limits:
    """What a deployment takes (`InfoResponse.limits`)."""

    max_document_tokens: int
    max_document_bytes: int
    max_ranks: int
    max_concurrent_jobs: int
    max_tokens_in_flight: int
    max_queued_requests: int
    max_queued_tokens: int
    max_jobs_per_caller: int


@dataclass(frozen=True)
class ModelInfo:
    """A model a deployment serves (`ModelInfo`)."""

    name: str
    architecture: str
    hidden_size: int
    num_layers: int
    #: Positions the checkpoint learned; 0 when positions are relative or computed.
    max_positions: int
    default_pooling: str
    layer_attention: tuple[str, ...]
    has_tokenizer: bool
    #: A causal language model: it scores tokens (`Client.log_probs`).
    causal: bool
    #: The precisions it runs in on CPU ranks ("f32", "bf16").
    precisions: tuple[str, ...]
    #: The precisions it runs in on GPU ranks ("f32", "bf16", "f16"); empty when it does not
    #: run on GPUs.
    gpu_precisions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Info:
    """What a deployment serves (`Tome.Info`)."""

    version: str
    models: tuple[ModelInfo, ...]
    default_ranks: int
    limits: Limits
    #: "embedded" (ranks are threads of the coordinator) or "cluster".
    backend: str
    #: A cluster's live workers, as "name@address".
    workers: tuple[str, ...]
    #: The server CPU's bf16 product kernel: "avx512_bf16", "avx512_fma" (the same bits from
    #: FMAs, where faster) or "portable" (correct, slower).
    bf16_kernel: str

    @classmethod
    def from_pb(cls, r: pb.InfoResponse) -> Info:
        models = tuple(
            ModelInfo(
                name=m.name,
                architecture=m.architecture,
                hidden_size=m.hidden_size,
                num_layers=m.num_layers,
                max_positions=m.max_positions,
                default_pooling=m.default_pooling,
                layer_attention=tuple(m.layer_attention),
                has_tokenizer=m.has_tokenizer,
                causal=m.causal,
                precisions=tuple(m.precisions),
                gpu_precisions=tuple(m.gpu_precisions),
            )
            for m in r.models
        )
        lim = r.limits
        limits = Limits(
            lim.max_document_tokens,
            lim.max_document_bytes,
            lim.max_ranks,
            lim.max_concurrent_jobs,
            lim.max_tokens_in_flight,
            lim.max_queued_requests,
            lim.max_queued_tokens,
            lim.max_jobs_per_caller,
        )
        return cls(r.version, models, r.default_ranks, limits, r.backend, tuple(r.workers), r.bf16_kernel)


@dataclass(frozen=True)
class Tokens:
    """A text's tokens (`Tome.Tokenize`): ids (int64 [n]) and each token's character offsets
    in the text (int64 [n, 2], half-open)."""

    ids: np.ndarray
    offsets: np.ndarray


@dataclass(frozen=True)
class Accepted:
    """The plan the server accepted a document with (the stream's first event)."""

    job_id: str
    model: str
    tokens: int
    ranks: int
    layout: str
    #: Tokens each rank holds.
    shard_tokens: tuple[int, ...]
    #: Per layer: "dense" or "window:W".
    layer_attention: tuple[str, ...]

    @classmethod
    def from_pb(cls, a: pb.Accepted) -> Accepted:
        return cls(a.job_id, a.model, a.tokens, a.ranks, LAYOUT_NAMES.get(a.layout, str(a.layout)), tuple(a.shard_tokens), tuple(a.layer_attention))


@dataclass(frozen=True)
class Done:
    """The summary that ends a document's stream."""

    tokens: int
    tokenize_seconds: float
    compute_seconds: float
    total_seconds: float
    #: Element bytes the ranks sent each other.
    bytes_exchanged: int
    #: Bytes the ranks put on the wire for them, framing included.
    wire_bytes_exchanged: int
    #: exp(-mean log-prob), when log-probs were asked.
    perplexity: float | None

    @classmethod
    def from_pb(cls, d: pb.Done) -> Done:
        perplexity = d.perplexity if d.HasField("perplexity") else None
        return cls(d.tokens, d.tokenize_seconds, d.compute_seconds, d.total_seconds, d.bytes_exchanged, d.wire_bytes_exchanged, perplexity)


@dataclass(frozen=True)
class Embeddings:
    """A document's embeddings (`Client.embed`).

    Attributes:
        document: the document embedding, float32 [hidden].
        chunks: chunk embeddings in document order, float32 [chunks, hidden].
        chunk_token_spans: each chunk's tokens, int64 [chunks, 2] (half-open).
        chunk_char_spans: each chunk's characters (Unicode scalar values) in the text, int64
            [chunks, 2]; -1 where the input was token ids.
        accepted: the plan the server ran.
        done: the summary (tokens, timings, bytes between ranks).
    """

    document: np.ndarray
    chunks: np.ndarray
    chunk_token_spans: np.ndarray
    chunk_char_spans: np.ndarray
    accepted: Accepted
    done: Done
