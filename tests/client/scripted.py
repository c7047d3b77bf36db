"""A real grpc.aio server that fails as a test scripts it, then answers: what retries and error details meet.

It runs on its own event loop thread, so blocking and asyncio clients both call it over a real socket.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import grpc
import numpy as np
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from openemploi.v1 import embedding_pb2, index_pb2

DIM = 4


def status(code: int, message: str, *details) -> status_pb2.Status:
    """A google.rpc.Status with `details` packed, as an AIP-193 server sends it."""
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=code, message=message, details=packed)


def unavailable() -> status_pb2.Status:
    return status(code_pb2.UNAVAILABLE, "draining")


def overloaded(delay_s: float) -> status_pb2.Status:
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(delay_s), nanos=int(delay_s % 1 * 1e9)))
    return status(code_pb2.RESOURCE_EXHAUSTED, "queue full", retry)


def bad_text(index: int) -> status_pb2.Status:
    violation = error_details_pb2.BadRequest.FieldViolation(field=f"texts[{index}]", description="over 512 tokens")
    info = error_details_pb2.ErrorInfo(reason="TEXT_TOO_LONG", domain="openemploi", metadata={"limit": "512"})
    return status(
        code_pb2.INVALID_ARGUMENT, f"texts[{index}] is too long", error_details_pb2.BadRequest(field_violations=[violation]), info
    )


@dataclass
class Received:
    method: str
    metadata: dict[str, str]
    timeout_s: float | None


@dataclass
class Script:
    """The failures to answer, in order, before each method succeeds."""

    failures: list[status_pb2.Status] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)


class ScriptedServer:
    def __init__(self) -> None:
        self.script = Script()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server, port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        self.address = f"127.0.0.1:{port}"

    def fail_with(self, *failures: status_pb2.Status) -> Script:
        self.script = Script(list(failures))
        return self.script

    async def _start(self) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        handlers = {
            "Embed": grpc.unary_unary_rpc_method_handler(
                self._embed, embedding_pb2.EmbedRequest.FromString, embedding_pb2.EmbedResponse.SerializeToString
            ),
        }
        index_handlers = {
            "CreateCollection": grpc.unary_unary_rpc_method_handler(
                self._create, index_pb2.CreateCollectionRequest.FromString, index_pb2.CreateCollectionResponse.SerializeToString
            ),
        }
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler("openemploi.v1.EmbeddingService", handlers),
                grpc.method_handlers_generic_handler("openemploi.v1.IndexService", index_handlers),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    async def _answer(self, method: str, context: grpc.aio.ServicerContext) -> None:
        metadata = {key: value for key, value in context.invocation_metadata() or ()}
        self.script.received.append(Received(method, metadata, context.time_remaining()))
        if self.script.failures:
            failure = self.script.failures.pop(0)
            await context.abort_with_status(rpc_status.to_status(failure))

    async def _embed(self, request: embedding_pb2.EmbedRequest, context) -> embedding_pb2.EmbedResponse:
        await self._answer("Embed", context)
        n = len(request.texts)
        vectors = np.tile(np.eye(1, DIM, dtype="<f4"), (n, 1))
        return embedding_pb2.EmbedResponse(
            raw_float32=vectors.tobytes(),
            dim=DIM,
            token_counts=[3] * n,
            truncated=[False] * n,
            model="scripted",
            model_version="1",
        )

    async def _create(self, request: index_pb2.CreateCollectionRequest, context) -> index_pb2.CreateCollectionResponse:
        await self._answer("CreateCollection", context)
        return index_pb2.CreateCollectionResponse(collection=index_pb2.CollectionInfo(name=request.name))

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
