"""Dense + lexical fusion with top-k: numba CPU against the numpy reference and Collection._fuse."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openemploi.kernels import (
    Fused,
    fuse_topk,
    fuse_topk_numba,
    fuse_topk_reference,
    fusion_candidates,
)

SETTINGS = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
INT64 = np.iinfo(np.int64)

ID_SPACES = {
    "small": st.integers(0, 40),  # lots of overlap between the lists
    "wide": st.integers(int(INT64.min), int(INT64.max)),
    "strided": st.integers(0, 80).map(lambda x: x << 40),  # same low bits: stresses the hash table
}
SCORES = st.one_of(st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.0]), st.floats(-1e3, 1e3, width=32))


@st.composite
def fusion_inputs(draw, duplicates: bool = False, max_len: int = 60):
    ids = ID_SPACES[draw(st.sampled_from(sorted(ID_SPACES)))]
    dense_ids = draw(st.lists(ids, max_size=max_len, unique=not duplicates))
    lexical_ids = draw(st.lists(ids, max_size=max_len, unique=not duplicates))
    dense_scores = sorted(draw(st.lists(SCORES, min_size=len(dense_ids), max_size=len(dense_ids))), reverse=True)
    lexical_scores = sorted(draw(st.lists(SCORES, min_size=len(lexical_ids), max_size=len(lexical_ids))), reverse=True)
    mode = draw(st.sampled_from(["rrf", "weighted"]))
    weight = draw(st.one_of(st.sampled_from([0.0, 0.3, 0.7, 1.0]), st.floats(0, 1)))
    u = len(dict.fromkeys(dense_ids + lexical_ids))
    union_dense = draw(st.lists(st.one_of(st.just(0.5), st.floats(-1, 1, width=32)), min_size=u, max_size=u))
    k = draw(st.integers(0, u + 5))
    return (
        np.array(dense_ids, np.int64),
        np.array(dense_scores, np.float32),
        np.array(lexical_ids, np.int64),
        np.array(lexical_scores, np.float32),
        k,
        mode,
        weight,
        np.array(union_dense, np.float32) if mode == "weighted" else None,
    )


def assert_same(got: Fused, want: Fused) -> None:
    assert got.ids.dtype == np.int64 and got.scores.dtype == np.float32
    assert got.dense_rank.dtype == np.int32 and got.lexical_rank.dtype == np.int32
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.dense_rank, want.dense_rank)
    np.testing.assert_array_equal(got.lexical_rank, want.lexical_rank)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-7, atol=0)  # same float64 formulas


@SETTINGS
@given(fusion_inputs())
def test_numba_matches_reference(args):
    want = fuse_topk_reference(*args)
    assert len(want.ids) == min(args[4], len(fusion_candidates(args[0], args[2])))
    assert_same(fuse_topk_numba(*args), want)


@SETTINGS
@given(fusion_inputs(duplicates=True, max_len=12))
def test_numba_matches_reference_with_duplicate_ids(args):
    assert_same(fuse_topk_numba(*args), fuse_topk_reference(*args))


@SETTINGS
@given(fusion_inputs(max_len=1))
def test_single_candidates(args):
    assert_same(fuse_topk_numba(*args), fuse_topk_reference(*args))


def _fuse_of_collection(args):
    """Collection._fuse itself, on a fake store whose 1-d vectors make the cosines union_dense."""
    collection = pytest.importorskip("openemploi.index.collection")
    search = pytest.importorskip("openemploi.index.search")
    from openemploi.index.store import StoredDocument

    dense_ids, dense_scores, lexical_ids, lexical_scores, k, mode, weight, union_dense = args
    union = fusion_candidates(dense_ids, lexical_ids)
    cosines = union_dense if union_dense is not None else np.zeros(len(union), np.float32)
    docs = {int(s): StoredDocument(int(s), str(s), "", {}, [], np.array([c], np.float32), "v") for s, c in zip(union, cosines)}
    store = SimpleNamespace(by_seqs=lambda seqs, include_vectors=False: {s: docs[s] for s in seqs})
    query = search.SearchQuery(vector=np.ones(1, np.float32), k=k, fusion=mode, dense_weight=weight, include_vectors=True)
    dense = [(int(s), float(v)) for s, v in zip(dense_ids, dense_scores)]
    lexical = [(int(s), float(v)) for s, v in zip(lexical_ids, lexical_scores)]
    hits = collection.Collection._fuse(SimpleNamespace(store=store), query, dense, lexical).hits
    return Fused(
        np.array([h.document.seq for h in hits], np.int64),
        np.array([h.score for h in hits], np.float32),
        np.array([h.dense_rank for h in hits], np.int32),
        np.array([h.lexical_rank for h in hits], np.int32),
    )


@settings(max_examples=30, deadline=None, database=None)
@given(fusion_inputs(duplicates=True, max_len=20))
def test_same_as_collection_fuse(args):
    # Collection._fuse calls the numba kernel itself, so compare it with the numpy reference:
    # this checks the glue (candidate order, exact cosines, ranks), not the kernel against itself.
    assert_same(fuse_topk_reference(*args), _fuse_of_collection(args))


def test_hand_computed_rrf():
    got = fuse_topk_numba([10, 20, 30], [0.9, 0.8, 0.7], [30, 40], [7.0, 3.0], k=10)
    # 30: 1/63 + 1/61; 10: 1/61; 20 and 40: 1/62 each, tie -> smaller id first
    np.testing.assert_array_equal(got.ids, [30, 10, 20, 40])
    np.testing.assert_allclose(got.scores, np.float32([1 / 63 + 1 / 61, 1 / 61, 1 / 62, 1 / 62]))
    np.testing.assert_array_equal(got.dense_rank, [3, 1, 2, 0])
    np.testing.assert_array_equal(got.lexical_rank, [1, 0, 0, 2])
    assert_same(fuse_topk_numba([10, 20, 30], [0.9, 0.8, 0.7], [30, 40], [7.0, 3.0], k=2), Fused(*(x[:2] for x in got)))


def test_hand_computed_weighted():
    union = fusion_candidates([1, 2], [3, 1])
    np.testing.assert_array_equal(union, [1, 2, 3])
    got = fuse_topk_numba(
        [1, 2], [0.9, 0.8], [3, 1], [4.0, 2.0], k=5, mode="weighted", dense_weight=0.5, union_dense=[0.9, 0.8, 0.1]
    )
    # 1: 0.45 + 0.5 * 2/4 = 0.7; 3: 0.05 + 0.5 = 0.55; 2: 0.4
    np.testing.assert_array_equal(got.ids, [1, 3, 2])
    np.testing.assert_allclose(got.scores, [0.7, 0.55, 0.4], rtol=1e-6)
    np.testing.assert_array_equal(got.lexical_rank, [2, 1, 0])


def test_weighted_top_lexical_zero_or_missing_means_one():
    got = fuse_topk_numba([1], [0.5], [2], [0.0], k=5, mode="weighted", dense_weight=0.5, union_dense=[0.5, 0.25])
    np.testing.assert_allclose(got.scores, [0.25, 0.125])  # lexical / 1
    got = fuse_topk_numba([1], [0.5], [], [], k=5, mode="weighted", dense_weight=0.25, union_dense=[0.5])
    np.testing.assert_allclose(got.scores, [0.125])


@pytest.mark.parametrize("fn", [fuse_topk_numba, fuse_topk_reference])
def test_empty_and_k_zero(fn):
    empty = np.zeros(0, np.int64), np.zeros(0, np.float32)
    for mode, union in (("rrf", None), ("weighted", [])):
        got = fn(*empty, *empty, 10, mode, 0.7, union)
        assert all(x.size == 0 for x in got)
        assert got.ids.dtype == np.int64 and got.dense_rank.dtype == np.int32
    assert all(x.size == 0 for x in fn([1, 2], [1, 1], [2], [1], 0))
    assert fn([], [], [5], [1.0], 3).ids.tolist() == [5]


@pytest.mark.parametrize("fn", [fuse_topk_numba, fuse_topk_reference])
def test_bad_arguments(fn):
    with pytest.raises(ValueError, match="union_dense"):
        fn([1], [1.0], [2], [1.0], 2, "weighted")
    with pytest.raises(ValueError, match="union_dense has 1"):
        fn([1], [1.0], [2], [1.0], 2, "weighted", 0.5, [0.3])
    with pytest.raises(ValueError, match="mode"):
        fn([1], [1.0], [2], [1.0], 2, "max")
    with pytest.raises(ValueError, match="k must"):
        fn([1], [1.0], [2], [1.0], -1)
    with pytest.raises(ValueError, match="dense_scores"):
        fn([1, 2], [1.0], [2], [1.0], 2)


def test_entry_point_backends():
    args = ([4, 2, 9], [0.9, 0.5, 0.1], [9, 7], [3.0, 1.0], 3, "weighted", 0.7, [0.9, 0.5, 0.1, 0.3])
    want = fuse_topk_reference(*args)
    for backend in (None, "numba", "numpy"):
        assert_same(fuse_topk(*args, backend=backend), want)
