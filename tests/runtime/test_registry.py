"""LoadedModel.embed with the real tokenizer and a fake encoder: where tokenising runs, deadlines, non-finite rows."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from openemploi.backends.base import BackendKind, EncoderInfo
from openemploi.batching import BatcherConfig, DeadlineExceededError, DynamicBatcher
from openemploi.runtime.registry import INLINE_TOKENIZE_CHARS, LoadedModel, NonFiniteEmbeddingError
from openemploi.tokenize import TextKind, TextTokenizer, TokenizerConfig

GATE_TIMEOUT_S = 20.0  # only reached when the loop is blocked, i.e. when the test fails
LONG_ENOUGH_TO_OVERFLOW = 16  # the fake encoder's rows overflow for texts of more tokens than this


class OverflowingEncoder:
    """Like an fp16 backend whose ReduceSum overflows: NaN rows for longer texts, unit rows otherwise."""

    def __init__(self, dim: int) -> None:
        self.info = EncoderInfo(BackendKind.ONNX, "cpu", "fp16", dim, "fake")

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.zeros((len(input_ids), self.info.dim), dtype=np.float32)
        rows[:, 0] = 1.0
        rows[attention_mask.sum(axis=1) > LONG_ENOUGH_TO_OVERFLOW] = np.nan
        return rows, rows.copy()

    def close(self) -> None:
        pass


class GatedTokenizer:
    """Wraps the tokenizers' Tokenizer: records what it is asked, and blocks its first call until released."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.timed_out = False
        self.threads: list[threading.Thread] = []
        self.texts_seen: list[int] = []

    def encode_batch(self, texts, **options):
        self.threads.append(threading.current_thread())
        self.texts_seen.append(len(texts))
        if not self.entered.is_set():
            self.entered.set()
            self.timed_out = not self.release.wait(GATE_TIMEOUT_S)
        return self._inner.encode_batch(texts, **options)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def make_model(version) -> tuple[LoadedModel, GatedTokenizer]:
    tokenizer = TextTokenizer(
        version.tokenizer_path, TokenizerConfig(version.max_tokens, version.query_prefix, version.passage_prefix)
    )
    gate = GatedTokenizer(tokenizer._tokenizer)
    tokenizer._tokenizer = gate
    encoder = OverflowingEncoder(version.dim)
    batcher = DynamicBatcher(encoder.encode, BatcherConfig(pad_token_id=tokenizer.pad_id), name="fake")
    return LoadedModel(version, tokenizer, encoder, batcher), gate


async def started(model: LoadedModel) -> LoadedModel:
    await model.batcher.start()
    return model


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_a_non_finite_row_fails_its_request_only_and_is_reported(default_version):
    model, gate = make_model(default_version)
    gate.release.set()
    reported: list[int] = []
    model.report_nonfinite = reported.append

    async def scenario():
        await started(model)
        try:
            long_text = "une description de poste bien plus longue que seize tokens, avec ses missions et son profil"
            fine, broken = await asyncio.gather(
                model.embed(["court"], TextKind.PASSAGE),
                model.embed(["court", long_text], TextKind.PASSAGE),
                return_exceptions=True,
            )
            return fine, broken
        finally:
            await model.batcher.stop()

    fine, broken = run(scenario())
    assert not isinstance(fine, BaseException) and np.all(np.isfinite(fine.normalized))
    assert isinstance(broken, NonFiniteEmbeddingError), broken
    assert broken.indices == [1] and "texts [1]" in str(broken) and default_version.version in str(broken)
    assert reported == [1]


AD = "Cariste en entrepôt frigorifique, CACES R489 catégories 1, 3 et 5, travail en équipes 2x8. " * 4
assert len(AD) > INLINE_TOKENIZE_CHARS


def test_tokenising_runs_in_a_worker_thread_while_the_loop_stays_free(default_version):
    model, gate = make_model(default_version)

    async def scenario():
        await started(model)
        loop_thread = threading.current_thread()
        try:
            embedding = asyncio.ensure_future(model.embed([AD], TextKind.PASSAGE))
            await asyncio.to_thread(gate.entered.wait, GATE_TIMEOUT_S)
            gate.release.set()  # reached only if the loop ran while the tokenizer was blocked
            # The fake encoder overflows past 16 tokens: the answer is its refusal, but it came.
            result = (await asyncio.gather(embedding, return_exceptions=True))[0]
            return loop_thread, result
        finally:
            await model.batcher.stop()

    loop_thread, result = run(scenario())
    assert not gate.timed_out, "the event loop was blocked while the tokenizer ran"
    assert gate.threads and all(t is not loop_thread for t in gate.threads)
    assert isinstance(result, NonFiniteEmbeddingError) and result.indices == [0]


def test_a_short_request_is_tokenised_on_the_loop_without_a_thread_hand_off(default_version):
    """A label or a query costs tens of microseconds to tokenise: less than a hop to a worker thread."""
    model, gate = make_model(default_version)
    gate.release.set()

    async def scenario():
        await started(model)
        try:
            return threading.current_thread(), await model.embed(["Boulanger / Boulangère"], TextKind.PASSAGE)
        finally:
            await model.batcher.stop()

    loop_thread, result = run(scenario())
    assert gate.threads == [loop_thread]
    assert result.normalized.shape == (1, default_version.dim)


def test_an_expired_deadline_is_refused_before_any_tokenising(default_version):
    model, gate = make_model(default_version)
    gate.release.set()

    async def scenario():
        await started(model)
        try:
            await model.embed(["Boulanger"], TextKind.PASSAGE, deadline=time.monotonic() - 1.0)
        finally:
            await model.batcher.stop()

    with pytest.raises(DeadlineExceededError):
        run(scenario())
    assert gate.texts_seen == []


def test_a_deadline_passing_while_tokenising_answers_then_stops_the_tokenizer(default_version):
    """The caller gets DEADLINE_EXCEEDED while the tokenizer is still busy, and no further chunk is tokenised."""
    model, gate = make_model(default_version)
    texts = [f"offre {i} : " + "cariste en entrepôt, CACES R489 " * 300 for i in range(400)]
    finished = threading.Event()
    inner_encode = model.tokenizer.encode

    def encode(*args, **options):
        try:
            return inner_encode(*args, **options)
        finally:
            finished.set()

    model.tokenizer.encode = encode

    async def scenario():
        await started(model)
        try:
            with pytest.raises(DeadlineExceededError):
                await model.embed(texts, TextKind.PASSAGE, truncate=True, deadline=time.monotonic() + 0.5)
            gate.release.set()
            await asyncio.to_thread(finished.wait, GATE_TIMEOUT_S)
        finally:
            gate.release.set()
            await model.batcher.stop()

    run(scenario())
    assert finished.is_set()
    assert len(gate.texts_seen) == 1 and gate.texts_seen[0] < len(texts), gate.texts_seen
