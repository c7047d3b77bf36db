"""The batcher's control flow: submit and back-pressure, when to wait for more texts, batch formation, routing rows, stop.

Failures (cancellation, deadlines, run_batch errors) are in test_scheduler_failures.py.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from openemploi.batching import (
    BatcherClosedError,
    BatcherConfig,
    BatcherError,
    BatchStats,
    DynamicBatcher,
    QueueFullError,
    SubmitResult,
)

from .fake_model import PAD, FakeModel, blocked_batcher, expected_row, make, release_and_stop, run, seq, text, until

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
        ids, _ = model.calls[1]
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


def test_batcher_does_not_pad_short_texts_to_a_long_one() -> None:
    async def body() -> None:
        model = FakeModel(block={0})
        batcher, first = await blocked_batcher(model, max_batch_size=64, lookahead=64)  # default ratio 2.0
        long = asyncio.create_task(batcher.submit([text(512, 2)]))
        shorts = asyncio.create_task(batcher.submit([text(12, 3 + i) for i in range(20)]))
        await until(lambda: batcher.queue_depth == 21, "all queued")
        await release_and_stop(model, batcher, first, long, shorts)
        assert [ids.shape for ids, _ in model.calls[1:]] == [(1, 512), (20, 12)]

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
