"""Length and batch buckets: pad a batch up to one of a few fixed shapes so shapes repeat.

GPU runtimes pay per new shape (cuDNN/cuBLAS plan choice, TensorRT profiles, one CUDA graph
per shape), so a batch of width 37 is padded to 64 and one of 5 rows to 8. Padded positions
carry mask 0 and padded rows are cut off the output: bucketing never changes a vector. The
padding itself is `openemploi.padding.widen`.
"""

from __future__ import annotations

from collections.abc import Iterable

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
