"""IndexService: collections of documents searchable by text or vector."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import numpy as np

from openemploi.v1 import index_pb2, index_pb2_grpc

from ..config import LimitsConfig
from ..index.collection import CollectionSpec
from ..index.protocols import CollectionLike, Collections
from ..index.reembed import reembed_collection
from ..index.search import SearchQuery
from ..index.store import NewDocument, StoredDocument
from ..index.vectors import IndexParams
from ..runtime.registry import LoadedModel, ModelRegistry
from ..runtime.repository import ModelNotFound
from ..tokenize import TextKind
from ..tracing import DISABLED, Tracing
from . import rpc
from .errors import RequestError, failed_precondition, invalid
from .validation import (
    cap_query_terms,
    check_ids,
    check_text_chars,
    check_unit_vector,
    check_upsert_documents,
    parse_filters,
    resolve_k,
    resolve_weight,
    search_k,
    text_chars,
)

KINDS = {index_pb2.INDEX_KIND_AUTO: "auto", index_pb2.FLAT: "flat", index_pb2.HNSW: "hnsw", index_pb2.IVF: "ivf"}


def collection_info(collection: CollectionLike) -> index_pb2.CollectionInfo:
    spec = collection.spec
    return index_pb2.CollectionInfo(
        name=spec.name,
        model=spec.model,
        model_version=spec.model_version,
        dim=spec.dim,
        size=collection.size(),
        index_kind=collection.index.kind,
        device=collection.index.device,
        last_sequence=collection.store.last_seq(),
        created_at=spec.created_at,
    )


def document_message(doc: StoredDocument, include_vector: bool, spec: CollectionSpec) -> index_pb2.Document:
    message = index_pb2.Document(id=doc.id, text=doc.text, metadata=doc.metadata, skills=doc.skills)
    if include_vector and doc.vector is not None:
        message.vector.extend(doc.vector.tolist())
        message.vector_model = f"{spec.model}/{spec.model_version}"  # so the vector can be upserted elsewhere, checked
    return message


def collection_model(registry: ModelRegistry, collection: CollectionLike) -> LoadedModel:
    """The exact model version that embedded the collection; anything else would mix vector spaces."""
    spec = collection.spec
    try:
        return registry.get(spec.model, spec.model_version)
    except ModelNotFound as exc:
        raise failed_precondition(
            f"collection {spec.name!r} holds vectors of {spec.model}/{spec.model_version}, which is not loaded; "
            "load that version or re-embed the collection"
        ) from exc


def check_vector_model(collection: CollectionLike, vector_model: str, what: str = "vector") -> None:
    """Same-dimension vectors of two models (e5-small, MiniLM: 384) would mix silently; empty trusts the caller."""
    if not vector_model:
        return
    name, _, version = vector_model.partition("/")
    spec = collection.spec
    if name != spec.model or (version and version != spec.model_version):
        raise failed_precondition(
            f"{what} from {vector_model!r} but collection {spec.name!r} holds {spec.model}/{spec.model_version} vectors"
        )


def as_vector(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


class IndexServicer(index_pb2_grpc.IndexServiceServicer):
    def __init__(
        self,
        manager: Collections,
        registry: ModelRegistry,
        limits: LimitsConfig,
        pool: rpc.WorkPool,
        tracing: Tracing = DISABLED,
    ) -> None:
        self._manager = manager
        self._registry = registry
        self._limits = limits
        self._pool = pool
        self._tracing = tracing
        self._reembedding: dict[str, asyncio.Future] = {}  # collection -> its running re-embed

    @rpc.unary
    async def CreateCollection(
        self, request: index_pb2.CreateCollectionRequest, call: rpc.Call
    ) -> index_pb2.CreateCollectionResponse:
        with self._registry.hold(request.model) as model:  # a swap meanwhile keeps the version the collection binds
            return await self._create_collection(request, model, call)

    async def _create_collection(
        self, request: index_pb2.CreateCollectionRequest, model: LoadedModel, call: rpc.Call
    ) -> index_pb2.CreateCollectionResponse:
        spec_in = request.index
        if spec_in.kind not in KINDS:
            raise invalid(f"unknown index kind {spec_in.kind}")
        defaults = IndexParams()
        try:
            params = IndexParams(
                kind=KINDS[spec_in.kind],
                flat_max=spec_in.flat_max or defaults.flat_max,
                hnsw_m=spec_in.hnsw_m or defaults.hnsw_m,
                hnsw_ef_search=spec_in.hnsw_ef_search or defaults.hnsw_ef_search,
                ivf_nlist=spec_in.ivf_nlist,
                ivf_nprobe=spec_in.ivf_nprobe or defaults.ivf_nprobe,
            )
        except ValueError as exc:
            raise invalid(str(exc)) from exc
        spec = CollectionSpec(request.name, model.name, model.version.version, model.dim, params)
        collection = await self._pool.run(call, self._manager.create, spec)
        return index_pb2.CreateCollectionResponse(collection=collection_info(collection))

    @rpc.unary
    async def ListCollections(
        self, request: index_pb2.ListCollectionsRequest, call: rpc.Call
    ) -> index_pb2.ListCollectionsResponse:
        names = self._manager.names()
        infos = await self._pool.run(call, lambda: [collection_info(self._manager.get(n)) for n in names])
        return index_pb2.ListCollectionsResponse(collections=infos)

    @rpc.unary
    async def DropCollection(self, request: index_pb2.DropCollectionRequest, call: rpc.Call) -> index_pb2.DropCollectionResponse:
        await self._pool.run(call, self._manager.drop, request.name)
        return index_pb2.DropCollectionResponse(dropped=True)

    @rpc.unary
    async def Upsert(self, request: index_pb2.UpsertRequest, call: rpc.Call) -> index_pb2.UpsertResponse:
        collection = self._manager.get(request.collection)
        documents = list(request.documents)
        check_upsert_documents(documents, self._limits)
        for i, d in enumerate(documents):
            if d.vector:
                check_vector_model(collection, d.vector_model, f"documents[{i}].vector")
        to_embed = [i for i, d in enumerate(documents) if not d.vector]
        embedded: dict[int, np.ndarray] = {}
        if to_embed:
            model = collection_model(self._registry, collection)
            result = await model.embed(
                [documents[i].text for i in to_embed], TextKind.PASSAGE, truncate=True, deadline=call.deadline
            )
            embedded = dict(zip(to_embed, result.normalized, strict=True))
        new = [
            NewDocument(d.id, d.text, embedded[i] if i in embedded else as_vector(d.vector), dict(d.metadata), tuple(d.skills))
            for i, d in enumerate(documents)
        ]
        last = await self._pool.run(call, collection.upsert, new)
        return index_pb2.UpsertResponse(upserted=len(new), last_sequence=last)

    @rpc.unary
    async def Delete(self, request: index_pb2.DeleteRequest, call: rpc.Call) -> index_pb2.DeleteResponse:
        collection = self._manager.get(request.collection)
        check_ids(request.ids, self._limits, required=True)
        deleted = await self._pool.run(call, collection.delete, list(request.ids))
        return index_pb2.DeleteResponse(deleted=deleted)

    @rpc.unary
    async def Get(self, request: index_pb2.GetRequest, call: rpc.Call) -> index_pb2.GetResponse:
        collection = self._manager.get(request.collection)
        check_ids(request.ids, self._limits, required=False)
        found = await self._pool.run(call, collection.get, list(request.ids), request.include_vectors)
        return index_pb2.GetResponse(
            documents=[document_message(found[i], request.include_vectors, collection.spec) for i in request.ids if i in found],
            missing=[i for i in request.ids if i not in found],
        )

    @rpc.unary
    async def Search(self, request: index_pb2.SearchRequest, call: rpc.Call) -> index_pb2.SearchResponse:
        collection = self._manager.get(request.collection)
        query = await search_query(self._registry, collection, request, call.deadline, self._limits)
        with self._tracing.span("index.search", collection=collection.spec.name, k=query.k, hybrid=query.hybrid):
            result = await self._pool.run(call, collection.search, query)
        hits = [
            index_pb2.SearchHit(
                id=h.document.id,
                score=h.score,
                dense_score=h.dense_score,
                lexical_score=h.lexical_score,
                dense_rank=h.dense_rank,
                lexical_rank=h.lexical_rank,
                text=h.document.text,
                metadata=h.document.metadata,
                skills=h.document.skills,
                vector=h.document.vector.tolist() if request.include_vectors and h.document.vector is not None else [],
            )
            for h in result.hits
        ]
        return index_pb2.SearchResponse(
            hits=hits, explanation=result.explanation, model=collection.spec.model, model_version=collection.spec.model_version
        )

    @rpc.unary
    async def Reembed(self, request: index_pb2.ReembedRequest, call: rpc.Call) -> index_pb2.ReembedResponse:
        collection = self._manager.get(request.collection)
        hold = self._registry.hold(request.model)  # the target version stays loaded until the job ends
        model = hold.model
        if (model.name, model.version.version) == (collection.spec.model, collection.spec.model_version):
            hold.release()
            raise invalid(f"collection {request.collection!r} already holds {model.name}/{model.version.version} vectors")
        if request.collection in self._reembedding:
            hold.release()
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"collection {request.collection!r} is already being re-embedded")

        async def embed(texts: list[str]) -> np.ndarray:
            return (await model.embed(texts, TextKind.PASSAGE, truncate=True)).normalized

        job = asyncio.ensure_future(
            reembed_collection(
                self._manager, request.collection, model.name, model.version.version, model.dim, embed, progress=False
            )
        )
        self._reembedding[request.collection] = job
        job.add_done_callback(lambda _: self._reembedding.pop(request.collection, None))
        job.add_done_callback(lambda _: hold.release())
        switched = await asyncio.shield(job)  # a client that goes away does not stop the job
        return index_pb2.ReembedResponse(collection=collection_info(switched))


async def search_query(
    registry: ModelRegistry,
    collection: CollectionLike,
    request: index_pb2.SearchRequest,
    deadline: float | None,
    limits: LimitsConfig,
) -> SearchQuery:
    k = resolve_k(request.k, search_k(limits))
    check_text_chars("text", request.text, text_chars(limits))
    if request.fusion not in (index_pb2.RRF, index_pb2.WEIGHTED):
        raise invalid(f"unknown fusion {request.fusion}")
    dense_weight = resolve_weight("dense_weight", request.dense_weight, 0.7)
    if request.vector and request.text:
        raise invalid("give either text or vector, not both")
    if request.hybrid and not request.text:
        raise invalid("hybrid search needs text (the lexical side matches words)")
    filters = parse_filters(request.filters, limits, request.skills_all, request.skills_any)
    if request.vector:
        check_vector_model(collection, request.vector_model)
        check_unit_vector("vector", request.vector)
        vector = as_vector(request.vector)
    elif request.text.strip():
        model = collection_model(registry, collection)
        result = await model.embed([request.text], TextKind.QUERY, truncate=True, deadline=deadline)
        vector = result.normalized[0]
    else:
        raise invalid("give a query text or vector")
    return SearchQuery(
        vector=vector,
        k=k,
        text=cap_query_terms(request.text, limits),
        filters=filters,
        skills_all=tuple(request.skills_all),
        skills_any=tuple(request.skills_any),
        hybrid=request.hybrid,
        fusion="weighted" if request.fusion == index_pb2.WEIGHTED else "rrf",
        dense_weight=dense_weight,
        include_vectors=request.include_vectors,
    )


def add_to_server(servicer: IndexServicer, server: grpc.aio.Server) -> None:
    rpc.register_service(servicer, server, index_pb2, "IndexService")
