"""Matching on top of collections: free text to ROME occupations, profiles to items.

Both are plain functions of a collection and an already-embedded query; the
API layer embeds the text with the collection's model and calls them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..index.protocols import CollectionLike
from ..index.search import Hit, SearchQuery
from ..index.text import fold_skill, terms
from ..index.vectors import MAX_K
from .catalogue import Occupation, entries
from .fusion import KINDS, Candidates, FusionTable

OCCUPATION_POOL = 300  # entries retrieved per side before grouping by code
PROFILE_POOL_MIN = 100
_KIND_COLUMN = {kind.value: column for column, kind in enumerate(KINDS)}


@dataclass
class OccupationScore:
    occupation: Occupation
    score: float
    dense_score: float
    lexical_score: float
    matched_terms: list[str]
    matched_entry: str


@dataclass
class ProfileScore:
    hit: Hit
    score: float
    skill_score: float
    matched_skills: list[str] = field(default_factory=list)
    missing_skills: list[str] = field(default_factory=list)


@dataclass
class _Evidence:
    dense_by_kind: list[float]
    dense: float = -2.0
    entry_text: str = ""
    lexical: float = 0.0


class OccupationMatcher:
    """Group entry hits by ROME code and score each code with the collection model's `Fusion`
    (fusion.py: best cosine per entry kind plus a bonus, plus a share of the normalised bm25)."""

    def __init__(
        self, collection: Callable[[], CollectionLike], occupations: list[Occupation], fusion: FusionTable | None = None
    ) -> None:
        self._collection = collection  # looked up per call: a re-embed swaps the collection object
        self.occupations = {o.code: o for o in occupations}
        self._terms = {o.code: set().union(*(terms(e.lexical_text) for e in entries(o))) for o in occupations}
        self.fusion = fusion if fusion is not None else FusionTable.load()

    @property
    def collection(self) -> CollectionLike:
        return self._collection()

    def _evidence(
        self, collection: CollectionLike, text: str, vector: np.ndarray, without: frozenset[str] = frozenset()
    ) -> dict[str, _Evidence]:
        result = collection.search(
            SearchQuery(vector=vector, k=OCCUPATION_POOL, text=text, hybrid=True, candidates=OCCUPATION_POOL)
        )
        found: dict[str, _Evidence] = {}
        for hit in result.hits:
            code = hit.document.metadata.get("code", "")
            if code not in self.occupations or hit.document.id in without:
                continue
            evidence = found.setdefault(code, _Evidence([float("-inf")] * len(KINDS)))
            kind = _KIND_COLUMN.get(hit.document.metadata.get("entry", ""), 0)
            evidence.dense_by_kind[kind] = max(evidence.dense_by_kind[kind], hit.dense_score)
            if hit.dense_score > evidence.dense:
                evidence.dense, evidence.entry_text = hit.dense_score, hit.document.text
            evidence.lexical = max(evidence.lexical, hit.lexical_score)
        return found

    def candidates(self, text: str, vector: np.ndarray, without: frozenset[str] = frozenset()) -> Candidates:
        """The evidence `match` scores, as arrays: what `fusion.fit` learns from. `without`: entry ids
        to leave out, as if not indexed (the evaluation's test that no few entries carry a query)."""
        found = self._evidence(self.collection, text, vector, without)
        top_lexical = max((e.lexical for e in found.values()), default=0.0) or 1.0
        codes = tuple(sorted(found))
        dense = np.array([found[c].dense_by_kind for c in codes], dtype=np.float64).reshape(len(codes), len(KINDS))
        lexical = np.array([found[c].lexical / top_lexical for c in codes], dtype=np.float64)
        return Candidates(codes, dense, lexical)

    def match(self, text: str, vector: np.ndarray, k: int, mode: str = "hybrid") -> list[OccupationScore]:
        """mode: hybrid (default), dense (cosine only) or lexical (bm25 only), for evaluation."""
        if mode not in ("hybrid", "dense", "lexical"):
            raise ValueError(f"unknown match mode {mode!r}")
        collection = self.collection
        fusion = self.fusion.for_model(collection.spec.model)
        found = self._evidence(collection, text, vector)
        top_lexical = max((e.lexical for e in found.values()), default=0.0) or 1.0
        query_terms = terms(text)
        scored = []
        for code, evidence in found.items():
            lex = evidence.lexical
            if mode == "lexical":
                if lex <= 0:
                    continue
                score = lex / top_lexical
            elif mode == "dense":
                score = evidence.dense
            else:
                score = fusion.score(evidence.dense_by_kind, lex / top_lexical)
            matched = [t for t in query_terms if t in self._terms[code]]
            scored.append(OccupationScore(self.occupations[code], score, evidence.dense, lex, matched, evidence.entry_text))
        scored.sort(key=lambda s: (-s.score, s.occupation.code))
        return scored[:k]


def match_profile(
    collection: CollectionLike,
    vector: np.ndarray,
    skills: list[str],
    k: int,
    filters: tuple[tuple[str, tuple[str, ...]], ...] = (),
    skill_weight: float = 0.3,
) -> list[ProfileScore]:
    """Dense similarity to the profile text, blended with the share of each item's skills the profile has."""
    pool = max(5 * k, PROFILE_POOL_MIN)
    result = collection.search(SearchQuery(vector=vector, k=min(pool, MAX_K), filters=filters))
    have = {fold_skill(s) for s in skills if fold_skill(s)}
    scored = []
    for hit in result.hits:
        item_skills = list(dict.fromkeys(hit.document.skills))
        matched = [s for s in item_skills if fold_skill(s) in have]
        missing = [s for s in item_skills if fold_skill(s) not in have]
        share = len(matched) / len(item_skills) if item_skills else 0.0
        score = (1 - skill_weight) * hit.dense_score + skill_weight * share
        scored.append(ProfileScore(hit, score, share, matched, missing))
    scored.sort(key=lambda s: (-s.score, s.hit.document.id))
    return scored[:k]
