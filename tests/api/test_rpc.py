"""The RPC wrapper without a server: the status table, request ids, deadlines, registration."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator

import grpc
import pytest

from openemploi.api import rpc
from openemploi.api.errors import STATUS_BY_ERROR, RequestError, invalid, status_for
from openemploi.api.validation import Unparsed
from openemploi.batching import (
    BatcherClosedError,
    DeadlineExceededError,
    DeadlineUnmeetableError,
    OverloadedError,
    QueueFullError,
)
from openemploi.index.collection import (
    CollectionExists,
    CollectionNotFound,
    CollectionReplaced,
    CollectionUnavailable,
    InvalidQuery,
    ShardUnavailable,
)
from openemploi.index.store import StorageFull
from openemploi.runtime.registry import ModelInUse, NonFiniteEmbeddingError
from openemploi.runtime.repository import ModelNotBuilt, ModelNotFound
from openemploi.skills.engine import UnknownOccupation, UnknownSkill
from openemploi.tokenize import TextTooLongError
from openemploi.v1 import embedding_pb2

# --------------------------------------------------------------------------- the status table


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (CollectionNotFound("collection 'x' not found"), grpc.StatusCode.NOT_FOUND, "collection 'x' not found"),
        (CollectionExists("collection 'x' exists"), grpc.StatusCode.ALREADY_EXISTS, "collection 'x' exists"),
        (CollectionReplaced("re-embedded; retry"), grpc.StatusCode.ABORTED, "re-embedded; retry"),
        (
            CollectionUnavailable("collection 'x' set aside: bad index"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "collection 'x' set aside",
        ),
        (InvalidQuery("k must be between 1 and 2048"), grpc.StatusCode.INVALID_ARGUMENT, "k must be between 1 and 2048"),
        (ShardUnavailable("shard 1 of 'x' did not answer"), grpc.StatusCode.UNAVAILABLE, "shard 1 of 'x' did not answer"),
        (TextTooLongError(3, 600, 512), grpc.StatusCode.INVALID_ARGUMENT, "texts[3] has 600 tokens"),
        (ModelNotFound("no model 'camembert'"), grpc.StatusCode.NOT_FOUND, "no model 'camembert'"),
        (ModelNotBuilt("run openemploi models build"), grpc.StatusCode.NOT_FOUND, "run openemploi models build"),
        (ModelInUse("e5 is the default model"), grpc.StatusCode.FAILED_PRECONDITION, "e5 is the default model"),
        (StorageFull("disk full: free space"), grpc.StatusCode.RESOURCE_EXHAUSTED, "disk full: free space"),
        (QueueFullError("queue holds 4 texts, limit 4"), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit 4; retry with backoff"),
        (DeadlineExceededError("deadline passed"), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed"),
        (BatcherClosedError("closed"), grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another replica"),
        (NonFiniteEmbeddingError("e5", "v1", [2]), grpc.StatusCode.INTERNAL, "produced non-finite vectors for texts [2]"),
        (UnknownOccupation("Z9999"), grpc.StatusCode.NOT_FOUND, "unknown ROME code 'Z9999'"),
        (UnknownSkill("http://data.europa.eu/esco/skill/x"), grpc.StatusCode.INVALID_ARGUMENT, "is not an ESCO v1 skill URI"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None,
)
def test_each_domain_error_has_its_status(error, code, message):
    status = status_for(error)
    assert status.code == code
    assert message in status.message


def test_every_row_of_the_table_is_covered_above():
    """A new domain error added to the table gets a row in the test above, with its message."""
    assert set(STATUS_BY_ERROR) == {
        CollectionNotFound, CollectionExists, CollectionReplaced, CollectionUnavailable, InvalidQuery, TextTooLongError, ModelNotFound,
        ModelNotBuilt, ModelInUse, StorageFull, QueueFullError, DeadlineExceededError, BatcherClosedError,
        NonFiniteEmbeddingError, UnknownOccupation, UnknownSkill, ShardUnavailable,
    }  # fmt: skip


def test_a_subclass_gets_its_closest_ancestors_status():
    overloaded = status_for(OverloadedError("estimated queue wait 80 ms exceeds 25 ms", 0.08, 0.025))
    assert overloaded.code == grpc.StatusCode.RESOURCE_EXHAUSTED and overloaded.message.endswith("retry with backoff")
    unmeetable = status_for(DeadlineUnmeetableError("deadline cannot be met: 10 ms left", 0.05, 0.01))
    assert unmeetable == (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline cannot be met: 10 ms left")


def test_a_request_error_carries_its_own_status():
    assert status_for(invalid("ids is empty")) == (grpc.StatusCode.INVALID_ARGUMENT, "ids is empty")
    assert status_for(RequestError(grpc.StatusCode.ALREADY_EXISTS, "busy")) == (grpc.StatusCode.ALREADY_EXISTS, "busy")


def test_anything_else_is_internal_without_its_details():
    status = status_for(KeyError("secret detail"))
    assert status.code == grpc.StatusCode.INTERNAL
    assert "KeyError" in status.message and "secret" not in status.message


# --------------------------------------------------------------------------- the wrapper


class Aborted(Exception):
    """What FakeContext.abort raises, as grpc.aio's abort raises AbortError."""


class FakeContext:
    def __init__(self, metadata: tuple[tuple[str, str], ...] = (), time_remaining: float | None = None) -> None:
        self._metadata = metadata
        self._time_remaining = time_remaining
        self.trailing: tuple[tuple[str, str], ...] = ()
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return self._time_remaining

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing = metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted(details)


class Servicer:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[rpc.Call] = []
        self.closed = False

    @rpc.unary
    async def Embed(self, request: embedding_pb2.EmbedRequest, call: rpc.Call) -> embedding_pb2.EmbedResponse:
        self.calls.append(call)
        if self.error is not None:
            raise self.error
        call.extra_trailing_metadata.append(("x-openemploi-batches", "1"))
        return embedding_pb2.EmbedResponse(dim=len(request.texts))

    @rpc.stream
    async def EmbedStream(
        self, requests: AsyncIterator[embedding_pb2.EmbedRequest], call: rpc.Call
    ) -> AsyncGenerator[embedding_pb2.EmbedStreamResponse, None]:
        try:
            sequence = 0
            async for request in requests:
                if not request.texts:
                    raise invalid("texts is empty: send at least one text")
                yield embedding_pb2.EmbedStreamResponse(sequence=sequence)
                sequence += 1
        finally:
            self.closed = True


async def requests_of(*requests: embedding_pb2.EmbedRequest) -> AsyncIterator[embedding_pb2.EmbedRequest]:
    for request in requests:
        yield request


def test_success_returns_the_request_id_and_the_bodys_trailers():
    context = FakeContext(metadata=(("x-request-id", "req-42"),), time_remaining=2.0)
    servicer = Servicer()
    before = time.monotonic()
    response = asyncio.run(servicer.Embed(embedding_pb2.EmbedRequest(texts=["a", "b"]), context))
    assert response.dim == 2
    assert context.trailing == (("x-request-id", "req-42"), ("x-openemploi-batches", "1"))
    call = servicer.calls[0]
    assert call.method == "Embed" and call.request_id == "req-42"
    assert before + 2.0 <= call.deadline <= time.monotonic() + 2.0


def test_a_missing_request_id_is_generated_and_a_long_one_cut():
    servicer = Servicer()
    asyncio.run(servicer.Embed(embedding_pb2.EmbedRequest(texts=["a"]), FakeContext()))
    generated = servicer.calls[0]
    assert len(generated.request_id) == 32 and generated.deadline is None
    asyncio.run(servicer.Embed(embedding_pb2.EmbedRequest(texts=["a"]), FakeContext(metadata=(("x-request-id", "r" * 500),))))
    assert servicer.calls[1].request_id == "r" * rpc.MAX_REQUEST_ID_CHARS


def test_a_failure_aborts_with_its_status_the_request_id_and_its_details():
    context = FakeContext(metadata=(("x-request-id", "req-7"),))
    with pytest.raises(Aborted):
        asyncio.run(Servicer(CollectionNotFound("collection 'x' not found")).Embed(embedding_pb2.EmbedRequest(), context))
    assert context.aborted == (grpc.StatusCode.NOT_FOUND, "collection 'x' not found")
    assert context.trailing[0] == ("x-request-id", "req-7")
    assert [key for key, _ in context.trailing] == ["x-request-id", "grpc-status-details-bin"]  # no timings of a failed call


def test_the_abort_does_not_chain_the_failure():
    """gRPC keeps the abort's exception alive: chained to ours, it would keep the failure's frames too."""
    with pytest.raises(Aborted) as info:
        asyncio.run(Servicer(RuntimeError("half-built model")).Embed(embedding_pb2.EmbedRequest(), FakeContext()))
    assert info.value.__context__ is None and info.value.__cause__ is None


def test_an_unparsed_request_never_reaches_the_body():
    context = FakeContext()
    servicer = Servicer()
    with pytest.raises(Aborted):
        asyncio.run(servicer.Embed(Unparsed("request could not be parsed (x); texts must be valid UTF-8"), context))
    assert context.aborted == (grpc.StatusCode.INVALID_ARGUMENT, "request could not be parsed (x); texts must be valid UTF-8")
    assert servicer.calls == []


def test_internal_errors_are_logged_with_the_request_id_and_refusals_are_not(caplog):
    with caplog.at_level(logging.INFO, logger="openemploi.api.rpc"):
        for error in (ZeroDivisionError("bug"), invalid("ids is empty")):
            context = FakeContext(metadata=(("x-request-id", "req-9"),))
            with pytest.raises(Aborted):
                asyncio.run(Servicer(error).Embed(embedding_pb2.EmbedRequest(), context))
    assert [(r.getMessage(), r.request_id, r.exc_info[0]) for r in caplog.records] == [
        ("Embed failed", "req-9", ZeroDivisionError)
    ]


def test_a_stream_answers_then_ends_with_the_status_of_its_failure():
    context = FakeContext(metadata=(("x-request-id", "s-1"),))
    servicer = Servicer()
    received = []

    async def consume() -> None:
        stream = servicer.EmbedStream(requests_of(embedding_pb2.EmbedRequest(texts=["a"]), embedding_pb2.EmbedRequest()), context)
        async for item in stream:
            received.append(item.sequence)

    with pytest.raises(Aborted):
        asyncio.run(consume())
    assert received == [0]
    assert context.aborted == (grpc.StatusCode.INVALID_ARGUMENT, "texts is empty: send at least one text")
    assert context.trailing[0] == ("x-request-id", "s-1")
    assert [key for key, _ in context.trailing] == ["x-request-id", "grpc-status-details-bin"]  # no timings of a failed call
    assert servicer.closed


def test_a_stream_the_caller_leaves_closes_its_body():
    context = FakeContext()
    servicer = Servicer()

    async def leave_after_one() -> None:
        stream = servicer.EmbedStream(requests_of(*[embedding_pb2.EmbedRequest(texts=["a"])] * 3), context)
        await anext(stream)
        await stream.aclose()

    asyncio.run(leave_after_one())
    assert servicer.closed and context.aborted is None


def test_a_finished_stream_returns_the_request_id():
    context = FakeContext(metadata=(("x-request-id", "s-2"),))

    async def consume() -> list[int]:
        stream = Servicer().EmbedStream(requests_of(embedding_pb2.EmbedRequest(texts=["a"])), context)
        return [item.sequence async for item in stream]

    assert asyncio.run(consume()) == [0]
    assert context.trailing == (("x-request-id", "s-2"),) and context.aborted is None


# --------------------------------------------------------------------------- registration


class RecordingServer:
    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self.generic.extend(handlers)


class Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_register_service_parses_bad_bytes_into_a_refusal_for_every_method():
    server = RecordingServer()
    rpc.register_service(Servicer(), server, embedding_pb2, "EmbeddingService", strings="texts")
    (generic,) = server.generic
    unary = generic.service(Details("/openemploi.v1.EmbeddingService/Embed"))
    stream = generic.service(Details("/openemploi.v1.EmbeddingService/EmbedStream"))
    assert unary.unary_unary is not None and stream.stream_stream is not None
    for handler in (unary, stream):
        parsed = handler.request_deserializer(b"\x0a\x03\xff\xfe\xfd")  # texts: 3 bytes that are not UTF-8
        assert isinstance(parsed, Unparsed) and parsed.reason.endswith("texts must be valid UTF-8")
    good = embedding_pb2.EmbedRequest(texts=["Boulanger"]).SerializeToString()
    assert list(unary.request_deserializer(good).texts) == ["Boulanger"]


# --------------------------------------------------------------------------- the index work pool


class Gate:
    """Holds the pool's only worker until released, so what queues behind it waits for sure."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def hold(self) -> str:
        self.entered.set()
        assert self.release.wait(30), "the test never released the worker"
        return "held"


def test_index_work_runs_on_the_pools_threads_and_returns_its_result():
    async def scenario() -> str:
        pool = rpc.WorkPool(workers=1, max_queue=4)
        try:
            return await pool.run(rpc.Call("Search", "r", None), threading.current_thread)
        finally:
            pool.close()

    assert asyncio.run(scenario()).name.startswith("openemploi-index")


def test_each_worker_runs_the_pools_thread_start_before_any_work():
    """Per-thread library settings (the server's OpenMP limit) hold for every call a worker runs."""
    started: list[str] = []  # the threads whose thread_start ran

    def work() -> bool:
        return threading.current_thread().name in started  # checked while the work runs, not afterwards

    async def scenario() -> list[bool]:
        pool = rpc.WorkPool(workers=2, max_queue=4, thread_start=lambda: started.append(threading.current_thread().name))
        try:
            return await asyncio.gather(*(pool.run(rpc.Call("Search", f"r{i}", None), work) for i in range(4)))
        finally:
            pool.close()

    started_before_work = asyncio.run(scenario())
    assert started and all(name.startswith("openemploi-index") for name in started)
    assert all(started_before_work)  # each call's own thread had run thread_start before it


def test_index_work_whose_deadline_passed_while_queued_never_runs():
    ran: list[str] = []

    async def scenario() -> None:
        pool = rpc.WorkPool(workers=1, max_queue=4)
        gate = Gate()
        try:
            held = asyncio.ensure_future(pool.run(rpc.Call("Upsert", "r1", None), gate.hold))
            await asyncio.to_thread(gate.entered.wait, 30)
            # Its deadline is the moment it queues: by the time a worker is free it has passed.
            late = asyncio.ensure_future(pool.run(rpc.Call("Search", "r2", time.monotonic()), ran.append, "late"))
            gate.release.set()
            assert await held == "held"
            with pytest.raises(RequestError) as info:
                await late
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "limits.index_workers" in info.value.message
        finally:
            gate.release.set()
            pool.close()

    asyncio.run(scenario())
    assert ran == []


def test_index_work_of_a_cancelled_call_never_runs():
    ran: list[str] = []

    async def scenario() -> None:
        pool = rpc.WorkPool(workers=1, max_queue=4)
        gate = Gate()
        try:
            held = asyncio.ensure_future(pool.run(rpc.Call("Upsert", "r1", None), gate.hold))
            await asyncio.to_thread(gate.entered.wait, 30)
            queued = asyncio.ensure_future(pool.run(rpc.Call("Search", "r2", None), ran.append, "cancelled"))
            await asyncio.sleep(0)  # let it queue
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            gate.release.set()
            assert await held == "held"
            assert pool.in_flight == 0  # the cancelled call gave its queue slot back
        finally:
            gate.release.set()
            pool.close()

    asyncio.run(scenario())
    assert ran == []


def test_index_work_past_the_queue_limit_is_refused_naming_the_key():
    async def scenario() -> None:
        pool = rpc.WorkPool(workers=1, max_queue=1)
        gate = Gate()
        try:
            held = asyncio.ensure_future(pool.run(rpc.Call("Upsert", "r1", None), gate.hold))
            await asyncio.to_thread(gate.entered.wait, 30)
            queued = asyncio.ensure_future(pool.run(rpc.Call("Search", "r2", None), str, "queued"))
            await asyncio.sleep(0)
            with pytest.raises(RequestError) as info:
                await pool.run(rpc.Call("Search", "r3", None), str, "refused")
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limits.max_index_queue" in info.value.message and "retry" in info.value.message
            gate.release.set()
            assert (await held, await queued) == ("held", "queued")
        finally:
            gate.release.set()
            pool.close()

    asyncio.run(scenario())
