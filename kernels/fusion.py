"""Fusion of a dense and a lexical candidate list, then top-k; the kernel of ``Collection._fuse``.

Inputs: ``dense_ids int64[a]`` with ``dense_scores[a]`` and ``lexical_ids int64[b]`` with
``lexical_scores[b]`` (bm25, higher = better), each list best-first (rank 1 = index 0). Scores are
read as float64, so the store's float64 bm25 scores go through without rounding. Candidates that
the store no longer has must be removed from both lists before the call (``Collection._fuse``
does): the kernel scores every id it is given.

Candidates (the *union*) are the distinct ids of ``dense_ids`` then ``lexical_ids``, in first-seen
order: ``fusion_candidates(dense_ids, lexical_ids)``.

Scores, computed in float64:

* ``mode="rrf"``: ``sum over the lists that hold the id of 1 / (60 + rank)``, 1-based ranks.
  Only the ranks matter: ``dense_scores``, ``lexical_scores`` and ``union_dense`` are not read.
* ``mode="weighted"``: ``w * union_dense[u] + (1 - w) * lexical / top`` with ``w = dense_weight``,
  ``lexical`` the id's lexical score (0 when absent from the lexical list) and ``top`` the largest
  lexical score, or 1 when there is none or it is 0 (``max(..., default=0) or 1``).

  **Contract**: ``union_dense[u]`` (required in this mode, read as float64) holds the dense score
  of every candidate, aligned with ``fusion_candidates(dense_ids, lexical_ids)``. The dense search
  returns no score for the lexical-only candidates, so the caller computes the exact cosine of
  every candidate (``vectors[union] @ query``) and passes them here; ``dense_scores`` is not read
  (it is there so FAISS output can be passed as is, and for validation of its length). A length
  other than ``u`` is a ``ValueError``.

Output: ``Fused(ids int64[r], scores float32[r], dense_rank int32[r], lexical_rank int32[r])``
with ``r = min(k, u)``, sorted by score descending, ties by smaller id (applied to the float64
scores; ``scores`` are those rounded to float32). A rank is 0 when the id is not in that list.
The lexical score of a hit is ``lexical_scores[lexical_rank - 1]`` when ``lexical_rank > 0``.

On a real GPU, NVVM contracts multiply-adds into FMAs by default, so the CUDA kernel's weighted
scores may differ from the CPU ones in the last bit, which can swap two candidates whose scores
differ by about one ulp (the simulator, and the rrf mode, match the CPU exactly).

Duplicated ids inside one list are not expected (FAISS and FTS5 return distinct rows); if there
are some, the *last* occurrence gives the rank and the lexical score, as ``dict(lexical)`` does for
the lexical score ``Collection._fuse`` shows. NaN scores are not supported.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numba import njit

from . import _dispatch

RRF_K = 60
MODES = ("rrf", "weighted")


class Fused(NamedTuple):
    ids: np.ndarray  # int64[r]
    scores: np.ndarray  # float32[r]
    dense_rank: np.ndarray  # int32[r], 0 = not in the dense list
    lexical_rank: np.ndarray  # int32[r], 0 = not in the lexical list


def _empty() -> Fused:
    return Fused(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(0, np.int32))


def _check(dense_ids, dense_scores, lexical_ids, lexical_scores, k, mode, dense_weight, union_dense):
    dense_ids = _dispatch.as_int_array(dense_ids, np.int64, "dense_ids")
    lexical_ids = _dispatch.as_int_array(lexical_ids, np.int64, "lexical_ids")
    dense_scores = np.asarray(dense_scores)
    lexical_scores = np.ascontiguousarray(lexical_scores, dtype=np.float64)
    if dense_scores.shape != dense_ids.shape:
        raise ValueError(f"dense_scores has shape {dense_scores.shape}, dense_ids {dense_ids.shape}")
    if lexical_scores.shape != lexical_ids.shape:
        raise ValueError(f"lexical_scores has shape {lexical_scores.shape}, lexical_ids {lexical_ids.shape}")
    k = _dispatch.as_k(k)
    if mode not in MODES:
        raise ValueError(f"unknown fusion mode {mode!r}; expected one of {MODES}")
    dense_weight = float(dense_weight)
    if mode == "weighted":
        if union_dense is None:
            raise ValueError("weighted fusion needs union_dense: the dense score of every candidate of fusion_candidates()")
        union_dense = np.ascontiguousarray(union_dense, dtype=np.float64)
        if union_dense.ndim != 1:
            raise ValueError(f"union_dense must be 1-dimensional, got shape {union_dense.shape}")
        if not np.isfinite(dense_weight):
            raise ValueError(f"dense_weight must be finite, got {dense_weight}")
    else:
        union_dense = np.zeros(0, np.float64)
    return dense_ids, lexical_ids, lexical_scores, k, union_dense, dense_weight


def _union_mismatch(got: int, want: int) -> ValueError:
    return ValueError(f"union_dense has {got} scores but there are {want} candidates (see fusion_candidates)")


# -- numpy reference ----------------------------------------------------------------------------------
def fusion_candidates(dense_ids: Any, lexical_ids: Any) -> np.ndarray:
    """The candidates, distinct ids in first-seen order (dense list, then lexical): union_dense's order."""
    all_ids = np.concatenate(
        [
            _dispatch.as_int_array(dense_ids, np.int64, "dense_ids"),
            _dispatch.as_int_array(lexical_ids, np.int64, "lexical_ids"),
        ]
    )
    _, first = np.unique(all_ids, return_index=True)
    return all_ids[np.sort(first)]


def _last_positions(ids: np.ndarray, uniq: np.ndarray) -> np.ndarray:
    """For each id of ``uniq`` (sorted), 1 + its last position in ``ids``, or 0."""
    out = np.zeros(uniq.size, np.int64)
    if ids.size:
        rev_uniq, rev_first = np.unique(ids[::-1], return_index=True)
        out[np.searchsorted(uniq, rev_uniq)] = ids.size - rev_first
    return out


def fuse_topk_reference(
    dense_ids: Any,
    dense_scores: Any,
    lexical_ids: Any,
    lexical_scores: Any,
    k: int,
    mode: str = "rrf",
    dense_weight: float = 0.7,
    union_dense: Any = None,
) -> Fused:
    """numpy: np.unique over the concatenated ids, vectorised scores, a stable sort."""
    dense_ids, lexical_ids, lexical_scores, k, union_dense, w = _check(
        dense_ids, dense_scores, lexical_ids, lexical_scores, k, mode, dense_weight, union_dense
    )
    all_ids = np.concatenate([dense_ids, lexical_ids])
    uniq, first = np.unique(all_ids, return_index=True)  # uniq sorted ascending
    if mode == "weighted" and union_dense.size != uniq.size:
        raise _union_mismatch(union_dense.size, uniq.size)
    if uniq.size == 0 or k == 0:
        return _empty()
    dense_rank = _last_positions(dense_ids, uniq)
    lexical_rank = _last_positions(lexical_ids, uniq)
    in_dense, in_lexical = dense_rank > 0, lexical_rank > 0
    if mode == "rrf":
        score = np.where(in_dense, 1.0 / (RRF_K + dense_rank), 0.0) + np.where(in_lexical, 1.0 / (RRF_K + lexical_rank), 0.0)
    else:
        lexical = np.zeros(uniq.size, np.float64)
        lexical[in_lexical] = lexical_scores[lexical_rank[in_lexical] - 1]
        top = float(lexical[in_lexical].max()) if in_lexical.any() else 0.0
        top = top or 1.0
        union_pos = np.empty(uniq.size, np.int64)
        union_pos[np.argsort(first, kind="stable")] = np.arange(uniq.size)
        score = w * union_dense[union_pos] + (1 - w) * lexical / top
    order = np.argsort(-score, kind="stable")[:k]  # uniq ascending: ties keep the smaller id first
    return Fused(
        uniq[order],
        score[order].astype(np.float32),
        dense_rank[order].astype(np.int32),
        lexical_rank[order].astype(np.int32),
    )


# -- numba CPU -----------------------------------------------------------------------------------------
_HASH_MUL = np.int64(-7046029254386353131)  # 0x9E3779B97F4A7C15 as int64 (Fibonacci hashing)


@njit(cache=True)
def _better(score, cand, g, h):  # pragma: no cover - compiled
    """Candidate g ranks before candidate h: higher score, then smaller id."""
    return score[g] > score[h] or (score[g] == score[h] and cand[g] < cand[h])


@njit(cache=True)
def _sift_down(heap, size, i, score, cand):  # pragma: no cover - compiled
    # heap of candidate indices, the worst kept one at the root
    while True:
        worst = i
        left = 2 * i + 1
        if left < size and _better(score, cand, heap[worst], heap[left]):
            worst = left
        if left + 1 < size and _better(score, cand, heap[worst], heap[left + 1]):
            worst = left + 1
        if worst == i:
            return
        heap[i], heap[worst] = heap[worst], heap[i]
        i = worst


@njit(cache=True)
def _top_r(score, cand, u, r):  # pragma: no cover - compiled
    """Indices of the best r of u candidates, best first: a size-r heap, O(u log r), no sort."""
    heap = np.empty(r, np.int64)
    size = 0
    for g in range(u):
        if size < r:
            i = size
            heap[i] = g
            size += 1
            while i > 0:
                parent = (i - 1) // 2
                if not _better(score, cand, heap[parent], heap[i]):
                    break
                heap[i], heap[parent] = heap[parent], heap[i]
                i = parent
        elif _better(score, cand, g, heap[0]):
            heap[0] = g
            _sift_down(heap, size, 0, score, cand)
    out = np.empty(r, np.int64)
    for j in range(r - 1, -1, -1):
        out[j] = heap[0]
        size -= 1
        heap[0] = heap[size]
        _sift_down(heap, size, 0, score, cand)
    return out


@njit(cache=True)
def _fuse_cpu(dense_ids, lexical_ids, lexical_scores, union_dense, k, weighted, w):  # pragma: no cover
    """Returns (ids, scores f64, dense_rank, lexical_rank, n_candidates); n_candidates -1 - u on a
    union_dense length mismatch (u candidates)."""
    a = dense_ids.size
    b = lexical_ids.size
    n = a + b
    bits = 1
    while (1 << bits) < 2 * n:
        bits += 1
    mask = (1 << bits) - 1
    slots = np.full(1 << bits, -1, np.int32)  # open addressing: slot -> candidate index
    cand = np.empty(n, np.int64)
    dr = np.zeros(n, np.int32)
    lr = np.zeros(n, np.int32)
    lex = np.zeros(n, np.float64)
    u = 0
    for pos in range(n):
        x = dense_ids[pos] if pos < a else lexical_ids[pos - a]
        h = ((x * _HASH_MUL) >> (64 - bits)) & mask
        while True:
            g = slots[h]
            if g < 0:
                g = u
                slots[h] = g
                cand[g] = x
                u += 1
                break
            if cand[g] == x:
                break
            h = (h + 1) & mask
        if pos < a:
            dr[g] = pos + 1  # last occurrence wins (see the module docstring)
        else:
            lr[g] = pos - a + 1
            lex[g] = lexical_scores[pos - a]
    if weighted and union_dense.size != u:
        return cand[:0], lex[:0], dr[:0], lr[:0], -1 - u
    r = min(k, u)
    if r == 0:
        return cand[:0], lex[:0], dr[:0], lr[:0], u
    score = np.empty(u, np.float64)
    if weighted:
        top = 0.0
        seen = False
        for g in range(u):
            if lr[g] > 0 and (not seen or lex[g] > top):
                top = lex[g]
                seen = True
        if top == 0.0:
            top = 1.0
        for g in range(u):
            score[g] = w * union_dense[g] + (1.0 - w) * lex[g] / top
    else:
        for g in range(u):
            s = 0.0
            if dr[g] > 0:
                s = s + 1.0 / (RRF_K + dr[g])
            if lr[g] > 0:
                s = s + 1.0 / (RRF_K + lr[g])
            score[g] = s
    out = _top_r(score, cand, u, r)
    ids = np.empty(r, np.int64)
    scores = np.empty(r, np.float64)
    odr = np.empty(r, np.int32)
    olr = np.empty(r, np.int32)
    for j in range(r):
        g = out[j]
        ids[j] = cand[g]
        scores[j] = score[g]
        odr[j] = dr[g]
        olr[j] = lr[g]
    return ids, scores, odr, olr, u


def fuse_topk_numba(
    dense_ids: Any,
    dense_scores: Any,
    lexical_ids: Any,
    lexical_scores: Any,
    k: int,
    mode: str = "rrf",
    dense_weight: float = 0.7,
    union_dense: Any = None,
) -> Fused:
    """numba CPU, single thread (a few hundred candidates: threads would cost more than they save):
    a hash table over the ids, then a heap of the best k (no sort: fast to compile and to run)."""
    dense_ids, lexical_ids, lexical_scores, k, union_dense, w = _check(
        dense_ids, dense_scores, lexical_ids, lexical_scores, k, mode, dense_weight, union_dense
    )
    ids, scores, dr, lr, u = _fuse_cpu(dense_ids, lexical_ids, lexical_scores, union_dense, k, mode == "weighted", w)
    if u < 0:
        raise _union_mismatch(union_dense.size, -1 - u)
    return Fused(ids, scores.astype(np.float32), dr, lr)


# -- numba CUDA ----------------------------------------------------------------------------------------
def fuse_topk_cuda(
    dense_ids: Any,
    dense_scores: Any,
    lexical_ids: Any,
    lexical_scores: Any,
    k: int,
    mode: str = "rrf",
    dense_weight: float = 0.7,
    union_dense: Any = None,
) -> Fused:
    """numba CUDA: one thread per position (quadratic scans; pools are a few hundred ids).
    Inputs may be host or device arrays; they are small and validated on the host, then copied to
    the device. The (small) result always comes back as numpy arrays."""
    from numba import cuda

    host_dense_ids, host_dense_scores, host_lexical_ids, host_lexical_scores = (
        _dispatch.to_host(x) for x in (dense_ids, dense_scores, lexical_ids, lexical_scores)
    )
    # validation reads shapes and mode only; ids and scores go to the device as given
    d_ids, l_ids, l_scores, k, union_host, w = _check(
        host_dense_ids,
        host_dense_scores,
        host_lexical_ids,
        host_lexical_scores,
        k,
        mode,
        dense_weight,
        _dispatch.to_host(union_dense),
    )
    n = d_ids.size + l_ids.size
    if n == 0:
        if mode == "weighted" and union_host.size:
            raise _union_mismatch(union_host.size, 0)
        return _empty()
    from ._cuda import fusion_groups, fusion_scores, fusion_select

    threads = _dispatch.cuda_threads(128)
    blocks = (n + threads - 1) // threads
    dev_d, dev_l, dev_ls = cuda.to_device(d_ids), cuda.to_device(l_ids), cuda.to_device(l_scores)
    is_first = cuda.device_array(n, np.int32)
    dr = cuda.device_array(n, np.int32)
    lr = cuda.device_array(n, np.int32)
    lex = cuda.device_array(n, np.float64)
    counters = cuda.to_device(np.zeros(2, np.int64))
    top = cuda.to_device(np.array([-np.inf]))
    fusion_groups[blocks, threads](dev_d, dev_l, dev_ls, is_first, dr, lr, lex, counters, top)
    u, n_lexical = (int(c) for c in counters.copy_to_host())
    if mode == "weighted" and union_host.size != u:
        raise _union_mismatch(union_host.size, u)
    r = min(k, u)
    if r == 0:
        return _empty()
    if n_lexical == 0:
        top = cuda.to_device(np.zeros(1))
    dev_union = cuda.to_device(union_host if union_host.size else np.zeros(1))
    score = cuda.device_array(n, np.float64)
    fusion_scores[blocks, threads](is_first, dr, lr, lex, dev_union, top, mode == "weighted", w, score)
    out_ids = cuda.device_array(r, np.int64)
    out_scores = cuda.device_array(r, np.float64)
    out_dr = cuda.device_array(r, np.int32)
    out_lr = cuda.device_array(r, np.int32)
    fusion_select[blocks, threads](dev_d, dev_l, is_first, dr, lr, score, r, out_ids, out_scores, out_dr, out_lr)
    return Fused(
        out_ids.copy_to_host(),
        out_scores.copy_to_host().astype(np.float32),
        out_dr.copy_to_host(),
        out_lr.copy_to_host(),
    )


def fuse_topk(
    dense_ids: Any,
    dense_scores: Any,
    lexical_ids: Any,
    lexical_scores: Any,
    k: int,
    mode: str = "rrf",
    dense_weight: float = 0.7,
    union_dense: Any = None,
    backend: str | None = None,
) -> Fused:
    """Dense + lexical fusion and top-k (see the module docstring); ``backend``: None (auto) |
    "numpy" | "numba" | "cuda"."""
    chosen = _dispatch.pick(backend, dense_ids, dense_scores, lexical_ids, lexical_scores, union_dense)
    args = (dense_ids, dense_scores, lexical_ids, lexical_scores, k, mode, dense_weight, union_dense)
    if chosen == "cuda":
        return fuse_topk_cuda(*args)
    args = tuple(_dispatch.to_host(x) for x in args)
    if chosen == "numpy":
        return fuse_topk_reference(*args)
    return fuse_topk_numba(*args)
