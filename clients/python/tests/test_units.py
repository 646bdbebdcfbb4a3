"""What the client decides without a server: tensor decoding, option parsing, addresses."""

from __future__ import annotations

import unittest

import numpy as np

import tome_client
from tome_client import Attention, AttentionKind, Client, pb
from tome_client._client import _document, _target


class TensorDecoding(unittest.TestCase):
    def test_bf16_widens_exactly_to_float32_by_shifting(self) -> None:
        # 1.0, -2.5, the largest bf16, the smallest subnormal, +inf, NaN: upper halves of f32.
        bits = np.array([0x3F80, 0xC020, 0x7F7F, 0x0001, 0x7F80, 0x7FC0], dtype="<u2")
        t = pb.Tensor(shape=[2, 3], dtype=pb.ELEMENT_TYPE_BF16, data=bits.tobytes())
        got = tome_client.decode_tensor(t)
        self.assertEqual(got.dtype, np.float32)
        self.assertEqual(got.shape, (2, 3))
        want = (bits.astype(np.uint32) << 16).view(np.float32).reshape(2, 3)
        np.testing.assert_array_equal(got, want)
        self.assertEqual(got[0, 0], 1.0)
        self.assertEqual(got[0, 1], -2.5)
        self.assertEqual(got[1, 0], np.float32(2.0**-133))
        self.assertTrue(np.isinf(got[1, 1]) and np.isnan(got[1, 2]))

    def test_bf16_encoding_round_trips_values_bf16_holds(self) -> None:
        values = np.array([0.0, 1.0, -0.15625, 3.0e38, -1.0e-30], dtype=np.float32)
        held = tome_client.bf16_to_f32((values.view(np.uint32) >> 16).astype("<u2").tobytes())
        t = tome_client.encode_tensor(held, pb.ELEMENT_TYPE_BF16)
        self.assertEqual(len(t.data), 2 * len(values))
        np.testing.assert_array_equal(tome_client.decode_tensor(t), held)

    def test_each_element_type_decodes_to_its_numpy_type_in_native_order(self) -> None:
        cases = [
            (pb.ELEMENT_TYPE_F32, np.array([[1.5, -2.0]], dtype="<f4"), np.float32),
            (pb.ELEMENT_TYPE_F16, np.array([0.5, 65504.0], dtype="<f2"), np.float16),
            (pb.ELEMENT_TYPE_I64, np.array([-(2**62), 7], dtype="<i8"), np.int64),
            (pb.ELEMENT_TYPE_U8, np.array([0, 255], dtype="u1"), np.uint8),
            (pb.ELEMENT_TYPE_U32, np.array([2**32 - 1, 1], dtype="<u4"), np.uint32),
        ]
        for dtype, array, native in cases:
            t = pb.Tensor(shape=list(array.shape), dtype=dtype, data=array.tobytes())
            got = tome_client.decode_tensor(t)
            self.assertEqual(got.dtype, np.dtype(native), pb.ElementType.Name(dtype))
            self.assertEqual(got.shape, array.shape)
            np.testing.assert_array_equal(got, array)
            got[...] = 0  # a writable copy, not a view of the message
        # Big-endian bytes are not what the wire carries: 1.0 little-endian is 00 00 80 3f.
        t = pb.Tensor(shape=[1], dtype=pb.ELEMENT_TYPE_F32, data=bytes([0, 0, 0x80, 0x3F]))
        self.assertEqual(tome_client.decode_tensor(t)[0], 1.0)

    def test_data_that_does_not_fill_the_shape_or_an_unknown_type_is_refused(self) -> None:
        with self.assertRaisesRegex(ValueError, r"shape \[2, 3\] needs 24 bytes, got 20"):
            tome_client.decode_tensor(pb.Tensor(shape=[2, 3], dtype=pb.ELEMENT_TYPE_F32, data=bytes(20)))
        with self.assertRaisesRegex(ValueError, "bf16 tensor of shape \\[4\\] needs 8 bytes"):
            tome_client.decode_tensor(pb.Tensor(shape=[4], dtype=pb.ELEMENT_TYPE_BF16, data=bytes(6)))
        with self.assertRaisesRegex(ValueError, "ELEMENT_TYPE_UNSPECIFIED"):
            tome_client.decode_tensor(pb.Tensor(shape=[1], data=bytes(4)))
        with self.assertRaisesRegex(ValueError, "99"):
            tome_client.decode_tensor(pb.Tensor(shape=[1], dtype=99, data=bytes(4)))  # type: ignore[arg-type]


class Options(unittest.TestCase):
    def test_attention_strings(self) -> None:
        self.assertEqual(Attention.parse("dense"), Attention(AttentionKind.DENSE))
        self.assertEqual(Attention.parse(" Window:512 "), Attention(AttentionKind.WINDOW, window=512))
        self.assertEqual(Attention.parse("window:64").to_pb(), pb.AttentionOverride(kind=pb.ATTENTION_KIND_WINDOW, window=64))
        for bad in ["window", "window:x", "window:-2", "sparse", "dense:3"]:
            with self.assertRaises(ValueError, msg=bad):
                Attention.parse(bad)

    def test_options_become_process_options_with_python_names(self) -> None:
        client = Client("http://127.0.0.1:1")
        o = client._options(
            [pb.OUTPUT_DOCUMENT_EMBEDDING],
            pooling="CLS",
            normalize=False,
            chunk_spans=[(0, 4), (2, 9)],
            attention="window:128",
            positions="tile",
            ranks=3,
            layout=tome_client.Layout.ZIGZAG,
            global_tokens=[0, 17],
            dtype="bf16",
            hidden_layer=0,
            segment_len=8,
            precision="BF16",
        )
        self.assertEqual(o.pooling, pb.POOLING_CLS)
        self.assertTrue(o.HasField("normalize") and not o.normalize)
        self.assertEqual([(s.start, s.end) for s in o.chunks.spans.spans], [(0, 4), (2, 9)])
        self.assertEqual((o.attention.kind, o.attention.window), (pb.ATTENTION_KIND_WINDOW, 128))
        self.assertEqual(o.position_extension, pb.POSITION_EXTENSION_TILE)
        self.assertEqual((o.ranks, o.layout, list(o.global_tokens)), (3, pb.LAYOUT_ZIGZAG, [0, 17]))
        self.assertEqual(o.hidden_dtype, pb.ELEMENT_TYPE_BF16)
        self.assertTrue(o.HasField("hidden_layer") and o.hidden_layer == 0)
        self.assertEqual(o.segment_len, 8)
        self.assertEqual(o.precision, pb.PRECISION_BF16, "the arithmetic, apart from the hidden states' dtype")
        unset = client._options([])
        self.assertEqual(unset.precision, pb.PRECISION_UNSPECIFIED, "f32 unless asked")
        self.assertFalse(unset.HasField("normalize") or unset.HasField("hidden_layer") or unset.HasField("attention") or unset.HasField("chunks"))
        with self.assertRaisesRegex(ValueError, "pooling: 'max' is not one of 'mean', 'cls'"):
            client._options([], pooling="max")
        with self.assertRaisesRegex(ValueError, "precision: 'f64' is not one of 'f32', 'bf16'"):
            client._options([], precision="f64")
        with self.assertRaisesRegex(ValueError, "not both"):
            client._options([], chunk_tokens=4, chunk_spans=[(0, 1)])
        client.close()

    def test_documents_are_text_or_token_ids(self) -> None:
        self.assertEqual(_document("héllo"), ("héllo".encode(), None))
        self.assertEqual(_document(b"raw"), (b"raw", None))
        self.assertEqual(_document([101, 7, 102]), (None, [101, 7, 102]))
        self.assertEqual(_document(np.array([[5, 6]], dtype=np.int64)), (None, [5, 6]))
        with self.assertRaises(TypeError):
            _document(np.zeros((2, 2), dtype=np.int64))
        with self.assertRaises(TypeError):
            _document([0.5, 1.5])  # type: ignore[list-item]

    def test_addresses(self) -> None:
        self.assertEqual(_target("http://127.0.0.1:50051", False), ("127.0.0.1:50051", False))
        self.assertEqual(_target("https://tome.example:443/", False), ("tome.example:443", True))
        self.assertEqual(_target("localhost:50051", False), ("localhost:50051", False))
        self.assertEqual(_target("localhost:50051", True), ("localhost:50051", True))
        for bad in ["ftp://x:1", "http://x:1/v1", "", "http://", "http://x:1?q=1"]:
            with self.assertRaises(ValueError, msg=bad):
                _target(bad, False)
        with self.assertRaisesRegex(ValueError, "use https://"):
            Client("http://127.0.0.1:1", root_certificates=b"-----BEGIN CERTIFICATE-----")
        with self.assertRaisesRegex(ValueError, "go together"):
            Client("https://127.0.0.1:1", client_certificate=b"x")
        with self.assertRaisesRegex(ValueError, "cannot read"):
            Client("https://127.0.0.1:1", root_certificates="/nonexistent/ca.pem")


if __name__ == "__main__":
    unittest.main()
