"""The packed RAW_FLOAT32 vectors and the protos -> dataclasses conversions, without a server."""

from __future__ import annotations

import numpy as np
import pytest

from openemploi.client import Document
from openemploi.client.convert import MalformedResponse, decode_packed, document, document_proto, embed_vectors, filters_proto
from openemploi.v1 import embedding_pb2, index_pb2


def test_packed_vectors_decode_row_major_little_endian():
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    decoded = decode_packed(vectors.astype("<f4").tobytes(), 3, 4)
    assert decoded.dtype == np.float32 and decoded.shape == (3, 4)
    np.testing.assert_array_equal(decoded, vectors)


def test_packed_vectors_are_read_as_little_endian_whatever_the_host():
    big_endian = np.array([[1.5, -2.0]], dtype=">f4").tobytes()
    assert decode_packed(big_endian, 1, 2).tolist() != [[1.5, -2.0]]
    assert decode_packed(np.array([[1.5, -2.0]], dtype="<f4").tobytes(), 1, 2).tolist() == [[1.5, -2.0]]


def test_decoded_vectors_are_writable_and_do_not_share_the_reply_buffer():
    data = np.ones((2, 2), dtype="<f4").tobytes()
    decoded = decode_packed(data, 2, 2)
    decoded[0, 0] = 5.0  # a caller normalising in place must not fail on a read-only buffer
    assert decode_packed(data, 2, 2)[0, 0] == 1.0


@pytest.mark.parametrize(("size", "count", "dim"), [(12, 2, 2), (20, 2, 2), (0, 1, 4)])
def test_a_packed_buffer_of_the_wrong_size_is_refused(size, count, dim):
    with pytest.raises(MalformedResponse, match=f"holds {size} bytes"):
        decode_packed(b"\0" * size, count, dim)


def test_float_list_replies_decode_like_packed_ones():
    rows = [[0.6, 0.8], [1.0, 0.0]]
    listed = embedding_pb2.EmbedResponse(dim=2, embeddings=[embedding_pb2.Embedding(values=r) for r in rows])
    packed = embedding_pb2.EmbedResponse(dim=2, raw_float32=np.asarray(rows, dtype="<f4").tobytes())
    np.testing.assert_array_equal(embed_vectors(listed, 2), embed_vectors(packed, 2))


def test_documents_round_trip_through_their_proto():
    original = Document("o1", "Boulanger", (0.5, 0.75), {"ville": "Lyon"}, ("pétrir",), "multilingual-e5-small")
    assert document(index_pb2.Document.FromString(document_proto(original).SerializeToString())) == original
    assert document(document_proto(Document("o2", "texte seul"))).vector is None


def test_filters_take_one_value_or_several():
    filters = filters_proto({"contrat": "CDI", "ville": ["Lyon", "Paris"]})
    assert [(f.field, list(f.values)) for f in filters] == [("contrat", ["CDI"]), ("ville", ["Lyon", "Paris"])]
