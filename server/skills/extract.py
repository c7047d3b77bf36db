"""Clause and text vectors to ESCO skills: one matrix product, the best clause blended with the whole text.

Everything here is numpy over vectors the caller embedded: the API embeds the clauses of a text
(QUERY kind); the bootstrap embedded each skill three times: its full ESCO description and its
English preferred label (PASSAGE), and its French label and wordings (QUERY, as the clauses are).

Why centred: e5 puts every French text and every English text in its own cone, so raw cosines
across the two languages sit in a narrow band (0.78-0.86) where hub skills ("review unpublished
articles") beat the right one. Subtracting each side's mean (French: the catalogue's lines;
English: the skills) before the cosine removes that language offset; on the dev set's tuning part
it lifted hit@5 of the whole-text cosine from 0.38 to 0.45, and summing the description and label
cosines to 0.60 with the clauses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .esco import Skill


@dataclass(frozen=True)
class ExtractParams:
    """The knobs tuned on the dev set's tuning part (benchmarks/eval_skills.py); defaults are the tuned values."""

    # Score (skill_matrix's weighted mean of cosines) below which a skill is not reported: 89% of the
    # tuning texts have ten skills above it (their 10th best: median 0.35).
    min_score: float = 0.27
    # Share of the best clause's score in a skill's score, the rest the whole text's: the clause keeps a
    # skill stated once in a long ad, the text gives context a lone clause lacks ("taille" of vines).
    clause_weight: float = 0.5
    # Each clause is moved towards its `expand_lines` nearest French catalogue lines (their mean, times
    # `expand_weight`): the catalogue's wording of the same task, whose skills it shares, steadies a
    # clause's direction. On the tuning part: hit@5 0.598 -> 0.636, recall@10 0.335 -> 0.386 (5, 0.5);
    # flat for 5-10 lines at 0.4-0.6, worse past 20 lines or at weight 1.
    expand_lines: int = 5
    expand_weight: float = 0.5


@dataclass(frozen=True)
class SkillSpace:
    """The ESCO skills as one matrix in the serving model's space, and the French side: mean and lines."""

    skills: list[Skill]
    vectors: np.ndarray  # [skills, dim]: see skill_matrix
    query_mean: np.ndarray  # [dim]: mean QUERY vector of the catalogue's French lines
    lines: np.ndarray  # [lines, dim]: the catalogue's French lines, centred

    def index_of(self) -> dict[str, int]:
        return {s.uri: i for i, s in enumerate(self.skills)}

    def centre(self, vectors: np.ndarray) -> np.ndarray:
        """French QUERY vectors, their mean removed and re-normalised: ready for `vectors @ space.vectors.T`."""
        return centre(vectors, self.query_mean)


@dataclass(frozen=True)
class Extracted:
    skill: int  # index into SkillSpace.skills
    score: float
    clause: int  # index of the supporting clause


def centre(vectors: np.ndarray, mean: np.ndarray) -> np.ndarray:
    shifted = np.asarray(vectors, np.float32) - mean
    norms = np.linalg.norm(shifted, axis=-1, keepdims=True)
    return shifted / np.maximum(norms, 1e-12)


# Shares of a skill's three vectors in its row of the skill matrix (see skill_matrix).
DESCRIPTION_WEIGHT = 1.0
LABEL_WEIGHT = 1.0
FRENCH_WEIGHT = 2.5


def skill_matrix(descriptions: np.ndarray, labels: np.ndarray, french: np.ndarray) -> np.ndarray:
    """Each skill's centred description, English label and French vectors (esco.Skill.french: label,
    wordings and usage), weighted 1 : 1 : 2.5: one product gives the weighted
    mean of the three cosines.

    The description carries the definition's words, the label the exact phrase, the French side the
    words French texts use ("je conduis des chariots élévateurs", "cariste"). On the dev set's tuning
    part, hit@5 / recall@10: description and label 0.692 / 0.388. French label and wordings added at
    weight 1, 0.720 / 0.439; 2-3, 0.748-0.766 / 0.445-0.453; 4-6, 0.71-0.72 / 0.46; alone 0.598 /
    0.390 (the English sides still carry the definitions' knowledge). With the usage lines in the
    same text, weight 2.5: 0.822 / 0.536 (1.5: 0.804, 3.5: 0.813, 5: 0.804 hit@5); as a fourth
    vector of its own instead, 0.738-0.748.
    """
    weights = (DESCRIPTION_WEIGHT, LABEL_WEIGHT, FRENCH_WEIGHT)
    parts = (descriptions, labels, french)
    matrix = sum(w / sum(weights) * centre(vectors, vectors.mean(axis=0)) for w, vectors in zip(weights, parts))
    return np.asarray(matrix, np.float32)


def text_vector(clauses: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The whole text's vector: its (centred) clauses' vectors weighted by length, re-normalised.

    e5 mean-pools its tokens, so a text's vector is near the length-weighted mean of its parts'
    (cosine 0.92 on a 2,000-character ad); as good as embedding the text on the dev set's tuning
    part (hit@5 0.598 both; unweighted 0.570), and the text's tokens are not embedded twice.
    """
    mean = np.asarray(weights, np.float32) @ clauses
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def expand(space: SkillSpace, clauses: np.ndarray, params: ExtractParams) -> np.ndarray:
    """Centred clauses, each plus `expand_weight` times the mean of its nearest centred lines, re-normalised."""
    count = min(params.expand_lines, len(space.lines))
    if count <= 0 or params.expand_weight <= 0:
        return clauses
    by_line = space.lines @ clauses.T  # [lines, clauses]: lines as rows, as in skill_scores
    nearest = np.argpartition(-by_line, count - 1, axis=0)[:count]  # [count, clauses]
    moved = clauses + params.expand_weight * space.lines[nearest].mean(axis=0)
    return centre(moved, np.zeros(moved.shape[1], np.float32))


def skill_scores(
    space: SkillSpace, clause_vectors: np.ndarray, weights: np.ndarray, params: ExtractParams
) -> tuple[np.ndarray, np.ndarray]:
    """([skills] scores, [skills] index of each skill's best clause), from the clauses' raw QUERY vectors.

    One product, skills as rows: [skills, dim] @ [dim, clauses + 1] runs several times faster than
    the transposed [clauses + 1, dim] @ [dim, skills] with the same BLAS.
    """
    clauses = expand(space, space.centre(clause_vectors), params)
    queries = np.vstack([clauses, text_vector(clauses, weights)])
    by_skill = space.vectors @ queries.T
    best = by_skill[:, :-1].argmax(axis=1)
    clause = np.take_along_axis(by_skill, best[:, None], axis=1)[:, 0]
    return params.clause_weight * clause + (1.0 - params.clause_weight) * by_skill[:, -1], best


def extract(
    space: SkillSpace,
    clause_vectors: np.ndarray,
    weights: np.ndarray,
    k: int,
    params: ExtractParams,
    min_score: float | None = None,
) -> list[Extracted]:
    """The k best skills at or above the floor, each once, with the clause that supports it best.

    `weights[i]` is clause i's length (characters): its share of the whole text.
    """
    if len(clause_vectors) == 0 or k <= 0:
        return []
    floor = params.min_score if min_score is None else min_score
    scores, best = skill_scores(space, clause_vectors, weights, params)
    top = min(k, len(scores))
    candidates = np.argpartition(-scores, top - 1)[:top]
    candidates = candidates[scores[candidates] >= floor]
    order = candidates[np.lexsort((candidates, -scores[candidates]))]  # best first, ties by index
    return [Extracted(int(i), float(scores[i]), int(best[i])) for i in order]


def map_lines(
    line_vectors: np.ndarray, skill_vectors: np.ndarray, per_line: int, min_score: float, chunk: int = 512
) -> list[list[tuple[int, float]]]:
    """Each French line's ESCO skills: its `per_line` best at or above `min_score` (chunked: 9k x 14k floats).

    `line_vectors` are centred like clauses, so a line's score is what extraction gives it as a one-clause text.
    """
    out: list[list[tuple[int, float]]] = []
    for start in range(0, len(line_vectors), chunk):
        scores = line_vectors[start : start + chunk] @ skill_vectors.T
        top = min(per_line, scores.shape[1])
        best = np.argpartition(-scores, top - 1, axis=1)[:, :top]
        for row, idx in zip(scores, best):
            pairs = sorted(((int(i), float(row[i])) for i in idx if row[i] >= min_score), key=lambda p: -p[1])
            out.append(pairs)
    return out
