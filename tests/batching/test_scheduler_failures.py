"""What the batcher does when a request goes away or a batch fails: cancellation, deadlines, run_batch errors."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from openemploi.batching import BatcherError, DeadlineExceededError

from .fake_model import FakeModel, blocked_batcher, encode, make, release_and_stop, run, text, until

# --------------------------------------------------------------------------- cancellation, deadlines, errors


def test_cancelled_request_never_reaches_run_batch() -> None:
    async def body() -> None:
        model = FakeModel(block={0})
        batcher, first = await blocked_batcher(model, max_batch_size=8, lookahead=8)
        doomed = asyncio.create_task(batcher.submit([text(30, 66), text(4, 67)]))
        survivor = asyncio.create_task(batcher.submit([text(5, 77)]))
        await until(lambda: batcher.prepared_size == 3, "both prepared behind the busy worker")
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert batcher.in_flight == 2 and batcher.queue_depth == 1
        await release_and_stop(model, batcher, first, survivor)
        assert not {66, 67} & model.seen_markers()
        # The prepared batch was re-padded to the survivor's own length.
        assert model.calls[1][0].tolist() == [[77] * 5]
        assert batcher.in_flight == 0 and batcher.queue_depth == 0

    run(body())


def test_cancelling_a_running_request_discards_its_rows() -> None:
    async def body() -> None:
        model = FakeModel(block={0})
        batcher, first = await blocked_batcher(model)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert batcher.in_flight == 0
        model.release.set()
        res = await batcher.submit([text(2, 5)])
        assert res.outputs[0][0, 2] == 5 and len(model.calls) == 2
        await batcher.stop()

    run(body())


def test_expired_deadline_never_reaches_run_batch() -> None:
    async def body() -> None:
        model = FakeModel(block={0})
        batcher, first = await blocked_batcher(model, max_batch_size=8, lookahead=8)
        deadline = time.monotonic() + 0.05
        late = asyncio.create_task(batcher.submit([text(4, 55)], deadline=deadline))
        ok = asyncio.create_task(batcher.submit([text(4, 56)], deadline=time.monotonic() + 3600))
        await until(lambda: time.monotonic() > deadline + 0.01, "deadline passed")
        model.release.set()
        with pytest.raises(DeadlineExceededError):
            await late
        await first
        assert (await ok).outputs[0][0, 2] == 56
        assert 55 not in model.seen_markers()
        assert batcher.in_flight == 0 and batcher.queue_depth == 0
        await batcher.stop()

    run(body())


def test_deadline_fails_request_while_worker_is_still_busy() -> None:
    async def body() -> None:
        model = FakeModel(block={0})
        batcher, first = await blocked_batcher(model)
        late = asyncio.create_task(batcher.submit([text(4, 55)], deadline=time.monotonic() + 0.05))
        with pytest.raises(DeadlineExceededError):
            await late  # answered by the deadline timer, not when the worker frees up
        assert len(model.calls) == 1 and batcher.queue_depth == 0
        await release_and_stop(model, batcher, first)
        assert 55 not in model.seen_markers()

    run(body())


def test_deadline_already_passed_at_submit() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher = make(model)
        await batcher.start()
        with pytest.raises(DeadlineExceededError):
            await batcher.submit([text(2, 9)], deadline=time.monotonic() - 1)
        assert model.calls == [] and batcher.in_flight == 0
        await batcher.stop()

    run(body())


def test_run_batch_error_fails_every_request_in_the_batch_and_batcher_recovers() -> None:
    boom = RuntimeError("onnx exploded")

    async def body() -> None:
        model = FakeModel(block={0}, fail=lambda ids: boom if (ids == 13).any() else None)
        batcher, first = await blocked_batcher(model, max_batch_size=8, lookahead=8)
        x = asyncio.create_task(batcher.submit([text(3, 13)]))
        y = asyncio.create_task(batcher.submit([text(3, 14), text(2, 15)]))
        await until(lambda: batcher.prepared_size == 3, "x and y share the next batch")
        model.release.set()
        await first
        for t in (x, y):
            with pytest.raises(RuntimeError, match="onnx exploded"):
                await t
        res = await batcher.submit([text(2, 16)])
        assert res.outputs[0][0, 2] == 16
        assert batcher.in_flight == 0 and batcher.queue_depth == 0
        await batcher.stop()

    run(body())


def test_failed_batch_drops_the_rest_of_a_split_request() -> None:
    async def body() -> None:
        model = FakeModel(block={0}, fail=lambda ids: ValueError("bad") if (ids == 40).any() else None)
        batcher, first = await blocked_batcher(model, max_batch_size=2, lookahead=2)
        split = asyncio.create_task(batcher.submit([text(3, 40), text(3, 41), text(3, 42), text(3, 43)]))
        await until(lambda: batcher.queue_depth == 4, "queued")
        model.release.set()
        with pytest.raises(ValueError, match="bad"):
            await split
        await first
        after = await batcher.submit([text(3, 50)])
        assert after.outputs[0][0, 2] == 50
        assert not {42, 43} & model.seen_markers()
        await batcher.stop()

    run(body())


def test_malformed_outputs_fail_the_batch_only() -> None:
    async def body() -> None:
        def result(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
            if (ids == 9).any():
                return (np.zeros((ids.shape[0] + 1, 2)),)
            return encode(ids, mask)

        model = FakeModel(result=result)
        batcher = make(model)
        await batcher.start()
        with pytest.raises(BatcherError, match="first dimension"):
            await batcher.submit([text(2, 9)])
        assert (await batcher.submit([text(2, 8)])).outputs[0][0, 2] == 8
        await batcher.stop()

    run(body())
