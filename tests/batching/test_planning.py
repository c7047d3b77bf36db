"""Batch planning: which queued texts form the next batch (pure functions, no batcher running)."""

from __future__ import annotations

import random

import pytest

from openemploi.batching import FREE_PADDING_TOKENS, BatcherConfig, plan_batch
from openemploi.batching.planning import BatchChoice, choose_batch


def test_plan_batch_groups_oldest_with_closest_lengths() -> None:
    lengths = [10, 100, 11, 9, 200, 10]
    picks = plan_batch(lengths, max_batch_size=3, max_batch_tokens=10_000)
    assert 0 in picks
    assert sorted(lengths[i] for i in picks) == [9, 10, 10]


def test_plan_batch_oldest_long_text_is_not_starved_by_short_ones() -> None:
    lengths = [400] + [5] * 100
    picks = plan_batch(lengths, max_batch_size=8, max_batch_tokens=100_000)
    assert 0 in picks and len(picks) == 8


def test_plan_batch_respects_token_budget() -> None:
    # 100 * 3 > 250: only one more text fits next to the oldest.
    # Equal lengths: the older text wins.
    assert sorted(plan_batch([100, 10, 10, 10], 64, 250)) == [0, 1]
    assert sorted(plan_batch([10, 5, 8, 8], 2, 1000)) == [0, 2]
    assert sorted(plan_batch([10, 13, 12, 12], 2, 1000)) == [0, 2]
    assert sorted(plan_batch([10, 12, 12, 10, 10], 2, 1000)) == [0, 3]
    assert plan_batch([300], 64, 300) == [0]
    with pytest.raises(ValueError):
        plan_batch([301], 64, 300)


def test_plan_batch_random_invariants() -> None:
    rng = random.Random(1234)
    for _ in range(500):
        n = rng.randint(1, 40)
        lengths = [rng.randint(1, 60) for _ in range(n)]
        size, budget = rng.randint(1, 10), rng.randint(60, 400)
        picks = plan_batch(lengths, size, budget)
        assert 0 in picks
        assert len(set(picks)) == len(picks) <= size
        assert max(lengths[i] for i in picks) * len(picks) <= budget
        # Contiguous in length order: no unpicked text lies strictly between picked lengths.
        lo, hi = min(lengths[i] for i in picks), max(lengths[i] for i in picks)
        chosen = set(picks)
        between = [i for i in range(n) if lo < lengths[i] < hi and i not in chosen]
        assert not between
        # Greedy is maximal: no remaining text could still be added within the limits.
        if len(picks) < size:
            for i in set(range(n)) - chosen:
                assert max(hi, lengths[i]) * (len(picks) + 1) > budget


def test_plan_batch_keeps_long_texts_apart_from_short_ones() -> None:
    lengths = [512] + [10] * 20 + [300, 200]
    picks = plan_batch(lengths, 64, 100_000, max_length_ratio=2.0)
    assert sorted(lengths[i] for i in picks) == [300, 512]
    # short texts (<= 64 tokens) always batch together, whatever the ratio
    assert len(plan_batch([60] + [5] * 10, 64, 100_000, max_length_ratio=2.0)) == 11
    # without a ratio, the long text pads every text the limits allow
    assert len(plan_batch(lengths, 64, 100_000)) == len(lengths)


def test_texts_up_to_free_padding_tokens_share_a_batch_whatever_the_ratio() -> None:
    longest, shortest = FREE_PADDING_TOKENS, 1
    assert sorted(plan_batch([longest, shortest], 2, 10_000, max_length_ratio=1.0)) == [0, 1]
    assert plan_batch([longest + 1, shortest], 2, 10_000, max_length_ratio=1.0) == [0]


def test_choose_batch_returns_chosen_and_rest_oldest_first() -> None:
    config = BatcherConfig(max_batch_size=3, lookahead=8)
    choice = choose_batch([10, 100, 11, 9, 200, 10], config, token_budget=10_000)
    assert (choice.chosen, choice.rest, choice.token_budget) == ([0, 3, 5], [1, 2, 4], 10_000)


def test_choose_batch_leaves_texts_past_the_lookahead_queued() -> None:
    config = BatcherConfig(max_batch_size=2, lookahead=2)
    # 29 would pair best with 30, but it is outside the 2-text window.
    choice = choose_batch([30, 2, 29], config, token_budget=10_000)
    assert (choice.chosen, choice.rest) == ([0, 1], [2])


def test_choose_batch_raises_the_budget_to_the_oldest_text() -> None:
    """A latency cap below one long text must not stall it: it goes alone, and only it."""
    config = BatcherConfig(max_batch_size=8, lookahead=8)
    choice = choose_batch([100, 10, 10], config, token_budget=50)
    assert (choice.chosen, choice.rest, choice.token_budget) == ([0], [1, 2], 100)
    assert choose_batch([], config, token_budget=50) == BatchChoice([], [], 50)
