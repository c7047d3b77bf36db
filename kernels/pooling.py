"""Masked mean pooling of token states, then L2 normalisation.

Same semantics as the pooling our ONNX graphs carry (``server/build/export.py``)::

    pooled     = sum_t mask[i, t] * hidden[i, t] / max(sum_t mask[i, t], 1)
    normalized = pooled / max(||pooled||_2, 1e-12)

``hidden`` is float32 ``[n, L, d]``, ``mask`` integer ``[n, L]`` (int32 or int64; other integer or
bool dtypes are cast to int64). Mask values are weights, as in the graph; attention masks are 0/1.
A row whose mask is all zero gives zeros in both outputs (no division by zero). Returns
``(normalized, pooled)``, both float32 ``[n, d]``.

Accumulation: the numpy reference sums in float32 through BLAS (batched ``matmul``); the numba and
CUDA kernels skip positions whose mask is 0 (padding costs nothing, and a NaN in a padded state
does not leak into the result, unlike the graph's ``hidden * mask``) and sum in float32 too, token
after token. Results agree to float32 rounding (tests: rtol 1e-5, atol 1e-6).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from . import _dispatch

NORM_EPS = 1e-12


def _check(hidden: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    hidden = np.ascontiguousarray(hidden, dtype=np.float32)
    mask = np.asarray(mask)
    if mask.dtype not in (np.int32, np.int64):
        mask = _dispatch.as_int_array(mask, np.int64, "mask", ndim=2)
    mask = np.ascontiguousarray(mask)
    if hidden.ndim != 3 or mask.ndim != 2 or hidden.shape[:2] != mask.shape:
        raise ValueError(f"hidden must be [n, L, d] and mask [n, L]; got {hidden.shape} and {mask.shape}")
    return hidden, mask


def mean_pool_normalize_reference(hidden: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy: one batched matrix product (BLAS) for the masked sums."""
    hidden, mask = _check(hidden, mask)
    weights = mask.astype(np.float32)
    summed = np.matmul(weights[:, None, :], hidden)[:, 0, :]
    count = np.maximum(weights.sum(axis=1, dtype=np.float32), np.float32(1.0))
    pooled = (summed / count[:, None]).astype(np.float32, copy=False)
    norm = np.sqrt(np.einsum("nd,nd->n", pooled, pooled, dtype=np.float32))
    normalized = pooled / np.maximum(norm, np.float32(NORM_EPS))[:, None]
    return normalized.astype(np.float32, copy=False), pooled


@njit(cache=True)
def _pool_cpu(hidden, mask, normalized, pooled):  # pragma: no cover - compiled
    # one thread: on 2 shared cores parallel=True (prange over rows) ran 10-20x slower (benchmark)
    n, length, d = hidden.shape
    for i in range(n):
        acc = pooled[i]
        acc[:] = 0.0
        count = 0.0
        for t in range(length):
            m = mask[i, t]
            if m != 0:
                count += m
                row = hidden[i, t]
                if m == 1:
                    for j in range(d):
                        acc[j] += row[j]
                else:
                    w = np.float32(m)
                    for j in range(d):
                        acc[j] += w * row[j]
        divisor = np.float32(max(count, 1.0))
        sq = 0.0
        for j in range(d):
            v = acc[j] / divisor
            acc[j] = v
            sq += np.float64(v) * np.float64(v)
        norm = np.float32(max(np.sqrt(sq), NORM_EPS))
        for j in range(d):
            normalized[i, j] = acc[j] / norm


def mean_pool_normalize_numba(hidden: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numba CPU, one thread: masked positions skipped, float32 accumulation in the output row."""
    hidden, mask = _check(hidden, mask)
    n, _, d = hidden.shape
    normalized = np.empty((n, d), np.float32)
    pooled = np.empty((n, d), np.float32)
    if n and d:
        _pool_cpu(hidden, mask, normalized, pooled)
    else:
        normalized[:] = 0
        pooled[:] = 0
    return normalized, pooled


def mean_pool_normalize_cuda(hidden: Any, mask: Any) -> tuple[Any, Any]:
    """numba CUDA: one block per row. Device inputs give device outputs; host inputs, numpy outputs."""
    from numba import cuda

    device_in = _dispatch.on_device(hidden) or _dispatch.on_device(mask)
    if not device_in:
        hidden, mask = _check(hidden, mask)
    else:
        if not _dispatch.on_device(hidden):
            hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        if not _dispatch.on_device(mask):
            mask = _dispatch.as_int_array(mask, np.int64, "mask", ndim=2)
    if len(hidden.shape) != 3 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"hidden must be [n, L, d] and mask [n, L]; got {hidden.shape} and {mask.shape}")
    if np.dtype(hidden.dtype) != np.float32:
        raise TypeError(f"device hidden must be float32, got {hidden.dtype}")
    n, _, d = hidden.shape
    from ._cuda import POOL_MAX_THREADS, pool_kernel

    d_hidden, d_mask = _dispatch.to_device(hidden), _dispatch.to_device(mask)
    normalized = cuda.device_array((n, d), np.float32)
    pooled = cuda.device_array((n, d), np.float32)
    if n and d:
        threads = min(_dispatch.cuda_threads(128), POOL_MAX_THREADS)
        pool_kernel[n, threads](d_hidden, d_mask, normalized, pooled)
    if device_in:
        return normalized, pooled
    return normalized.copy_to_host(), pooled.copy_to_host()


def mean_pool_normalize(hidden: Any, mask: Any, backend: str | None = None) -> tuple[Any, Any]:
    """Masked mean pooling + L2 normalisation; ``backend``: None (auto) | "numpy" | "numba" | "cuda"."""
    chosen = _dispatch.pick(backend, hidden, mask)
    if chosen == "cuda":
        return mean_pool_normalize_cuda(hidden, mask)
    hidden, mask = _dispatch.to_host(hidden), _dispatch.to_host(mask)
    if chosen == "numpy":
        return mean_pool_normalize_reference(hidden, mask)
    return mean_pool_normalize_numba(hidden, mask)
