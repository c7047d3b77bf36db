"""EmbeddingService: Embed (unary) and EmbedStream (bidirectional, ordered, windowed)."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np

from openemploi.v1 import embedding_pb2, embedding_pb2_grpc

from ..config import LimitsConfig
from ..modelrepo.registry import ModelRegistry
from ..tokenize import TextKind
from .errors import Malformed, RequestError, safe_deserializer, status_for

log = logging.getLogger(__name__)

_KINDS = {
    embedding_pb2.TEXT_KIND_UNSPECIFIED: TextKind.PASSAGE,
    embedding_pb2.QUERY: TextKind.QUERY,
    embedding_pb2.PASSAGE: TextKind.PASSAGE,
}


@dataclass
class Timings:
    tokenize_s: float = 0.0
    queue_s: float = 0.0
    inference_s: float = 0.0
    batches: int = 0

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (
            ("x-openemploi-tokenize-ms", f"{self.tokenize_s * 1e3:.3f}"),
            ("x-openemploi-queue-ms", f"{self.queue_s * 1e3:.3f}"),
            ("x-openemploi-inference-ms", f"{self.inference_s * 1e3:.3f}"),
            ("x-openemploi-batches", str(self.batches)),
        )


def request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return str(value)[:128]
    return uuid.uuid4().hex


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, registry: ModelRegistry, limits: LimitsConfig) -> None:
        self._registry = registry
        self._limits = limits

    def validate(self, request) -> None:
        if isinstance(request, Malformed):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request could not be parsed ({request.error}); texts must be valid UTF-8",
            )
        n = len(request.texts)
        if n == 0:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "texts is empty: send at least one text")
        limit = self._limits.max_texts_per_request
        if n > limit:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{n} texts in one request, over the limit of {limit} (limits.max_texts_per_request); split the request",
            )
        if request.kind not in _KINDS:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown kind {request.kind}; use QUERY or PASSAGE")
        if request.encoding not in (embedding_pb2.FLOAT_LIST, embedding_pb2.RAW_FLOAT32):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown encoding {request.encoding}")
        max_chars = self._limits.max_text_chars
        for index, text in enumerate(request.texts):
            if len(text) > max_chars:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"texts[{index}] has {len(text)} characters, over the limit of {max_chars} (limits.max_text_chars)",
                )

    async def embed(self, request, deadline: float | None) -> tuple[embedding_pb2.EmbedResponse, Timings]:
        self.validate(request)
        model = self._registry.get(request.model, request.model_version)
        result = await model.embed(list(request.texts), _KINDS[request.kind], request.truncate, deadline)
        timings = Timings(result.tokenize_s, result.queue_s, result.inference_s, result.batches)
        vectors = result.normalized if (not request.HasField("normalize") or request.normalize) else result.pooled
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        counts = [len(t.ids) for t in result.tokens]
        response = embedding_pb2.EmbedResponse(
            dim=int(vectors.shape[1]),
            token_counts=counts,
            truncated=[t.truncated for t in result.tokens],
            model=model.name,
            model_version=model.version.version,
            total_tokens=sum(counts),
        )
        if request.encoding == embedding_pb2.RAW_FLOAT32:
            response.raw_float32 = vectors.tobytes()
        else:
            response.embeddings.extend(embedding_pb2.Embedding(values=row) for row in vectors.tolist())
        return response, timings

    async def Embed(self, request, context: grpc.aio.ServicerContext):  # noqa: N802 - gRPC method name
        rid = request_id(context)
        try:
            response, timings = await self.embed(request, deadline_of(context))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("Embed failed", extra={"request_id": rid})
            context.set_trailing_metadata((("x-request-id", rid),))
            await context.abort(code, message)
        context.set_trailing_metadata((("x-request-id", rid),) + timings.metadata())
        return response

    async def EmbedStream(self, request_iterator, context: grpc.aio.ServicerContext) -> AsyncIterator:  # noqa: N802
        """Up to `stream_window` requests run at once; we stop reading while the window is full,
        so HTTP/2 flow control pushes back on a fast producer. One call takes at most
        `max_stream_requests` requests: the answers to those come back, then RESOURCE_EXHAUSTED."""
        rid = request_id(context)
        deadline = deadline_of(context)
        window: deque[tuple[int, asyncio.Task]] = deque()
        sequence = 0

        async def run(request) -> embedding_pb2.EmbedResponse:
            response, _ = await self.embed(request, deadline)
            return response

        async def settle(seq: int, task: asyncio.Task) -> embedding_pb2.EmbedStreamResponse:
            try:
                return embedding_pb2.EmbedStreamResponse(sequence=seq, response=await task)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code, message = status_for(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("EmbedStream item failed", extra={"request_id": rid})
                return embedding_pb2.EmbedStreamResponse(sequence=seq, code=code.value[0], message=message)

        try:
            async for request in request_iterator:
                if sequence >= self._limits.max_stream_requests:
                    while window:
                        yield await settle(*window.popleft())
                    context.set_trailing_metadata((("x-request-id", rid),))
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"more than {self._limits.max_stream_requests} requests in one EmbedStream "
                        "(limits.max_stream_requests); open a new stream for the rest",
                    )
                window.append((sequence, asyncio.create_task(run(request))))
                sequence += 1
                while len(window) >= self._limits.stream_window:
                    yield await settle(*window.popleft())
            while window:
                yield await settle(*window.popleft())
        finally:
            for _, task in window:
                task.cancel()
        context.set_trailing_metadata((("x-request-id", rid),))


def add_to_server(servicer: EmbeddingServicer, server: grpc.aio.Server) -> None:
    """Register with our own deserialisers so malformed bytes get INVALID_ARGUMENT."""
    handlers = {
        "Embed": grpc.unary_unary_rpc_method_handler(
            servicer.Embed,
            request_deserializer=safe_deserializer(embedding_pb2.EmbedRequest),
            response_serializer=embedding_pb2.EmbedResponse.SerializeToString,
        ),
        "EmbedStream": grpc.stream_stream_rpc_method_handler(
            servicer.EmbedStream,
            request_deserializer=safe_deserializer(embedding_pb2.EmbedRequest),
            response_serializer=embedding_pb2.EmbedStreamResponse.SerializeToString,
        ),
    }
    service = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
