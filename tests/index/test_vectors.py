"""The index kind a collection's size calls for: it grows at its mark and comes back only below SHRINK_MARK x it."""

from __future__ import annotations

import numpy as np
import pytest

from openemploi.index.vectors import IVF_MIN_TRAIN, SHRINK_MARK, IndexParams, VectorIndex

DIM = 8


def batches(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    vectors = np.random.default_rng(n).normal(size=(n, DIM)).astype(np.float32)
    return [(np.arange(1, n + 1, dtype=np.int64), vectors / np.linalg.norm(vectors, axis=1, keepdims=True))]


@pytest.mark.parametrize(
    ("params", "larger", "first_larger"),
    [
        (IndexParams(kind="auto", flat_max=100), "hnsw", 101),  # HNSW past flat_max
        (IndexParams(kind="ivf", flat_max=100), "ivf", 100),  # IVF trains at min(IVF_MIN_TRAIN, flat_max)
        (IndexParams(kind="ivf", flat_max=10 * IVF_MIN_TRAIN), "ivf", IVF_MIN_TRAIN),
    ],
)
def test_the_kind_grows_at_its_mark_and_shrinks_only_below_the_shrink_mark(params, larger, first_larger):
    index = VectorIndex(DIM, params)
    assert index.target_kind(first_larger - 1) == "flat" and index.target_kind(first_larger) == larger
    index.rebuild(larger, batches(200))
    mark = min(params.flat_max, IVF_MIN_TRAIN) if larger == "ivf" else params.flat_max
    lowest_kept = int(np.ceil(SHRINK_MARK * mark))
    assert index.target_kind(first_larger - 1) == larger  # just under the mark: no flip back
    assert index.target_kind(lowest_kept) == larger and index.target_kind(lowest_kept - 1) == "flat"


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_fixed_kind_never_changes(kind):
    index = VectorIndex(DIM, IndexParams(kind=kind, flat_max=10))
    assert {index.target_kind(n) for n in (0, 10, 11, 10_000)} == {kind}
