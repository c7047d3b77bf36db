"""Length and batch buckets: pad a batch up to one of a few fixed shapes so shapes repeat.

GPU runtimes pay per new shape (cuDNN/cuBLAS plan choice, TensorRT profiles, one CUDA graph
per shape), so a batch of width 37 is padded to 64 and one of 5 rows to 8. Padded positions
carry mask 0 and padded rows are cut off the output: bucketing never changes a vector.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

DEFAULT_LENGTH_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512)


def length_buckets(configured: Iterable[int], max_tokens: int = 0) -> tuple[int, ...]:
    """The sorted bucket set for one model: configured sizes below ``max_tokens``, then ``max_tokens``.

    ``max_tokens`` (the model's limit, 0 = none) is always the last bucket, so a batch is never
    padded past what the model accepts. An empty ``configured`` means no bucketing: ``()``.
    """
    sizes = sorted({int(size) for size in configured if int(size) > 0})
    if not sizes:
        return ()
    if max_tokens > 0:
        sizes = [size for size in sizes if size < max_tokens] + [max_tokens]
    return tuple(sizes)


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= ``length``; ``length`` itself when none is large enough (or no buckets)."""
    for size in buckets:
        if size >= length:
            return size
    return length


def batch_bucket(rows: int, max_batch: int) -> int:
    """The next power of two >= ``rows``, capped at ``max_batch``; ``rows`` itself past the cap."""
    if rows >= max_batch:
        return rows
    return min(1 << max(rows - 1, 0).bit_length(), max_batch)


def pad_to(
    input_ids: np.ndarray, attention_mask: np.ndarray, length: int, rows: int | None = None, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to ``length`` columns (mask 0) and ``rows`` rows; returns the inputs when nothing changes.

    Padded rows attend to their first position only (mask ``[1, 0, ...]``): a row with no
    attended position makes some attention kernels return NaN, and the caller drops those rows.
    """
    n, width = input_ids.shape
    rows = n if rows is None else rows
    if width > length or n > rows:
        raise ValueError(f"cannot pad a [{n}, {width}] batch down to [{rows}, {length}]")
    if (width, n) == (length, rows):
        return input_ids, attention_mask
    ids = np.full((rows, length), pad_id, dtype=input_ids.dtype)
    mask = np.zeros((rows, length), dtype=attention_mask.dtype)
    ids[:n, :width] = input_ids
    mask[:n, :width] = attention_mask
    mask[n:, 0] = 1
    return ids, mask
