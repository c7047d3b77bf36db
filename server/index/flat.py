"""Exact search of a Flat collection by BLAS (one query: one SIMD thread) instead of faiss's Flat kernel.

faiss 1.15 scores fewer than `distance_compute_blas_threshold` (128,000) queries pair by pair,
and its IndexIDMap2 forks OpenMP threads even for ten labels: on two cores that ran 2-5x slower
than numpy's matrix product plus argpartition (benchmarks/search_bench.py). This reads the
vectors and ids in place from the faiss index (no copy; the caller holds the index lock) and
returns what faiss Flat returns: scores highest first, missing slots as id -1 with score -FLT_MAX.
Exactly equal scores (duplicate vectors) are the one difference: faiss's heap keeps and orders
them by arrival history; here the rows added first win at the cut and come first, as the
filtered exact path of Collection (a stable sort by sequence) orders them.

Rows outside `allowed`, or in `excluded` (tombstones), are never scored.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import faiss
import numpy as np

# Scores computed per block: queries x rows <= this many floats (16 MiB, plus argpartition's
# int64 indices), so a batch against a large collection never allocates queries x N at once.
BLOCK_FLOATS = 4 * 1024 * 1024
MISSING_SCORE = np.float32(-np.finfo(np.float32).max)


def flat_views(index: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(vectors, ids) of an IndexIDMap2 over an inner-product IndexFlat, as views into faiss's
    memory; None for any other index (the caller then asks faiss)."""
    inner = faiss.downcast_index(index.index)
    if not isinstance(inner, faiss.IndexFlat) or inner.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    count = int(inner.ntotal)
    if count == 0:
        return np.zeros((0, inner.d), np.float32), np.zeros(0, np.int64)
    vectors = faiss.rev_swig_ptr(inner.get_xb(), count * inner.d).reshape(count, inner.d)
    ids = faiss.rev_swig_ptr(index.id_map.data(), count)
    return vectors, ids


def _select(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (score, row) of each query row: highest score, then lowest row at a tie on the cut.

    `rows` is (n,) shared by every query, or (queries, n). Returns unsorted (queries, min(k, n)).
    """
    n = scores.shape[1]
    if n <= k:
        return scores, np.broadcast_to(rows, scores.shape).copy()
    top = np.argpartition(scores, n - k, axis=1)[:, n - k :]
    picked = np.take_along_axis(scores, top, 1)
    cut = picked.min(axis=1)
    at_or_above = (scores >= cut[:, None]).sum(axis=1)
    for q in np.flatnonzero(at_or_above > k):  # a tie straddles the cut: argpartition chose any of them
        row_rows = rows if rows.ndim == 1 else rows[q]
        above = np.flatnonzero(scores[q] > cut[q])
        tied = np.flatnonzero(scores[q] == cut[q])
        tied = tied[np.argsort(row_rows[tied], kind="stable")][: k - len(above)]
        top[q] = np.concatenate([above, tied])
    picked = np.take_along_axis(scores, top, 1)
    chosen = rows[top] if rows.ndim == 1 else np.take_along_axis(rows, top, 1)
    return picked, chosen


def _scores(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """queries x vectors inner products. One query (every Search RPC) on one thread: BLAS's gemv
    forks onto the second core, and when another process holds it the call waits a scheduler slice
    (8 ms vs 1.1 ms for 20k x 384 on this 2-core machine under load); faiss's SIMD loop is as fast
    as one BLAS thread. Batches keep BLAS's matrix product (its threads pay off there)."""
    if len(queries) != 1:
        return queries @ vectors.T
    vectors = np.ascontiguousarray(vectors)
    query = np.ascontiguousarray(queries[0])
    out = np.empty((1, len(vectors)), np.float32)
    faiss.fvec_inner_products_ny(
        faiss.swig_ptr(out), faiss.swig_ptr(query), faiss.swig_ptr(vectors), vectors.shape[1], len(vectors)
    )
    return out


def search(
    index: Any, queries: np.ndarray, k: int, allowed: np.ndarray | None, excluded: Collection[int]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Top-k inner products like `index.search` (scores, ids), or None when `index` is not Flat."""
    views = flat_views(index)
    if views is None:
        return None
    vectors, ids = views
    nq = len(queries)
    rows = np.arange(len(ids))
    if allowed is not None or excluded:
        keep = np.ones(len(ids), bool) if allowed is None else np.isin(ids, np.asarray(allowed, np.int64))
        if excluded:
            keep &= ~np.isin(ids, np.fromiter(excluded, np.int64, len(excluded)))
        rows = np.flatnonzero(keep)
        vectors = vectors[rows]
    out_scores = np.full((nq, k), MISSING_SCORE, np.float32)
    out_ids = np.full((nq, k), -1, np.int64)
    if len(rows) == 0 or nq == 0:
        return out_scores, out_ids
    block = max(k, BLOCK_FLOATS // nq)
    parts = []
    for start in range(0, len(rows), block):
        parts.append(_select(_scores(queries, vectors[start : start + block]), rows[start : start + block], k))
    if len(parts) == 1:
        scores, chosen = parts[0]
    else:
        scores, chosen = _select(np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1), k)
    order = np.lexsort((chosen, -scores), axis=1)  # score descending, then the row added first
    found = scores.shape[1]
    out_scores[:, :found] = np.take_along_axis(scores, order, 1)
    out_ids[:, :found] = ids[np.take_along_axis(chosen, order, 1)]
    return out_scores, out_ids
