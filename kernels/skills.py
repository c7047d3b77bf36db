"""Skill overlap between one profile and many items (the skill share of ``match_profile``).

Inputs: ``profile int32[p]``, the profile's skill ids, sorted and unique; the items as CSR,
``indptr int64[m + 1]`` (``indptr[0] == 0``, non-decreasing, ``indptr[m] == nnz``) and
``skill_ids int32[nnz]``, item ``i`` owning ``skill_ids[indptr[i]:indptr[i + 1]]``, sorted and unique
within each item; ``weights float32[n_skills]`` or None (every skill weighs 1), non-negative and
finite, indexed by skill id (every item skill id then lies in ``[0, n_skills)``).

Output: ``(overlap_share float32[m], matched_count int32[m])`` with
``matched_count[i] = |item_i ∩ profile|`` and
``overlap_share[i] = sum(weights[s] for s in item_i ∩ profile) / sum(weights[s] for s in item_i)``
(sums in float64), 0 for an item with no skills or a zero total weight. Unweighted, this is
``len(matched) / len(item_skills)`` of ``match_profile``, once skills are mapped to ids (the
caller folds them with ``fold_skill`` and deduplicates them first).

Violations (unsorted or repeated ids in an item or in the profile, a bad ``indptr``, an item skill
id outside ``weights``) raise ``ValueError``: the kernels check them as they go, so invalid input
never reads out of bounds.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from . import _dispatch

_BAD_INDPTR, _BAD_ORDER, _BAD_ID = -1, -2, -3
_PROBLEMS = {
    _BAD_INDPTR: "indptr is not non-decreasing within [0, nnz]",
    _BAD_ORDER: "its skill ids are not sorted and unique",
    _BAD_ID: "a skill id is outside [0, len(weights))",
}


def _check_profile(profile: Any) -> np.ndarray:
    profile = _dispatch.as_int_array(profile, np.int32, "profile")
    if profile.size > 1 and not np.all(profile[1:] > profile[:-1]):
        raise ValueError("profile skill ids must be sorted and unique")
    return profile


def _check_ends(size: int, first: int, last: int, nnz: int) -> None:
    if size == 0 or first != 0 or last != nnz:
        raise ValueError(f"indptr must have m + 1 entries, start at 0 and end at nnz={nnz}")


def _check_weights(weights: Any) -> np.ndarray | None:
    if weights is None:
        return None
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    if weights.ndim != 1:
        raise ValueError(f"weights must be 1-dimensional, got shape {weights.shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("weights must be finite and non-negative")
    return weights


def _check(profile: Any, indptr: Any, skill_ids: Any, weights: Any):
    profile = _check_profile(profile)
    indptr = _dispatch.as_int_array(indptr, np.int64, "indptr")
    skill_ids = _dispatch.as_int_array(skill_ids, np.int32, "skill_ids")
    _check_ends(indptr.size, int(indptr[0]) if indptr.size else 0, int(indptr[-1]) if indptr.size else 0, skill_ids.size)
    return profile, indptr, skill_ids, _check_weights(weights)


def _raise_for(status: np.ndarray) -> None:
    """The error for the first bad item, a bad indptr first (it makes the other checks moot)."""
    for problem in (_BAD_INDPTR, _BAD_ORDER, _BAD_ID):
        bad = np.flatnonzero(status == problem)
        if bad.size:
            raise ValueError(f"item {int(bad[0])} (and {bad.size - 1} more): {_PROBLEMS[problem]}")


def skill_overlap_reference(
    profile: Any, indptr: Any, skill_ids: Any, weights: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """numpy: np.isin for the matches, np.bincount per item for the counts and weighted sums."""
    profile, indptr, skill_ids, weights = _check(profile, indptr, skill_ids, weights)
    m = indptr.size - 1
    lengths = np.diff(indptr)
    status = np.zeros(m, np.int32)
    if np.any(lengths < 0):
        status[lengths < 0] = _BAD_INDPTR
        _raise_for(status)
    item_of = np.repeat(np.arange(m), lengths)
    same_item = item_of[1:] == item_of[:-1]
    unsorted = same_item & (skill_ids[1:] <= skill_ids[:-1])
    if unsorted.any():
        status[item_of[1:][unsorted]] = _BAD_ORDER
        _raise_for(status)
    hit = np.isin(skill_ids, profile)
    matched = np.bincount(item_of[hit], minlength=m).astype(np.int32)
    if weights is None:
        total = lengths.astype(np.float64)
        got = matched.astype(np.float64)
    else:
        outside = (skill_ids < 0) | (skill_ids >= weights.size)
        if outside.any():
            status[item_of[outside]] = _BAD_ID
            _raise_for(status)
        w = weights[skill_ids].astype(np.float64)
        total = np.bincount(item_of, weights=w, minlength=m)
        got = np.bincount(item_of, weights=np.where(hit, w, 0.0), minlength=m)
    share = np.zeros(m, np.float64)
    np.divide(got, total, out=share, where=total > 0)
    return share.astype(np.float32), matched


@njit(cache=True)
def _overlap_cpu(profile, indptr, skill_ids, weights, weighted, share, matched):  # pragma: no cover
    m = indptr.size - 1
    nnz = skill_ids.size
    n_profile = profile.size
    n_weights = weights.size
    bad = 0
    for i in range(m):  # one thread: on 2 shared cores parallel=True ran 1.5-2.5x slower (benchmark)
        start = indptr[i]
        end = indptr[i + 1]
        status = 0
        count = 0
        got = 0.0
        total = 0.0
        if start < 0 or end < start or end > nnz:
            status = _BAD_INDPTR
        else:
            p = 0
            prev = 0
            for j in range(start, end):
                s = skill_ids[j]
                if j > start and s <= prev:
                    status = _BAD_ORDER
                    break
                prev = s
                w = 1.0
                if weighted:
                    if s < 0 or s >= n_weights:
                        status = _BAD_ID
                        break
                    w = np.float64(weights[s])
                total += w
                while p < n_profile and profile[p] < s:
                    p += 1
                if p < n_profile and profile[p] == s:
                    count += 1
                    got += w
                    p += 1
        if status != 0:
            bad += 1
            matched[i] = status
            share[i] = 0.0
        else:
            matched[i] = count
            share[i] = got / total if total > 0.0 else 0.0
    return bad


def skill_overlap_numba(
    profile: Any, indptr: Any, skill_ids: Any, weights: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """numba CPU, one thread: a merge of each item's sorted ids with the profile's."""
    profile, indptr, skill_ids, weights = _check(profile, indptr, skill_ids, weights)
    m = indptr.size - 1
    share = np.empty(m, np.float32)
    matched = np.empty(m, np.int32)
    weighted = weights is not None
    if not weighted:
        weights = np.zeros(0, np.float32)
    if m and _overlap_cpu(profile, indptr, skill_ids, weights, weighted, share, matched):
        _raise_for(matched)
    return share, matched


def skill_overlap_cuda(
    profile: Any, indptr: Any, skill_ids: Any, weights: Any = None
) -> tuple[Any, Any]:
    """numba CUDA: one thread per item. Device inputs give device outputs; host inputs, numpy ones.
    The profile, the two ends of indptr and the weights are checked on the host (copied if needed)."""
    from numba import cuda

    from ._cuda import overlap_kernel

    device_in = any(_dispatch.on_device(x) for x in (profile, indptr, skill_ids, weights))
    host_profile = _check_profile(_dispatch.to_host(profile))
    host_weights = _check_weights(_dispatch.to_host(weights))
    if not _dispatch.on_device(indptr):
        indptr = _dispatch.as_int_array(indptr, np.int64, "indptr")
    if not _dispatch.on_device(skill_ids):
        skill_ids = _dispatch.as_int_array(skill_ids, np.int32, "skill_ids")
    size = int(indptr.shape[0])
    first = int(_dispatch.to_host(indptr[:1])[0]) if size else 0
    last = int(_dispatch.to_host(indptr[size - 1:])[0]) if size else 0
    _check_ends(size, first, last, int(skill_ids.shape[0]))
    m = int(indptr.shape[0]) - 1
    share = cuda.device_array(m, np.float32)
    matched = cuda.device_array(m, np.int32)
    if m:
        weighted = host_weights is not None
        d_weights = _dispatch.to_device(host_weights if weighted else np.zeros(1, np.float32))
        bad = cuda.to_device(np.zeros(1, np.int64))
        threads = _dispatch.cuda_threads(256)
        overlap_kernel[(m + threads - 1) // threads, threads](
            _dispatch.to_device(host_profile), _dispatch.to_device(indptr), _dispatch.to_device(skill_ids),
            d_weights, weighted, share, matched, bad,
        )
        if bad.copy_to_host()[0]:
            _raise_for(matched.copy_to_host())
    if device_in:
        return share, matched
    return share.copy_to_host(), matched.copy_to_host()


def skill_overlap(
    profile: Any, indptr: Any, skill_ids: Any, weights: Any = None, backend: str | None = None
) -> tuple[Any, Any]:
    """Weighted share of each item's skills found in the profile, and their count; ``backend``:
    None (auto) | "numpy" | "numba" | "cuda"."""
    chosen = _dispatch.pick(backend, profile, indptr, skill_ids, weights)
    if chosen == "cuda":
        return skill_overlap_cuda(profile, indptr, skill_ids, weights)
    args = tuple(_dispatch.to_host(x) for x in (profile, indptr, skill_ids, weights))
    if chosen == "numpy":
        return skill_overlap_reference(*args)
    return skill_overlap_numba(*args)
