"""EmbeddingService: Embed (unary) and EmbedStream (bidirectional, ordered, windowed)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from openemploi.v1 import embedding_pb2, embedding_pb2_grpc

from ..config import LimitsConfig
from ..runtime.registry import ModelRegistry
from ..tokenize import TextKind
from . import rpc
from .errors import RequestError, invalid
from .validation import Unparsed, check_text_chars, check_text_count, require_parsed, text_chars

KINDS = {
    embedding_pb2.TEXT_KIND_UNSPECIFIED: TextKind.PASSAGE,
    embedding_pb2.QUERY: TextKind.QUERY,
    embedding_pb2.PASSAGE: TextKind.PASSAGE,
}


@dataclass
class Timings:
    """Where an Embed spent its time, sent back in trailing metadata so callers can see queueing."""

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


def check_request_chars(texts: Sequence[str], limits: LimitsConfig) -> None:
    """Bound the tokenising one request may cost, whatever its split into texts."""
    total = sum(map(len, texts))
    if total > limits.max_request_chars:
        raise invalid(
            f"texts hold {total} characters in all, over the limit of {limits.max_request_chars} "
            "(limits.max_request_chars); split the request"
        )


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, registry: ModelRegistry, limits: LimitsConfig) -> None:
        self._registry = registry
        self._limits = limits

    def validate(self, received: embedding_pb2.EmbedRequest | Unparsed) -> embedding_pb2.EmbedRequest:
        request: embedding_pb2.EmbedRequest = require_parsed(received)
        check_text_count(len(request.texts), self._limits)
        if request.kind not in KINDS:
            raise invalid(f"unknown kind {request.kind}; use QUERY or PASSAGE")
        if request.encoding not in (embedding_pb2.FLOAT_LIST, embedding_pb2.RAW_FLOAT32):
            raise invalid(f"unknown encoding {request.encoding}")
        limit = text_chars(self._limits)
        for index, text in enumerate(request.texts):
            check_text_chars(f"texts[{index}]", text, limit)
        check_request_chars(request.texts, self._limits)
        return request

    async def embed(
        self, received: embedding_pb2.EmbedRequest | Unparsed, deadline: float | None
    ) -> tuple[embedding_pb2.EmbedResponse, Timings]:
        request = self.validate(received)
        model = self._registry.get(request.model, request.model_version)
        result = await model.embed(list(request.texts), KINDS[request.kind], request.truncate, deadline)
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

    @rpc.unary
    async def Embed(self, request: embedding_pb2.EmbedRequest, call: rpc.Call) -> embedding_pb2.EmbedResponse:
        response, timings = await self.embed(request, call.deadline)
        call.extra_trailing_metadata.extend(timings.metadata())
        return response

    @rpc.stream
    async def EmbedStream(
        self, requests: AsyncIterator[embedding_pb2.EmbedRequest | Unparsed], call: rpc.Call
    ) -> AsyncGenerator[embedding_pb2.EmbedStreamResponse, None]:
        """Up to `stream_window` requests run at once; we stop reading while the window is full,
        so HTTP/2 flow control pushes back on a fast producer. One call takes at most
        `max_stream_requests` requests: the answers to those come back, then RESOURCE_EXHAUSTED.
        A bad item is answered with its own status and the stream goes on."""
        window: deque[tuple[int, asyncio.Task]] = deque()
        sequence = 0

        async def run(request: embedding_pb2.EmbedRequest | Unparsed) -> embedding_pb2.EmbedResponse:
            response, _ = await self.embed(request, call.deadline)
            return response

        async def settle(seq: int, task: asyncio.Task) -> embedding_pb2.EmbedStreamResponse:
            try:
                return embedding_pb2.EmbedStreamResponse(sequence=seq, response=await task)
            except Exception as exc:
                status = call.status_of(exc, what="EmbedStream item")
                return embedding_pb2.EmbedStreamResponse(sequence=seq, code=status.code.value[0], message=status.message)

        try:
            async for request in requests:
                if sequence >= self._limits.max_stream_requests:
                    while window:
                        yield await settle(*window.popleft())
                    raise RequestError(
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


def add_to_server(servicer: EmbeddingServicer, server: grpc.aio.Server) -> None:
    rpc.register_service(servicer, server, embedding_pb2, "EmbeddingService", strings="texts")
