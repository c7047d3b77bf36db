"""The exact-search top-k kernel against its numpy specification: ties, merged blocks, shapes, errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from openemploi.kernels import topk_rows, topk_rows_numba, topk_rows_reference


def assert_same(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("queries,n,k", [(1, 1, 1), (1, 50, 10), (3, 7, 10), (64, 2000, 10), (5, 300, 100), (2, 40, 0)])
def test_numba_equals_the_reference(queries, n, k):
    rng = np.random.default_rng(queries * 1000 + n + k)
    scores = rng.standard_normal((queries, n)).astype(np.float32)
    rows = np.arange(n, dtype=np.int64) + 7
    got = topk_rows_numba(scores, rows, k)
    assert_same(got, topk_rows_reference(scores, rows, k))
    assert got[0].shape == (queries, min(k, n))


def test_the_best_come_first_and_at_a_tie_the_smaller_row():
    scores = np.asarray([[0.5, 0.9, 0.5, 0.7, 0.5, 0.9]], np.float32)
    rows = np.asarray([40, 30, 10, 20, 5, 60], np.int64)  # rows in no particular order
    for backend in ("numpy", "numba"):
        best, chosen = topk_rows(scores, rows, 4, backend=backend)
        assert chosen.tolist() == [[30, 60, 20, 5]], backend  # 0.9 x2 by row, 0.7, then the smallest of the 0.5s
        assert best.tolist() == [[pytest.approx(0.9), pytest.approx(0.9), pytest.approx(0.7), 0.5]]


def test_coarse_scores_full_of_ties_keep_the_rule():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, (16, 500)).astype(np.float32)  # hundreds of rows share each score
    rows = rng.permutation(500).astype(np.int64)
    assert_same(topk_rows_numba(scores, rows, 25), topk_rows_reference(scores, rows, 25))


def test_merging_blocks_gives_the_answer_of_one_pass():
    rng = np.random.default_rng(4)
    scores = np.round(rng.standard_normal((8, 900)), 1).astype(np.float32)  # ties across blocks
    rows = np.arange(900, dtype=np.int64)
    whole = topk_rows_numba(scores, rows, 10)
    merged_scores, merged_rows = None, None
    for start in range(0, 900, 250):
        part = topk_rows_numba(scores[:, start : start + 250], rows[start : start + 250], 10)
        if merged_scores is not None:
            part = topk_rows_numba(np.concatenate([merged_scores, part[0]], 1), np.concatenate([merged_rows, part[1]], 1), 10)
        merged_scores, merged_rows = part
    assert_same((merged_scores, merged_rows), whole)


def test_bad_shapes_and_k_are_value_errors():
    scores = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match="rows must be"):
        topk_rows(scores, np.arange(4), 3)
    with pytest.raises(ValueError, match="scores must be"):
        topk_rows(np.zeros(5, np.float32), np.arange(5), 3)
    with pytest.raises(ValueError, match="k must be"):
        topk_rows(scores, np.arange(5), -1)


def test_warm_up_compiles_the_search_kernels_in_a_fresh_process():
    check = (
        "import openemploi.kernels as K; from openemploi.kernels.topk import _topk_cpu; "
        "from openemploi.kernels.fusion import _fuse_cpu; "
        "assert not _topk_cpu.signatures and not _fuse_cpu.signatures; K.warm_up(); "
        "assert _topk_cpu.signatures and _fuse_cpu.signatures"
    )
    proc = subprocess.run([sys.executable, "-P", "-c", check], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
