"""The k best scores of each query row, and their rows; the selection step of exact (Flat) search.

Input: ``scores`` float32 ``[q, n]`` (one row of inner products per query) and ``rows`` int64,
either ``[n]`` (the same row numbers for every query: one block of a collection; on the device
``[1, n]``) or ``[q, n]`` (per query: candidates merged from several blocks).
Output: ``(best_scores float32[q, r], best_rows int64[q, r])`` with ``r = min(k, n)``, each query's
row sorted by score descending, then by smaller row. So at a tie on the cut the rows with the
smaller numbers are kept, whatever order they come in: the rows added to a collection first win,
as the collection's filtered exact path orders them.

Why a kernel: after BLAS's matrix product (7.1 ms), numpy's ``argpartition`` and the tie check
over the ``[64, 20,000]`` scores took 3.6 ms of a batch-64 search. This kernel reads each score
once and keeps a sorted list of the k best, so a score below the k-th costs one comparison
(benchmarks/kernels_bench.py: 2.5x on that case).

NaN scores are not supported (a NaN is never kept by the compiled kernels).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from . import _dispatch


def _check(scores: Any, rows: Any, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    rows = _dispatch.as_int_array(rows, np.int64, "rows", ndim=2 if np.ndim(rows) == 2 else 1)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [queries, n], got shape {scores.shape}")
    if rows.shape not in ((scores.shape[1],), scores.shape):
        raise ValueError(f"rows must be [n] or [queries, n] for scores {scores.shape}, got {rows.shape}")
    return scores, np.ascontiguousarray(rows.reshape(-1, scores.shape[1])), _dispatch.as_k(k)


def topk_rows_reference(scores: Any, rows: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy: a full sort of each query row by (score descending, row ascending)."""
    scores, rows, k = _check(scores, rows, k)
    rows = np.broadcast_to(rows, scores.shape)
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


@njit(cache=True, nogil=True)
def _topk_cpu(scores, rows, best_scores, best_rows):  # pragma: no cover - compiled
    # one thread (kernels/__init__.py): an insertion into a sorted list of k, entered only by a
    # score at least as high as the k-th. rows is [1, n] when every query shares it.
    queries, n = scores.shape
    k = best_scores.shape[1]
    for q in range(queries):
        kept_scores = best_scores[q]
        kept_rows = best_rows[q]
        row_of = rows[q] if rows.shape[0] == queries else rows[0]
        count = 0
        for j in range(n):
            score = scores[q, j]
            row = row_of[j]
            if count == k:
                if not score >= kept_scores[k - 1]:
                    continue
                if score == kept_scores[k - 1] and row > kept_rows[k - 1]:
                    continue
                pos = k - 1
            else:
                pos = count
                count += 1
            while pos > 0 and (kept_scores[pos - 1] < score or (kept_scores[pos - 1] == score and kept_rows[pos - 1] > row)):
                kept_scores[pos] = kept_scores[pos - 1]
                kept_rows[pos] = kept_rows[pos - 1]
                pos -= 1
            kept_scores[pos] = score
            kept_rows[pos] = row


def topk_rows_numba(scores: Any, rows: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numba CPU, one thread, one pass over the scores."""
    scores, rows, k = _check(scores, rows, k)
    kept = min(k, scores.shape[1])
    best_scores = np.empty((scores.shape[0], kept), np.float32)
    best_rows = np.empty((scores.shape[0], kept), np.int64)
    if kept:
        _topk_cpu(scores, rows, best_scores, best_rows)
    return best_scores, best_rows


def topk_rows_cuda(scores: Any, rows: Any, k: int) -> tuple[Any, Any]:
    """numba CUDA: one thread per query row. Device inputs give device outputs; host inputs, numpy outputs."""
    from numba import cuda

    device_in = _dispatch.on_device(scores) or _dispatch.on_device(rows)
    if not device_in:
        scores, rows, k = _check(scores, rows, k)
    else:
        if len(scores.shape) != 2 or tuple(rows.shape) not in ((1, scores.shape[1]), tuple(scores.shape)):
            raise ValueError(f"device rows must be [1, n] or [queries, n] for scores {scores.shape}, got {rows.shape}")
        if np.dtype(scores.dtype) != np.float32 or np.dtype(rows.dtype) != np.int64:
            raise TypeError(f"device scores must be float32 and rows int64, got {scores.dtype} and {rows.dtype}")
        k = _dispatch.as_k(k)
    from ._cuda import TOPK_THREADS, topk_kernel

    queries, n = scores.shape
    kept = min(k, n)
    best_scores = cuda.device_array((queries, kept), np.float32)
    best_rows = cuda.device_array((queries, kept), np.int64)
    if queries and kept:
        blocks = (queries + TOPK_THREADS - 1) // TOPK_THREADS
        topk_kernel[blocks, TOPK_THREADS](_dispatch.to_device(scores), _dispatch.to_device(rows), best_scores, best_rows)
    if device_in:
        return best_scores, best_rows
    return best_scores.copy_to_host(), best_rows.copy_to_host()


def topk_rows(scores: Any, rows: Any, k: int, backend: str | None = None) -> tuple[Any, Any]:
    """The k best (score, row) of each query row; ``backend``: None (auto) | "numpy" | "numba" | "cuda"."""
    chosen = _dispatch.pick(backend, scores, rows)
    if chosen == "cuda":
        return topk_rows_cuda(scores, rows, k)
    scores, rows = _dispatch.to_host(scores), _dispatch.to_host(rows)
    if chosen == "numpy":
        return topk_rows_reference(scores, rows, k)
    return topk_rows_numba(scores, rows, k)
