"""Occupation skills profiles: each ROME occupation's ESCO skills, read off its own French lines.

A profile is the union of the ESCO skills mapped to the occupation's task and skill lines (the
same line-to-skill map that gives extraction its French vocabulary). Specificity is IDF-like over
the profiles: a skill in every profile tells nothing about a transition, one in three tells much.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..matching.catalogue import Occupation


@dataclass(frozen=True)
class ProfileSkill:
    skill: int  # index into SkillSpace.skills
    score: float  # cosine of the best line to the skill
    evidence: str  # the catalogue line it came from


@dataclass(frozen=True)
class ProfileParams:
    """Thresholds of the line-to-skill map, set so that a line keeps its one to three clear skills.

    Scores are extraction's vector score (extract.py: skill_matrix; no lexical share). Read by hand on random catalogue lines when
    skills had no French side: a paraphrase scored 0.45-0.65, a related skill 0.35-0.45, under 0.34
    mostly unrelated, and 0.35 kept a skill for 82% of the 9,444 lines. Each change of the skill
    matrix since kept that share: 0.37 with the French side, 0.39 without ESCO's descriptions.
    """

    per_line: int = 3
    min_score: float = 0.39
    # Cosine of two skills' re-normalised skill_matrix rows from which they count as one skill said
    # twice: mostly true ("labour legislation" / "labour law", "animal welfare" / "manage animal
    # welfare"), some close relatives ("cure tobacco leaves" / "dry tobacco leaves"); below it
    # relatives and a few missed ("3D texturing" / "create 3D texture map"), as read when the rows
    # still held ESCO's descriptions (0.83, 0.81, 0.83 and 0.78 then). Set, when the
    # French side joined the rows, to keep the number of such pairs among the skills lines reach
    # (387 at 0.75 before; 0.786 then; without ESCO's descriptions, 0.787 keeps the same 355).
    near_duplicate: float = 0.79


def occupation_lines(occupation: Occupation) -> list[str]:
    return list(dict.fromkeys((*occupation.tasks, *occupation.skills)))


def derive_profiles(
    occupations: list[Occupation], lines: list[str], line_skills: list[list[tuple[int, float]]]
) -> dict[str, list[ProfileSkill]]:
    position = {line: i for i, line in enumerate(lines)}
    profiles: dict[str, list[ProfileSkill]] = {}
    for occupation in occupations:
        best: dict[int, ProfileSkill] = {}
        for line in occupation_lines(occupation):
            for skill, score in line_skills[position[line]] if line in position else []:
                if skill not in best or score > best[skill].score:
                    best[skill] = ProfileSkill(skill, score, line)
        profiles[occupation.code] = sorted(best.values(), key=lambda p: (-p.score, p.skill))
    return profiles


def specificity(profiles: dict[str, list[ProfileSkill]]) -> dict[int, float]:
    """log(occupations / occupations with the skill) / log(occupations): 1 for one occupation's, 0 for all's."""
    count = Counter(p.skill for profile in profiles.values() for p in profile)
    total = max(len(profiles), 2)
    return {skill: math.log(total / n) / math.log(total) for skill, n in count.items()}


def near_duplicates(skills: list[int], vectors: np.ndarray, threshold: float) -> dict[int, list[int]]:
    """For each skill of the profiles, the others within `threshold` cosine (itself excluded)."""
    if not skills:
        return {}
    matrix = vectors[skills]
    out: dict[int, list[int]] = {}
    for start in range(0, len(skills), 1024):
        block = matrix[start : start + 1024] @ matrix.T
        for row, skill in zip(block, skills[start : start + 1024]):
            out[skill] = [skills[j] for j in np.flatnonzero(row >= threshold).tolist() if skills[j] != skill]
    return out
