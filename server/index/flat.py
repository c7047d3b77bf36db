"""Exact search of a Flat collection: scores by BLAS (one query over a small collection: faiss's
one-thread SIMD loop), then the top-k kernel (kernels/topk.py), instead of faiss's Flat kernel.

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

from openemploi.kernels import topk_rows

# Scores computed per block: queries x rows <= this many floats (16 MiB), so a batch against a
# large collection never allocates queries x N at once.
BLOCK_FLOATS = 4 * 1024 * 1024
# From this many rows a single query's scan is long enough for BLAS's two threads to pay even on a
# loaded machine (_scores); at 50k rows the two ways traded wins between p50 and p90.
SINGLE_QUERY_BLAS_ROWS = 65_536
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


def _scores(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """queries x vectors inner products. Batches, and single queries over at least
    SINGLE_QUERY_BLAS_ROWS rows, go to BLAS's matrix product on both cores. A smaller single query
    runs faiss's SIMD loop on one thread: when other processes hold the cores, BLAS's second thread
    waits for a scheduler slice, which costs more than it saves on a short scan. With both cores
    busy (benchmarks/flat_single_query.py): 20k rows p90 5.1 ms on one thread vs 8.7 ms with
    BLAS, 100k rows p50 22 vs 14 ms; on an idle machine BLAS halves both."""
    if len(queries) != 1 or len(vectors) >= SINGLE_QUERY_BLAS_ROWS:
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
    best_scores, best_rows = None, None
    for start in range(0, len(rows), block):
        scores, chosen = topk_rows(_scores(queries, vectors[start : start + block]), rows[start : start + block], k)
        if best_scores is not None:  # merge with the blocks before: the kernel's tie rule holds across blocks
            scores, chosen = topk_rows(np.concatenate([best_scores, scores], 1), np.concatenate([best_rows, chosen], 1), k)
        best_scores, best_rows = scores, chosen
    assert best_scores is not None and best_rows is not None  # at least one block: rows is not empty
    found = best_scores.shape[1]
    out_scores[:, :found] = best_scores
    out_ids[:, :found] = ids[best_rows]
    return out_scores, out_ids
