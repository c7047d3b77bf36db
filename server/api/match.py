"""MatchService: free French text to ROME occupations; profiles to collection items."""
from __future__ import annotations

import asyncio
import logging

import grpc

from openemploi.v1 import match_pb2, match_pb2_grpc

from ..config import LimitsConfig
from ..index.collection import CollectionManager
from ..matching.matcher import OccupationMatcher, match_profile
from ..modelrepo.registry import ModelRegistry
from ..tokenize import TextKind
from .embedding import deadline_of
from .errors import failed_precondition, handle_unary, invalid, register_unary_service
from .index import check_k, check_text_chars, collection_model, parse_filters

log = logging.getLogger(__name__)
MAX_TEXT_CHARS = 20_000  # MatchOccupation: a job description or CV line, not a document
MAX_OCCUPATIONS_K = 100  # MatchOccupation: more than 100 ROME codes is no longer a match


class MatchServicer(match_pb2_grpc.MatchServiceServicer):
    def __init__(
        self, manager: CollectionManager, registry: ModelRegistry, occupations: OccupationMatcher | None,
        limits: LimitsConfig = LimitsConfig(),
    ) -> None:
        self._manager = manager
        self._registry = registry
        self._limits = limits
        self.occupations = occupations  # set once the ROME collection is indexed

    async def _rpc(self, request, context, work, name: str):
        return await handle_unary(request, context, work, log, name)

    async def _embed_query(self, collection, text: str, context):
        model = collection_model(self._registry, collection)
        result = await model.embed([text], TextKind.QUERY, truncate=True, deadline=deadline_of(context))
        return result.normalized[0]

    async def MatchOccupation(self, request, context):  # noqa: N802
        async def work():
            if self.occupations is None:
                raise failed_precondition("this server runs without the ROME catalogue (rome_collection = false); start it with rome_collection = true")
            k = request.k or 5
            k_limit = min(MAX_OCCUPATIONS_K, self._limits.max_k)
            if not 1 <= k <= k_limit:
                raise invalid(f"k must be between 1 and {k_limit} (MatchOccupation: at most {MAX_OCCUPATIONS_K}; limits.max_k), got {request.k}")
            text = request.text.strip()
            if not text:
                raise invalid("text is empty: describe a job, a CV line or an offer")
            chars = min(MAX_TEXT_CHARS, self._limits.max_text_chars)
            if len(text) > chars:
                raise invalid(
                    f"text has {len(text)} characters, over the limit of {chars} "
                    f"(MatchOccupation: at most {MAX_TEXT_CHARS}; limits.max_text_chars)"
                )
            collection = self.occupations.collection
            vector = await self._embed_query(collection, text, context)
            scores = await asyncio.to_thread(self.occupations.match, text, vector, k)
            return match_pb2.MatchOccupationResponse(
                matches=[
                    match_pb2.OccupationMatch(
                        code=s.occupation.code, label=s.occupation.label, score=s.score, dense_score=s.dense_score,
                        lexical_score=s.lexical_score, matched_terms=s.matched_terms, matched_entry=s.matched_entry,
                        sectors=s.occupation.sectors,
                    )
                    for s in scores
                ],
                model=collection.spec.model,
                model_version=collection.spec.model_version,
            )

        return await self._rpc(request, context, work, "MatchOccupation")

    async def MatchProfile(self, request, context):  # noqa: N802
        async def work():
            collection = self._manager.get(request.collection)
            k = request.k or 10
            check_k(k, self._limits.max_k, request.k)
            check_text_chars("text", request.text, self._limits)
            weight = request.skill_weight or 0.3
            if not 0.0 <= weight <= 1.0:
                raise invalid(f"skill_weight must be within [0, 1], got {request.skill_weight}")
            if not request.text.strip() and not request.skills:
                raise invalid("a profile needs a text or skills")
            text = request.text.strip() or ", ".join(request.skills)
            vector = await self._embed_query(collection, text, context)
            filters = parse_filters(request.filters)
            scores = await asyncio.to_thread(match_profile, collection, vector, list(request.skills), k, filters, weight)
            return match_pb2.MatchProfileResponse(
                matches=[
                    match_pb2.ProfileMatch(
                        id=s.hit.document.id, score=s.score, dense_score=s.hit.dense_score, skill_score=s.skill_score,
                        matched_skills=s.matched_skills, missing_skills=s.missing_skills, text=s.hit.document.text,
                        metadata=s.hit.document.metadata,
                    )
                    for s in scores
                ]
            )

        return await self._rpc(request, context, work, "MatchProfile")


def add_to_server(servicer, server: grpc.aio.Server) -> None:
    register_unary_service(servicer, server, match_pb2, "MatchService")
