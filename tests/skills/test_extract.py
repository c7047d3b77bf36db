"""Scoring a text's clause and whole vectors against skills: centring, the blend, the prior, de-duplication, line mapping."""

from __future__ import annotations

import numpy as np
import pytest

from openemploi.skills.esco import Skill
from openemploi.skills.extract import (
    FRENCH_WEIGHT,
    LABEL_WEIGHT,
    ExtractParams,
    SkillSpace,
    centre,
    expand,
    extract,
    map_lines,
    skill_matrix,
    skill_scores,
    text_vector,
)
from openemploi.skills.lexical import LexicalIndex
from openemploi.skills.prior import OccupationPrior
from openemploi.skills.profiles import ProfileSkill


def unit(*values: float) -> np.ndarray:
    v = np.asarray(values, np.float32)
    return v / np.linalg.norm(v)


NAMES = ("forklift", "trucks", "rigour", "cook")


def space(mean: np.ndarray | None = None, lines: np.ndarray | None = None) -> SkillSpace:
    """Skills as unit rows of a 5-d space whose last axis is the French side's shared offset."""
    skills = [Skill(f"http://data.europa.eu/esco/skill/{n}", n, n, "") for n in NAMES]
    vectors = np.stack([unit(1, 0, 0, 0, 0), unit(0.9, 0.44, 0, 0, 0), unit(0, 0, 1, 0, 0), unit(0, 0, 0, 1, 0)])
    mean = np.zeros(5, np.float32) if mean is None else mean
    lines = np.zeros((0, 5), np.float32) if lines is None else lines
    return SkillSpace(skills, vectors, mean, lines, LexicalIndex.build([s.french for s in skills]))


PARAMS = ExtractParams(min_score=0.3, clause_weight=0.5, lexical_share=0.0)  # the vector score alone


def test_a_clause_moves_towards_its_nearest_catalogue_lines():
    """A clause between two skills is settled by the French lines it is closest to."""
    lines = np.stack([unit(0, 1, 0, 0, 0), unit(0, 0, 0, 1, 0), unit(0, 0, 0, 0.9, 0.44)])  # "trucks", "cook" twice
    clause = unit(0.1, 0.4, 0, 0.6, 0)[None, :]
    moved = expand(space(lines=lines), clause, ExtractParams(expand_lines=1, expand_weight=0.5))
    assert np.allclose(moved, unit(*(clause[0] + 0.5 * lines[1]))[None, :], atol=1e-6)  # its nearest: line 1
    two = expand(space(lines=lines), clause, ExtractParams(expand_lines=2, expand_weight=0.5))
    assert np.allclose(two, unit(*(clause[0] + 0.25 * (lines[1] + lines[2])))[None, :], atol=1e-6)
    assert (two @ space().vectors.T)[0, 3] > (clause @ space().vectors.T)[0, 3]  # closer to "cook"
    assert expand(space(lines=lines), clause, ExtractParams(expand_weight=0)) is clause
    assert expand(space(), clause, ExtractParams()) is clause  # no lines: nothing to move towards


def lengths(*values: int) -> np.ndarray:
    return np.asarray(values, np.float32)


def texts(*sizes: int) -> list[str]:
    """Clauses of these lengths sharing no word with any skill: extraction weighs them by length alone."""
    return ["z" * size for size in sizes]


def test_each_skill_once_with_its_best_clause_as_evidence():
    clauses = np.stack([unit(1, 0.05, 0, 0, 0), unit(0.95, 0.3, 0, 0, 0), unit(0, 0, 1, 0.1, 0)])
    found = extract(space(), texts(20, 20, 20), clauses, k=10, params=PARAMS)
    skills = [e.skill for e in found]
    assert len(skills) == len(set(skills))
    by_skill = {e.skill: e for e in found}
    assert by_skill[0].clause == 0 and by_skill[1].clause == 1 and by_skill[2].clause == 2
    assert [e.score for e in found] == sorted((e.score for e in found), reverse=True)
    assert 3 not in by_skill  # "cook" is in no clause and not in the text


def test_min_score_and_k_bound_the_answer():
    clauses = np.stack([unit(1, 0.05, 0, 0, 0), unit(0, 0, 1, 0.1, 0)])
    assert len(extract(space(), texts(10, 10), clauses, k=1, params=PARAMS)) == 1
    assert extract(space(), texts(10, 10), clauses, k=10, params=PARAMS, min_score=0.999) == []
    assert extract(space(), [], np.zeros((0, 5), np.float32), k=10, params=PARAMS) == []


def test_the_whole_text_is_its_clauses_weighted_by_length():
    clauses = np.stack([unit(1, 0, 0, 0, 0), unit(0, 0, 1, 0, 0)])
    assert np.allclose(text_vector(clauses, lengths(30, 10)), unit(3, 0, 1, 0, 0), atol=1e-6)


def test_the_score_blends_the_best_clause_with_the_whole_text():
    """A skill stated in one short clause of a text about something else scores below one the text is about."""
    clauses = np.stack([unit(0, 0, 1, 0, 0), unit(0, 0, 0, 1, 0)])  # "rigour" said briefly, "cook" at length
    scores, best = skill_scores(space(), clauses, lengths(10, 30), ExtractParams(clause_weight=0.5))
    whole = unit(0, 0, 1, 3, 0)
    assert scores[2] == pytest.approx(0.5 + 0.5 * whole[2]) and scores[3] == pytest.approx(0.5 + 0.5 * whole[3])
    assert scores[3] > scores[2] and best[2] == 0 and best[3] == 1
    only_clauses, _ = skill_scores(space(), clauses, lengths(10, 30), ExtractParams(clause_weight=1.0))
    assert only_clauses[2] == pytest.approx(1.0) and only_clauses[3] == pytest.approx(1.0)


def test_the_words_a_clause_uses_choose_among_skills_near_in_meaning():
    """ "trucks" is nearer the clause by vector, but the clause names the forklift: the blend ranks it first."""
    clause = unit(0.93, 0.37, 0, 0, 0)[None, :]
    by_vector = extract(space(), ["conduite du Forklift"], clause, k=2, params=PARAMS)
    assert [e.skill for e in by_vector] == [1, 0]
    blended = ExtractParams(min_score=0.3, clause_weight=0.5, lexical_share=0.3)
    found = extract(space(), ["conduite du Forklift"], clause, k=2, params=blended)
    assert [e.skill for e in found] == [0, 1]
    vector = clause[0] @ space().vectors[0]
    assert found[0].score == pytest.approx(0.7 * vector + 0.3 * 1.0, abs=1e-5)  # all of "forklift"'s words
    assert found[1].score == pytest.approx(0.7 * (clause[0] @ space().vectors[1]), abs=1e-5)  # none of "trucks"'
    shortlisted = ExtractParams(min_score=0.3, clause_weight=0.5, lexical_share=0.3, rerank=1)
    assert [e.skill for e in extract(space(), ["conduite du Forklift"], clause, k=2, params=shortlisted)] == [1, 0]


def test_centring_removes_the_offset_all_french_texts_share():
    """Raw cosines put every clause near every skill along the shared axis; the centred ones do not."""
    clause = unit(0, 0, 1, 0, 3)[None, :]  # "rigour", said in French: mostly the French offset
    offset = np.asarray([0, 0, 0, 0, clause[0, 4]], np.float32)  # what all French texts share
    assert (clause @ space().vectors.T)[0, 2] < 0.35  # raw: "rigour" barely shows
    centred = space(mean=offset).centre(clause)
    assert np.allclose(centred, unit(0, 0, 1, 0, 0)[None, :], atol=1e-6)
    found = extract(space(mean=offset), texts(8), clause, k=1, params=PARAMS)
    assert found[0].skill == 2 and found[0].score == pytest.approx(1.0, abs=1e-5)


def test_skill_matrix_gives_the_weighted_mean_of_the_centred_cosines():
    rng = np.random.default_rng(2)
    labels, french = (rng.normal(size=(6, 8)).astype(np.float32) for _ in range(2))
    query = unit(*rng.normal(size=8))
    cosines = [centre(x, x.mean(0)) @ query for x in (labels, french)]
    expected = (LABEL_WEIGHT * cosines[0] + FRENCH_WEIGHT * cosines[1]) / (LABEL_WEIGHT + FRENCH_WEIGHT)
    assert np.allclose(skill_matrix(labels, french) @ query, expected, atol=1e-6)


def test_map_lines_keeps_the_best_above_the_floor_in_order():
    skills = np.stack([unit(1, 0, 0), unit(0.9, 0.44, 0), unit(0, 0, 1)])
    lines = np.stack([unit(1, 0.1, 0), unit(0, 0.2, 1), unit(0, 1, 0)])
    mapped = map_lines(lines, skills, per_line=2, min_score=0.8, chunk=2)
    assert [[s for s, _ in pairs] for pairs in mapped] == [[0, 1], [2], []]
    assert all(score >= 0.8 for pairs in mapped for _, score in pairs)


def test_the_occupation_prior_chooses_between_skills_equally_near():
    """A clause as near "trucks" as "forklift": the text's occupation, whose profile holds trucks, decides."""
    both = unit(1, 0, 0, 0, 0) + unit(0.9, 0.44, 0, 0, 0)
    clause = unit(*both)[None, :]
    occupations = np.stack([unit(*both), unit(0, 0, 0, 1, 0)])  # the text's occupation, and a cook's
    profiles = {"N1101": [ProfileSkill(1, 0.6, "conduire un camion")], "G1602": [ProfileSkill(3, 0.7, "cuisiner")]}
    prior = OccupationPrior.build(["N1101", "G1602"], profiles, occupations, skills=len(NAMES))
    without = extract(space(), texts(20), clause, k=2, params=PARAMS)
    assert {e.skill for e in without} == {0, 1} and without[0].score == pytest.approx(without[1].score, abs=1e-6)
    with_prior = ExtractParams(min_score=0.3, lexical_share=0.0, prior_share=0.1, prior_occupations=1)
    found = extract(space(), texts(20), clause, k=2, params=with_prior, prior=prior)
    assert [e.skill for e in found] == [1, 0]
    by_skill = {e.skill: e.score for e in without}
    assert found[0].score == pytest.approx(0.9 * by_skill[1] + 0.1, abs=1e-5)
    assert found[1].score == pytest.approx(0.9 * by_skill[0], abs=1e-5)
    off = ExtractParams(min_score=0.3, lexical_share=0.0, prior_share=0.0)
    assert [e.score for e in extract(space(), texts(20), clause, k=2, params=off, prior=prior)] == [e.score for e in without]
