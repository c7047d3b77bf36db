"""What SkillsService answers with, once vectors are in hand: the skill space, profiles and transitions.

Built once at start (bootstrap.py); every method is pure numpy/Python over vectors the API embedded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..matching.catalogue import Occupation
from .esco import SKILL_URI_PREFIX
from .extract import Extracted, ExtractParams, SkillSpace, extract
from .prior import OccupationPrior
from .profiles import ProfileSkill, specificity
from .transitions import Ranked, Source, TransitionParams, covered_set, family, rank, viable_threshold


class UnknownOccupation(LookupError):
    """A ROME code the catalogue does not hold."""

    def __init__(self, code: str) -> None:
        super().__init__(f"unknown ROME code {code!r}: codes look like D1102 (see MatchOccupation)")
        self.resource_name = code


class UnknownSkill(ValueError):
    """An ESCO skill URI the shipped ESCO data does not hold."""

    def __init__(self, uri: str) -> None:
        super().__init__(f"skills: {uri!r} is not an ESCO v1 skill URI this server knows; send a French phrase instead")
        self.resource_name = uri


@dataclass(frozen=True)
class Needs:
    typical: list[Extracted]  # asked for, and in the occupation's profile (or a near-duplicate of one)
    specific: list[Extracted]


class SkillsEngine:
    def __init__(
        self,
        space: SkillSpace,
        occupations: list[Occupation],
        profiles: dict[str, list[ProfileSkill]],
        neighbours: dict[int, list[int]],
        occupation_vectors: np.ndarray,
        extract_params: ExtractParams | None = None,
        transition_params: TransitionParams | None = None,
    ) -> None:
        self.space = space
        self.occupations = {o.code: o for o in occupations}
        self.codes = [o.code for o in occupations]
        self.profiles = profiles
        self.neighbours = neighbours
        self.occupation_vectors = occupation_vectors  # row i: the text vector of occupation codes[i]
        self.extract_params = extract_params or ExtractParams()
        self.transition_params = transition_params or TransitionParams()
        self.specificity = specificity(profiles)
        self.prior = OccupationPrior.build(self.codes, profiles, occupation_vectors, len(space.skills))
        self.uri_index = space.index_of()
        self.viable = viable_threshold(
            self.codes, profiles, self.specificity, neighbours, occupation_vectors, self.transition_params
        )

    def occupation(self, code: str) -> Occupation:
        try:
            return self.occupations[code.strip().upper()]
        except KeyError:
            raise UnknownOccupation(code) from None

    def profile(self, code: str) -> list[ProfileSkill]:
        return self.profiles.get(self.occupation(code).code, [])

    def extract(self, clauses: list[str], clause_vectors: np.ndarray, k: int, min_score: float | None = None) -> list[Extracted]:
        """A text's clauses and their raw QUERY vectors, as the API embedded them."""
        return extract(self.space, clauses, clause_vectors, k, self.extract_params, min_score, self.prior)

    def skill_index(self, uri: str) -> int:
        if uri not in self.uri_index:
            raise UnknownSkill(uri)
        return self.uri_index[uri]

    @staticmethod
    def is_uri(value: str) -> bool:
        return value.startswith(SKILL_URI_PREFIX)

    def from_code(self, code: str, k: int) -> list[Ranked]:
        occupation = self.occupation(code)
        row = self.codes.index(occupation.code)
        covered = covered_set({p.skill for p in self.profiles.get(occupation.code, [])}, self.neighbours)
        source = Source(covered, self.occupation_vectors[row], family(occupation.code), occupation.code)
        return self._rank(source, k)

    def from_person(self, skills: set[int], vector: np.ndarray | None, k: int) -> list[Ranked]:
        """A person's family is their closest occupation's: the prior helps them as it helps a code."""
        nearest = ""
        if vector is not None:
            nearest = family(self.codes[int(np.argmax(self.occupation_vectors @ vector))])
        return self._rank(Source(covered_set(skills, self.neighbours), vector, nearest), k)

    def _rank(self, source: Source, k: int) -> list[Ranked]:
        return rank(source, self.codes, self.profiles, self.specificity, self.occupation_vectors, k, self.transition_params)

    def needs(self, extracted: list[Extracted], code: str) -> Needs:
        typical_set = covered_set({p.skill for p in self.profile(code)}, self.neighbours)
        typical = [e for e in extracted if e.skill in typical_set]
        return Needs(typical, [e for e in extracted if e.skill not in typical_set])
