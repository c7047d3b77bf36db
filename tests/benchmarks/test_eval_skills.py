"""benchmarks/eval_skills.py and its dev sets: the files a skills or transitions score is computed
on are well formed (known ESCO URIs and ROME codes, both splits, no leak between them), and the
metrics and the anchor's method give the values worked out by hand."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from openemploi.matching.catalogue import load_catalogue
from openemploi.testing.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "eval_skills.py"


ev = load_script(SCRIPT, "eval_skills")


@pytest.fixture(scope="module")
def skills_dev() -> list[dict]:
    return ev.load_jsonl(ev.SKILLS_DEV)


@pytest.fixture(scope="module")
def transitions_dev() -> list[dict]:
    return ev.load_jsonl(ev.TRANSITIONS_DEV)


def test_skills_dev_set_is_well_formed(skills_dev: list[dict]) -> None:
    esco = set(ev.load_skills()[0])
    assert len(skills_dev) >= 150
    assert len({d["id"] for d in skills_dev}) == len(skills_dev)
    assert len({d["text"] for d in skills_dev}) == len(skills_dev)
    for case in skills_dev:
        assert set(case) >= {"id", "text", "style", "skills", "split"}, case["id"]
        assert case["style"] in ev.STYLES and case["split"] in ev.SPLITS, case["id"]
        assert case["text"].strip(), case["id"]
        assert 2 <= len(case["skills"]) <= 6 and len(set(case["skills"])) == len(case["skills"]), case["id"]
        assert set(case["skills"]) <= esco, f"{case['id']}: unknown ESCO URI"


def test_skills_heldout_is_a_third_and_covers_every_style(skills_dev: list[dict]) -> None:
    heldout = [d for d in skills_dev if d["split"] == "heldout"]
    assert 0.25 <= len(heldout) / len(skills_dev) <= 0.40
    assert Counter(d["style"] for d in heldout).keys() == set(ev.STYLES)
    assert len({d["sector"] for d in heldout}) >= 10


def test_no_tuning_text_is_a_near_duplicate_of_a_heldout_one(skills_dev: list[dict]) -> None:
    tuning = [d["text"] for d in skills_dev if d["split"] == "tuning"]
    heldout = [d["text"] for d in skills_dev if d["split"] == "heldout"]
    assert ev.near_duplicates(tuning, heldout) == []


def test_transitions_dev_set_is_well_formed(transitions_dev: list[dict]) -> None:
    codes = {o.code for o in load_catalogue()}
    assert len(transitions_dev) >= 40
    assert len({t["code"] for t in transitions_dev}) == len(transitions_dev)
    for case in transitions_dev:
        assert case["split"] in ev.SPLITS, case["id"]
        assert case["code"] in codes and set(case["targets"]) <= codes, case["id"]
        assert 2 <= len(case["targets"]) <= 5 and len(set(case["targets"])) == len(case["targets"]), case["id"]
        assert case["code"] not in case["targets"], case["id"]
    assert {t["split"] for t in transitions_dev} == set(ev.SPLITS)
    crossing = [t for t in transitions_dev if any(c[:3] != t["code"][:3] for c in t["targets"])]
    assert len(crossing) / len(transitions_dev) >= 0.30  # else the family rule (d) would be trivially perfect


def test_hit_and_recall_at_k() -> None:
    ranked = ["a", "b", "c", "d", "e", "f"]
    assert ev.hit_at(ranked, ["f", "z"], 5) == 0.0
    assert ev.hit_at(ranked, ["e", "z"], 5) == 1.0
    assert ev.recall_at(ranked, ["b", "f", "z", "y"], 5) == 0.25
    assert ev.recall_at(ranked, ["b", "f", "z", "y"], 10) == 0.5
    assert ev.recall_at(["a", "a", "b"], ["a", "c"], 3) == 0.5  # a repeated item counts once
    assert ev.recall_at([], ["a"], 10) == 0.0


def test_scores_average_over_cases() -> None:
    scores = ev.skills_scores([["a", "b"], ["x"]], [["b", "c"], ["y", "z"]])
    assert scores == {"n": 2, "hit5": 0.5, "recall5": 0.25, "recall10": 0.25}
    moves = ev.transitions_scores([["B1", "C2"], []], [["C2", "D3"], ["A1", "A2"]])
    assert moves == {"n": 2, "hit10": 0.5, "recall10": 0.25}
    assert ev.skills_scores([], [])["hit5"] == 0.0


def test_family_rule_puts_the_source_family_first_in_cosine_order() -> None:
    ranked = ["B1101", "A1203", "C1000", "A1208", "A1101"]
    assert ev.rank_by_family_then("A1201", ranked) == ["A1203", "A1208", "B1101", "C1000", "A1101"]


def test_near_duplicates_flags_a_reworded_copy_only() -> None:
    heldout = ["Cariste CACES 3 pour le chargement des camions", "Aide-soignante en EHPAD"]
    tuning = ["cariste caces 3 pour le chargement des camions !", "Développeur Python"]
    pairs = ev.near_duplicates(tuning, heldout)
    assert [(i, j) for i, j, _ in pairs] == [(0, 0)]


def test_anchor_split_is_the_tools_own_regex() -> None:
    # its pattern also cuts inside words ("commandes" at "and", "port" at "or"): reproduced on purpose
    assert ev.anchor_fragments("Préparateur de commandes, port de charges; CACES.") == [
        "Préparateur de comm",
        "es",
        " p",
        "t de charges",
        " CACES",
    ]
    assert ev.anchor_fragments("  ") == []


def test_anchor_rank_keeps_each_fragments_best_skill_above_its_threshold() -> None:
    skills = np.eye(3, dtype=np.float32)
    fragments = np.array([[0.9, 0.1, 0.0], [0.0, 0.5, 0.4], [0.95, 0.0, 0.0], [0.0, 0.3, 0.7]], dtype=np.float32)
    # fragment 1's best (0.5) is under 0.6; fragments 0 and 2 share skill a (best score kept)
    assert ev.anchor_rank(fragments, skills, ["a", "b", "c"]) == ["a", "c"]
    assert ev.anchor_rank(np.zeros((0, 3), np.float32), skills, ["a", "b", "c"]) == []


def test_top_k_orders_by_cosine() -> None:
    items = np.array([[1.0, 0.0], [0.0, 1.0], [0.7071, 0.7071]], dtype=np.float32)
    assert ev.top_k(np.array([[0.0, 1.0]], dtype=np.float32), items, ["x", "y", "z"], 2) == [["y", "z"]]


def heldout(service_hit5: float, rule_hit10: float, service_recall10: float) -> dict:
    def row(hit5: float, recall10: float) -> dict:
        return {"overall": {"n": 10, "hit5": hit5, "recall5": recall10, "recall10": recall10}}

    return {
        "skills": {"service": row(service_hit5, 0.7), "e5": row(0.45, 0.3), "anchor (MiniLM)": row(0.2, 0.1)},
        "transitions": {
            "service": {"n": 5, "hit10": 1.0, "recall10": service_recall10},
            "family, then e5 (d)": {"n": 5, "hit10": rule_hit10, "recall10": 0.57},
        },
    }


def test_targets_need_the_margins_over_the_baselines() -> None:
    passed = ev.check_targets(heldout(0.9, 1.0, 0.6))
    assert all(row["passed"] for row in passed.values()), passed
    short = ev.check_targets(heldout(0.74, 0.9, 0.57))
    assert not short["skills_hit5"]["passed"]
    assert not short["skills_hit5_over_e5"]["passed"]  # 0.74 - 0.45 < 0.30
    assert short["skills_hit5_over_anchor"]["passed"]
    assert short["transitions_hit10_over_rule"]["passed"]  # 1.0 over 0.9
    assert not short["transitions_recall10_over_rule"]["passed"]  # a tie is not "above"
    assert ev.check_targets({"skills": {}, "transitions": {}}) == {}


def test_cache_resumes_after_an_interrupted_run_and_then_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ev, "CACHE", tmp_path)
    texts = [f"skill {i}" for i in range(5)]
    encoded: list[str] = []

    def encode(batch: list[str]) -> np.ndarray:
        encoded.extend(batch)
        return np.array([[float(t.split()[1])] for t in batch])

    def interrupted(batch: list[str]) -> np.ndarray:
        if encoded:
            raise KeyboardInterrupt
        return encode(batch)

    with pytest.raises(KeyboardInterrupt):
        ev.cached("m", texts, interrupted, chunk=2)
    assert encoded == ["skill 0", "skill 1"]
    vectors = ev.cached("m", texts, encode, chunk=2)
    assert encoded == texts  # the first chunk was not encoded again
    assert vectors[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert ev.cached("m", texts, interrupted, chunk=2)[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert ev.cached("m", texts[:4], encode, chunk=2).shape == (4, 1)  # other texts, another key
