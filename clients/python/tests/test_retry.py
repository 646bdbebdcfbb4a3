"""The client against an in-process gRPC server implementing tome.v1.Tome from the generated
stubs: retries on RESOURCE_EXHAUSTED as `retry-after` says (and only then), uploads of large
texts, the API key header, and streams decoded as they arrive."""

from __future__ import annotations

import threading
import time
import unittest
from collections import Counter
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np

from tome_client import Client, RetryPolicy, TomeError, encode_tensor, pb, pb_grpc

WIDTH = 4
ROWS_PER_BLOCK = 3


class FakeTome(pb_grpc.TomeServicer):
    """Answers `busy[method]` calls with RESOURCE_EXHAUSTED and `retry-after`, then serves;
    `refuse` makes every call fail with that (code, message, metadata)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.call_times: list[float] = []
        self.busy: Counter[str] = Counter()
        self.retry_after = "1"
        self.refuse: tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]] | None = None
        self.fail_after_accepted: str | None = None
        self.metadata: list[dict[str, str]] = []
        self.uploads: list[list[pb.UploadChunk]] = []
        self.requests: list[pb.ProcessRequest] = []

    def _enter(self, name: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls[name] += 1
            self.call_times.append(time.monotonic())
            self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
            busy = self.busy[name] > 0
            if busy:
                self.busy[name] -= 1
        if busy:
            context.set_trailing_metadata((("retry-after", self.retry_after),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "2 jobs in flight, at most 2")
        if self.refuse is not None:
            code, message, metadata = self.refuse
            if metadata:
                context.set_trailing_metadata(metadata)
            context.abort(code, message)

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        self._enter("Info", context)
        return pb.InfoResponse(version="fake", default_ranks=2, models=[pb.ModelInfo(name="fake-model", hidden_size=WIDTH, causal=True)])

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        self._enter("Tokenize", context)
        words = request.text.split()
        return pb.TokenizeResponse(ids=[len(w) for w in words], offsets=[pb.Span(start=i, end=i + 1) for i in range(len(words))])

    def Process(self, request: pb.ProcessRequest, context: grpc.ServicerContext) -> Iterator[pb.ProcessEvent]:
        self._enter("Process", context)
        self.requests.append(request)
        yield from self._events(request, context)

    def ProcessUpload(self, request_iterator: Iterator[pb.UploadChunk], context: grpc.ServicerContext) -> Iterator[pb.ProcessEvent]:
        parts = list(request_iterator)
        self._enter("ProcessUpload", context)
        self.uploads.append(parts)
        request = pb.ProcessRequest()
        request.CopyFrom(parts[0].request)
        request.text = b"".join(p.text for p in parts[1:])
        yield from self._events(request, context)

    def _events(self, request: pb.ProcessRequest, context: grpc.ServicerContext) -> Iterator[pb.ProcessEvent]:
        """Token i is word i (or id i); its hidden state is [i, i + 0.5, -i, bytes] and its
        log-prob -1/(i+1); the document embedding is [tokens, bytes, 0, 1]."""
        n = len(request.text.split()) if request.WhichOneof("input") == "text" else len(request.token_ids.ids)
        yield pb.ProcessEvent(accepted=pb.Accepted(job_id="job-1", model="fake-model", tokens=n, ranks=2, shard_tokens=[n - n // 2, n // 2]))
        if self.fail_after_accepted is not None:
            context.set_trailing_metadata((("retry-after", "1"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.fail_after_accepted)
        yield pb.ProcessEvent(progress=pb.Progress(layers_done=1, layers_total=1))
        outputs = set(request.options.outputs)
        dtype = request.options.hidden_dtype or pb.ELEMENT_TYPE_F32
        if pb.OUTPUT_HIDDEN_STATES in outputs:
            for start in range(0, n, ROWS_PER_BLOCK):
                i = np.arange(start, min(n, start + ROWS_PER_BLOCK), dtype=np.float32)
                rows = np.stack([i, i + 0.5, -i, np.full_like(i, len(request.text))], axis=1)
                if dtype == pb.ELEMENT_TYPE_F16:
                    tensor = encode_tensor(rows.astype(np.float16))
                else:
                    tensor = encode_tensor(rows, dtype)
                yield pb.ProcessEvent(hidden_states=pb.HiddenStates(token_start=start, states=tensor))
        if pb.OUTPUT_LOG_PROBS in outputs:
            for start in range(0, n - 1, ROWS_PER_BLOCK):
                i = np.arange(start, min(n - 1, start + ROWS_PER_BLOCK), dtype=np.float32)
                yield pb.ProcessEvent(log_probs=pb.LogProbs(token_start=start, values=encode_tensor(-1 / (i + 1))))
        if pb.OUTPUT_CHUNK_EMBEDDINGS in outputs:
            for c, start in enumerate(range(0, n, 2)):
                chunk = pb.ChunkEmbedding(index=c, tokens=pb.Span(start=start, end=min(n, start + 2)), chars=pb.Span(start=10 * c, end=10 * c + 5))
                chunk.embedding.CopyFrom(encode_tensor(np.full(WIDTH, c, np.float32)))
                yield pb.ProcessEvent(chunk=chunk)
        if pb.OUTPUT_DOCUMENT_EMBEDDING in outputs:
            vector = np.array([n, len(request.text), 0, 1], np.float32)
            yield pb.ProcessEvent(document=pb.DocumentEmbedding(embedding=encode_tensor(vector)))
        done = pb.Done(tokens=n, total_seconds=0.01)
        if pb.OUTPUT_LOG_PROBS in outputs:
            done.perplexity = 2.5
        yield pb.ProcessEvent(done=done)


class AgainstAFakeServer(unittest.TestCase):
    def setUp(self) -> None:
        self.fake = FakeTome()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_TomeServicer_to_server(self.fake, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.url = f"http://127.0.0.1:{port}"

    def tearDown(self) -> None:
        self.server.stop(None)

    def client(self, **kwargs: object) -> Client:
        client = Client(self.url, "key-0123456789abcdef", **kwargs)  # type: ignore[arg-type]
        self.addCleanup(client.close)
        return client

    def test_busy_twice_then_served_waits_as_retry_after_says(self) -> None:
        self.fake.busy["Info"] = 2
        started = time.monotonic()
        info = self.client().info()
        elapsed = time.monotonic() - started
        self.assertEqual(info.models[0].name, "fake-model")
        self.assertEqual(self.fake.calls["Info"], 3, "two refusals, then the call that was served")
        gaps = np.diff(self.fake.call_times)
        self.assertTrue(all(0.95 <= g < 2.5 for g in gaps), f"each retry waits the 1 s retry-after: {gaps}")
        self.assertLess(elapsed, 6.0)

    def test_a_stream_refused_for_now_is_retried_before_its_first_event(self) -> None:
        self.fake.busy["Process"] = 2
        started = time.monotonic()
        embeddings = self.client().embed("one two three four five")
        self.assertGreaterEqual(time.monotonic() - started, 1.95)
        self.assertEqual(self.fake.calls["Process"], 3)
        np.testing.assert_array_equal(embeddings.document, [5, 23, 0, 1])
        self.assertEqual(embeddings.chunks.shape, (3, WIDTH))
        np.testing.assert_array_equal(embeddings.chunk_token_spans, [[0, 2], [2, 4], [4, 5]])
        np.testing.assert_array_equal(embeddings.chunk_char_spans, [[0, 5], [10, 15], [20, 25]])
        self.assertEqual((embeddings.accepted.job_id, embeddings.accepted.shard_tokens), ("job-1", (3, 2)))
        self.assertEqual(embeddings.done.tokens, 5)
        self.assertIsNone(embeddings.done.perplexity)

    def test_other_codes_and_refusals_for_good_raise_at_once(self) -> None:
        client = self.client()
        for code, metadata in [
            (grpc.StatusCode.INVALID_ARGUMENT, ()),
            (grpc.StatusCode.UNAUTHENTICATED, ()),
            # RESOURCE_EXHAUSTED without retry-after: too large, for good (e.g. over the token limit).
            (grpc.StatusCode.RESOURCE_EXHAUSTED, ()),
            # retry-after on another code is not a refusal for now either.
            (grpc.StatusCode.UNAVAILABLE, (("retry-after", "1"),)),
        ]:
            self.fake.calls.clear()
            self.fake.refuse = (code, f"refused with {code.name}", metadata)
            for call in (client.info, lambda: client.embed("a b c"), lambda: client.hidden_states([1, 2]).collect()):
                started = time.monotonic()
                with self.assertRaises(TomeError) as caught:
                    call()
                self.assertLess(time.monotonic() - started, 0.9, code)
                self.assertEqual(caught.exception.code, code)
                self.assertEqual(caught.exception.message, f"refused with {code.name}")
                self.assertEqual(caught.exception.attempts, 1)
            self.assertEqual(sum(self.fake.calls.values()), 3, f"{code.name}: one call each, no retry")

    def test_retries_are_bounded_in_attempts_and_in_time(self) -> None:
        self.fake.busy["Info"] = 100
        self.fake.retry_after = "0.1"
        with self.assertRaises(TomeError) as caught:
            self.client(retry=RetryPolicy(max_attempts=3)).info()
        self.assertEqual((caught.exception.code, caught.exception.attempts, caught.exception.retry_after), (grpc.StatusCode.RESOURCE_EXHAUSTED, 3, 0.1))
        self.assertEqual(self.fake.calls["Info"], 3)

        # 1 s waits within 1.5 s: the second wait would end past it, so two calls and no wait.
        self.fake.calls.clear()
        self.fake.retry_after = "1"
        started = time.monotonic()
        with self.assertRaises(TomeError) as caught:
            self.client(retry=RetryPolicy(max_attempts=10, total_seconds=1.5)).info()
        self.assertLess(time.monotonic() - started, 1.95, "no second wait")
        self.assertEqual((self.fake.calls["Info"], caught.exception.attempts), (2, 2))

        # A long retry-after is capped at max_wait_seconds; max_attempts=1 never retries.
        self.fake.calls.clear()
        self.fake.busy["Info"] = 1
        self.fake.retry_after = "3600"
        started = time.monotonic()
        self.assertEqual(self.client(retry=RetryPolicy(max_wait_seconds=0.2)).info().version, "fake")
        self.assertLess(time.monotonic() - started, 2.0, "not the hour retry-after asked")
        self.fake.busy["Info"] = 1
        with self.assertRaises(TomeError):
            self.client(retry=RetryPolicy(max_attempts=1)).info()

    def test_a_stream_that_already_delivered_events_is_not_retried(self) -> None:
        self.fake.fail_after_accepted = "the job lost its place"
        stream = self.client().hidden_states("a b c d")
        with self.assertRaises(TomeError) as caught:
            stream.collect()
        self.assertEqual(caught.exception.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertEqual(self.fake.calls["Process"], 1)
        self.assertEqual(stream.accepted.job_id if stream.accepted else None, "job-1")

    def test_texts_over_the_threshold_are_uploaded_in_pieces(self) -> None:
        client = self.client(upload_threshold_bytes=16, upload_piece_bytes=7)
        text = "naïve café — déjà vu € " * 3
        data = text.encode()
        got = client.embed(text, attention="window:64", positions="tile", chunk_tokens=2)
        self.assertEqual((self.fake.calls["ProcessUpload"], self.fake.calls["Process"]), (1, 0))
        parts = self.fake.uploads[0]
        opening = parts[0].request
        self.assertEqual(opening.WhichOneof("input"), None, "the request goes first, without the text")
        self.assertEqual((opening.options.attention.window, opening.options.position_extension, opening.options.chunks.tokens_per_chunk), (64, pb.POSITION_EXTENSION_TILE, 2))
        pieces = [p.text for p in parts[1:]]
        self.assertTrue(all(0 < len(p) <= 7 for p in pieces), [len(p) for p in pieces])
        self.assertEqual(b"".join(pieces), data)
        self.assertTrue(any(self._splits_a_character(p) for p in pieces), "pieces split inside characters")
        np.testing.assert_array_equal(got.document, [len(text.split()), len(data), 0, 1])
        # At the threshold or under it: one Process message. Token ids never upload.
        client.embed("x" * 16)
        client.hidden_states(list(range(100))).collect()
        self.assertEqual((self.fake.calls["ProcessUpload"], self.fake.calls["Process"]), (1, 2))
        # A busy upload is sent again whole.
        self.fake.busy["ProcessUpload"] = 1
        self.fake.retry_after = "0.1"
        client.embed(text)
        self.assertEqual(self.fake.calls["ProcessUpload"], 3)
        self.assertEqual(b"".join(p.text for p in self.fake.uploads[-1][1:]), data)

    @staticmethod
    def _splits_a_character(piece: bytes) -> bool:
        try:
            piece.decode()
            return False
        except UnicodeDecodeError:
            return True

    def test_the_api_key_goes_as_a_bearer_token(self) -> None:
        self.client().tokenize("a b")
        self.assertEqual(self.fake.metadata[-1].get("authorization"), "Bearer key-0123456789abcdef")
        anonymous = Client(self.url)
        self.addCleanup(anonymous.close)
        anonymous.info()
        self.assertNotIn("authorization", self.fake.metadata[-1])

    def test_streams_yield_blocks_as_they_arrive_in_each_dtype(self) -> None:
        client = self.client()
        ids = list(range(8))
        want = np.stack([np.arange(8), np.arange(8) + 0.5, -np.arange(8), np.zeros(8)], axis=1).astype(np.float32)
        for dtype, numpy_type in [("f32", np.float32), ("bf16", np.float32), ("f16", np.float16)]:
            with client.hidden_states(ids, dtype=dtype, hidden_layer=2) as stream:
                blocks = list(stream)
            self.assertEqual(self.fake.requests[-1].options.hidden_layer, 2)
            self.assertEqual([b.shape for b in blocks], [(3, WIDTH), (3, WIDTH), (2, WIDTH)], dtype)
            self.assertTrue(all(b.dtype == numpy_type for b in blocks), dtype)
            np.testing.assert_array_equal(np.concatenate(blocks), want, dtype)
            self.assertEqual(stream.done.tokens if stream.done else None, 8)
        scores = client.log_probs(ids, layout="zigzag")
        first = next(scores)
        self.assertIsNone(scores.done, "the summary comes at the end")
        rest = scores.collect()
        np.testing.assert_allclose(np.concatenate([first, rest]), -1 / (np.arange(7, dtype=np.float32) + 1), rtol=0)
        self.assertEqual(scores.done.perplexity if scores.done else None, 2.5)
        self.assertEqual(scores.progress, (1, 1))
        self.assertEqual(self.fake.requests[-1].options.layout, pb.LAYOUT_ZIGZAG)
        tokens = client.tokenize("three short words")
        np.testing.assert_array_equal(tokens.ids, [5, 5, 5])
        self.assertEqual(tokens.offsets.shape, (3, 2))

    def test_closing_a_stream_early_cancels_the_call(self) -> None:
        client = self.client()
        stream = client.hidden_states(list(range(30)))
        next(stream)
        stream.close()
        with self.assertRaises(StopIteration):
            next(stream)
        self.assertEqual(client.info().version, "fake", "the channel still serves")


if __name__ == "__main__":
    unittest.main()
