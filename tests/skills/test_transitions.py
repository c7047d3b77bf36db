"""Profiles, specificity and the transition ranking, on a small hand-made catalogue."""

from __future__ import annotations

import math

import numpy as np
import pytest

from openemploi.matching.catalogue import Occupation
from openemploi.skills.profiles import ProfileSkill, derive_profiles, near_duplicates, specificity
from openemploi.skills.transitions import Source, TransitionParams, covered_set, overlap, rank, viable_threshold

OCCUPATIONS = [
    Occupation("N1101", "Cariste", tasks=("charger les camions",), skills=("conduite de chariots",)),
    Occupation("N1103", "Magasinier", tasks=("charger les camions", "tenir les stocks")),
    Occupation("D1102", "Boulanger", tasks=("pétrir la pâte",), skills=("hygiène alimentaire",)),
    Occupation("D1106", "Vendeur en alimentation", tasks=("hygiène alimentaire", "tenir les stocks")),
]
LINES = sorted({line for o in OCCUPATIONS for line in (*o.tasks, *o.skills)})
# skills: 0 load trucks, 1 drive forklift, 2 stock control, 3 knead dough, 4 food hygiene
MAP = {
    "charger les camions": [(0, 0.9)],
    "conduite de chariots": [(1, 0.92), (0, 0.84)],
    "tenir les stocks": [(2, 0.88)],
    "pétrir la pâte": [(3, 0.9)],
    "hygiène alimentaire": [(4, 0.91)],
}
LINE_SKILLS = [MAP[line] for line in LINES]


@pytest.fixture
def profiles():
    return derive_profiles(OCCUPATIONS, LINES, LINE_SKILLS)


def test_a_profile_is_the_union_of_its_lines_skills_with_the_best_evidence(profiles):
    cariste = {p.skill: p for p in profiles["N1101"]}
    assert set(cariste) == {0, 1}
    assert cariste[0] == ProfileSkill(0, 0.9, "charger les camions")  # the better of its two lines
    assert [p.skill for p in profiles["D1106"]] == [4, 2]  # by score


def test_specificity_is_one_for_a_unique_skill_and_falls_with_sharing(profiles):
    weight = specificity(profiles)
    assert weight[1] == pytest.approx(1.0) and weight[3] == pytest.approx(1.0)
    assert weight[0] == pytest.approx(math.log(2) / math.log(4))
    assert weight[0] < weight[1]


def test_near_duplicates_are_symmetric_and_exclude_themselves():
    vectors = np.asarray([[1, 0], [0.99, 0.141], [0, 1]], np.float32)
    near = near_duplicates([0, 1, 2], vectors, 0.95)
    assert near == {0: [1], 1: [0], 2: []}
    assert covered_set({0}, near) == frozenset({0, 1})


def test_overlap_weighs_covered_skills_by_specificity_and_lists_missing_most_specific_first(profiles):
    weight = {0: 0.5, 1: 1.0}
    share, have, missing = overlap(profiles["N1101"], frozenset({0}), weight)
    assert share == pytest.approx(0.5 / 1.5) and have == [0] and missing == [1]
    share, _, missing = overlap([ProfileSkill(2, 0.9, ""), ProfileSkill(1, 0.8, "")], frozenset(), {1: 1.0, 2: 0.2})
    assert share == 0.0 and missing == [1, 2]


def test_ranking_combines_overlap_proximity_and_family(profiles):
    weight = specificity(profiles)
    codes = [o.code for o in OCCUPATIONS]
    vectors = np.asarray([[1, 0, 0], [0.95, 0.31, 0], [0, 0, 1], [0, 0.6, 0.8]], np.float32)
    source = Source(covered_set({p.skill for p in profiles["N1101"]}, {}), vectors[0], "N11", "N1101")
    ranked = rank(source, codes, profiles, weight, vectors, k=3, params=TransitionParams())
    assert ranked[0].code == "N1103"  # shares a skill, close work, same family
    assert "N1101" not in [r.code for r in ranked]  # never suggests staying put
    first = ranked[0]
    assert first.same_family and first.transferable == [0] and first.missing == [2]
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    no_family = rank(source, codes, profiles, weight, vectors, 3, TransitionParams(family_weight=0.0))
    assert ranked[0].score - no_family[0].score == pytest.approx(TransitionParams().family_weight)


def test_the_viable_threshold_is_a_quantile_of_same_family_pairs(profiles):
    weight = specificity(profiles)
    codes = [o.code for o in OCCUPATIONS]
    vectors = np.eye(4, dtype=np.float32)
    params = TransitionParams(viable_quantile=0.0)
    threshold = viable_threshold(codes, profiles, weight, {}, vectors, params)
    pairs = [("N1101", "N1103"), ("N1103", "N1101"), ("D1102", "D1106"), ("D1106", "D1102")]
    shares = [overlap(profiles[b], frozenset(p.skill for p in profiles[a]), weight)[0] for a, b in pairs]
    # Orthogonal texts: proximity 0, so a pair scores its overlap and the family prior.
    assert threshold == pytest.approx(min(params.overlap_weight * s + params.family_weight for s in shares))
    assert viable_threshold(codes, profiles, weight, {}, vectors, TransitionParams(viable_quantile=1.0)) > threshold
