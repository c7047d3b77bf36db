"""The occupation prior: a skill typical of the occupations a text is about is more likely to be meant.

A job ad, a CV or a seeker's account is about one trade. A clause alone is often ambiguous
("je nourris les bêtes", "je change les pièces"), and among the skills near it in meaning the one in
the profile of the text's occupation is usually the one an annotator accepts: extraction adds a share
of the skill's weight in the profiles of the text's nearest occupations, as a reader who knows the
trade would. The occupations are found by the whole text's raw vector against each occupation's
`tasks` vector in the `rome` collection, the vector that transitions use for proximity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .profiles import ProfileSkill


@dataclass(frozen=True)
class OccupationPrior:
    vectors: np.ndarray  # [occupations, dim]: unit vectors, as stored in the rome collection
    members: list[np.ndarray]  # per occupation: the indices of its profile's skills
    skills: int  # how many skills there are

    @classmethod
    def build(
        cls, codes: Sequence[str], profiles: dict[str, list[ProfileSkill]], vectors: np.ndarray, skills: int
    ) -> OccupationPrior:
        members = [np.fromiter((p.skill for p in profiles.get(code, [])), np.int64) for code in codes]
        return cls(np.asarray(vectors, np.float32), members, skills)

    def shares(self, text: np.ndarray, nearest: int) -> np.ndarray:
        """[skills]: the share of the `nearest` occupations closest to `text` (a unit vector) whose profile
        holds each skill; zeros when there is nothing to go by."""
        out = np.zeros(self.skills, np.float32)
        count = min(nearest, len(self.vectors))
        if count <= 0:
            return out
        closest = np.argpartition(-(self.vectors @ text), count - 1)[:count]
        for row in closest:
            out[self.members[row]] += 1.0 / count
        return out
