"""Tests of the dynamic batcher.

No pytest-asyncio: each async test is driven by ``asyncio.run``.  Ordering is
controlled with threading events inside fake ``run_batch`` functions, never by
asserting how long something took.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from server.batching import (
    BatchStats,
    BatcherClosedError,
    BatcherConfig,
    BatcherError,
    DeadlineExceededError,
    DynamicBatcher,
    QueueFullError,
    SubmitResult,
    pad_sequences,
    plan_batch,
)

GUARD_S = 20.0  # generous safety net so a broken batcher fails a test instead of hanging it
PAD = 0


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Drive one async test on a fresh event loop."""
    asyncio.run(asyncio.wait_for(coro, GUARD_S))


def seq(*ids: int) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64)


def text(length: int, marker: int) -> np.ndarray:
    """A recognisable text: every token is ``marker`` (non-zero, so never the pad id)."""
    return np.full(length, marker, dtype=np.int64)


def encode(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fake model: row = (sum of real ids, real length, first id), plus the real length.

    It only looks at real tokens, so a correct batcher gets the same row for a
    text whatever it was batched or padded with.
    """
    real = ids * mask
    emb = np.stack([real.sum(axis=1), mask.sum(axis=1), ids[:, 0]], axis=1).astype(np.float64)
    return emb, mask.sum(axis=1).astype(np.int64)


def expected_row(ids: np.ndarray) -> tuple[np.ndarray, int]:
    return np.array([ids.sum(), len(ids), ids[0]], dtype=np.float64), len(ids)


class FakeModel:
    """Recording ``run_batch``; calls listed in ``block`` wait for ``release``."""

    def __init__(
        self,
        block: set[int] | None = None,
        fail: Callable[[np.ndarray], BaseException | None] | None = None,
        work_s: float = 0.0,
        result: Callable[[np.ndarray, np.ndarray], Any] = encode,
    ) -> None:
        self.block = block or set()
        self.fail = fail
        self.work_s = work_s
        self.result = result
        self.release = threading.Event()
        self.started = [threading.Event() for _ in range(10_000)]
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []
        self.threads: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> Any:
        with self._lock:
            k = len(self.calls)
            self.calls.append((ids.copy(), mask.copy()))
            self.threads.append(threading.get_ident())
        self.started[k].set()
        if k in self.block:
            assert self.release.wait(GUARD_S), "test never released the batch"
        if self.work_s:
            time.sleep(self.work_s)
        if self.fail is not None:
            exc = self.fail(ids)
            if exc is not None:
                raise exc
        return self.result(ids, mask)

    async def wait_started(self, k: int) -> None:
        """Wait (without blocking the loop) until call ``k`` has entered run_batch."""
        assert await asyncio.to_thread(self.started[k].wait, GUARD_S), f"call {k} never started"

    def seen_markers(self) -> set[int]:
        return {int(x) for ids, _ in self.calls for x in np.unique(ids)} - {PAD}


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll the loop until ``predicate`` holds (correctness never depends on how long it takes)."""
    deadline = time.monotonic() + GUARD_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.001)


def make(model: Callable[..., Any], **cfg: Any) -> DynamicBatcher:
    cfg.setdefault("max_wait_ms", 0.0)
    return DynamicBatcher(model, BatcherConfig(**cfg), name="test")


async def blocked_batcher(model: FakeModel, **cfg: Any) -> tuple[DynamicBatcher, asyncio.Task[SubmitResult]]:
    """Start a batcher whose worker is stuck inside call 0 (a one-text request marked 1)."""
    batcher = make(model, **cfg)
    await batcher.start()
    first = asyncio.create_task(batcher.submit([text(3, 1)]))
    await model.wait_started(0)
    return batcher, first


async def release_and_stop(model: FakeModel, batcher: DynamicBatcher, *tasks: Awaitable[Any]) -> None:
    model.release.set()
    for t in tasks:
        await t
    await batcher.stop()


# --------------------------------------------------------------------------- config and pure helpers


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_tokens": -1}, "max_batch_tokens"),
        ({"max_queue_texts": 0}, "max_queue_texts"),
        ({"lookahead": 0}, "lookahead"),
        ({"max_wait_ms": -1.0}, "max_wait_ms"),
        ({"max_wait_ms": float("nan")}, "max_wait_ms"),
        ({"pad_token_id": -1}, "pad_token_id"),
        ({"max_batch_size": 2.5}, "max_batch_size"),
        ({"max_batch_size": True}, "max_batch_size"),
        ({"max_batch_size": 64, "lookahead": 32}, "lookahead"),
    ],
)
def test_config_rejects_invalid_values(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        BatcherConfig(**kwargs)


def test_config_defaults_are_valid() -> None:
    cfg = BatcherConfig()
    assert (cfg.max_batch_size, cfg.max_batch_tokens, cfg.max_queue_texts) == (64, 16384, 4096)
    assert BatcherConfig(max_wait_ms=0).max_wait_ms == 0


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


def test_pad_sequences_right_pads_to_longest() -> None:
    ids, mask = pad_sequences([seq(5, 6, 7), seq(8), seq(9, 10)], pad_token_id=3)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.tolist() == [[5, 6, 7], [8, 3, 3], [9, 10, 3]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    ids, mask = pad_sequences([seq(4, 2)], pad_token_id=3)
    assert ids.tolist() == [[4, 2]] and mask.tolist() == [[1, 1]] and ids.dtype == mask.dtype == np.int64


# --------------------------------------------------------------------------- submit validation / back-pressure


def test_submit_validation_errors() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher = make(model, max_batch_size=4, max_batch_tokens=8, lookahead=4)
        with pytest.raises(BatcherError, match="before start"):
            await batcher.submit([seq(1)])
        await batcher.start()
        with pytest.raises(ValueError, match="empty"):
            await batcher.submit([])
        with pytest.raises(ValueError, match="max_batch_tokens"):
            await batcher.submit([seq(1), np.arange(1, 10)])
        with pytest.raises(ValueError, match="1-D"):
            await batcher.submit([np.ones((2, 2), dtype=np.int64)])
        with pytest.raises(ValueError, match="integer"):
            await batcher.submit([np.ones(3, dtype=np.float32)])
        with pytest.raises(ValueError, match="empty"):
            await batcher.submit([np.zeros(0, dtype=np.int64)])
        assert batcher.queue_depth == 0 and batcher.in_flight == 0
        # int32 ids are accepted and widened.
        res = await batcher.submit([np.asarray([4, 5], dtype=np.int32)])
        assert res.outputs[0][0].tolist() == [9.0, 2.0, 4.0]
        assert model.calls[0][0].dtype == np.int64
        await batcher.stop()

    run(body())


def test_queue_full_is_all_or_nothing() -> None:
    async def body() -> None:
        model = FakeModel(block={0})
        batcher, first = await blocked_batcher(model, max_queue_texts=4, max_batch_size=4, lookahead=4)
        # The running text no longer counts as waiting.
        assert batcher.queue_depth == 0
        three = asyncio.create_task(batcher.submit([text(2, 10), text(2, 11), text(2, 12)]))
        await until(lambda: batcher.queue_depth == 3, "3 texts queued")
        with pytest.raises(QueueFullError, match=r"limit 4"):
            await batcher.submit([text(2, 20), text(2, 21)])
        assert batcher.queue_depth == 3 and batcher.in_flight == 2
        one = asyncio.create_task(batcher.submit([text(2, 30)]))
        await until(lambda: batcher.queue_depth == 4, "4 texts queued")
        await release_and_stop(model, batcher, first, three, one)
        assert 20 not in model.seen_markers() and 21 not in model.seen_markers()
        assert (await three).outputs[0][:, 2].tolist() == [10, 11, 12]
        assert batcher.queue_depth == 0 and batcher.in_flight == 0

    run(body())


# --------------------------------------------------------------------------- waiting policy


def test_isolated_requests_never_wait() -> None:
    """With a huge max_wait, any wait would trip the guard; sequential requests must run at once."""

    async def body() -> None:
        model = FakeModel()
        batcher = make(model, max_wait_ms=60_000.0)
        await batcher.start()
        for k in range(3):
            res = await asyncio.wait_for(batcher.submit([text(4, k + 1)]), 5.0)
            assert res.batches == 1
        assert [ids.shape[0] for ids, _ in model.calls] == [1, 1, 1]
        await batcher.stop()

    run(body())


def test_concurrent_requests_on_idle_backend_wait_for_more_texts() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher = make(model, max_wait_ms=60_000.0, max_batch_size=3, lookahead=3)
        await batcher.start()
        a = asyncio.create_task(batcher.submit([text(2, 1)]))
        b = asyncio.create_task(batcher.submit([text(2, 2)]))
        await until(lambda: batcher.prepared_size == 2, "A and B prepared")
        for _ in range(20):
            await asyncio.sleep(0.001)
        assert model.calls == []  # concurrent traffic: the batcher waits for a fuller batch
        c = asyncio.create_task(batcher.submit([text(2, 3)]))
        await asyncio.gather(a, b, c)
        assert len(model.calls) == 1 and model.calls[0][0][:, 0].tolist() == [1, 2, 3]
        await batcher.stop()

    run(body())


def test_wait_for_more_texts_is_bounded_by_max_wait() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher = make(model, max_wait_ms=20.0)
        await batcher.start()
        results = await asyncio.gather(batcher.submit([text(2, 1)]), batcher.submit([text(2, 2)]))
        assert [r.outputs[0][0, 2] for r in results] == [1, 2]
        assert len(model.calls) == 1
        await batcher.stop()

    run(body())


def test_busy_backend_prepares_next_batch_without_waiting() -> None:
    async def body() -> None:
        model = FakeModel(block={0})
        batcher, first = await blocked_batcher(model, max_wait_ms=60_000.0, max_batch_size=8, lookahead=8)
        b = asyncio.create_task(batcher.submit([text(4, 2)]))
        await until(lambda: batcher.prepared_size == 1, "next batch prepared while busy")
        # The prepared batch stays open: later arrivals join it until the worker takes it.
        c = asyncio.create_task(batcher.submit([text(6, 3), text(5, 4)]))
        await until(lambda: batcher.prepared_size == 3, "prepared batch re-formed")
        assert len(model.calls) == 1
        model.release.set()
        # Not full (3 < 8) and max_wait is huge, yet it must start at once: it was formed under load.
        await asyncio.gather(first, b, c)
        assert len(model.calls) == 2
        ids, mask = model.calls[1]
        assert ids[:, 0].tolist() == [2, 3, 4] and ids.shape == (3, 6)
        await batcher.stop()

    run(body())


def test_at_most_one_prepared_batch() -> None:
    async def body() -> None:
        model = FakeModel(block={0})
        batcher, first = await blocked_batcher(model, max_batch_size=4, lookahead=4)
        many = asyncio.create_task(batcher.submit([text(2, 10 + i) for i in range(10)]))
        await until(lambda: batcher.prepared_size == 4, "one batch prepared")
        assert batcher.queue_depth == 10 and len(model.calls) == 1
        await release_and_stop(model, batcher, first, many)
        assert [ids.shape[0] for ids, _ in model.calls] == [1, 4, 4, 2]
        res = await many
        assert res.batches == 3
        assert res.outputs[0][:, 2].tolist() == [10 + i for i in range(10)]

    run(body())


# --------------------------------------------------------------------------- batch formation


def test_batches_group_similar_lengths_and_start_with_oldest() -> None:
    async def body() -> None:
        model = FakeModel(block={0})
        batcher, first = await blocked_batcher(model, max_batch_size=3, lookahead=16)
        lengths = [50, 3, 48, 4, 49, 5, 2]
        tasks = [asyncio.create_task(batcher.submit([text(n, 100 + n)])) for n in lengths]
        await until(lambda: batcher.queue_depth == len(lengths), "all queued")
        await release_and_stop(model, batcher, first, *tasks)
        batches = [sorted(int(n) for n in mask.sum(axis=1)) for _, mask in model.calls[1:]]
        # Oldest (50) first, grouped with its nearest lengths; then the oldest left (3), etc.
        assert batches == [[48, 49, 50], [2, 3, 4], [5]]
        # Each batch is padded only to its own longest text.
        assert [ids.shape[1] for ids, _ in model.calls[1:]] == [50, 4, 5]

    run(body())


def test_lookahead_limits_which_texts_are_considered() -> None:
    async def body() -> None:
        model = FakeModel(block={0})
        batcher, first = await blocked_batcher(model, max_batch_size=2, lookahead=2)
        tasks = [asyncio.create_task(batcher.submit([text(n, 100 + n)])) for n in [30, 2, 29]]
        await until(lambda: batcher.queue_depth == 3, "all queued")
        await release_and_stop(model, batcher, first, *tasks)
        # 29 is outside the 2-text window when the first batch is formed.
        assert [sorted(m.sum(axis=1).tolist()) for _, m in model.calls[1:]] == [[2, 30], [29]]

    run(body())


def test_token_budget_splits_batches() -> None:
    async def body() -> None:
        model = FakeModel(block={0})
        batcher, first = await blocked_batcher(model, max_batch_size=64, max_batch_tokens=40, lookahead=64)
        big = asyncio.create_task(batcher.submit([text(10, 5 + i) for i in range(9)]))
        await until(lambda: batcher.queue_depth == 9, "all queued")
        await release_and_stop(model, batcher, first, big)
        assert [ids.shape for ids, _ in model.calls[1:]] == [(4, 10), (4, 10), (1, 10)]
        assert (await big).outputs[0][:, 2].tolist() == [5 + i for i in range(9)]

    run(body())


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


# --------------------------------------------------------------------------- results routing


def test_many_concurrent_requests_get_exactly_their_rows() -> None:
    rng = np.random.default_rng(7)
    stats: list[BatchStats] = []

    async def body() -> None:
        model = FakeModel(work_s=0.0005)
        batcher = DynamicBatcher(
            model,
            BatcherConfig(max_batch_size=16, max_batch_tokens=320, max_queue_texts=10_000, lookahead=32, max_wait_ms=0.5),
            name="stress",
            on_batch=stats.append,
        )
        await batcher.start()
        requests: list[list[np.ndarray]] = []
        for _ in range(150):
            n = int(rng.integers(1, 12))
            requests.append([rng.integers(1, 30_000, size=int(rng.integers(1, 40))) for _ in range(n)])

        async def client(texts: list[np.ndarray]) -> SubmitResult:
            await asyncio.sleep(float(rng.random()) * 0.01)
            return await batcher.submit(texts)

        results = await asyncio.gather(*(client(r) for r in requests))
        for texts, res in zip(requests, results):
            emb, lengths = res.outputs
            assert emb.shape == (len(texts), 3) and lengths.shape == (len(texts),)
            for row, ids in enumerate(texts):
                want_emb, want_len = expected_row(ids)
                np.testing.assert_array_equal(emb[row], want_emb)
                assert lengths[row] == want_len
            assert 1 <= res.batches <= len(texts)
            assert res.queue_s >= 0 and res.inference_s >= 0
        # Padding: each batch only as wide as its longest text, pad id and mask 0 past each text.
        for ids, mask in model.calls:
            lens = mask.sum(axis=1)
            assert ids.shape[1] == lens.max()
            assert ids.shape[0] <= 16 and ids.shape[0] * ids.shape[1] <= 320
            for row, n in enumerate(lens):
                assert mask[row, :n].all() and not mask[row, n:].any()
                assert (ids[row, n:] == PAD).all()
        total = sum(len(r) for r in requests)
        assert sum(s.size for s in stats) == total == sum(ids.shape[0] for ids, _ in model.calls)
        assert batcher.queue_depth == 0 and batcher.in_flight == 0
        await batcher.stop()

    run(body())


def test_split_request_rows_reassembled_in_order_across_mixed_batches() -> None:
    async def body() -> None:
        model = FakeModel(block={0})
        batcher, first = await blocked_batcher(model, max_batch_size=3, lookahead=8)
        # Interleave lengths so the request's texts land in different batches with another request's.
        mine = [text(n, 200 + i) for i, n in enumerate([9, 2, 8, 3, 7, 1])]
        other = asyncio.create_task(batcher.submit([text(2, 300), text(8, 301)]))
        task = asyncio.create_task(batcher.submit(mine))
        await until(lambda: batcher.queue_depth == 8, "queued")
        await release_and_stop(model, batcher, first, other, task)
        res = await task
        assert res.batches >= 2
        assert res.outputs[0][:, 2].tolist() == [200 + i for i in range(6)]
        assert res.outputs[1].tolist() == [9, 2, 8, 3, 7, 1]
        assert (await other).outputs[0][:, 2].tolist() == [300, 301]
        mixed = [set(ids[:, 0].tolist()) for ids, _ in model.calls[1:]]
        assert any(s & {300, 301} and s & set(range(200, 206)) for s in mixed)

    run(body())


def test_submit_result_timing_and_batch_stats() -> None:
    stats: list[BatchStats] = []

    async def body() -> None:
        model = FakeModel(work_s=0.01)
        batcher = DynamicBatcher(model, BatcherConfig(max_batch_size=2, lookahead=2, max_wait_ms=0), on_batch=stats.append)
        await batcher.start()
        res = await batcher.submit([text(4, 1), text(2, 2), text(3, 3)])
        assert res.batches == 2
        assert res.inference_s >= 0.02  # two batches, each sleeps at least 10 ms
        assert res.queue_s >= 0.01  # the second batch started after the first finished
        assert [(s.size, s.tokens, s.padded_tokens, s.failed) for s in stats] == [(2, 6, 8, False), (1, 3, 3, False)]
        assert all(s.inference_s >= 0.01 for s in stats)
        await batcher.stop()

    run(body())


def test_run_batch_runs_in_one_worker_thread() -> None:
    async def body() -> None:
        model = FakeModel(block={0})
        batcher, first = await blocked_batcher(model)
        # The event loop stays responsive while run_batch is blocked in the worker.
        await asyncio.sleep(0.01)
        more = [asyncio.create_task(batcher.submit([text(2, 5 + i)])) for i in range(3)]
        await release_and_stop(model, batcher, first, *more)
        assert len(set(model.threads)) == 1
        assert model.threads[0] != threading.get_ident()

    run(body())


# --------------------------------------------------------------------------- stop


def test_stop_with_drain_finishes_queued_and_running_work() -> None:
    async def body() -> None:
        model = FakeModel(block={0})
        batcher, first = await blocked_batcher(model, max_batch_size=2, lookahead=2)
        queued = [asyncio.create_task(batcher.submit([text(2, 10 + i)])) for i in range(5)]
        await until(lambda: batcher.queue_depth == 5, "queued")
        stopping = asyncio.create_task(batcher.stop(drain=True))
        await asyncio.sleep(0.01)
        assert not stopping.done()
        with pytest.raises(BatcherClosedError):
            await batcher.submit([text(2, 99)])
        model.release.set()
        await stopping
        assert (await first).outputs[0][0, 2] == 1
        assert [(await t).outputs[0][0, 2] for t in queued] == [10 + i for i in range(5)]
        assert batcher.queue_depth == 0 and batcher.in_flight == 0

    run(body())


def test_stop_without_drain_fails_queued_requests() -> None:
    async def body() -> None:
        model = FakeModel(block={0})
        batcher, first = await blocked_batcher(model, max_batch_size=2, lookahead=2)
        queued = [asyncio.create_task(batcher.submit([text(2, 10 + i)])) for i in range(3)]
        await until(lambda: batcher.queue_depth == 3, "queued")
        stopping = asyncio.create_task(batcher.stop(drain=False))
        for t in queued:  # failed at once, while the worker is still busy
            with pytest.raises(BatcherClosedError):
                await t
        model.release.set()
        await stopping
        assert (await first).outputs[0][0, 2] == 1  # the running batch still completes
        assert len(model.calls) == 1
        assert batcher.queue_depth == 0 and batcher.in_flight == 0

    run(body())


def test_submit_after_stop_and_restart_are_rejected() -> None:
    async def body() -> None:
        batcher = make(FakeModel())
        await batcher.start()
        await batcher.start()  # idempotent
        await batcher.stop()
        await batcher.stop()  # idempotent
        with pytest.raises(BatcherClosedError):
            await batcher.submit([text(2, 1)])
        with pytest.raises(BatcherClosedError):
            await batcher.start()

    run(body())
