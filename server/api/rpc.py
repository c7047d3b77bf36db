"""The one wrapper around every RPC: request id, deadline, failure -> status, registration.

A servicer method is written as `body(self, request, call)` and decorated with
`unary` or `stream`; it returns (or yields) responses, or raises. The wrapper
answers a failure with `errors.status_for` and its AIP-193 details (`grpc-status-details-bin`),
logs our own bugs with the request id, and sends the request id back in trailing metadata
whatever the outcome.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any, NoReturn, ParamSpec, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from . import status_details
from .errors import ErrorDetails, RequestError, Status, details_for, status_for
from .validation import Unparsed, request_parser, require_parsed

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID_CHARS = 128  # a caller's id is echoed in metadata and logs: keep it bounded
MIN_RETRY_S = 0.05  # the index pool's retry delay before any call was timed, and its floor
MEAN_WEIGHT = 0.1  # weight of the newest call in the index pool's mean run time

Request = TypeVar("Request", bound=Message)
Response = TypeVar("Response", bound=Message)
Metadata = tuple[tuple[str, str], ...]
Params = ParamSpec("Params")
Result = TypeVar("Result")


@dataclass
class Call:
    """One RPC as its body sees it: who asked, by when the caller gives up, extra trailers on success."""

    method: str
    request_id: str
    deadline: float | None  # on the time.monotonic() clock; None: the caller set no deadline
    extra_trailing_metadata: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def begin(cls, method: str, context: grpc.aio.ServicerContext) -> Call:
        return cls(method, request_id(context), deadline_of(context))

    def request_id_metadata(self) -> Metadata:
        return ((REQUEST_ID_KEY, self.request_id),)

    def status_of(self, exc: Exception, what: str | None = None) -> Status:
        """The caller's status for `exc`; an INTERNAL one is our bug, so it is logged with the request id."""
        status = status_for(exc)
        if status.code == grpc.StatusCode.INTERNAL:
            log.error("%s failed", what or self.method, exc_info=exc, extra={"request_id": self.request_id})
        return status


def request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's `x-request-id`, so its logs and ours join up; a fresh one when it sent none."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)[:MAX_REQUEST_ID_CHARS]
    return uuid.uuid4().hex


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline on the monotonic clock, so batching can refuse work that would come too late."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def fail(context: grpc.aio.ServicerContext, call: Call, status: Status, details: ErrorDetails) -> NoReturn:
    """End the call with `status` and its details; raises, as context.abort does.

    Called outside the `except` block that caught the failure: gRPC keeps the abort's exception
    alive, and chained to ours it would keep the failure's frames (a failed LoadModel's
    half-built model) alive too.
    """
    rich = (status_details.DETAILS_KEY, status_details.encode(status, details))
    context.set_trailing_metadata((*call.request_id_metadata(), rich))  # a -bin key takes bytes
    await context.abort(status.code, status.message)
    raise AssertionError("grpc's context.abort returned instead of raising")


class WorkPool:
    """Blocking index and SQLite work of the RPC bodies, on threads of its own.

    Apart from asyncio's default pool, which embedding and shutdown use, so a flood of searches
    cannot starve them; bounded, so a backlog is refused rather than grown. Work whose call was
    cancelled, or whose deadline passed, while it queued never runs: nobody waits for its answer.
    A refusal carries a retry delay: the calls ahead, shared by the workers, at their mean duration.
    """

    def __init__(self, workers: int, max_queue: int, thread_start: Callable[[], None] | None = None) -> None:
        """`thread_start` runs once in each worker thread as it starts (per-thread library settings)."""
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="openemploi-index", initializer=thread_start)
        self._workers = workers
        self._capacity = workers + max_queue
        self._lock = threading.Lock()
        self._in_flight = 0
        self._mean_s = 0.0  # moving average of a call's run time, for the retry delay

    def retry_after_s(self) -> float:
        """When a refused call may find room: the work ahead of it drained by the workers."""
        ahead = max(0, self._in_flight - self._workers) / self._workers + 1.0
        return max(MIN_RETRY_S, ahead * self._mean_s)

    @property
    def in_flight(self) -> int:
        """Calls queued or running."""
        return self._in_flight

    async def run(self, call: Call, work: Callable[Params, Result], *args: Params.args, **kwargs: Params.kwargs) -> Result:
        with self._lock:
            if self._in_flight >= self._capacity:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self._in_flight} index calls are queued or running, the most this server takes "
                    "(limits.index_workers + limits.max_index_queue); retry with backoff",
                    reason="INDEX_POOL_FULL",
                    retry_after_s=self.retry_after_s(),
                )
            self._in_flight += 1
        queued_at = time.monotonic()

        def start() -> Result:
            now = time.monotonic()
            if call.deadline is not None and now >= call.deadline:
                raise RequestError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"deadline passed after {now - queued_at:.3f}s waiting for an index worker (limits.index_workers)",
                )
            try:
                return work(*args, **kwargs)
            finally:
                elapsed = time.monotonic() - now
                with self._lock:
                    self._mean_s += MEAN_WEIGHT * (elapsed - self._mean_s) if self._mean_s else elapsed

        future: Future[Result] = self._executor.submit(start)
        future.add_done_callback(self._release)  # also when cancelled while queued
        return await asyncio.wrap_future(future)  # cancelling this await cancels the queued work

    def _release(self, _: Future[Any]) -> None:
        with self._lock:
            self._in_flight -= 1

    def close(self) -> None:
        """Drop queued work and wait for the running calls (blocking)."""
        self._executor.shutdown(wait=True, cancel_futures=True)


UnaryBody = Callable[[Any, Request, Call], Awaitable[Response]]
UnaryHandler = Callable[[Any, Request | Unparsed, grpc.aio.ServicerContext], Awaitable[Response]]


def unary(body: UnaryBody) -> UnaryHandler:
    """Make `body(self, request, call)` a unary gRPC method; requests that did not parse never reach it."""

    @functools.wraps(body)
    async def handler(self: Any, request: Request | Unparsed, context: grpc.aio.ServicerContext) -> Response:
        call = Call.begin(body.__name__, context)
        try:
            require_parsed(request)
            response = await body(self, request, call)
        except Exception as exc:
            status, details = call.status_of(exc), details_for(exc)
        else:
            context.set_trailing_metadata(call.request_id_metadata() + tuple(call.extra_trailing_metadata))
            return response
        await fail(context, call, status, details)

    return handler


StreamBody = Callable[[Any, AsyncIterator[Request | Unparsed], Call], AsyncGenerator[Response, None]]
StreamHandler = Callable[[Any, AsyncIterator[Request | Unparsed], grpc.aio.ServicerContext], AsyncIterator[Response]]


def stream(body: StreamBody) -> StreamHandler:
    """Make the async generator `body(self, requests, call)` a bidirectional-streaming gRPC method.

    Requests that did not parse reach the body as `validation.Unparsed`, so it can answer them one by one.
    """

    @functools.wraps(body)
    async def handler(
        self: Any, requests: AsyncIterator[Request | Unparsed], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Response]:
        call = Call.begin(body.__name__, context)
        try:
            async with aclosing(body(self, requests, call)) as responses:  # closed, not left to GC, if the caller leaves
                async for response in responses:
                    yield response
        except Exception as exc:
            status, details = call.status_of(exc), details_for(exc)
        else:
            context.set_trailing_metadata(call.request_id_metadata() + tuple(call.extra_trailing_metadata))
            return
        await fail(context, call, status, details)

    return handler


_HANDLER_FACTORIES = MappingProxyType(
    {  # (client streams, server streams) -> grpc handler factory
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
)


@dataclass(frozen=True)
class Registered:
    """A service registered on a server: the HTTP API calls the same servicer through it."""

    servicer: object
    pb_module: ModuleType
    descriptor: ServiceDescriptor


_REGISTERED: weakref.WeakKeyDictionary[grpc.aio.Server, dict[str, Registered]] = weakref.WeakKeyDictionary()


def registered_services(server: grpc.aio.Server) -> Mapping[str, Registered]:
    """The services `register_service` put on `server`, by full name ("openemploi.v1.MatchService")."""
    return MappingProxyType(_REGISTERED.get(server, {}))


def describe_service(servicer: object, pb_module: ModuleType, service: str) -> Registered:
    """What `register_service` records, also for a host without a grpc.aio.Server (Ray Serve's gateway)."""
    return Registered(servicer, pb_module, pb_module.DESCRIPTOR.services_by_name[service])


def register_service(
    servicer: object, server: grpc.aio.Server, pb_module: ModuleType, service: str, strings: str = "strings"
) -> None:
    """Register every method of `service` with parsers that never raise; `strings` names what must be UTF-8."""
    registered = describe_service(servicer, pb_module, service)
    descriptor = registered.descriptor
    _REGISTERED.setdefault(server, {})[descriptor.full_name] = registered
    handlers = {
        method.name: _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)](
            getattr(servicer, method.name),
            request_deserializer=request_parser(getattr(pb_module, method.input_type.name), strings),
            response_serializer=getattr(pb_module, method.output_type.name).SerializeToString,
        )
        for method in descriptor.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
