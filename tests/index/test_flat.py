"""A Flat collection searched by BLAS returns what faiss's Flat kernel returns: same ids in the same
order, same scores, -1 for missing slots, with deletes, filters and tombstones; duplicates in insertion order."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from openemploi.index import flat
from openemploi.index.vectors import IndexParams, VectorIndex

DIM = 32


def units(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.standard_normal((n, DIM), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def faiss_flat(index: VectorIndex, queries: np.ndarray, k: int, allowed=None, excluded=()) -> tuple[np.ndarray, np.ndarray]:
    """faiss's own Flat search on the same IndexIDMap2, with the selector VectorIndex would build."""
    params = faiss.SearchParameters()
    keep = []
    if allowed is not None:
        ids = np.asarray(allowed, np.int64)
        ids = ids[~np.isin(ids, np.asarray(list(excluded), np.int64))]
        keep.append(faiss.IDSelectorBatch(ids))
    elif excluded:
        keep.append(faiss.IDSelectorBatch(np.asarray(list(excluded), np.int64)))
        keep.append(faiss.IDSelectorNot(keep[-1]))
    if keep:
        params.sel = keep[-1]
    return index._index.search(queries, k, params=params)


def assert_same(ours: tuple[np.ndarray, np.ndarray], theirs: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_array_equal(ours[1], theirs[1])
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-5)


@pytest.fixture
def index() -> VectorIndex:
    rng = np.random.default_rng(7)
    built = VectorIndex(DIM, IndexParams(kind="flat"), name="flat-test")
    ids = rng.permutation(10_000)[:3_000].astype(np.int64)  # ids are not row numbers
    built.rebuild("flat", [(ids[:1_000], units(rng, 1_000)), (ids[1_000:], units(rng, 2_000))])
    return built


@pytest.mark.parametrize(("batch", "k"), [(1, 1), (1, 10), (64, 10), (5, 300)])
def test_search_matches_faiss_flat(index, batch, k):
    queries = units(np.random.default_rng(batch), batch)
    assert_same(index.search(queries, k), faiss_flat(index, queries, k))


def test_after_deletes_and_adds_the_results_match_faiss(index):
    rng = np.random.default_rng(3)
    queries = units(rng, 16)
    before = index.search(queries, 10)[1]
    gone = np.unique(before[:, :3])
    index.remove(gone)
    index.add(np.arange(20_000, 20_100, dtype=np.int64), units(rng, 100))
    after = index.search(queries, 10)
    assert not np.isin(after[1], gone).any()
    assert_same(after, faiss_flat(index, queries, 10))


def test_an_allowed_set_restricts_and_pads_with_minus_one(index):
    queries = units(np.random.default_rng(5), 4)
    live = faiss.rev_swig_ptr(index._index.id_map.data(), index._index.ntotal).copy()
    allowed = np.concatenate([live[::500], [99_999_999]])  # an id the index does not hold is ignored
    ours = index.search(queries, 20, allowed)
    assert_same(ours, faiss_flat(index, queries, 20, allowed))
    assert (ours[1][:, len(live[::500]) :] == -1).all()
    assert (ours[0][:, len(live[::500]) :] == np.float32(-np.finfo(np.float32).max)).all()


def test_tombstoned_rows_are_never_returned(index):
    """Flat removes rows outright today; tombstones (as HNSW keeps them) are honoured all the same."""
    queries = units(np.random.default_rng(9), 8)
    excluded = set(index.search(queries, 5)[1][:, 0].tolist())
    ours = flat.search(index._index, queries, 10, None, excluded)
    assert ours is not None
    assert_same(ours, faiss_flat(index, queries, 10, excluded=excluded))
    allowed = np.asarray(sorted(excluded) + [int(i) for i in index.search(queries, 40)[1][0]], np.int64)
    assert_same(flat.search(index._index, queries, 10, allowed, excluded), faiss_flat(index, queries, 10, allowed, excluded))
    one = queries[:1]  # a single query takes the one-thread path
    assert_same(flat.search(index._index, one, 10, allowed, excluded), faiss_flat(index, one, 10, allowed, excluded))


def test_equal_scores_keep_and_list_the_rows_added_first():
    """Duplicate vectors: faiss's heap order depends on arrival history; ours is insertion order."""
    rng = np.random.default_rng(1)
    groups = units(rng, 3)
    index = VectorIndex(DIM, IndexParams(kind="flat"))
    ids = np.asarray([50, 3, 7, 20, 9, 1, 40, 2, 8, 60, 5, 11], np.int64)
    index.rebuild("flat", [(ids, np.repeat(groups, 4, axis=0))])
    scores, found = index.search(groups, 6)
    by_group = {0: [50, 3, 7, 20], 1: [9, 1, 40, 2], 2: [8, 60, 5, 11]}
    for q in range(3):
        assert found[q, :4].tolist() == by_group[q]
        second = (groups @ groups[q]).argsort()[-2]  # the next best group: its first two rows
        assert found[q, 4:].tolist() == by_group[int(second)][:2]
        assert scores[q, 0] == pytest.approx(1.0, abs=1e-5) and scores[q, 4] < scores[q, 3]
    assert index.search(groups[:1], 2)[1].tolist() == [[50, 3]]


def test_blocks_merge_to_the_same_answer(index, monkeypatch):
    queries = units(np.random.default_rng(11), 64)
    whole = index.search(queries, 10)
    monkeypatch.setattr(flat, "BLOCK_FLOATS", 64 * 700)  # five blocks of 700 rows
    assert_same(index.search(queries, 10), whole)


def test_a_single_query_over_a_large_collection_takes_blas_with_the_same_answer(index, monkeypatch):
    one = units(np.random.default_rng(12), 1)
    small = index.search(one, 10)  # faiss's one-thread loop
    monkeypatch.setattr(flat, "SINGLE_QUERY_BLAS_ROWS", 100)
    assert_same(index.search(one, 10), small)


def test_empty_index_and_other_kinds():
    index = VectorIndex(DIM, IndexParams(kind="flat"))
    scores, ids = index.search(units(np.random.default_rng(2), 2), 3)
    assert (ids == -1).all() and scores.shape == (2, 3)
    hnsw = VectorIndex(DIM, IndexParams(kind="hnsw"))
    assert flat.search(hnsw._index, units(np.random.default_rng(2), 1), 3, None, ()) is None
