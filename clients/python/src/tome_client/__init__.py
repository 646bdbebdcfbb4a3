"""A typed Python client for tome (`tome.v1.Tome` over gRPC).

    from tome_client import Client

    with Client("http://127.0.0.1:50051", api_key="...") as tome:
        e = tome.embed(open("book.txt").read(), attention="window:512", positions="tile")
        e.document        # float32 [hidden]
        e.chunks          # float32 [chunks, hidden], with e.chunk_token_spans, e.chunk_char_spans
        for rows in tome.hidden_states("a text", dtype="bf16"):
            ...           # float32 [rows, hidden] blocks, in token order, as they arrive
        tome.embed("a text", precision="bf16")   # bfloat16 arithmetic, if the model has it

Errors from the server raise TomeError (its gRPC code and message); calls refused for now
(RESOURCE_EXHAUSTED with `retry-after`) are retried as RetryPolicy says. The generated stubs are
`tome_client.pb` (messages) and `tome_client.pb_grpc` (service stubs and servicer).
"""

from ._client import Client, Document, RetryPolicy, Stream
from ._errors import TomeError
from ._proto.tome.v1 import tome_pb2 as pb
from ._proto.tome.v1 import tome_pb2_grpc as pb_grpc
from ._tensors import bf16_to_f32, decode_tensor, encode_tensor
from ._types import (
    Accepted,
    Attention,
    AttentionKind,
    Done,
    Dtype,
    Embeddings,
    Info,
    Layout,
    Limits,
    ModelInfo,
    Pooling,
    Positions,
    Precision,
    Tokens,
)

__version__ = "0.1.0"

__all__ = [
    "Accepted",
    "Attention",
    "AttentionKind",
    "Client",
    "Document",
    "Done",
    "Dtype",
    "Embeddings",
    "Info",
    "Layout",
    "Limits",
    "ModelInfo",
    "Pooling",
    "Positions",
    "Precision",
    "RetryPolicy",
    "Stream",
    "Tokens",
    "TomeError",
    "bf16_to_f32",
    "decode_tensor",
    "encode_tensor",
    "pb",
    "pb_grpc",
]
