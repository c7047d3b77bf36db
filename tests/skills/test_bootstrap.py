"""What the skills bootstrap embeds and persists (the indexing itself runs in tests/api/test_skills_service.py)."""

from __future__ import annotations

from openemploi.matching.catalogue import Occupation, load_catalogue
from openemploi.skills.bootstrap import LABEL_CHARS, catalogue_lines, data_version, decode_map, encode_map, label_text
from openemploi.skills.esco import Skill
from openemploi.skills.profiles import ProfileParams


def test_label_text_keeps_the_preferred_label_and_cuts_at_a_word():
    long = Skill("u", "drive forklifts", "drive forklifts " + "operate forklift trucks " * 20, "")
    text = label_text(long)
    assert text.startswith("drive forklifts") and len(text) <= LABEL_CHARS and long.labels.startswith(text + " ")
    short = Skill("u", "bake bread", "bake bread make bread", "")
    assert label_text(short) == "bake bread make bread"


def test_catalogue_lines_are_the_distinct_task_and_skill_lines():
    occupations = [
        Occupation("A1", "a", tasks=("charger les camions",), skills=("sécurité",)),
        Occupation("A2", "b", tasks=("charger les camions", "tenir les stocks")),
    ]
    assert catalogue_lines(occupations) == ["charger les camions", "sécurité", "tenir les stocks"]
    assert len(catalogue_lines(load_catalogue())) > 9_000


def test_the_data_version_follows_the_profile_thresholds():
    assert data_version(ProfileParams()) == data_version(ProfileParams())
    assert data_version(ProfileParams(min_score=0.9)) != data_version(ProfileParams())


def test_the_line_map_round_trips_through_uris():
    skills = [Skill(f"http://data.europa.eu/esco/skill/{i}", str(i), str(i), "") for i in range(4)]
    line_skills = [[(2, 0.91), (0, 0.85)], []]
    neighbours = {2: [3], 3: [2], 0: []}
    decoded = decode_map(encode_map(line_skills, neighbours, skills), skills)
    assert decoded == (line_skills, {2: [3], 3: [2]})
