"""Right-padding of token ids into the `[rows, length]` int64 arrays every encoder takes.

The one place that decides what padding looks like: pad id in `input_ids`, 0 in `attention_mask`,
and rows added past the real ones attend to their first position only (mask `[1, 0, ...]`), since a
row with no attended position makes some attention kernels return NaN (callers drop those rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pad_sequences(
    sequences: Sequence[Sequence[int] | np.ndarray], pad_id: int, length: int | None = None, rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Ragged token sequences to `(input_ids, attention_mask)`, `length` columns (default: the longest)."""
    n = len(sequences)
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=n)
    width = int(lengths.max()) if n else 0
    length = width if length is None else length
    rows = n if rows is None else rows
    if width > length or n > rows:
        raise ValueError(f"cannot pad a [{n}, {width}] batch into [{rows}, {length}]")
    if n == 1 and rows == 1 and width == length:  # an isolated request: nothing to pad
        ids = np.array(sequences[0], dtype=np.int64, ndmin=2)
        return ids, np.ones_like(ids)
    input_ids = np.full((rows, length), pad_id, dtype=np.int64)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = seq
    attention_mask = np.zeros((rows, length), dtype=np.int64)
    attention_mask[:n] = np.arange(length, dtype=np.int64)[None, :] < lengths[:, None]
    attention_mask[n:, 0] = 1
    return input_ids, attention_mask


def widen(
    input_ids: np.ndarray, attention_mask: np.ndarray, length: int, rows: int | None = None, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """An already padded batch to `length` columns and `rows` rows (a shape bucket); the inputs when they fit."""
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
