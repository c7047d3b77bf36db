"""A recording fake ``run_batch`` and the helpers the scheduler tests drive a batcher with.

No pytest-asyncio: each async test is driven by ``asyncio.run``.  Ordering is
controlled with threading events inside the fake ``run_batch``, never by
asserting how long something took.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import numpy as np

from openemploi.batching import BatcherConfig, DynamicBatcher, SubmitResult

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
