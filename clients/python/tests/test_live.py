"""The client against real tome servers, which tests/tests/python_client.rs starts and names in
the environment:

    TOME_TEST_URL             `tome run` serving all-MiniLM-L6-v2 and a causal model, with keys
    TOME_TEST_API_KEY         a key it accepts
    TOME_TEST_TEXT            a document longer than MiniLM's 512 positions
    TOME_TEST_REFERENCE       `tome process --coordinator` outputs for that document
                              (window:128, tile, 300-token chunks, normalised, 2 ranks,
                              document, chunks and hidden states)
    TOME_TEST_CAUSAL_MODEL    the causal model's name on the server
    TOME_TEST_CAUSAL_FIXTURE  its directory: input_ids.npy and transformers' goldens
    TOME_TEST_TLS_URL         `tome run` over mutual TLS (MiniLM, no keys)
    TOME_TEST_TLS_DIR         ca.pem, client.pem/.key (signed by it), stranger-ca.pem

Without them every test here is skipped, saying so; the Rust test that sets them fails on any
skip.
"""

from __future__ import annotations

import math
import os
import time
import unittest
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tome_client import Client, Dtype, RetryPolicy, TomeError

OPTIONS: dict[str, Any] = {"attention": "window:128", "positions": "tile", "ranks": 2}


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise unittest.SkipTest(f"{name} is not set: tests/tests/python_client.rs runs these against real servers")
    return value


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


class RealServer(unittest.TestCase):
    client: Client
    text: str
    reference: Path

    @classmethod
    def setUpClass(cls) -> None:
        cls.client = Client(env("TOME_TEST_URL"), env("TOME_TEST_API_KEY"), timeout=300)
        cls.text = Path(env("TOME_TEST_TEXT")).read_text()
        cls.reference = Path(env("TOME_TEST_REFERENCE"))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.client.close()

    def ref(self, name: str) -> np.ndarray:
        return np.load(self.reference / name)

    def test_info_and_tokenize(self) -> None:
        info = self.client.info()
        names = [m.name for m in info.models]
        self.assertEqual(names[0], "all-MiniLM-L6-v2", names)
        minilm = info.models[0]
        self.assertEqual((minilm.hidden_size, minilm.num_layers, minilm.max_positions, minilm.causal), (384, 6, 512, False))
        causal = [m for m in info.models if m.name == env("TOME_TEST_CAUSAL_MODEL")]
        self.assertTrue(causal and causal[0].causal, info.models)
        self.assertEqual(info.backend, "embedded")
        self.assertGreaterEqual(info.limits.max_ranks, 3)
        tokens = self.client.tokenize("Hello world")
        self.assertEqual(tokens.ids.dtype, np.int64)
        self.assertEqual(int(tokens.ids[0]), 101, "[CLS] first")
        self.assertEqual(tokens.offsets.shape, (len(tokens.ids), 2))
        self.assertEqual(tokens.offsets[1].tolist(), [0, 5], "'Hello' at characters 0..5")

    def test_embed_equals_the_cli(self) -> None:
        e = self.client.embed(self.text, chunk_tokens=300, normalize=True, **OPTIONS)
        want_doc = self.ref("document_embedding.npy")
        self.assertEqual((e.document.dtype, e.document.shape), (np.float32, (384,)))
        self.assertLessEqual(max_diff(e.document, want_doc), 1e-6)
        self.assertAlmostEqual(float(np.linalg.norm(e.document)), 1.0, places=5)
        want_chunks = self.ref("chunk_embeddings.npy")
        self.assertGreater(len(want_chunks), 1)
        self.assertEqual(e.chunks.shape, want_chunks.shape)
        self.assertLessEqual(max_diff(e.chunks, want_chunks), 1e-6)
        np.testing.assert_array_equal(e.chunk_token_spans, self.ref("chunk_token_spans.npy"))
        np.testing.assert_array_equal(e.chunk_char_spans, self.ref("chunk_char_spans.npy"))
        self.assertEqual(e.chunk_token_spans[0].tolist(), [0, 300])
        self.assertEqual(int(e.chunk_char_spans[-1][1]), len(self.text.rstrip()), "the last chunk ends where the text's last token does")
        self.assertEqual((e.accepted.ranks, e.accepted.tokens), (2, e.done.tokens))
        self.assertEqual(int(e.chunk_token_spans[-1][1]), e.done.tokens, "the chunks cover the document")
        self.assertEqual(e.accepted.layer_attention, ("window:128",) * 6)
        self.assertGreater(e.done.bytes_exchanged, 0, "two ranks passed each other halos")
        # Options by enum and by string alike; any number of ranks gives the same outputs.
        other = self.client.embed(self.text, chunk_tokens=300, normalize=True, attention="window:128", positions="TILE", ranks=3, layout="contiguous")
        self.assertEqual(other.accepted.ranks, 3)
        self.assertLessEqual(max_diff(other.document, want_doc), 1e-5)

    def test_hidden_states_stream_in_order_and_equal_the_cli(self) -> None:
        want = self.ref("last_hidden_state.npy")
        with self.client.hidden_states(self.text, **OPTIONS) as stream:
            blocks: list[np.ndarray] = []
            for block in stream:
                self.assertEqual((block.dtype, block.ndim, block.shape[1]), (np.float32, 2, 384))
                if not blocks:
                    self.assertIsNotNone(stream.accepted, "the plan comes before the first rows")
                    self.assertIsNone(stream.done, "rows arrive before the stream ends")
                blocks.append(block)
        self.assertGreater(len(blocks), 1, "a document of this length comes in several blocks")
        rows = np.concatenate(blocks)
        assert stream.done is not None and stream.accepted is not None
        self.assertEqual(rows.shape, (stream.done.tokens, 384))
        self.assertEqual(rows.shape[0], stream.accepted.tokens)
        self.assertEqual(rows.shape, want.shape)
        self.assertLessEqual(max_diff(rows, want), 1e-6)
        # bf16 on the wire, widened exactly: every value is a bf16 (low 16 bits zero) within
        # bf16's rounding of the f32 states; f16 arrives as float16.
        bf16 = self.client.hidden_states(self.text, dtype=Dtype.BF16, **OPTIONS).collect()
        self.assertEqual((bf16.dtype, bf16.shape), (np.float32, want.shape))
        self.assertFalse(np.any(bf16.view(np.uint32) & 0xFFFF), "bf16 widened by shifting")
        self.assertTrue(np.all(np.abs(bf16 - want) <= np.abs(want) * 2.0**-8 + 1e-30))
        f16 = self.client.hidden_states(self.text, dtype="f16", **OPTIONS).collect()
        self.assertEqual((f16.dtype, f16.shape), (np.float16, want.shape))
        self.assertTrue(np.all(np.abs(f16.astype(np.float32) - want) <= np.abs(want) * 2.0**-10 + 2.0**-24))
        # Layer 0 is the embeddings: not the last layer's states.
        first = self.client.hidden_states(self.text, hidden_layer=0, **OPTIONS).collect()
        self.assertEqual(first.shape, want.shape)
        self.assertGreater(max_diff(first, want), 0.1)

    def test_texts_over_the_threshold_go_up_in_pieces_with_the_same_result(self) -> None:
        text = self.text + "€"
        direct = self.client.embed(text, **OPTIONS)
        uploaded_calls = []
        with Client(env("TOME_TEST_URL"), env("TOME_TEST_API_KEY"), upload_threshold_bytes=1000, upload_piece_bytes=333) as small:
            upload = small._stub.ProcessUpload

            def counted(*args: Any, **kwargs: Any) -> Any:
                uploaded_calls.append(1)
                return upload(*args, **kwargs)

            small._stub.ProcessUpload = counted  # type: ignore[method-assign]
            got = small.embed(text, **OPTIONS)
            self.assertEqual(len(uploaded_calls), 1, "the text went up as ProcessUpload")
            np.testing.assert_array_equal(got.document, direct.document)
            np.testing.assert_array_equal(got.chunks, direct.chunks)
            np.testing.assert_array_equal(got.chunk_char_spans, direct.chunk_char_spans)
            rows = small.hidden_states(text, **OPTIONS).collect()
            self.assertEqual(len(uploaded_calls), 2)
            self.assertEqual(rows.shape, (direct.done.tokens, 384))

    def test_calls_without_a_valid_key_are_refused(self) -> None:
        for key in (None, "not-a-key-0123456789"):
            with Client(env("TOME_TEST_URL"), key) as stranger:
                for call in (stranger.info, lambda: stranger.embed("a short text"), lambda: stranger.hidden_states([101, 102]).collect()):
                    with self.assertRaises(TomeError) as caught:
                        call()
                    self.assertEqual(caught.exception.code, grpc.StatusCode.UNAUTHENTICATED, caught.exception)
                    self.assertEqual(caught.exception.attempts, 1)

    def test_refusals_raise_the_servers_code_and_message_at_once(self) -> None:
        cases = [
            (lambda: self.client.embed(self.text), grpc.StatusCode.INVALID_ARGUMENT, "512 positions"),
            (lambda: self.client.embed("short", ranks=99), grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 8"),
            (lambda: self.client.embed("short", model="no-such-model"), grpc.StatusCode.NOT_FOUND, "no-such-model"),
            (lambda: self.client.log_probs("short").collect(), grpc.StatusCode.INVALID_ARGUMENT, "causal"),
            (lambda: self.client.embed("short", chunk_spans=[(1, 99)]), grpc.StatusCode.INVALID_ARGUMENT, "outside the document"),
        ]
        for call, code, says in cases:
            started = time.monotonic()
            with self.assertRaises(TomeError) as caught:
                call()
            self.assertEqual(caught.exception.code, code, caught.exception)
            self.assertIn(says, caught.exception.message)
            self.assertIsNone(caught.exception.retry_after, "a refusal for good")
            self.assertEqual(caught.exception.attempts, 1)
            self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(self.client.info().models[0].name, "all-MiniLM-L6-v2", "the server keeps serving")

    def test_a_causal_model_streams_hidden_states_and_log_probs_equal_to_transformers(self) -> None:
        model = env("TOME_TEST_CAUSAL_MODEL")
        fixture = Path(env("TOME_TEST_CAUSAL_FIXTURE"))
        ids = np.load(fixture / "input_ids.npy")
        golden, golden_lp = np.load(fixture / "last_hidden_state.npy"), np.load(fixture / "logprobs.npy")
        for ranks, layout in [(1, "contiguous"), (3, "zigzag")]:
            rows = self.client.hidden_states(ids, model=model, ranks=ranks, layout=layout).collect()
            self.assertEqual(rows.shape, golden.shape)
            self.assertLessEqual(max_diff(rows, golden), 1e-4, f"{ranks} ranks {layout}")
            stream = self.client.log_probs(ids, model=model, ranks=ranks, layout=layout)
            blocks = list(stream)
            self.assertTrue(blocks and all(b.dtype == np.float32 and b.ndim == 1 for b in blocks))
            scores = np.concatenate(blocks)
            self.assertEqual(scores.shape, (len(ids) - 1,))
            self.assertLessEqual(max_diff(scores, golden_lp), 1e-4, f"{ranks} ranks {layout}: log-probs")
            assert stream.done is not None and stream.done.perplexity is not None
            want = math.exp(-float(np.mean(golden_lp.astype(np.float64))))
            self.assertLess(abs(stream.done.perplexity - want), 1e-3 * want)
        # Hidden states of a chosen layer, as transformers' hidden_states[k].
        layers = np.load(fixture / "hidden_states.npy")
        second = self.client.hidden_states(ids.tolist(), model=model, hidden_layer=2, ranks=2).collect()
        self.assertLessEqual(max_diff(second, layers[2]), 1e-4)


class OverTls(unittest.TestCase):
    def test_mutual_tls_serves_the_same_embeddings_and_refuses_strangers(self) -> None:
        url = env("TOME_TEST_TLS_URL")
        pki = Path(env("TOME_TEST_TLS_DIR"))
        text = "It was the best of times, it was the worst of times."
        with Client(env("TOME_TEST_URL"), env("TOME_TEST_API_KEY")) as plain:
            want = plain.embed(text)
        with Client(url, root_certificates=pki / "ca.pem", client_certificate=pki / "client.pem", client_key=(pki / "client.key").read_bytes(), timeout=60) as tls:
            self.assertTrue(tls.tls)
            self.assertEqual(tls.info().models[0].name, "all-MiniLM-L6-v2")
            got = tls.embed(text)
            self.assertLessEqual(max_diff(got.document, want.document), 1e-6)
            rows = tls.hidden_states(text).collect()
            self.assertEqual(rows.shape, (got.done.tokens, 384))
        refused = [
            # No certificate of ours: the server's mutual TLS refuses the handshake.
            dict(root_certificates=pki / "ca.pem"),
            # A CA that did not sign the server's certificate.
            dict(root_certificates=pki / "stranger-ca.pem", client_certificate=pki / "client.pem", client_key=pki / "client.key"),
        ]
        for kwargs in refused:
            with Client(url, timeout=10, retry=RetryPolicy(max_attempts=1), **kwargs) as stranger:  # type: ignore[arg-type]
                with self.assertRaises(TomeError) as caught:
                    stranger.embed(text)
                self.assertEqual(caught.exception.code, grpc.StatusCode.UNAVAILABLE, caught.exception)
        with Client(url.replace("https://", "http://"), timeout=10) as plaintext:
            with self.assertRaises(TomeError) as caught:
                plaintext.info()
            self.assertEqual(caught.exception.code, grpc.StatusCode.UNAVAILABLE, caught.exception)


if __name__ == "__main__":
    unittest.main()
