"""Batch formation as pure functions: which of the queued texts form the next batch.

No asyncio, no clock: the scheduler hands in text lengths, oldest first, and
gets indices back, so every grouping rule is testable without a running batcher.

* Length-aware grouping inside a ``lookahead`` window keeps padding (wasted
  compute) low, while always anchoring a batch on the OLDEST queued text bounds
  how long any text can be overtaken.
* A long text only shares a batch with texts of comparable length
  (``max_length_ratio``), so one 512-token text does not pad 63 short ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .config import BatcherConfig

__all__ = ["FREE_PADDING_TOKENS", "BatchChoice", "choose_batch", "plan_batch"]

FREE_PADDING_TOKENS = 64
"""Texts up to this long always share batches (``max_length_ratio`` does not apply): padding them costs little."""


def _lengths_compatible(shortest: int, longest: int, max_length_ratio: float) -> bool:
    """Whether texts of these lengths may share a batch (see ``BatcherConfig.max_length_ratio``)."""
    return longest <= FREE_PADDING_TOKENS or longest <= max_length_ratio * shortest


def plan_batch(
    lengths: Sequence[int],
    max_batch_size: int,
    max_batch_tokens: int,
    max_length_ratio: float = math.inf,
) -> list[int]:
    """Choose which texts of a window form the next batch.

    ``lengths[0]`` must be the OLDEST text: it is always chosen, so nothing
    starves.  Texts are sorted by length and the batch grows from the oldest
    text to its neighbours in length order, each step taking the neighbour that
    adds the least padding (a shorter text pads itself up to the current max, a
    longer one pads every row already chosen), while respecting
    ``max_batch_size``, ``max_batch_tokens`` (max length * count) and
    ``max_length_ratio`` (longest / shortest, for texts over
    ``FREE_PADDING_TOKENS``).  Returns indices into ``lengths`` (unordered).
    """
    n = len(lengths)
    if n == 0:
        return []
    if lengths[0] > max_batch_tokens:
        raise ValueError(f"text of {lengths[0]} tokens exceeds max_batch_tokens={max_batch_tokens}")
    first = lengths[0]
    # Ties in length are broken so the OLDER text is always the nearer neighbour of text 0.
    order = sorted(range(n), key=lambda i: (lengths[i], i if lengths[i] >= first else -i))
    pos = order.index(0)
    lo = hi = pos
    max_len = first
    count = 1
    while count < max_batch_size:
        best_side = 0
        best_waste = -1
        min_len = lengths[order[lo]]
        if (
            lo > 0
            and max_len * (count + 1) <= max_batch_tokens
            and _lengths_compatible(lengths[order[lo - 1]], max_len, max_length_ratio)
        ):
            best_side, best_waste = -1, max_len - lengths[order[lo - 1]]
        if hi < n - 1:
            longer = lengths[order[hi + 1]]  # >= max_len: order[hi] is the longest chosen
            if longer * (count + 1) <= max_batch_tokens and _lengths_compatible(min_len, longer, max_length_ratio):
                waste = (longer - max_len) * count
                if best_side == 0 or waste < best_waste:
                    best_side, best_waste = 1, waste
        if best_side == 0:
            break
        if best_side < 0:
            lo -= 1
        else:
            hi += 1
            max_len = lengths[order[hi]]
        count += 1
    return order[lo : hi + 1]


@dataclass(frozen=True)
class BatchChoice:
    """The next batch out of a window of live texts, as indices into that window."""

    chosen: list[int]
    """Texts of the batch, oldest first."""
    rest: list[int]
    """Texts left for later batches, oldest first (they go back to the head of the queue)."""
    token_budget: int
    """Padded tokens the batch was formed under: the budget asked for, or the oldest text's length when longer."""


def choose_batch(lengths_oldest_first: Sequence[int], config: BatcherConfig, token_budget: int) -> BatchChoice:
    """Plan the next batch among the ``config.lookahead`` oldest texts; texts past the lookahead stay queued.

    The oldest text always goes, even when it alone exceeds ``token_budget``
    (the latency cap can be below one long text), so the budget is raised to it.
    """
    window = lengths_oldest_first[: config.lookahead]
    budget = max(token_budget, window[0]) if window else token_budget
    picks = sorted(plan_batch(window, config.max_batch_size, budget, config.max_length_ratio))
    picked = set(picks)
    rest = [i for i in range(len(lengths_oldest_first)) if i not in picked]
    return BatchChoice(picks, rest, budget)
