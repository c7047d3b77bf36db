"""Latency-aware admission: the cost model and the refusals it drives.

The backend here has a *simulated* cost: each batch advances a fake clock by
``overhead + per_token * padded tokens``, and the batcher times batches with
that clock.  Every estimate is therefore exact and no assertion depends on how
fast this machine runs.  A gate holds the worker inside a batch so that a queue
builds up deterministically.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Coroutine
from typing import Any

import grpc
import numpy as np
import pytest

from openemploi.api.errors import status_for
from openemploi.batching import (
    BatchCostModel,
    BatcherConfig,
    DeadlineExceededError,
    DeadlineUnmeetableError,
    DynamicBatcher,
    OverloadedError,
    QueueFullError,
)
from openemploi.batching.admission import AdmissionControl, QueuedWork, validate_sequences

GUARD_S = 20.0
OVERHEAD_S = 1.0  # simulated seconds: far above any real scheduling jitter
PER_TOKEN_S = 0.1


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, GUARD_S))


def text(length: int, marker: int) -> np.ndarray:
    return np.full(length, marker, dtype=np.int64)


class SimBackend:
    """``run_batch`` with a simulated cost, a clock that only it advances, and a gate."""

    def __init__(self, overhead_s: float = OVERHEAD_S, per_token_s: float = PER_TOKEN_S) -> None:
        self.overhead_s = overhead_s
        self.per_token_s = per_token_s
        self.now = 0.0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = 0
        self.shapes: list[tuple[int, int]] = []
        self.markers: list[int] = []  # first token id of every row it computed
        self._lock = threading.Lock()

    def advance(self, seconds: float) -> None:
        """Simulated time passing while a batch is held at the gate (a slow machine)."""
        with self._lock:
            self.now += seconds

    def clock(self) -> float:
        with self._lock:
            return self.now

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray]:
        with self._lock:
            self.entered += 1
            self.shapes.append(ids.shape)
            self.markers.extend(int(x) for x in ids[:, 0])
        assert self.gate.wait(GUARD_S), "test never opened the gate"
        with self._lock:
            self.now += self.overhead_s + self.per_token_s * ids.size
        # row = (first token id, real length): lets a test check every request got its own rows
        return (np.stack([ids[:, 0], mask.sum(axis=1)], axis=1).astype(np.float64),)

    async def wait_entered(self, count: int) -> None:
        deadline = time.monotonic() + GUARD_S
        while True:
            with self._lock:
                if self.entered >= count:
                    return
            assert time.monotonic() < deadline, f"worker never entered batch {count}"
            await asyncio.sleep(0.001)


def make(backend: SimBackend, **cfg: Any) -> DynamicBatcher:
    cfg.setdefault("max_wait_ms", 0.0)
    return DynamicBatcher(backend, BatcherConfig(**cfg), name="sim", clock=backend.clock)


async def warm(batcher: DynamicBatcher) -> None:
    """Run batches of 10, 30 and 50 padded tokens, one at a time: the fit becomes exact."""
    for n in (1, 3, 5):
        await batcher.submit([text(10, 90 + i) for i in range(n)])


# --------------------------------------------------------------------------- the cost model alone


def test_cost_model_converges_to_overhead_and_slope() -> None:
    model = BatchCostModel()
    assert not model.ready
    for k in range(200):
        padded = (16, 64, 256, 1024, 4096)[k % 5]
        model.observe(padded, 0.004 + 2e-5 * padded, padded)
    assert model.ready and model.batches == 200
    assert model.overhead_s == pytest.approx(0.004, rel=1e-6)
    assert model.per_token_s == pytest.approx(2e-5, rel=1e-6)
    assert model.batch_seconds(1000) == pytest.approx(0.024, rel=1e-6)
    assert model.tokens_within(0.024) == pytest.approx(1000, rel=1e-6)


def test_cost_model_with_one_batch_size_assumes_cost_proportional_to_tokens() -> None:
    model = BatchCostModel()
    for _ in range(10):
        model.observe(20, 0.010, 20)
    assert model.overhead_s == 0.0
    assert model.per_token_s == pytest.approx(0.0005)
    assert model.batch_seconds(20) == pytest.approx(0.010)  # exact where it has seen batches


def test_cost_model_follows_a_machine_that_slows_down() -> None:
    model = BatchCostModel()
    for k in range(300):
        padded = 50 + 50 * (k % 4)
        model.observe(padded, 0.002 + 1e-4 * padded, padded)
    for k in range(300):
        padded = 50 + 50 * (k % 4)
        model.observe(padded, 2 * (0.002 + 1e-4 * padded), padded)
    assert model.batch_seconds(100) == pytest.approx(2 * (0.002 + 1e-2), rel=1e-3)


def test_cost_model_ignores_nonsense_and_noise_cannot_make_cost_negative() -> None:
    model = BatchCostModel()
    model.observe(0, 1.0, 0)
    model.observe(10, float("nan"), 10)
    assert not model.ready
    # bigger batches looking cheaper (noise): slope clamps at zero, never a negative cost
    for padded, seconds in ((10, 0.05), (100, 0.01)) * 5:
        model.observe(padded, seconds, padded)
    assert model.per_token_s >= 0.0 and model.overhead_s >= 0.0
    assert model.batch_seconds(10_000) > 0.0
    assert math.isinf(model.tokens_within(1.0)) or model.tokens_within(1.0) >= 0.0


def test_work_estimate_counts_batches_and_padding() -> None:
    model = BatchCostModel()
    for padded, real in ((100, 50), (200, 100)) * 3:
        model.observe(padded, 0.01 + 0.001 * padded, real)  # recent batches were half padding
    assert model.padding_factor == pytest.approx(2.0)
    # 10 texts of 100 real tokens -> 200 padded; at most 4 texts per batch -> 3 batches
    assert model.work_seconds(10, 100, 4, math.inf) == pytest.approx(3 * 0.01 + 200 * 0.001)
    # the token budget can need more batches than the size limit: 200 / 50 -> 4
    assert model.work_seconds(10, 100, 64, 50) == pytest.approx(4 * 0.01 + 200 * 0.001)
    assert model.work_seconds(0, 0, 4, math.inf) == 0.0


# --------------------------------------------------------------------------- the decision alone


class FakeClock:
    """The admission clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def learned(config: BatcherConfig, clock: FakeClock) -> AdmissionControl:
    """Admission whose cost model has seen exact batches: 1 s per batch plus 0.125 s per padded token."""
    admission = AdmissionControl(config, "batcher[sim]", clock)
    for padded in (10, 30, 50):
        admission.cost.observe(padded, 1.0 + 0.125 * padded, padded)
    return admission


def test_admission_before_any_batch_refuses_only_past_the_text_cap_or_deadline() -> None:
    admission = AdmissionControl(BatcherConfig(max_queue_delay_ms=1.0, max_queue_texts=50), "batcher[sim]", FakeClock())
    ahead = QueuedWork(texts=49, tokens=490)
    assert admission.estimated_wait_s(ahead) is None
    assert admission.token_budget() == 16384  # no latency cap before the cost is known
    admission.check(1, 10, None, now=0.0, ahead=ahead)
    with pytest.raises(QueueFullError, match="limit 50") as info:
        admission.check(2, 20, None, now=0.0, ahead=ahead)
    assert not isinstance(info.value, OverloadedError)
    with pytest.raises(DeadlineExceededError, match=r"batcher\[sim\]: deadline already passed"):
        admission.check(1, 10, deadline=5.0, now=5.0, ahead=QueuedWork(0, 0))


def test_admission_caps_the_batch_and_refuses_past_the_delay_budget() -> None:
    clock = FakeClock()
    admission = learned(BatcherConfig(max_queue_delay_ms=11_010.0), clock)
    assert admission.token_budget() == 80  # (11.01 s - 1 s) / 0.125 s per token
    running = admission.start_batch(8)
    assert running.started_at == 0.0 and running.estimate_s == pytest.approx(2.0)
    # 8 texts of 10 tokens: one batch of 80 padded tokens = 11 s, behind 2 s of running batch
    ahead = QueuedWork(texts=8, tokens=80, running=running)
    assert admission.estimated_wait_s(ahead) == pytest.approx(13.0)
    with pytest.raises(OverloadedError) as info:
        admission.check(1, 10, None, now=0.0, ahead=ahead)
    assert info.value.estimated_wait_s == pytest.approx(13.0) and info.value.limit_s == pytest.approx(11.01)
    # 20 texts will run 3 batches = 3 + 200 * 0.125 = 28 s: it may wait that long
    admission.check(20, 200, None, now=0.0, ahead=ahead)
    clock.now = 4.0  # 4 s into a 2 s batch: queued work counts double
    assert admission.estimated_wait_s(ahead) == pytest.approx(2 * 11.0)


def test_admission_refuses_an_unmeetable_deadline_only_behind_other_work() -> None:
    admission = learned(BatcherConfig(), FakeClock())
    ahead = QueuedWork(texts=1, tokens=10, running=admission.start_batch(8))
    # 2 s running + one batch of 2 texts (1 + 20 * 0.125 s) = 5.5 s
    with pytest.raises(DeadlineUnmeetableError) as info:
        admission.check(1, 10, deadline=105.0, now=100.0, ahead=ahead)
    assert info.value.estimated_s == pytest.approx(5.5) and info.value.remaining_s == pytest.approx(5.0)
    admission.check(1, 10, deadline=106.0, now=100.0, ahead=ahead)
    # idle: the request starts at once, so an estimate alone never refuses it
    admission.check(5, 50, deadline=101.0, now=100.0, ahead=QueuedWork(0, 0))


def test_a_single_flat_array_is_refused_before_queueing() -> None:
    with pytest.raises(ValueError, match="not one 1-D array"):
        validate_sequences(np.arange(1, 4), max_batch_tokens=8)  # type: ignore[arg-type]  # the mistake under test
    assert [s.dtype for s in validate_sequences([np.arange(1, 4, dtype=np.int32)], max_batch_tokens=8)] == [np.int64]


# --------------------------------------------------------------------------- admission in the batcher


def test_batches_are_timed_with_the_injected_clock_and_the_estimate_converges() -> None:
    async def body() -> None:
        backend = SimBackend()
        batcher = make(backend)
        await batcher.start()
        assert batcher.estimated_wait_s() is None  # nothing ran: no estimate
        await warm(batcher)
        cost = batcher.cost_model
        assert cost.overhead_s == pytest.approx(OVERHEAD_S, rel=1e-9)
        assert cost.per_token_s == pytest.approx(PER_TOKEN_S, rel=1e-9)
        assert batcher.estimated_wait_s() == 0.0  # idle and empty
        await batcher.stop()

    run(body())


def test_everything_is_admitted_before_any_batch_has_run() -> None:
    async def body() -> None:
        backend = SimBackend()
        backend.gate.clear()
        batcher = make(backend, max_queue_delay_ms=1.0, max_queue_texts=50, max_batch_size=64, lookahead=64)
        await batcher.start()
        first = asyncio.create_task(batcher.submit([text(10, 1)]))
        await backend.wait_entered(1)
        tasks = [asyncio.create_task(batcher.submit([text(10, 2 + i)])) for i in range(50)]
        while batcher.queue_depth < 50:
            await asyncio.sleep(0.001)
        # a 1 ms budget would refuse all of them, but no batch has finished: nothing is known yet;
        # only the text-count cap (memory) refuses now
        with pytest.raises(QueueFullError, match="limit 50") as info:
            await batcher.submit([text(10, 99)])
        assert not isinstance(info.value, OverloadedError)
        backend.gate.set()
        results = await asyncio.gather(first, *tasks)
        assert [r.outputs[0][0, 0] for r in results] == [1 + i for i in range(51)]
        await batcher.stop()

    run(body())


def test_requests_are_refused_once_queued_work_exceeds_the_delay_budget() -> None:
    async def body() -> None:
        backend = SimBackend()
        # budget 10.5 s: a batch may hold (10.5 - 1) / 0.1 = 95 padded tokens = 9 texts of 10
        batcher = make(backend, max_queue_delay_ms=10_500.0, max_batch_size=64, lookahead=64)
        await batcher.start()
        await warm(batcher)
        backend.gate.clear()
        running = asyncio.create_task(batcher.submit([text(10, 1)]))  # 2 s, held in the worker
        await backend.wait_entered(4)
        admitted = []
        # wait ahead with k texts queued = 2 (running) + 1 (one batch) + k * 1 (10 tokens each):
        # k = 0..7 -> 2 .. 10 s <= 10.5 s; k = 8 -> 11 s > 10.5 s
        for k in range(8):
            assert batcher.estimated_wait_s() == pytest.approx(2.0 + (1.0 + k if k else 0.0))
            admitted.append(asyncio.create_task(batcher.submit([text(10, 10 + k)])))
            await asyncio.sleep(0)
        assert batcher.queue_depth == 8
        with pytest.raises(OverloadedError) as info:
            await batcher.submit([text(10, 99)])
        refusal = info.value
        assert isinstance(refusal, QueueFullError)  # RESOURCE_EXHAUSTED through the existing mapping
        assert refusal.estimated_wait_s == pytest.approx(11.0) and refusal.limit_s == pytest.approx(10.5)
        assert "11000 ms" in str(refusal) and "10500 ms" in str(refusal)
        assert batcher.queue_depth == 8 and batcher.in_flight == 9  # the refused request left no trace
        # a big request may wait as long as it will run: 20 texts = 3 batches = 3 * 1 + 200 * 0.1 = 23 s > 11 s
        big = asyncio.create_task(batcher.submit([text(10, 200 + i) for i in range(20)]))
        await asyncio.sleep(0)
        assert batcher.queue_depth == 28
        with pytest.raises(OverloadedError):  # ... but then the queue is longer than a small one may wait
            await batcher.submit([text(10, 99)])
        backend.gate.set()
        results = await asyncio.gather(running, *admitted)
        assert [r.outputs[0][0, 0] for r in results] == [1] + [10 + k for k in range(8)]
        assert (await big).outputs[0][:, 0].tolist() == [200 + i for i in range(20)]
        assert 99 not in backend.markers
        assert batcher.queue_depth == 0 and batcher.in_flight == 0
        # once drained, new work is admitted again
        assert (await batcher.submit([text(10, 55)])).outputs[0][0, 0] == 55
        await batcher.stop()

    run(body())


def test_a_running_batch_past_its_estimate_scales_the_queued_work() -> None:
    async def body() -> None:
        backend = SimBackend()
        batcher = make(backend, max_queue_delay_ms=10_500.0, max_batch_size=64, lookahead=64)
        await batcher.start()
        await warm(batcher)
        backend.gate.clear()
        running = asyncio.create_task(batcher.submit([text(10, 1)]))  # estimated 2 s
        await backend.wait_entered(4)
        queued = asyncio.create_task(batcher.submit([text(10, 2)]))  # 2 s of queued work
        await asyncio.sleep(0)
        assert batcher.estimated_wait_s() == pytest.approx(2.0 + 2.0)
        backend.advance(1.0)  # on time: 1 s of the running batch left
        assert batcher.estimated_wait_s() == pytest.approx(1.0 + 2.0)
        backend.advance(3.0)  # 4 s into a 2 s batch: the machine runs at half speed right now
        assert batcher.estimated_wait_s() == pytest.approx(2 * 2.0)
        # queued work now counts double: k texts = 2 * (1 + k) s; k = 1..4 -> 4 .. 10 s <= 10.5 s
        more = []
        for k in range(1, 5):
            assert batcher.estimated_wait_s() == pytest.approx(2 * (1.0 + k))
            more.append(asyncio.create_task(batcher.submit([text(10, 10 + k)])))
            await asyncio.sleep(0)
        with pytest.raises(OverloadedError):  # 12 s; at the learned speed it would have been 6 s
            await batcher.submit([text(10, 99)])
        backend.gate.set()
        await asyncio.gather(running, queued, *more)
        await batcher.stop()

    run(body())


def test_one_batch_never_exceeds_the_delay_budget() -> None:
    async def body() -> None:
        backend = SimBackend()
        batcher = make(backend, max_queue_delay_ms=10_500.0, max_batch_size=64, lookahead=64)
        await batcher.start()
        await warm(batcher)
        before = len(backend.shapes)
        big = await batcher.submit([text(10, 100 + i) for i in range(30)])  # empty queue: admitted whole
        assert big.outputs[0][:, 0].tolist() == [100 + i for i in range(30)]
        # 95 padded tokens per batch at most -> 9 texts of 10 tokens
        assert [rows for rows, _ in backend.shapes[before:]] == [9, 9, 9, 3]
        await batcher.stop()

    run(body())


def test_unmeetable_deadline_is_refused_at_submit() -> None:
    async def body() -> None:
        backend = SimBackend()
        batcher = make(backend)  # no delay budget: deadlines alone decide
        await batcher.start()
        await warm(batcher)
        backend.gate.clear()
        running = asyncio.create_task(batcher.submit([text(10, 1)]))  # 2 s left to run
        await backend.wait_entered(4)
        queued = asyncio.create_task(batcher.submit([text(10, 2)]))  # +2 s
        await asyncio.sleep(0)
        # it would finish after about 2 + 1 + 2 * 1 = 5 simulated seconds; 3 s are not enough
        with pytest.raises(DeadlineUnmeetableError) as info:
            await batcher.submit([text(10, 3)], deadline=time.monotonic() + 3.0)
        assert isinstance(info.value, DeadlineExceededError)  # DEADLINE_EXCEEDED through the mapping
        assert info.value.estimated_s == pytest.approx(5.0)
        assert "5000 ms" in str(info.value)
        assert batcher.queue_depth == 1 and batcher.in_flight == 2
        # a deadline it can meet is admitted and served
        fine = asyncio.create_task(batcher.submit([text(10, 4)], deadline=time.monotonic() + 3600.0))
        await asyncio.sleep(0)
        assert batcher.queue_depth == 2
        backend.gate.set()
        results = await asyncio.gather(running, queued, fine)
        assert [r.outputs[0][0, 0] for r in results] == [1, 2, 4]
        assert 3 not in backend.markers  # the refused request was never computed
        # idle: nothing to wait for, so even a deadline shorter than the (simulated) 6 s run of five
        # texts is admitted: an estimate alone never locks a tight-deadline client out
        assert batcher.estimated_wait_s() == 0.0
        assert batcher.estimated_wait_s(5, 50) == pytest.approx(6.0)
        alone = await batcher.submit([text(10, 5)] * 5, deadline=time.monotonic() + 5.0)
        assert alone.outputs[0][:, 0].tolist() == [5] * 5
        await batcher.stop()

    run(body())


def test_under_a_flood_every_request_is_either_served_or_refused_as_overloaded() -> None:
    async def body() -> None:
        backend = SimBackend(overhead_s=0.001, per_token_s=0.001)
        batcher = make(backend, max_queue_delay_ms=30.0, max_batch_size=8, lookahead=8)
        await batcher.start()
        await warm(batcher)
        backend.gate.clear()
        outcomes: list[asyncio.Task[Any]] = []
        for i in range(300):
            outcomes.append(asyncio.create_task(batcher.submit([text(5 + i % 7, 1000 + i)])))
            await asyncio.sleep(0)
            if i == 100:
                backend.gate.set()  # the worker runs while the flood goes on
        done = await asyncio.gather(*outcomes, return_exceptions=True)
        served = refused = 0
        for i, result in enumerate(done):
            if isinstance(result, OverloadedError):
                refused += 1
            else:
                assert not isinstance(result, BaseException), repr(result)
                assert result.outputs[0][0].tolist() == [1000 + i, 5 + i % 7]
                served += 1
        assert refused > 0 and served > 0 and served + refused == 300
        assert batcher.queue_depth == 0 and batcher.in_flight == 0
        await batcher.stop()

    run(body())


# --------------------------------------------------------------------------- status codes


def test_refusals_map_to_the_right_grpc_status() -> None:
    code, message = status_for(OverloadedError("overloaded: estimated queue wait 80 ms exceeds the limit of 25 ms", 0.08, 0.025))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "80 ms" in message and "25 ms" in message and "retry with backoff" in message
    code, message = status_for(DeadlineUnmeetableError("deadline cannot be met: 10 ms left", 0.05, 0.01))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "10 ms left" in message
