"""Each client method as data: the RPC, its request, how to read the reply, and whether a retry is safe.

Written once here, run by both the blocking `Client` and the `AsyncClient`, so the two cannot drift.

Retried (idempotent): every read, Embed, the skills RPCs, Upsert (by id: a replay leaves the same
documents) and Delete (a replay deletes nothing more; its `deleted` count then covers only the
last try). Never retried: CreateCollection and DropCollection, whose replay after a success that
the client did not hear of would answer ALREADY_EXISTS / dropped=False.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
from google.protobuf.message import Message

from openemploi.v1 import embedding_pb2, index_pb2, match_pb2, models_pb2, skills_pb2

from . import convert
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

Reply = TypeVar("Reply", bound=Message)
Result = TypeVar("Result")
Vector = Sequence[float] | np.ndarray


@dataclass(frozen=True)
class Plan(Generic[Reply, Result]):
    method: str  # the full gRPC method path
    request: Message
    reply_type: type[Reply]
    parse: Callable[[Reply], Result]
    idempotent: bool = True


def _method(service: str, name: str) -> str:
    return f"/openemploi.v1.{service}/{name}"


def _vector(vector: Vector | None) -> list[float]:
    return [] if vector is None else np.asarray(vector, dtype=np.float32).ravel().tolist()


# -- embeddings ------------------------------------------------------------------------------------------------------


def text_list(texts: str | Sequence[str]) -> list[str]:
    """A single string is one text (a 1 x dim answer), never a sequence of characters."""
    return [texts] if isinstance(texts, str) else list(texts)


def chunks(texts: list[str], size: int) -> list[list[str]]:
    """At most `size` texts per request (the server's limits.max_texts_per_request); one empty chunk for no texts,
    so the server, not the client, answers that mistake."""
    return [texts[i : i + size] for i in range(0, len(texts), size)] or [[]]


def embed(
    texts: list[str], kind: TextKind, model: str, model_version: str, truncate: bool, normalize: bool
) -> Plan[embedding_pb2.EmbedResponse, Embeddings]:
    request = embedding_pb2.EmbedRequest(
        texts=texts,
        model=model,
        model_version=model_version,
        kind=kind.value,
        truncate=truncate,
        normalize=normalize,
        encoding=embedding_pb2.RAW_FLOAT32,
    )

    def parse(reply: embedding_pb2.EmbedResponse) -> Embeddings:
        vectors = convert.embed_vectors(reply, len(texts))
        return Embeddings(vectors, reply.model, reply.model_version, tuple(reply.token_counts), tuple(reply.truncated))

    return Plan(_method("EmbeddingService", "Embed"), request, embedding_pb2.EmbedResponse, parse)


def join(parts: Sequence[Embeddings]) -> Embeddings:
    """One result from the chunks of one embed call (all made by the same model version: later chunks are pinned)."""
    if len(parts) == 1:
        return parts[0]
    return Embeddings(
        np.concatenate([p.vectors for p in parts]),
        parts[0].model,
        parts[0].model_version,
        tuple(c for p in parts for c in p.token_counts),
        tuple(t for p in parts for t in p.truncated),
    )


# -- matching --------------------------------------------------------------------------------------------------------


def match_occupation(text: str, k: int) -> Plan[match_pb2.MatchOccupationResponse, list[OccupationMatch]]:
    return Plan(
        _method("MatchService", "MatchOccupation"),
        match_pb2.MatchOccupationRequest(text=text, k=k),
        match_pb2.MatchOccupationResponse,
        lambda reply: [convert.occupation_match(m) for m in reply.matches],
    )


def match_profile(
    collection: str,
    text: str,
    skills: Sequence[str],
    k: int,
    filters: Mapping[str, str | Sequence[str]] | None,
    skill_weight: float,
) -> Plan[match_pb2.MatchProfileResponse, list[ProfileMatch]]:
    request = match_pb2.MatchProfileRequest(
        collection=collection,
        text=text,
        skills=list(skills),
        k=k,
        filters=convert.filters_proto(filters),
        skill_weight=skill_weight,
    )
    return Plan(
        _method("MatchService", "MatchProfile"),
        request,
        match_pb2.MatchProfileResponse,
        lambda reply: [convert.profile_match(m) for m in reply.matches],
    )


# -- collections -----------------------------------------------------------------------------------------------------


def search(
    collection: str,
    text: str,
    vector: Vector | None,
    vector_model: str,
    k: int,
    filters: Mapping[str, str | Sequence[str]] | None,
    skills_all: Sequence[str],
    skills_any: Sequence[str],
    hybrid: bool,
    fusion: Fusion,
    dense_weight: float,
    include_vectors: bool,
) -> Plan[index_pb2.SearchResponse, list[SearchHit]]:
    request = index_pb2.SearchRequest(
        collection=collection,
        text=text,
        vector=_vector(vector),
        vector_model=vector_model,
        k=k,
        filters=convert.filters_proto(filters),
        skills_all=list(skills_all),
        skills_any=list(skills_any),
        hybrid=hybrid,
        fusion=fusion.value,
        dense_weight=dense_weight,
        include_vectors=include_vectors,
    )
    return Plan(
        _method("IndexService", "Search"),
        request,
        index_pb2.SearchResponse,
        lambda reply: [convert.search_hit(h) for h in reply.hits],
    )


def upsert(collection: str, documents: Sequence[Document]) -> Plan[index_pb2.UpsertResponse, UpsertResult]:
    request = index_pb2.UpsertRequest(collection=collection, documents=[convert.document_proto(d) for d in documents])
    return Plan(
        _method("IndexService", "Upsert"),
        request,
        index_pb2.UpsertResponse,
        lambda reply: UpsertResult(reply.upserted, reply.last_sequence),
    )


def delete(collection: str, ids: Sequence[str]) -> Plan[index_pb2.DeleteResponse, int]:
    return Plan(
        _method("IndexService", "Delete"),
        index_pb2.DeleteRequest(collection=collection, ids=list(ids)),
        index_pb2.DeleteResponse,
        lambda reply: int(reply.deleted),
    )


def get(collection: str, ids: Sequence[str], include_vectors: bool) -> Plan[index_pb2.GetResponse, GetResult]:
    return Plan(
        _method("IndexService", "Get"),
        index_pb2.GetRequest(collection=collection, ids=list(ids), include_vectors=include_vectors),
        index_pb2.GetResponse,
        lambda reply: GetResult(tuple(convert.document(d) for d in reply.documents), tuple(reply.missing)),
    )


def create_collection(name: str, model: str, index: IndexSpec) -> Plan[index_pb2.CreateCollectionResponse, CollectionInfo]:
    spec = index_pb2.IndexSpec(
        kind=index.kind.value,
        flat_max=index.flat_max,
        hnsw_m=index.hnsw_m,
        hnsw_ef_search=index.hnsw_ef_search,
        ivf_nlist=index.ivf_nlist,
        ivf_nprobe=index.ivf_nprobe,
    )
    return Plan(
        _method("IndexService", "CreateCollection"),
        index_pb2.CreateCollectionRequest(name=name, model=model, index=spec),
        index_pb2.CreateCollectionResponse,
        lambda reply: convert.collection_info(reply.collection),
        idempotent=False,
    )


def drop_collection(name: str) -> Plan[index_pb2.DropCollectionResponse, bool]:
    return Plan(
        _method("IndexService", "DropCollection"),
        index_pb2.DropCollectionRequest(name=name),
        index_pb2.DropCollectionResponse,
        lambda reply: bool(reply.dropped),
        idempotent=False,
    )


def list_collections() -> Plan[index_pb2.ListCollectionsResponse, list[CollectionInfo]]:
    return Plan(
        _method("IndexService", "ListCollections"),
        index_pb2.ListCollectionsRequest(),
        index_pb2.ListCollectionsResponse,
        lambda reply: [convert.collection_info(c) for c in reply.collections],
    )


def list_models() -> Plan[models_pb2.ListModelsResponse, list[ModelInfo]]:
    return Plan(
        _method("ModelService", "ListModels"),
        models_pb2.ListModelsRequest(),
        models_pb2.ListModelsResponse,
        lambda reply: [convert.model_info(m) for m in reply.models],
    )


# -- skills ----------------------------------------------------------------------------------------------------------


def extract_skills(text: str, k: int, min_score: float) -> Plan[skills_pb2.ExtractSkillsResponse, list[ExtractedSkill]]:
    return Plan(
        _method("SkillsService", "ExtractSkills"),
        skills_pb2.ExtractSkillsRequest(text=text, k=k, min_score=min_score),
        skills_pb2.ExtractSkillsResponse,
        lambda reply: [convert.extracted_skill(s) for s in reply.skills],
    )


def get_occupation(code: str) -> Plan[skills_pb2.GetOccupationResponse, Occupation]:
    return Plan(
        _method("SkillsService", "GetOccupation"),
        skills_pb2.GetOccupationRequest(code=code),
        skills_pb2.GetOccupationResponse,
        convert.occupation,
    )


def suggest_transitions(
    code: str, text: str, skills: Sequence[str], k: int
) -> Plan[skills_pb2.SuggestTransitionsResponse, list[Transition]]:
    return Plan(
        _method("SkillsService", "SuggestTransitions"),
        skills_pb2.SuggestTransitionsRequest(code=code, text=text, skills=list(skills), k=k),
        skills_pb2.SuggestTransitionsResponse,
        lambda reply: [convert.transition(t) for t in reply.transitions],
    )


def describe_needs(text: str, k: int) -> Plan[skills_pb2.DescribeNeedsResponse, Needs]:
    return Plan(
        _method("SkillsService", "DescribeNeeds"),
        skills_pb2.DescribeNeedsRequest(text=text, k=k),
        skills_pb2.DescribeNeedsResponse,
        convert.needs,
    )
