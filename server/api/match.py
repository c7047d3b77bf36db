"""MatchService: free French text to ROME occupations; profiles to collection items."""

from __future__ import annotations

import grpc
import numpy as np

from openemploi.v1 import match_pb2, match_pb2_grpc

from ..config import LimitsConfig
from ..index.protocols import CollectionLike, CollectionManagerLike
from ..matching.matcher import OccupationMatcher, OccupationScore, match_profile
from ..runtime.registry import ModelRegistry
from ..tokenize import TextKind
from . import rpc
from .errors import failed_precondition, invalid
from .index import collection_model
from .validation import (
    cap_query_terms,
    check_text_chars,
    occupation_k,
    occupation_text_chars,
    parse_filters,
    resolve_k,
    resolve_weight,
    search_k,
    text_chars,
)


class MatchServicer(match_pb2_grpc.MatchServiceServicer):
    def __init__(
        self,
        manager: CollectionManagerLike,
        registry: ModelRegistry,
        occupations: OccupationMatcher | None,
        limits: LimitsConfig,
        pool: rpc.WorkPool,
    ) -> None:
        self._manager = manager
        self._registry = registry
        self._limits = limits
        self._pool = pool
        self.occupations = occupations  # set once the ROME collection is indexed

    async def _embed_query(self, collection: CollectionLike, text: str, deadline: float | None) -> np.ndarray:
        model = collection_model(self._registry, collection)
        result = await model.embed([text], TextKind.QUERY, truncate=True, deadline=deadline)
        return result.normalized[0]

    @rpc.unary
    async def MatchOccupation(
        self, request: match_pb2.MatchOccupationRequest, call: rpc.Call
    ) -> match_pb2.MatchOccupationResponse:
        if self.occupations is None:
            raise failed_precondition(
                "this server runs without the ROME catalogue (rome_collection = false); start it with rome_collection = true"
            )
        k = resolve_k(request.k, occupation_k(self._limits), default=5)
        text = request.text.strip()
        if not text:
            raise invalid("text is empty: describe a job, a CV line or an offer")
        check_text_chars("text", text, occupation_text_chars(self._limits))
        collection = self.occupations.collection
        vector = await self._embed_query(collection, text, call.deadline)
        scores = await self._pool.run(call, self.occupations.match, cap_query_terms(text, self._limits), vector, k)
        return match_pb2.MatchOccupationResponse(
            matches=[occupation_match(s) for s in scores],
            model=collection.spec.model,
            model_version=collection.spec.model_version,
        )

    @rpc.unary
    async def MatchProfile(self, request: match_pb2.MatchProfileRequest, call: rpc.Call) -> match_pb2.MatchProfileResponse:
        collection = self._manager.get(request.collection)
        k = resolve_k(request.k, search_k(self._limits), default=10)
        check_text_chars("text", request.text, text_chars(self._limits))
        weight = resolve_weight("skill_weight", request.skill_weight, 0.3)
        if not request.text.strip() and not request.skills:
            raise invalid("a profile needs a text or skills")
        filters = parse_filters(request.filters, self._limits)
        text = request.text.strip() or ", ".join(request.skills)
        vector = await self._embed_query(collection, text, call.deadline)
        scores = await self._pool.run(call, match_profile, collection, vector, list(request.skills), k, filters, weight)
        return match_pb2.MatchProfileResponse(
            matches=[
                match_pb2.ProfileMatch(
                    id=s.hit.document.id,
                    score=s.score,
                    dense_score=s.hit.dense_score,
                    skill_score=s.skill_score,
                    matched_skills=s.matched_skills,
                    missing_skills=s.missing_skills,
                    text=s.hit.document.text,
                    metadata=s.hit.document.metadata,
                )
                for s in scores
            ]
        )


def occupation_match(scored: OccupationScore) -> match_pb2.OccupationMatch:
    """One ranked occupation as MatchOccupation (and DescribeNeeds) answer it."""
    return match_pb2.OccupationMatch(
        code=scored.occupation.code,
        label=scored.occupation.label,
        score=scored.score,
        dense_score=scored.dense_score,
        lexical_score=scored.lexical_score,
        matched_terms=scored.matched_terms,
        matched_entry=scored.matched_entry,
        sectors=scored.occupation.sectors,
    )


def add_to_server(servicer: MatchServicer, server: grpc.aio.Server) -> None:
    rpc.register_service(servicer, server, match_pb2, "MatchService")
