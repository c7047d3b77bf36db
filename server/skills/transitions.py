"""Rank next occupations: what transfers (skill overlap), how close the work is, and the same-family prior.

score = overlap_weight * overlap + proximity_weight * proximity' + family_weight * same_family, where
overlap is the specificity-weighted share of the target's profile the source covers (a skill or
one of its near-duplicates), and proximity' rescales the cosine of the occupations' texts from
[proximity_floor, 1] to [0, 1]. A transition is viable above the `viable_quantile` of the scores
of same-family pairs: as good as the weaker quarter of moves within a family, which advisers
treat as plausible by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .profiles import ProfileSkill


@dataclass(frozen=True)
class TransitionParams:
    """Weights tuned on the transitions dev set's tuning part (grid over 144 settings, hit@10 + recall@10)."""

    overlap_weight: float = 0.3
    proximity_weight: float = 0.6
    family_weight: float = 0.1
    proximity_floor: float = 0.8  # e5-small puts unrelated French occupation texts near 0.75-0.8
    viable_quantile: float = 0.25


@dataclass(frozen=True)
class Source:
    """Who moves: the skills they have (with near-duplicates), their work's vector, their ROME family."""

    covered: frozenset[int]
    vector: np.ndarray | None
    family: str
    code: str = ""  # excluded from the targets


@dataclass(frozen=True)
class Ranked:
    code: str
    score: float
    overlap: float
    proximity: float
    same_family: bool
    transferable: list[int]
    missing: list[int]  # most specific first


def family(code: str) -> str:
    return code[:3]


def covered_set(skills: set[int], neighbours: dict[int, list[int]]) -> frozenset[int]:
    out = set(skills)
    for skill in skills:
        out.update(neighbours.get(skill, ()))
    return frozenset(out)


def overlap(profile: list[ProfileSkill], covered: frozenset[int], weight: dict[int, float]) -> tuple[float, list[int], list[int]]:
    have = [p.skill for p in profile if p.skill in covered]
    missing = sorted((p.skill for p in profile if p.skill not in covered), key=lambda s: (-weight.get(s, 0.0), s))
    total = sum(weight.get(p.skill, 0.0) for p in profile)
    share = sum(weight.get(s, 0.0) for s in have) / total if total > 0 else 0.0
    return share, have, missing


def rescale(cosine: float, floor: float) -> float:
    return min(max((cosine - floor) / (1.0 - floor), 0.0), 1.0)


def rank(
    source: Source,
    codes: list[str],
    profiles: dict[str, list[ProfileSkill]],
    weight: dict[int, float],
    vectors: np.ndarray,
    k: int,
    params: TransitionParams,
) -> list[Ranked]:
    """All targets scored; the k best returned (ties by code). `vectors[i]` is occupation codes[i]'s text vector."""
    cosines = vectors @ source.vector if source.vector is not None else np.zeros(len(codes), np.float32)
    out = []
    for i, code in enumerate(codes):
        if code == source.code:
            continue
        share, have, missing = overlap(profiles.get(code, []), source.covered, weight)
        proximity = float(cosines[i])
        same = bool(source.family) and family(code) == source.family
        score = (
            params.overlap_weight * share
            + params.proximity_weight * rescale(proximity, params.proximity_floor)
            + params.family_weight * same
        )
        out.append(Ranked(code, score, share, proximity, same, have, missing))
    out.sort(key=lambda r: (-r.score, r.code))
    return out[:k]


def viable_threshold(
    codes: list[str],
    profiles: dict[str, list[ProfileSkill]],
    weight: dict[int, float],
    neighbours: dict[int, list[int]],
    vectors: np.ndarray,
    params: TransitionParams,
) -> float:
    """The `viable_quantile` of the scores of every ordered pair of distinct same-family occupations."""
    by_family: dict[str, list[int]] = {}
    for i, code in enumerate(codes):
        by_family.setdefault(family(code), []).append(i)
    scores = []
    for members in by_family.values():
        for a in members:
            covered = covered_set({p.skill for p in profiles.get(codes[a], [])}, neighbours)
            for b in members:
                if a == b:
                    continue
                share, _, _ = overlap(profiles.get(codes[b], []), covered, weight)
                proximity = rescale(float(vectors[a] @ vectors[b]), params.proximity_floor)
                scores.append(params.overlap_weight * share + params.proximity_weight * proximity + params.family_weight)
    return float(np.quantile(scores, params.viable_quantile)) if scores else 1.0
