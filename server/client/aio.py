"""The asyncio client (grpc.aio): the blocking Client's methods, awaited; same plans, same retries."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from . import plans
from .connection import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_TIMEOUT_S,
    Attempts,
    Deadline,
    Tls,
    call_metadata,
    channel_options,
    check_chunk_size,
    credentials,
)
from .errors import from_rpc_error
from .retry import RetryPolicy
from .types import (
    CollectionInfo,
    Document,
    Embeddings,
    ExtractedSkill,
    Fusion,
    GetResult,
    IndexSpec,
    ModelInfo,
    Needs,
    Occupation,
    OccupationMatch,
    ProfileMatch,
    SearchHit,
    TextKind,
    Transition,
    UpsertResult,
)

Result = TypeVar("Result")


class AsyncClient:
    """openemploi over grpc.aio: the arguments and methods of `Client`, each method awaited.

    Create it inside the event loop that uses it; `sleep` is a coroutine function.
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        tls: Tls = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        creds = credentials(tls)
        options = channel_options(tls)
        self._channel = (
            grpc.aio.insecure_channel(address, options=options)
            if creds is None
            else grpc.aio.secure_channel(address, creds, options=options)
        )
        self._token = token
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self._chunk_size = check_chunk_size(chunk_size)
        self._sleep = sleep
        self._rand = rand
        self._callables: dict[str, Any] = {}

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _invoke(self, plan: plans.Plan[Any, Result], deadline: Deadline) -> Result:
        call = self._callables.get(plan.method)
        if call is None:
            call = self._channel.unary_unary(
                plan.method,
                request_serializer=type(plan.request).SerializeToString,
                response_deserializer=plan.reply_type.FromString,
            )
            self._callables[plan.method] = call
        attempts = Attempts(self._retry, plan.idempotent, deadline, self._rand)
        metadata = call_metadata(self._token, attempts.request_id)
        while True:
            try:
                reply = await call(plan.request, timeout=deadline.remaining(), metadata=metadata)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error, attempts.request_id)
                delay = attempts.next_delay(error)
                if delay is None:
                    raise error from None
                await self._sleep(delay)
            else:
                return plan.parse(reply)

    async def _run(self, plan: plans.Plan[Any, Result]) -> Result:
        return await self._invoke(plan, Deadline(self._timeout))

    # -- embeddings --------------------------------------------------------------------------------------------------

    async def embed_with_info(
        self,
        texts: str | Sequence[str],
        kind: TextKind = TextKind.QUERY,
        model: str = "",
        truncate: bool = False,
        normalize: bool = True,
    ) -> Embeddings:
        """Vectors and what made them. Over `chunk_size` texts go in several requests, all pinned to the
        model version that answered the first, so one call never mixes versions."""
        deadline = Deadline(self._timeout)
        parts: list[Embeddings] = []
        version = ""
        for chunk in plans.chunks(plans.text_list(texts), self._chunk_size):
            parts.append(await self._invoke(plans.embed(chunk, kind, model, version, truncate, normalize), deadline))
            model, version = parts[0].model, parts[0].model_version
        return plans.join(parts)

    async def embed(
        self,
        texts: str | Sequence[str],
        kind: TextKind = TextKind.QUERY,
        model: str = "",
        truncate: bool = False,
        normalize: bool = True,
    ) -> np.ndarray:
        """n x dim float32, one row per text (a single string gives 1 x dim); unit length unless normalize=False.

        `kind` QUERY (the default) is what a search sends; embed the documents it searches as PASSAGE.
        """
        return (await self.embed_with_info(texts, kind, model, truncate, normalize)).vectors

    # -- matching ----------------------------------------------------------------------------------------------------

    async def match_occupation(self, text: str, k: int = 5) -> list[OccupationMatch]:
        """The ROME occupations closest to free French text, best first."""
        return await self._run(plans.match_occupation(text, k))

    async def match_profile(
        self,
        collection: str,
        text: str = "",
        skills: Sequence[str] = (),
        k: int = 10,
        filters: Mapping[str, str | Sequence[str]] | None = None,
        skill_weight: float = 0.0,
    ) -> list[ProfileMatch]:
        """Items of `collection` for a profile; skill_weight 0 means the server's default (0.3)."""
        return await self._run(plans.match_profile(collection, text, skills, k, filters, skill_weight))

    # -- collections -------------------------------------------------------------------------------------------------

    async def search(
        self,
        collection: str,
        text: str = "",
        vector: plans.Vector | None = None,
        k: int = 10,
        filters: Mapping[str, str | Sequence[str]] | None = None,
        skills_all: Sequence[str] = (),
        skills_any: Sequence[str] = (),
        hybrid: bool = False,
        fusion: Fusion = Fusion.RRF,
        dense_weight: float = 0.0,
        vector_model: str = "",
        include_vectors: bool = False,
    ) -> list[SearchHit]:
        """By `text` (embedded as a query) or your own unit-length `vector`; filters: {"field": "v" or ["v1", "v2"]}."""
        return await self._run(
            plans.search(
                collection,
                text,
                vector,
                vector_model,
                k,
                filters,
                skills_all,
                skills_any,
                hybrid,
                fusion,
                dense_weight,
                include_vectors,
            )
        )

    async def upsert(self, collection: str, documents: Sequence[Document]) -> UpsertResult:
        """Insert or replace by id; answered once durable. Retried on UNAVAILABLE: a replay writes the same documents."""
        return await self._run(plans.upsert(collection, documents))

    async def delete(self, collection: str, ids: Sequence[str]) -> int:
        """The number of documents deleted. Retried: after a lost answer, the count covers only the last try."""
        return await self._run(plans.delete(collection, ids))

    async def get(self, collection: str, ids: Sequence[str], include_vectors: bool = False) -> GetResult:
        return await self._run(plans.get(collection, ids, include_vectors))

    async def create_collection(self, name: str, model: str = "", index: IndexSpec | None = None) -> CollectionInfo:
        """Never retried: a replay of a create that succeeded unheard would answer ALREADY_EXISTS."""
        return await self._run(plans.create_collection(name, model, index or IndexSpec()))

    async def drop_collection(self, name: str) -> bool:
        """Never retried: a replay would answer False for a collection the first try dropped."""
        return await self._run(plans.drop_collection(name))

    async def list_collections(self) -> list[CollectionInfo]:
        return await self._run(plans.list_collections())

    async def list_models(self) -> list[ModelInfo]:
        return await self._run(plans.list_models())

    # -- skills ------------------------------------------------------------------------------------------------------

    async def extract_skills(self, text: str, k: int = 10, min_score: float = 0.0) -> list[ExtractedSkill]:
        """ESCO skills a text asks for or shows; min_score 0 means the server's calibrated default."""
        return await self._run(plans.extract_skills(text, k, min_score))

    async def get_occupation(self, code: str) -> Occupation:
        return await self._run(plans.get_occupation(code))

    async def suggest_transitions(
        self, code: str = "", text: str = "", skills: Sequence[str] = (), k: int = 10
    ) -> list[Transition]:
        """Where a person can go next: from a ROME `code`, or from their own `text` and/or `skills`."""
        return await self._run(plans.suggest_transitions(code, text, skills, k))

    async def describe_needs(self, text: str, k: int = 3) -> Needs:
        """What an employer's job ad asks for: its occupations and skills."""
        return await self._run(plans.describe_needs(text, k))
