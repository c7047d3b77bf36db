"""Clause and text vectors to ESCO skills: one matrix product, the best clause blended with the whole text.

Everything here is numpy over vectors the caller embedded: the API embeds the clauses of a text
(QUERY kind); the bootstrap embedded each skill twice: its English preferred label (PASSAGE), and
its French label, wordings and usage (QUERY, as the clauses are).

Why centred: e5 puts every French text and every English text in its own cone, so raw cosines
across the two languages sit in a narrow band (0.78-0.86) where hub skills ("review unpublished
articles") beat the right one. Subtracting each side's mean (French: the catalogue's lines;
English: the skills) before the cosine removes that language offset; on the dev set's tuning part
it lifted hit@5 of the whole-text cosine against ESCO's descriptions from 0.38 to 0.45.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .esco import Skill
from .lexical import LexicalIndex
from .prior import OccupationPrior


@dataclass(frozen=True)
class ExtractParams:
    """The knobs tuned on the dev set's tuning part (benchmarks/eval_skills.py); defaults are the tuned values."""

    # Score (extract's blend of vector, lexical and prior scores) below which a skill is not reported: 89% of
    # the tuning texts have ten skills above it (their 10th best: median 0.30).
    min_score: float = 0.23
    # Share of the best clause's score in a skill's score, the rest the whole text's: the clause keeps a
    # skill stated once in a long ad, the text gives context a lone clause lacks ("taille" of vines).
    clause_weight: float = 0.5
    # Each clause is moved towards its `expand_lines` nearest French catalogue lines (their mean, times
    # `expand_weight`): the catalogue's wording of the same task, whose skills it shares, steadies a
    # clause's direction. On the tuning part: hit@5 0.598 -> 0.636, recall@10 0.335 -> 0.386 (5, 0.5);
    # flat for 5-10 lines at 0.4-0.6, worse past 20 lines or at weight 1.
    expand_lines: int = 5
    expand_weight: float = 0.5
    # Share of the lexical coverage (lexical.py: the skill's French words one clause holds) in the score of
    # the `rerank` best skills by vector score, the rest the vector score. On the tuning part, hit@5 /
    # recall@10: 0.804 / 0.541 without, 0.869 / 0.588 at 0.3; 0.860-0.869 / 0.580-0.595 from 0.2 to 0.5.
    lexical_share: float = 0.3
    rerank: int = 100
    # Share of the occupation prior (prior.py: the part of the text's `prior_occupations` nearest occupations
    # whose profile holds the skill) in the score of the `rerank` best, the rest the blend above. On the
    # tuning part, hit@5 / recall@10: 0.869 / 0.584 without; at 0.1, 0.869 / 0.615 with 5 occupations,
    # 0.879 / 0.602 with 3, 0.869 / 0.593 with 10; 5-fold cross-validation over shares 0.05-0.15 and
    # 1-10 occupations picked (0.1, 5) in every fold, out of fold 0.869 / 0.615.
    prior_share: float = 0.1
    prior_occupations: int = 5


@dataclass(frozen=True)
class SkillSpace:
    """The ESCO skills as one matrix in the serving model's space, the French side (mean and lines),
    and the skills' French words."""

    skills: list[Skill]
    vectors: np.ndarray  # [skills, dim]: see skill_matrix
    query_mean: np.ndarray  # [dim]: mean QUERY vector of the catalogue's French lines
    lines: np.ndarray  # [lines, dim]: the catalogue's French lines, centred
    words: LexicalIndex  # built from each skill's `french` text

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


# Shares of a skill's two vectors in its row of the skill matrix (see skill_matrix).
LABEL_WEIGHT = 1.0
FRENCH_WEIGHT = 2.5


def skill_matrix(labels: np.ndarray, french: np.ndarray) -> np.ndarray:
    """Each skill's centred English label and French vectors (esco.Skill.french: label, wordings and
    usage), weighted 1 : 2.5: one product gives the weighted mean of the two cosines.

    The label carries ESCO's exact phrase, the French side the words French texts use ("je conduis
    des chariots élévateurs", "cariste"). ESCO's description (labels and definition: 1.04M tokens to
    embed, more than everything else indexed) was a third vector. On the dev set's tuning part,
    hit@5 / recall@10 with extraction's lexical share: 0.860 / 0.588 with it at weight 1, 0.869 /
    0.585 at 0.5, 0.869 / 0.588 without it. Before the lexical share it had lifted 0.598 / 0.390
    (French alone) to 0.822 / 0.536. French weight 2 or 3: within 0.003.
    """
    weights = (LABEL_WEIGHT, FRENCH_WEIGHT)
    matrix = sum(w / sum(weights) * centre(vectors, vectors.mean(axis=0)) for w, vectors in zip(weights, (labels, french)))
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
    # Lines as rows for the product (as in skill_scores), then one contiguous row per clause: the
    # partition along rows runs 4-5 times faster than down the columns of [lines, clauses].
    by_clause = np.ascontiguousarray((space.lines @ clauses.T).T)  # [clauses, lines]
    nearest = np.argpartition(-by_clause, count - 1, axis=1)[:, :count]  # [clauses, count]
    moved = clauses + params.expand_weight * space.lines[nearest].mean(axis=1)
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
    clause = by_skill[np.arange(len(by_skill)), best]
    return params.clause_weight * clause + (1.0 - params.clause_weight) * by_skill[:, -1], best


def extract(
    space: SkillSpace,
    clauses: Sequence[str],
    clause_vectors: np.ndarray,
    k: int,
    params: ExtractParams,
    min_score: float | None = None,
    prior: OccupationPrior | None = None,
) -> list[Extracted]:
    """The k best skills at or above the floor, each once, with the clause that supports it best.

    The vector score (skill_scores) ranks all skills; the `rerank` best blend in their lexical
    coverage (lexical.py) and, given a `prior`, the occupation prior; the others keep only the vector
    share of their score. The evidence is the clause with the best vector score. A clause weighs in
    the whole text by its length.
    """
    if len(clauses) == 0 or k <= 0:
        return []
    floor = params.min_score if min_score is None else min_score
    weights = np.fromiter((len(c) for c in clauses), np.float32, len(clauses))
    vector_scores, best = skill_scores(space, clause_vectors, weights, params)
    scores = (1.0 - params.lexical_share) * vector_scores
    shortlist = _best(vector_scores, params.rerank) if params.rerank > 0 else np.zeros(0, np.int64)
    if params.lexical_share > 0 and len(shortlist):
        scores[shortlist] += params.lexical_share * space.words.coverage(clauses, shortlist)
    if prior is not None and params.prior_share > 0 and len(shortlist):
        text = text_vector(np.asarray(clause_vectors, np.float32), weights)  # raw, as the occupations' vectors are
        scores *= 1.0 - params.prior_share
        scores[shortlist] += params.prior_share * prior.shares(text, params.prior_occupations)[shortlist]
    candidates = _best(scores, k)
    candidates = candidates[scores[candidates] >= floor]
    order = candidates[np.lexsort((candidates, -scores[candidates]))]  # best first, ties by index
    return [Extracted(int(i), float(scores[i]), int(best[i])) for i in order]


def _best(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` highest scores, in no order."""
    count = min(count, len(scores))
    return np.argpartition(-scores, count - 1)[:count]


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
