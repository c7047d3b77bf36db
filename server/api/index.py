"""IndexService: collections of documents searchable by text or vector."""
from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np

from openemploi.v1 import index_pb2, index_pb2_grpc

from ..config import LimitsConfig
from ..index.collection import Collection, CollectionManager, CollectionSpec, SearchQuery
from ..index.reembed import reembed_collection
from ..index.store import NewDocument, StoredDocument
from ..index.vectors import IndexParams
from ..modelrepo.registry import LoadedModel, ModelRegistry
from ..modelrepo.repository import ModelNotFound
from ..tokenize import TextKind
from .embedding import deadline_of
from .errors import RequestError, failed_precondition, handle_unary, invalid, register_unary_service

log = logging.getLogger(__name__)

KINDS = {index_pb2.INDEX_KIND_AUTO: "auto", index_pb2.FLAT: "flat", index_pb2.HNSW: "hnsw", index_pb2.IVF: "ivf"}
MAX_IDS = 4096


def collection_info(collection: Collection) -> index_pb2.CollectionInfo:
    spec = collection.spec
    return index_pb2.CollectionInfo(
        name=spec.name, model=spec.model, model_version=spec.model_version, dim=spec.dim, size=collection.size(),
        index_kind=collection.index.kind, device=collection.index.device,
        last_sequence=collection.store.last_seq(), created_at=spec.created_at,
    )


def document_message(doc: StoredDocument, include_vector: bool) -> index_pb2.Document:
    message = index_pb2.Document(id=doc.id, text=doc.text, metadata=doc.metadata, skills=doc.skills)
    if include_vector and doc.vector is not None:
        message.vector.extend(doc.vector.tolist())
    return message


def collection_model(registry: ModelRegistry, collection: Collection) -> LoadedModel:
    """The exact model version that embedded the collection; anything else would mix vector spaces."""
    spec = collection.spec
    try:
        return registry.get(spec.model, spec.model_version)
    except ModelNotFound as exc:
        raise failed_precondition(
            f"collection {spec.name!r} holds vectors of {spec.model}/{spec.model_version}, which is not loaded; "
            "load that version or re-embed the collection"
        ) from exc


def check_vector_model(collection: Collection, vector_model: str) -> None:
    if not vector_model:
        return
    name, _, version = vector_model.partition("/")
    spec = collection.spec
    if name != spec.model or (version and version != spec.model_version):
        raise failed_precondition(
            f"vector from {vector_model!r} but collection {spec.name!r} holds {spec.model}/{spec.model_version} vectors"
        )


def as_vector(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


class IndexServicer(index_pb2_grpc.IndexServiceServicer):
    def __init__(self, manager: CollectionManager, registry: ModelRegistry, limits: LimitsConfig = LimitsConfig()) -> None:
        self._manager = manager
        self._registry = registry
        self._limits = limits
        self._reembedding: dict[str, asyncio.Future] = {}

    async def _rpc(self, request, context, work, name: str):
        return await handle_unary(request, context, work, log, name)

    async def CreateCollection(self, request, context):  # noqa: N802
        async def work():
            model = self._registry.get(request.model)
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
            collection = await asyncio.to_thread(self._manager.create, spec)
            return index_pb2.CreateCollectionResponse(collection=collection_info(collection))

        return await self._rpc(request, context, work, "CreateCollection")

    async def ListCollections(self, request, context):  # noqa: N802
        async def work():
            names = self._manager.names()
            infos = await asyncio.to_thread(lambda: [collection_info(self._manager.get(n)) for n in names])
            return index_pb2.ListCollectionsResponse(collections=infos)

        return await self._rpc(request, context, work, "ListCollections")

    async def DropCollection(self, request, context):  # noqa: N802
        async def work():
            await asyncio.to_thread(self._manager.drop, request.name)
            return index_pb2.DropCollectionResponse(dropped=True)

        return await self._rpc(request, context, work, "DropCollection")

    async def Upsert(self, request, context):  # noqa: N802
        async def work():
            collection = self._manager.get(request.collection)
            documents = list(request.documents)
            if not documents:
                raise invalid("documents is empty")
            limit = self._limits.max_upsert_documents
            if len(documents) > limit:
                raise invalid(
                    f"{len(documents)} documents in one upsert, over the limit of {limit} (limits.max_upsert_documents); split it"
                )
            seen = set()
            for i, doc in enumerate(documents):
                if not doc.id:
                    raise invalid(f"documents[{i}] has no id")
                if doc.id in seen:
                    raise invalid(f"documents[{i}]: id {doc.id!r} appears twice in this upsert")
                seen.add(doc.id)
                if not doc.vector and not doc.text.strip():
                    raise invalid(f"documents[{i}] ({doc.id!r}) needs a text or a vector")
                check_text_chars(f"documents[{i}].text", doc.text, self._limits)
            vectors: list[np.ndarray | None] = [as_vector(d.vector) if d.vector else None for d in documents]
            to_embed = [i for i, v in enumerate(vectors) if v is None]
            if to_embed:
                model = collection_model(self._registry, collection)
                result = await model.embed(
                    [documents[i].text for i in to_embed], TextKind.PASSAGE, truncate=True, deadline=deadline_of(context)
                )
                for row, i in enumerate(to_embed):
                    vectors[i] = result.normalized[row]
            new = [
                NewDocument(d.id, d.text, vectors[i], dict(d.metadata), tuple(d.skills))
                for i, d in enumerate(documents)
            ]
            last = await asyncio.to_thread(collection.upsert, new)
            return index_pb2.UpsertResponse(upserted=len(new), last_sequence=last)

        return await self._rpc(request, context, work, "Upsert")

    async def Delete(self, request, context):  # noqa: N802
        async def work():
            collection = self._manager.get(request.collection)
            if not request.ids:
                raise invalid("ids is empty")
            if len(request.ids) > MAX_IDS:
                raise invalid(f"{len(request.ids)} ids, over the limit of {MAX_IDS}")
            deleted = await asyncio.to_thread(collection.delete, list(request.ids))
            return index_pb2.DeleteResponse(deleted=deleted)

        return await self._rpc(request, context, work, "Delete")

    async def Get(self, request, context):  # noqa: N802
        async def work():
            collection = self._manager.get(request.collection)
            if len(request.ids) > MAX_IDS:
                raise invalid(f"{len(request.ids)} ids, over the limit of {MAX_IDS}")
            found = await asyncio.to_thread(collection.get, list(request.ids), request.include_vectors)
            return index_pb2.GetResponse(
                documents=[document_message(found[i], request.include_vectors) for i in request.ids if i in found],
                missing=[i for i in request.ids if i not in found],
            )

        return await self._rpc(request, context, work, "Get")

    async def Search(self, request, context):  # noqa: N802
        async def work():
            collection = self._manager.get(request.collection)
            query = await search_query(self._registry, collection, request, deadline_of(context), self._limits)
            result = await asyncio.to_thread(collection.search, query)
            hits = [
                index_pb2.SearchHit(
                    id=h.document.id, score=h.score, dense_score=h.dense_score, lexical_score=h.lexical_score,
                    dense_rank=h.dense_rank, lexical_rank=h.lexical_rank, text=h.document.text,
                    metadata=h.document.metadata, skills=h.document.skills,
                    vector=h.document.vector.tolist() if request.include_vectors and h.document.vector is not None else [],
                )
                for h in result.hits
            ]
            return index_pb2.SearchResponse(
                hits=hits, explanation=result.explanation, model=collection.spec.model, model_version=collection.spec.model_version
            )

        return await self._rpc(request, context, work, "Search")


    async def Reembed(self, request, context):  # noqa: N802
        async def work():
            collection = self._manager.get(request.collection)
            model = self._registry.get(request.model)
            if (model.name, model.version.version) == (collection.spec.model, collection.spec.model_version):
                raise invalid(f"collection {request.collection!r} already holds {model.name}/{model.version.version} vectors")
            if request.collection in self._reembedding:
                raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"collection {request.collection!r} is already being re-embedded")

            async def embed(texts: list[str]):
                return (await model.embed(texts, TextKind.PASSAGE, truncate=True)).normalized

            job = asyncio.ensure_future(
                reembed_collection(
                    self._manager, request.collection, model.name, model.version.version, model.dim, embed, progress=False
                )
            )
            self._reembedding[request.collection] = job
            job.add_done_callback(lambda _: self._reembedding.pop(request.collection, None))
            switched = await asyncio.shield(job)  # a client that goes away does not stop the job
            return index_pb2.ReembedResponse(collection=collection_info(switched))

        return await self._rpc(request, context, work, "Reembed")


def parse_filters(filters) -> tuple[tuple[str, tuple[str, ...]], ...]:
    parsed = []
    for f in filters:
        if not f.field:
            raise invalid("a filter has no field")
        if not f.values:
            raise invalid(f"filter on {f.field!r} has no values")
        parsed.append((f.field, tuple(f.values)))
    return tuple(parsed)


def check_k(k: int, limit: int, requested: int | None = None) -> None:
    if not 1 <= k <= limit:
        raise invalid(f"k must be between 1 and {limit} (limits.max_k), got {k if requested is None else requested}")


def check_text_chars(field: str, text: str, limits: LimitsConfig) -> None:
    if len(text) > limits.max_text_chars:
        raise invalid(f"{field} has {len(text)} characters, over the limit of {limits.max_text_chars} (limits.max_text_chars)")


async def search_query(
    registry: ModelRegistry, collection: Collection, request, deadline, limits: LimitsConfig = LimitsConfig()
) -> SearchQuery:
    check_k(request.k, limits.max_k)
    check_text_chars("text", request.text, limits)
    if request.fusion not in (index_pb2.RRF, index_pb2.WEIGHTED):
        raise invalid(f"unknown fusion {request.fusion}")
    if not 0.0 <= request.dense_weight <= 1.0:
        raise invalid(f"dense_weight must be within [0, 1], got {request.dense_weight}")
    if request.vector and request.text:
        raise invalid("give either text or vector, not both")
    if request.hybrid and not request.text:
        raise invalid("hybrid search needs text (the lexical side matches words)")
    if request.vector:
        check_vector_model(collection, request.vector_model)
        vector = as_vector(request.vector)
    elif request.text.strip():
        model = collection_model(registry, collection)
        result = await model.embed([request.text], TextKind.QUERY, truncate=True, deadline=deadline)
        vector = result.normalized[0]
    else:
        raise invalid("give a query text or vector")
    return SearchQuery(
        vector=vector,
        k=request.k,
        text=request.text,
        filters=parse_filters(request.filters),
        skills_all=tuple(request.skills_all),
        skills_any=tuple(request.skills_any),
        hybrid=request.hybrid,
        fusion="weighted" if request.fusion == index_pb2.WEIGHTED else "rrf",
        dense_weight=request.dense_weight or 0.7,
        include_vectors=request.include_vectors,
    )


def add_to_server(servicer, server: grpc.aio.Server) -> None:
    register_unary_service(servicer, server, index_pb2, "IndexService")
