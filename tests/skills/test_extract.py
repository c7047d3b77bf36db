"""Scoring clause vectors against skills: per-clause picks, French votes, de-duplication, line mapping."""

from __future__ import annotations

import numpy as np

from openemploi.skills.esco import Skill
from openemploi.skills.extract import ExtractParams, SkillSpace, clause_scores, extract, map_lines


def unit(*values: float) -> np.ndarray:
    v = np.asarray(values, np.float32)
    return v / np.linalg.norm(v)


def space(line_skills=None) -> SkillSpace:
    skills = [Skill(f"http://data.europa.eu/esco/skill/{n}", n, n, "") for n in ("forklift", "trucks", "rigour", "cook")]
    vectors = np.stack([unit(1, 0, 0, 0), unit(0.9, 0.44, 0, 0), unit(0, 0, 1, 0), unit(0, 0, 0, 1)])
    lines = ["conduite de chariots élévateurs"]
    line_vectors = np.stack([unit(0, 1, 0, 0)])
    return SkillSpace(skills, vectors, lines, line_vectors, line_skills if line_skills is not None else [[(0, 0.95)]])


PARAMS = ExtractParams(min_score=0.8, per_clause=2, clause_margin=0.15, french_weight=1.0, french_min=0.9, french_lines=1)


def test_each_skill_once_with_its_best_clause_as_evidence():
    clauses = np.stack([unit(1, 0.05, 0, 0), unit(0.95, 0.3, 0, 0), unit(0, 0, 1, 0.1)])
    found = extract(space([[]]), clauses, k=10, params=PARAMS)
    assert [e.skill for e in found] == sorted({e.skill for e in found}, key=[e.skill for e in found].index)  # no repeats
    by_skill = {e.skill: e for e in found}
    assert by_skill[0].clause == 0 and by_skill[1].clause == 1 and by_skill[2].clause == 2
    assert [e.score for e in found] == sorted((e.score for e in found), reverse=True)
    assert 3 not in by_skill  # "cook" is no clause's match


def test_min_score_and_k_bound_the_answer():
    clauses = np.stack([unit(1, 0.05, 0, 0), unit(0, 0, 1, 0.1)])
    assert len(extract(space([[]]), clauses, k=1, params=PARAMS)) == 1
    assert extract(space([[]]), clauses, k=10, params=PARAMS, min_score=0.999) == []
    assert extract(space([[]]), np.zeros((0, 4), np.float32), k=10, params=PARAMS) == []


def test_a_clause_keeps_only_skills_close_to_its_best():
    clause = np.stack([unit(1, 0.02, 0, 0)])
    tight = ExtractParams(min_score=0.5, per_clause=4, clause_margin=0.01, french_weight=0)
    loose = ExtractParams(min_score=0.5, per_clause=4, clause_margin=0.2, french_weight=0)
    assert [e.skill for e in extract(space(), clause, 10, tight)] == [0]
    assert [e.skill for e in extract(space(), clause, 10, loose)] == [0, 1]


def test_a_french_line_votes_for_its_mapped_skills():
    clause = np.stack([unit(0, 1, 0, 0)])  # says what the French line says, far from the English label
    direct = clause_scores(space(), clause, ExtractParams(french_weight=0))
    voted = clause_scores(space(), clause, PARAMS)
    assert direct[0, 0] < 0.1 and voted[0, 0] == np.float32(0.95)  # min(clause-line 1.0, line-skill 0.95)
    assert extract(space(), clause, 10, PARAMS)[0].skill == 0
    far = ExtractParams(min_score=0.8, french_weight=1.0, french_min=1.01)
    assert clause_scores(space(), clause, far)[0, 0] == direct[0, 0]  # below french_min: no vote


def test_map_lines_keeps_the_best_above_the_floor_in_order():
    skills = np.stack([unit(1, 0, 0), unit(0.9, 0.44, 0), unit(0, 0, 1)])
    lines = np.stack([unit(1, 0.1, 0), unit(0, 0.2, 1), unit(0, 1, 0)])
    mapped = map_lines(lines, skills, per_line=2, min_score=0.8, chunk=2)
    assert [[s for s, _ in pairs] for pairs in mapped] == [[0, 1], [2], []]
    assert all(score >= 0.8 for pairs in mapped for _, score in pairs)
