"""Protos to the client's dataclasses, and the packed RAW_FLOAT32 vectors to a numpy array."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from openemploi.v1 import embedding_pb2, index_pb2, match_pb2, models_pb2, skills_pb2

from .types import (
    CollectionInfo,
    Document,
    ExtractedSkill,
    ModelInfo,
    ModelVersionInfo,
    Needs,
    Occupation,
    OccupationMatch,
    OccupationSkill,
    ProfileMatch,
    SearchHit,
    Transition,
)

PACKED_DTYPE = np.dtype("<f4")  # EmbedResponse.raw_float32: little-endian float32, row-major


class MalformedResponse(ValueError):
    """The server's answer does not add up (a packed buffer of the wrong size); a server bug, not the caller's."""


def decode_packed(data: bytes, count: int, dim: int) -> np.ndarray:
    """`count` x `dim` native float32 from the packed little-endian bytes, in a fresh writable array."""
    expected = count * dim * PACKED_DTYPE.itemsize
    if len(data) != expected:
        raise MalformedResponse(f"raw_float32 holds {len(data)} bytes, expected {count} x {dim} float32 = {expected}")
    return np.frombuffer(data, dtype=PACKED_DTYPE).astype(np.float32).reshape(count, dim)


def embed_vectors(response: embedding_pb2.EmbedResponse, count: int) -> np.ndarray:
    """The vectors of an EmbedResponse, whichever encoding the server chose to answer with."""
    if response.embeddings:
        return np.asarray([e.values for e in response.embeddings], dtype=np.float32).reshape(count, response.dim)
    return decode_packed(response.raw_float32, count, response.dim)


def occupation_match(m: match_pb2.OccupationMatch) -> OccupationMatch:
    return OccupationMatch(
        m.code, m.label, m.score, m.dense_score, m.lexical_score, tuple(m.matched_terms), m.matched_entry, tuple(m.sectors)
    )


def profile_match(m: match_pb2.ProfileMatch) -> ProfileMatch:
    return ProfileMatch(
        m.id,
        m.score,
        m.dense_score,
        m.skill_score,
        tuple(m.matched_skills),
        tuple(m.missing_skills),
        m.text,
        dict(m.metadata),
    )


def search_hit(h: index_pb2.SearchHit) -> SearchHit:
    return SearchHit(
        h.id,
        h.score,
        h.dense_score,
        h.lexical_score,
        h.dense_rank,
        h.lexical_rank,
        h.text,
        dict(h.metadata),
        tuple(h.skills),
        tuple(h.vector) if h.vector else None,
    )


def document(d: index_pb2.Document) -> Document:
    return Document(d.id, d.text, tuple(d.vector) if d.vector else None, dict(d.metadata), tuple(d.skills), d.vector_model)


def document_proto(d: Document) -> index_pb2.Document:
    vector = [] if d.vector is None else np.asarray(d.vector, dtype=np.float32).ravel().tolist()
    return index_pb2.Document(
        id=d.id, text=d.text, vector=vector, metadata=dict(d.metadata), skills=list(d.skills), vector_model=d.vector_model
    )


def filters_proto(filters: Mapping[str, str | Sequence[str]] | None) -> list[index_pb2.Filter]:
    """{"field": "value"} is field == value; {"field": ["a", "b"]} is field IN (a, b)."""
    return [
        index_pb2.Filter(field=name, values=[values] if isinstance(values, str) else list(values))
        for name, values in (filters or {}).items()
    ]


def collection_info(c: index_pb2.CollectionInfo) -> CollectionInfo:
    return CollectionInfo(c.name, c.model, c.model_version, c.dim, c.size, c.index_kind, c.device, c.last_sequence, c.created_at)


def model_info(m: models_pb2.ModelInfo) -> ModelInfo:
    versions = tuple(ModelVersionInfo(v.version, v.state, v.device, v.precision, v.built_at, v.detail) for v in m.versions)
    return ModelInfo(m.name, m.dim, m.max_tokens, m.current_version, m.is_default, versions)


def extracted_skill(s: skills_pb2.ExtractedSkill) -> ExtractedSkill:
    return ExtractedSkill(s.uri, s.label, s.score, s.evidence, s.label_fr)


def occupation(r: skills_pb2.GetOccupationResponse) -> Occupation:
    skills = tuple(OccupationSkill(s.uri, s.label, s.score, s.specificity, s.evidence, s.label_fr) for s in r.skills)
    return Occupation(r.code, r.label, tuple(r.sectors), tuple(r.titles), tuple(r.tasks), skills)


def transition(t: skills_pb2.Transition) -> Transition:
    return Transition(
        t.code,
        t.label,
        t.score,
        tuple(t.transferable_skills),
        tuple(t.missing_skills),
        t.skill_overlap,
        t.proximity,
        t.same_family,
        t.viable,
        tuple(t.transferable_skills_fr),
        tuple(t.missing_skills_fr),
    )


def needs(r: skills_pb2.DescribeNeedsResponse) -> Needs:
    return Needs(
        tuple(occupation_match(m) for m in r.occupations),
        tuple(extracted_skill(s) for s in r.typical_skills),
        tuple(extracted_skill(s) for s in r.specific_skills),
        r.model,
        r.model_version,
    )
