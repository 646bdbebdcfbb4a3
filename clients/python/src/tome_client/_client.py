"""The client: one gRPC channel to a tome coordinator, calls with retries, replies as numpy."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, Union
from urllib.parse import urlsplit

import grpc
import numpy as np

from ._errors import TomeError
from ._proto.tome.v1 import tome_pb2 as pb
from ._proto.tome.v1 import tome_pb2_grpc as pb_grpc
from ._tensors import decode_tensor
from ._types import (
    DTYPE_PB,
    LAYOUT_PB,
    POOLING_PB,
    POSITIONS_PB,
    PRECISION_PB,
    Accepted,
    Attention,
    Done,
    Dtype,
    Embeddings,
    Info,
    Layout,
    Pooling,
    Positions,
    Precision,
    Tokens,
    parse_enum,
)

#: A document: text (str, or UTF-8 bytes), or token ids (a sequence or 1-D array of ints).
Document = Union[str, bytes, Sequence[int], np.ndarray]
#: PEM contents (bytes, or a str starting with "-----BEGIN"), or the path of a PEM file.
Pem = Union[bytes, str, "os.PathLike[str]"]

#: The metadata key of a refusal for now: seconds to wait before calling again.
RETRY_AFTER = "retry-after"

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """When a call refused for now is made again.

    A server that is busy answers RESOURCE_EXHAUSTED with `retry-after` metadata (seconds); the
    client waits that long (at most `max_wait_seconds`) and calls again, up to `max_attempts`
    calls in all, and never waits past `total_seconds` after the first call began. Refusals
    for good (RESOURCE_EXHAUSTED without `retry-after`, e.g. a document over the token limit)
    and every other code raise TomeError at once, as does a stream that already delivered
    events (its retry would repeat them). `RetryPolicy(max_attempts=1)` never retries.
    """

    max_attempts: int = 5
    total_seconds: float = 120.0
    max_wait_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be at least 1")
        if self.total_seconds < 0 or self.max_wait_seconds < 0:
            raise ValueError("RetryPolicy's seconds must not be negative")


def _retry_after(err: grpc.RpcError) -> float | None:
    """The `retry-after` seconds a RESOURCE_EXHAUSTED carries (trailers or headers), if any."""
    if not isinstance(err, grpc.Call) or err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    for metadata in (err.trailing_metadata(), err.initial_metadata()):
        for key, value in metadata or ():
            if key.lower() == RETRY_AFTER:
                try:
                    seconds = float(value if isinstance(value, str) else value.decode())
                except ValueError:
                    return None
                return max(seconds, 0.0)
    return None


def _error(err: grpc.RpcError, attempts: int) -> TomeError:
    if isinstance(err, grpc.Call):
        code, message = err.code(), err.details() or ""
    else:
        code, message = grpc.StatusCode.UNKNOWN, str(err)
    return TomeError(code, message, retry_after=_retry_after(err), attempts=attempts)


def _read_pem(value: Pem | None, what: str) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        with open(value, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {os.fspath(value)!r}: {e.strerror}") from None


def _target(url: str, tls_files: bool) -> tuple[str, bool]:
    """`host:port` and whether to use TLS, from `http://host:port`, `https://host:port`, or a
    bare `host:port` (TLS when certificates were given)."""
    if "://" not in url:
        if not url or "/" in url:
            raise ValueError(f"url: {url!r} is not http://host:port, https://host:port or host:port")
        return url, tls_files
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"url: {url!r} must start with http:// (plaintext) or https:// (TLS)")
    if not parts.netloc or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"url: {url!r} must be just a scheme, host and port")
    if parts.scheme == "http" and tls_files:
        raise ValueError(f"url: {url!r} is plaintext, but TLS certificates were given: use https://")
    return parts.netloc, parts.scheme == "https"


def _document(doc: Document) -> tuple[bytes | None, list[int] | None]:
    """(text bytes, None) or (None, token ids)."""
    if isinstance(doc, str):
        return doc.encode("utf-8"), None
    if isinstance(doc, (bytes, bytearray, memoryview)):
        return bytes(doc), None
    ids = np.asarray(doc)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise TypeError(f"a document is a str, UTF-8 bytes, or a 1-D sequence of int token ids; got an array of shape {ids.shape} and dtype {ids.dtype}")
    return None, [int(i) for i in ids]


class Stream(Iterator[np.ndarray]):
    """Arrays of one document's stream as the server sends them, in document order.

    Iterating yields one array per event: hidden-state rows (float32 or float16 [rows, hidden])
    or log-probs (float32 [values]). `accepted` is set once the plan arrives, `done` once the
    stream ends (for log-probs it holds the perplexity); `collect()` concatenates what is left.
    Leaving a `with` block, `close()`, or dropping the stream cancels the job on the server.
    Raises TomeError for a failed call.
    """

    def __init__(self, events: Iterator[pb.ProcessEvent], field: str) -> None:
        self._events = events
        self._field = field
        self._next_start = 0
        self.accepted: Accepted | None = None
        self.done: Done | None = None
        #: (layers done, layers in all), from the latest progress event.
        self.progress: tuple[int, int] | None = None

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> np.ndarray:
        for event in self._events:
            which = event.WhichOneof("event")
            if which == "accepted":
                self.accepted = Accepted.from_pb(event.accepted)
            elif which == "progress":
                self.progress = (event.progress.layers_done, event.progress.layers_total)
            elif which == "done":
                self.done = Done.from_pb(event.done)
            elif which == self._field == "hidden_states":
                block = event.hidden_states
                rows = decode_tensor(block.states)
                if rows.ndim != 2 or block.token_start != self._next_start:
                    raise ValueError(f"hidden states out of order: rows from {block.token_start} of shape {list(rows.shape)} after {self._next_start} rows")
                self._next_start += rows.shape[0]
                return rows
            elif which == self._field == "log_probs":
                block = event.log_probs
                values = decode_tensor(block.values)
                if values.ndim != 1 or block.token_start != self._next_start:
                    raise ValueError(f"log-probs out of order: values from {block.token_start} of shape {list(values.shape)} after {self._next_start} values")
                self._next_start += values.shape[0]
                return values
        raise StopIteration

    def collect(self) -> np.ndarray:
        """The rest of the stream as one array (all of it when nothing was read yet)."""
        parts = list(self)
        if parts:
            return np.concatenate(parts)
        if self._field == "log_probs":
            return np.zeros((0,), np.float32)
        return np.zeros((0, 0), np.float32)

    def close(self) -> None:
        """Stops reading; the call is cancelled, and with it the job."""
        close = getattr(self._events, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A client of a tome coordinator's `tome.v1.Tome` (`tome run`, `tome serve coordinator`).

    Args:
        url: `http://host:port` (plaintext), `https://host:port` (TLS), or `host:port`.
        api_key: sent as `authorization: Bearer KEY` with every call (servers started with
            `--api-keys-file` refuse calls without one: TomeError UNAUTHENTICATED).
        root_certificates: the CA that signed the server's certificate (PEM bytes or a file);
            default for https: the system's roots.
        client_certificate, client_key: a certificate to present (mutual TLS: a server with
            `--tls-client-ca`).
        timeout: seconds each call may take (a gRPC deadline, which bounds the job on every
            rank); None for no limit. Methods take their own `timeout` too.
        retry: when calls refused for now are made again (RetryPolicy).
        model: the model calls use unless they name one; "" is the server's default.
        upload_threshold_bytes: texts larger than this go up as `ProcessUpload`, in pieces of
            `upload_piece_bytes` (the server's messages are at most `--max-message-bytes`, 64
            MiB by default; 4 MiB is what gRPC clients take without asking).
        max_message_bytes: the largest message this client sends or receives.
        channel_options: more gRPC channel arguments, as `(name, value)` pairs.

    A Client holds one channel; use it from any number of threads, and `close()` it (or use it
    as a context manager) when done.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        root_certificates: Pem | None = None,
        client_certificate: Pem | None = None,
        client_key: Pem | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        model: str = "",
        upload_threshold_bytes: int = 4 << 20,
        upload_piece_bytes: int = 1 << 20,
        max_message_bytes: int = 64 << 20,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if (client_certificate is None) != (client_key is None):
            raise ValueError("client_certificate and client_key go together")
        if upload_threshold_bytes < 0 or upload_piece_bytes < 1:
            raise ValueError("upload_threshold_bytes must be >= 0 and upload_piece_bytes >= 1")
        tls_files = root_certificates is not None or client_certificate is not None
        self.target, self.tls = _target(url, tls_files)
        self.url = f"{'https' if self.tls else 'http'}://{self.target}"
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        self.model = model
        self.upload_threshold_bytes = upload_threshold_bytes
        self.upload_piece_bytes = upload_piece_bytes
        self._metadata: tuple[tuple[str, str], ...] = ()
        if api_key is not None:
            if not api_key or any(c.isspace() for c in api_key):
                raise ValueError("api_key must be a non-empty key without whitespace")
            self._metadata = (("authorization", f"Bearer {api_key}"),)
        options = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes), *channel_options]
        if self.tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(root_certificates, "root_certificates"),
                private_key=_read_pem(client_key, "client_key"),
                certificate_chain=_read_pem(client_certificate, "client_certificate"),
            )
            self._channel = grpc.secure_channel(self.target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(self.target, options=options)
        self._stub = pb_grpc.TomeStub(self._channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    # ---- calls ------------------------------------------------------------------------------

    def info(self, *, timeout: float | None = None) -> Info:
        """What the deployment serves: version, models, default ranks, limits, workers."""
        reply = self._unary(lambda t: self._stub.Info(pb.InfoRequest(), timeout=t, metadata=self._metadata), timeout)
        return Info.from_pb(reply)

    def tokenize(self, text: str | bytes, *, model: str | None = None, timeout: float | None = None) -> Tokens:
        """The ids and character offsets of `text` under a model's tokenizer."""
        if not isinstance(text, (str, bytes)):
            raise TypeError(f"tokenize takes a str or UTF-8 bytes, not {type(text).__name__}")
        data = text.encode("utf-8") if isinstance(text, str) else text
        request = pb.TokenizeRequest(model=self._model(model), text=data)
        reply = self._unary(lambda t: self._stub.Tokenize(request, timeout=t, metadata=self._metadata), timeout)
        ids = np.array(reply.ids, dtype=np.int64)
        offsets = np.array([(s.start, s.end) for s in reply.offsets], dtype=np.int64).reshape(-1, 2)
        return Tokens(ids, offsets)

    def embed(
        self,
        document: Document,
        *,
        model: str | None = None,
        pooling: Pooling | str | None = None,
        normalize: bool | None = None,
        chunk_tokens: int | None = None,
        chunk_spans: Sequence[tuple[int, int]] | None = None,
        attention: Attention | str | None = None,
        positions: Positions | str | None = None,
        ranks: int = 0,
        layout: Layout | str | None = None,
        global_tokens: Sequence[int] = (),
        hidden_layer: int | None = None,
        segment_len: int = 0,
        precision: Precision | str | None = None,
        timeout: float | None = None,
    ) -> Embeddings:
        """A document's embedding and its chunks' (late chunking: each chunk's tokens saw the
        whole document's context as the attention allows).

        Args:
            document: text (str or UTF-8 bytes; large texts are uploaded in pieces), or token
                ids.
            model: a model name from `info()`; default: the client's, else the server's.
            pooling: "mean" or "cls"; default: the model's own.
            normalize: L2-normalise the embeddings; default: what the model's
                sentence-transformers modules say.
            chunk_tokens: tokens per chunk (default 256); or `chunk_spans`: token spans
                [start, end) of your own (they may overlap).
            attention: "dense", "window:W", or an Attention; default: the model's config.
            positions: "tile" to run documents longer than the model's learned positions
                (token p uses learned position p mod max_positions); default "refuse".
            ranks: ranks to spread the document over; 0: the server's default.
            layout: "contiguous" or "zigzag".
            global_tokens: token positions every token attends to (window attention).
            hidden_layer: compute from the hidden states after this many layers (0: the
                embeddings); default: the last.
            segment_len: tokens per segment for segment-recurrent models; 0: the model's.
            precision: the arithmetic, "f32" (exact; the default) or "bf16" (bfloat16 weights
                and attention inputs, f32 accumulation); a model that does not implement it
                refuses the call.
            timeout: seconds for this call; default: the client's.
        """
        options = self._options(
            [pb.OUTPUT_DOCUMENT_EMBEDDING, pb.OUTPUT_CHUNK_EMBEDDINGS],
            pooling=pooling,
            normalize=normalize,
            chunk_tokens=chunk_tokens,
            chunk_spans=chunk_spans,
            attention=attention,
            positions=positions,
            ranks=ranks,
            layout=layout,
            global_tokens=global_tokens,
            hidden_layer=hidden_layer,
            segment_len=segment_len,
            precision=precision,
        )
        accepted: Accepted | None = None
        done: Done | None = None
        document_vector: np.ndarray | None = None
        chunks: list[np.ndarray] = []
        token_spans: list[tuple[int, int]] = []
        char_spans: list[tuple[int, int]] = []
        for event in self._process(document, model, options, timeout):
            which = event.WhichOneof("event")
            if which == "accepted":
                accepted = Accepted.from_pb(event.accepted)
            elif which == "chunk":
                chunk = event.chunk
                if chunk.index != len(chunks):
                    raise ValueError(f"chunk {chunk.index} arrived where chunk {len(chunks)} was due")
                chunks.append(decode_tensor(chunk.embedding).reshape(-1))
                token_spans.append((chunk.tokens.start, chunk.tokens.end))
                char_spans.append((chunk.chars.start, chunk.chars.end) if chunk.HasField("chars") else (-1, -1))
            elif which == "document":
                document_vector = decode_tensor(event.document.embedding).reshape(-1)
            elif which == "done":
                done = Done.from_pb(event.done)
        if accepted is None or done is None or document_vector is None:
            raise TomeError(grpc.StatusCode.DATA_LOSS, "the stream ended without its plan, document embedding or summary")
        width = document_vector.shape[0]
        return Embeddings(
            document=document_vector,
            chunks=np.stack(chunks) if chunks else np.zeros((0, width), np.float32),
            chunk_token_spans=np.array(token_spans, dtype=np.int64).reshape(-1, 2),
            chunk_char_spans=np.array(char_spans, dtype=np.int64).reshape(-1, 2),
            accepted=accepted,
            done=done,
        )

    def hidden_states(
        self,
        document: Document,
        *,
        model: str | None = None,
        dtype: Dtype | str = Dtype.F32,
        attention: Attention | str | None = None,
        positions: Positions | str | None = None,
        ranks: int = 0,
        layout: Layout | str | None = None,
        global_tokens: Sequence[int] = (),
        hidden_layer: int | None = None,
        segment_len: int = 0,
        precision: Precision | str | None = None,
        timeout: float | None = None,
    ) -> Stream:
        """The hidden states of every token, streamed in token order as blocks of rows.

        Returns a Stream yielding [rows, hidden] arrays as they arrive: float32 for dtype "f32"
        and "bf16" (widened exactly), float16 for "f16". `hidden_layer` picks transformers'
        `hidden_states[k]` (0: the embeddings); `dtype` is the element type of the rows on the
        wire, `precision` the arithmetic that computes them; the other options are `embed`'s.
        """
        options = self._options(
            [pb.OUTPUT_HIDDEN_STATES],
            dtype=dtype,
            attention=attention,
            positions=positions,
            ranks=ranks,
            layout=layout,
            global_tokens=global_tokens,
            hidden_layer=hidden_layer,
            segment_len=segment_len,
            precision=precision,
        )
        return Stream(self._process(document, model, options, timeout), "hidden_states")

    def log_probs(
        self,
        document: Document,
        *,
        model: str | None = None,
        attention: Attention | str | None = None,
        positions: Positions | str | None = None,
        ranks: int = 0,
        layout: Layout | str | None = None,
        global_tokens: Sequence[int] = (),
        segment_len: int = 0,
        precision: Precision | str | None = None,
        timeout: float | None = None,
    ) -> Stream:
        """A causal language model's log p(token t+1 | tokens <= t) for every t, streamed in
        order as float32 blocks; the stream's `done.perplexity` is the document's perplexity."""
        options = self._options(
            [pb.OUTPUT_LOG_PROBS],
            attention=attention,
            positions=positions,
            ranks=ranks,
            layout=layout,
            global_tokens=global_tokens,
            segment_len=segment_len,
            precision=precision,
        )
        return Stream(self._process(document, model, options, timeout), "log_probs")

    def process_events(self, request: pb.ProcessRequest, *, timeout: float | None = None) -> Iterator[pb.ProcessEvent]:
        """The raw `tome.v1.ProcessEvent`s of a request built by hand (uploaded when its text
        is over the threshold), with this client's key, retries and errors."""
        text = request.text if request.WhichOneof("input") == "text" else None
        if text is not None and len(text) > self.upload_threshold_bytes:
            opening = pb.ProcessRequest()
            opening.CopyFrom(request)
            opening.ClearField("text")
            return self._streaming(lambda t: self._stub.ProcessUpload(self._upload(opening, text), timeout=t, metadata=self._metadata), timeout)
        return self._streaming(lambda t: self._stub.Process(request, timeout=t, metadata=self._metadata), timeout)

    # ---- plumbing ---------------------------------------------------------------------------

    def _model(self, model: str | None) -> str:
        return self.model if model is None else model

    def _options(
        self,
        outputs: Sequence[pb.Output],
        *,
        pooling: Pooling | str | None = None,
        normalize: bool | None = None,
        chunk_tokens: int | None = None,
        chunk_spans: Sequence[tuple[int, int]] | None = None,
        attention: Attention | str | None = None,
        positions: Positions | str | None = None,
        ranks: int = 0,
        layout: Layout | str | None = None,
        global_tokens: Sequence[int] = (),
        dtype: Dtype | str | None = None,
        hidden_layer: int | None = None,
        segment_len: int = 0,
        precision: Precision | str | None = None,
    ) -> pb.ProcessOptions:
        o = pb.ProcessOptions(outputs=outputs, ranks=ranks, segment_len=segment_len, global_tokens=[int(g) for g in global_tokens])
        if pooling is not None:
            o.pooling = POOLING_PB[parse_enum(Pooling, pooling, "pooling")]
        if normalize is not None:
            o.normalize = bool(normalize)
        if chunk_tokens is not None and chunk_spans is not None:
            raise ValueError("give chunk_tokens or chunk_spans, not both")
        if chunk_tokens is not None:
            o.chunks.tokens_per_chunk = chunk_tokens
        if chunk_spans is not None:
            o.chunks.spans.SetInParent()
            for start, end in chunk_spans:
                o.chunks.spans.spans.add(start=start, end=end)
        if attention is not None:
            o.attention.CopyFrom(Attention.parse(attention).to_pb())
        if positions is not None:
            o.position_extension = POSITIONS_PB[parse_enum(Positions, positions, "positions")]
        if layout is not None:
            o.layout = LAYOUT_PB[parse_enum(Layout, layout, "layout")]
        if dtype is not None:
            o.hidden_dtype = DTYPE_PB[parse_enum(Dtype, dtype, "dtype")]
        if hidden_layer is not None:
            o.hidden_layer = hidden_layer
        if precision is not None:
            o.precision = PRECISION_PB[parse_enum(Precision, precision, "precision")]
        return o

    def _process(self, document: Document, model: str | None, options: pb.ProcessOptions, timeout: float | None) -> Iterator[pb.ProcessEvent]:
        text, ids = _document(document)
        request = pb.ProcessRequest(model=self._model(model), options=options)
        if text is not None:
            request.text = text
        else:
            request.token_ids.ids.extend(ids or [])
        return self.process_events(request, timeout=timeout)

    def _upload(self, opening: pb.ProcessRequest, text: bytes) -> Iterator[pb.UploadChunk]:
        """An upload: the request without its text, then the text in pieces (split anywhere,
        even inside a character: the server joins the bytes before decoding)."""
        yield pb.UploadChunk(request=opening)
        piece = self.upload_piece_bytes
        for start in range(0, len(text), piece):
            yield pb.UploadChunk(text=text[start : start + piece])

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _wait(self, err: grpc.RpcError, attempts: int, started: float) -> float | None:
        """Seconds to wait before the next attempt, or None to give up with `err`."""
        seconds = _retry_after(err)
        if seconds is None or attempts >= self.retry.max_attempts:
            return None
        seconds = min(seconds, self.retry.max_wait_seconds)
        if time.monotonic() + seconds - started > self.retry.total_seconds:
            return None
        return seconds

    def _unary(self, call: Callable[[float | None], T], timeout: float | None) -> T:
        started, attempts = time.monotonic(), 0
        while True:
            attempts += 1
            try:
                return call(self._deadline(timeout))
            except grpc.RpcError as err:
                wait = self._wait(err, attempts, started)
                if wait is None:
                    raise _error(err, attempts) from None
            time.sleep(wait)

    def _streaming(self, start: Callable[[float | None], Iterable[pb.ProcessEvent]], timeout: float | None) -> Iterator[pb.ProcessEvent]:
        started, attempts = time.monotonic(), 0
        while True:
            attempts += 1
            call = start(self._deadline(timeout))
            received = False
            finished = False
            try:
                for event in call:
                    received = True
                    yield event
                finished = True
                return
            except grpc.RpcError as err:
                finished = True
                wait = None if received else self._wait(err, attempts, started)
                if wait is None:
                    raise _error(err, attempts) from None
            finally:
                if not finished and isinstance(call, grpc.Future):
                    call.cancel()
            time.sleep(wait)
