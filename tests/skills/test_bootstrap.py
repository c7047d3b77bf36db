"""What the skills bootstrap embeds and persists (the indexing itself runs in tests/api/test_skills_service.py)."""

from __future__ import annotations

import numpy as np
import pytest

from openemploi.matching.catalogue import Occupation, load_catalogue
from openemploi.skills import bootstrap
from openemploi.skills.bootstrap import catalogue_lines, data_version, decode_map, encode_map, map_catalogue
from openemploi.skills.esco import Skill
from openemploi.skills.extract import SkillSpace, centre, skill_matrix
from openemploi.skills.lexical import LexicalIndex
from openemploi.skills.profiles import ProfileParams


def test_a_skill_is_embedded_in_french_as_its_label_wordings_and_usage():
    skill = Skill(
        "u", "operate forklift", "operate forklift", "", "conduire un chariot élévateur", ("utiliser un chariot",), ("cariste",)
    )
    assert skill.french == "conduire un chariot élévateur, utiliser un chariot, cariste"
    assert Skill("u", "bake", "bake", "").french == "bake"  # no French wordings: the English label stands in


def test_catalogue_lines_are_the_distinct_task_and_skill_lines():
    occupations = [
        Occupation("A1", "a", tasks=("charger les camions",), skills=("sécurité",)),
        Occupation("A2", "b", tasks=("charger les camions", "tenir les stocks")),
    ]
    assert catalogue_lines(occupations) == ["charger les camions", "sécurité", "tenir les stocks"]
    assert len(catalogue_lines(load_catalogue())) > 9_000


SKILLS = [Skill("http://data.europa.eu/esco/skill/1", "drive forklifts", "drive forklifts", "Operate a forklift.")]


def test_the_data_version_follows_the_profile_thresholds():
    assert data_version(ProfileParams(), SKILLS) == data_version(ProfileParams(), SKILLS)
    assert data_version(ProfileParams(min_score=0.9), SKILLS) != data_version(ProfileParams(), SKILLS)


def test_the_data_version_follows_the_indexing_recipe(monkeypatch: pytest.MonkeyPatch):
    """A change of what is embedded per skill re-indexes production and the test catalogues."""
    before = data_version(ProfileParams(), SKILLS)
    monkeypatch.setattr(bootstrap, "INDEX_RECIPE", bootstrap.INDEX_RECIPE + ";other")
    assert data_version(ProfileParams(), SKILLS) != before


def test_the_data_version_follows_the_derived_labels():
    """The labels are embedded: a change of the label heuristic, with the same data file, re-indexes."""
    relabelled = [Skill(SKILLS[0].uri, "drive", SKILLS[0].labels, SKILLS[0].definition)]
    assert data_version(ProfileParams(), relabelled) != data_version(ProfileParams(), SKILLS)


def test_lines_map_to_their_skills_and_near_duplicates_pair_up():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(4, 16)).astype(np.float32)
    labels = np.concatenate([base, base[:1] + 0.05 * rng.normal(size=(1, 16)).astype(np.float32)])  # 4 ~ 0
    french = labels + 0.01
    skills = [Skill(f"http://data.europa.eu/esco/skill/{i}", str(i), str(i), "") for i in range(5)]
    lines = centre(np.stack([labels[0], labels[2]]), np.zeros(16, np.float32))
    words = LexicalIndex.build([s.french for s in skills])
    space = SkillSpace(skills, skill_matrix(labels, french), np.zeros(16, np.float32), lines, words)
    line_skills, neighbours = map_catalogue(space, ProfileParams(per_line=2, min_score=0.5, near_duplicate=0.9))
    assert {s for s, _ in line_skills[0]} == {0, 4} and [s for s, _ in line_skills[1]] == [2]
    assert neighbours[0] == [4] and neighbours[4] == [0] and neighbours[2] == []


def test_the_line_map_round_trips_through_uris():
    skills = [Skill(f"http://data.europa.eu/esco/skill/{i}", str(i), str(i), "") for i in range(4)]
    line_skills = [[(2, 0.91), (0, 0.85)], []]
    neighbours = {2: [3], 3: [2], 0: []}
    decoded = decode_map(encode_map(line_skills, neighbours, skills), skills)
    assert decoded == (line_skills, {2: [3], 3: [2]})
