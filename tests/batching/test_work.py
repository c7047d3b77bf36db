"""The records the scheduler moves around: a formed batch's padding, a request's rows, run_batch's outputs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from openemploi.batching import BatcherConfig, BatcherError
from openemploi.batching.work import FormedBatch, PendingRequest, QueuedText, normalize_outputs

from .fake_model import seq


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop that only creates the requests' futures (nothing runs on it)."""
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


def pending(loop: asyncio.AbstractEventLoop, size: int) -> PendingRequest:
    return PendingRequest(loop.create_future(), size, None, submitted_at=0.0, unstarted=size, unstarted_tokens=0)


def batch_of(loop: asyncio.AbstractEventLoop, *sequences: np.ndarray, pad_token_id: int = 0, budget: int = 10_000) -> FormedBatch:
    request = pending(loop, len(sequences))
    texts = [QueuedText(request, index, ids, seq=index) for index, ids in enumerate(sequences)]
    return FormedBatch(texts, pad_token_id, budget)


def test_formed_batch_right_pads_to_its_longest_text(loop: asyncio.AbstractEventLoop) -> None:
    batch = batch_of(loop, seq(5, 6, 7), seq(8), seq(9, 10), pad_token_id=3)
    ids, mask = batch.input_ids, batch.attention_mask
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.tolist() == [[5, 6, 7], [8, 3, 3], [9, 10, 3]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert (batch.max_len, batch.tokens) == (3, 6)
    single = batch_of(loop, seq(4, 2), pad_token_id=3)
    ids, mask = single.input_ids, single.attention_mask
    assert ids.tolist() == [[4, 2]] and mask.tolist() == [[1, 1]] and ids.dtype == mask.dtype == np.int64


def test_formed_batch_is_full_when_no_text_of_its_width_fits(loop: asyncio.AbstractEventLoop) -> None:
    config = BatcherConfig(max_batch_size=4, lookahead=4)
    assert not batch_of(loop, seq(1, 2, 3), seq(4, 5), budget=9).full(config)  # a third 3-token text fits
    assert batch_of(loop, seq(1, 2, 3), seq(4, 5), budget=8).full(config)
    assert batch_of(loop, seq(1), seq(2), seq(3), seq(4)).full(config)  # max_batch_size reached


def test_rows_by_request_skips_dead_requests(loop: asyncio.AbstractEventLoop) -> None:
    first, second = pending(loop, 2), pending(loop, 1)
    texts = [QueuedText(first, 1, seq(1), 0), QueuedText(second, 0, seq(2), 1), QueuedText(first, 0, seq(3), 2)]
    batch = FormedBatch(texts, 0, 100)
    assert batch.rows_by_request() == {first: ([1, 0], [0, 2]), second: ([0], [1])}
    second.done = True
    assert batch.rows_by_request() == {first: ([1, 0], [0, 2])}


def test_collect_reassembles_a_split_request_in_order(loop: asyncio.AbstractEventLoop) -> None:
    request = pending(loop, 3)
    request.collect((np.array([[30.0], [10.0]]),), indices=[2, 0], rows=[0, 1], started=1.0, inference_s=0.5)
    request.collect((np.array([[99.0], [20.0]]),), indices=[1], rows=[1], started=3.0, inference_s=0.25)
    assert request.completed == 3
    result = request.result()
    assert result.outputs[0].tolist() == [[10.0], [20.0], [30.0]]
    assert (result.batches, result.inference_s, result.queue_s) == (2, 0.75, 3.0)


def test_collect_refuses_rows_whose_shape_changed_between_batches(loop: asyncio.AbstractEventLoop) -> None:
    request = pending(loop, 2)
    request.collect((np.zeros((1, 4)),), [0], [0], 0.0, 0.0)
    with pytest.raises(BatcherError, match="different shapes"):
        request.collect((np.zeros((1, 5)),), [1], [0], 0.0, 0.0)
    assert request.completed == 1


def test_normalize_outputs_accepts_one_array_and_rejects_wrong_rows() -> None:
    only = np.zeros((2, 3))
    assert normalize_outputs(only, 2)[0] is only
    with pytest.raises(BatcherError, match="first dimension 2"):
        normalize_outputs((np.zeros((3, 3)),), 2)
    with pytest.raises(BatcherError, match="non-empty tuple"):
        normalize_outputs((), 2)
