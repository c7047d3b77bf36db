"""The matcher's fusion: one formula, weights fitted on the tuning part, read by the matcher."""

from __future__ import annotations

import json

import numpy as np
import pytest

from openemploi.index.collection import CollectionManager, CollectionSpec
from openemploi.index.store import NewDocument
from openemploi.index.vectors import IndexParams
from openemploi.matching.catalogue import Occupation, entries
from openemploi.matching.fusion import (
    BONUS_GRID,
    KINDS,
    LEXICAL_GRID,
    Candidates,
    EntryKind,
    Fusion,
    FusionTable,
    cross_validate,
    evaluate,
    fit,
)
from openemploi.matching.matcher import OccupationMatcher

INF = float("-inf")


def candidates(codes, dense, lexical) -> Candidates:
    return Candidates(tuple(codes), np.asarray(dense, dtype=np.float64), np.asarray(lexical, dtype=np.float64))


def test_score_is_best_entry_plus_bonus_plus_lexical_share():
    fusion = Fusion(0.5, (0.0, 0.02, -0.03, -0.01))
    assert fusion.score([0.80, 0.79, INF, INF], 0.4) == pytest.approx(0.81 + 0.2)
    assert fusion.score([INF, INF, 0.9, 0.91], 0.0) == pytest.approx(0.90)


def test_fit_finds_the_lexical_weight_the_tuning_queries_need():
    # two queries where the right code has the weaker cosine but the stronger bm25 match
    rows = [
        candidates(["A0001", "B0002"], [[0.80, INF, INF, INF], [0.83, INF, INF, INF]], [1.0, 0.1]),
        candidates(["A0001", "C0003"], [[0.78, INF, INF, INF], [0.80, INF, INF, INF]], [1.0, 0.2]),
    ]
    expected = ["A0001", "A0001"]
    assert evaluate(rows, expected, Fusion(0.0))["top1"] == 0.0
    fusion, metrics = fit(rows, expected)
    assert metrics["top1"] == 1.0 and evaluate(rows, expected, fusion) == metrics
    assert fusion.lexical_weight >= 0.05


def test_fit_prefers_the_hand_set_default_among_equals():
    rows = [candidates(["A0001", "B0002"], [[0.9, INF, INF, INF], [0.5, INF, INF, INF]], [1.0, 0.0])]
    fusion, metrics = fit(rows, ["A0001"])
    assert metrics["top1"] == 1.0 and fusion == Fusion()


def test_fit_learns_how_far_to_trust_example_entries():
    """Example queries match a query's wording closely, also for a neighbouring code: the fit
    finds the handicap that keeps an occupation's own label ahead of another's near example."""
    trusted_label = candidates(["A0001", "B0002"], [[0.85, INF, INF, INF], [INF, INF, INF, 0.875]], [0.0, 0.0])
    trusted_example = candidates(["A0001", "B0002"], [[INF, INF, INF, 0.90], [0.84, INF, INF, INF]], [0.0, 0.0])
    rows, expected = [trusted_label, trusted_example], ["A0001", "A0001"]
    assert evaluate(rows, expected, Fusion(0.0))["top1"] == 0.5
    fusion, metrics = fit(rows, expected)
    assert metrics["top1"] == 1.0
    # -0.03 to -0.05 all rank both right; among equals the fit keeps the one closest to no bonus
    assert fusion.bonus[KINDS.index(EntryKind.EXAMPLE)] == pytest.approx(-0.03)


def test_fit_scores_as_evaluate_does_and_no_grid_point_beats_it():
    """The fit drops codes that no grid fusion can lift above the expected one and scores the
    grid in bulk: neither may change what it finds against scoring each fusion on all codes."""
    rng = np.random.default_rng(3)
    rows, expected = [], []
    for query in range(40):
        count = int(rng.integers(2, 30))
        codes = [f"C{n:04d}" for n in sorted(rng.choice(500, count, replace=False))]
        dense = np.where(rng.random((count, len(KINDS))) < 0.5, rng.normal(0.8, 0.04, (count, len(KINDS))), INF)
        dense[np.isinf(dense).all(axis=1), 0] = 0.8
        rows.append(candidates(codes, dense, rng.random(count) * (rng.random(count) < 0.6)))
        expected.append(codes[int(rng.integers(count))] if query % 10 else "Z9999")
    fusion, metrics = fit(rows, expected)
    assert evaluate(rows, expected, fusion) == pytest.approx(metrics)
    for _ in range(300):
        other = Fusion(float(rng.choice(LEXICAL_GRID)), (0.0, *rng.choice(BONUS_GRID, len(KINDS) - 1).tolist()))
        scored = evaluate(rows, expected, other)
        assert (scored["top1"], scored["mrr"]) <= (metrics["top1"], metrics["mrr"] + 1e-12)


def test_a_code_not_retrieved_is_a_miss_and_ties_go_to_the_lower_code():
    rows = [candidates(["A0001", "B0002"], [[0.8, INF, INF, INF], [0.8, INF, INF, INF]], [0.0, 0.0])]
    assert evaluate(rows, ["A0001"], Fusion())["top1"] == 1.0
    assert evaluate(rows, ["B0002"], Fusion()) == {"top1": 0.0, "top5": 1.0, "mrr": 0.5}
    assert evaluate(rows, ["Z9999"], Fusion()) == {"top1": 0.0, "top5": 0.0, "mrr": 0.0}


def test_the_table_falls_back_to_the_default_for_other_models(tmp_path):
    path = tmp_path / "fusion.json"
    path.write_text(json.dumps({"models": {"tuned": {"lexical_weight": 0.1, "entry_bonus": {"title": 0.02}}}}))
    table = FusionTable.load(path)
    assert table.for_model("tuned") == Fusion(0.1, (0.0, 0.02, 0.0, 0.0))  # a kind the file omits gets no bonus
    assert table.for_model("other") == Fusion()
    assert FusionTable.load(tmp_path / "absent.json") == FusionTable()
    path.write_text(json.dumps({"default": {"lexical_weight": 0.2, "entry_bonus": {"blurb": 0.1}}}))
    with pytest.raises(ValueError, match="unknown entry kinds"):
        FusionTable.load(path)


def test_the_shipped_fusion_file_loads():
    table = FusionTable.load()
    for fusion in (table.default, *table.by_model.values()):
        assert 0.0 <= fusion.lexical_weight <= 1.0 and len(fusion.bonus) == len(KINDS)


def _unit(seed: int, dim: int = 16) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def test_match_ranks_codes_with_the_collection_models_fitted_fusion(tmp_path):
    occupations = [
        Occupation("D1102", "Boulanger", masculine=("Boulanger",), titles=("mitron",), tasks=("pétrir la pâte",)),
        Occupation("D1104", "Pâtissier", masculine=("Pâtissier",), titles=("chef pâtissier",), tasks=("monter les entremets",)),
    ]
    manager = CollectionManager(tmp_path)
    collection = manager.create(CollectionSpec("rome", "tuned", "v1", 16, IndexParams(kind="flat")))
    query = _unit(0)
    documents = []
    for n, occupation in enumerate(occupations):
        for m, entry in enumerate(entries(occupation)):
            mixed = _unit(1000 + 100 * n + m) + (3.0 if occupation.code == "D1104" else 1.0) * query
            documents.append(
                NewDocument(
                    entry.id,
                    entry.text,
                    mixed / np.linalg.norm(mixed),
                    {"code": entry.code, "entry": entry.kind},
                    (),
                    entry.lexical_text,
                )
            )
    collection.upsert(documents)
    text = "mitron qui pétrit la pâte"
    dense_first = OccupationMatcher(lambda: collection, occupations, FusionTable(Fusion(0.0)))
    assert dense_first.match(text, query, 2)[0].occupation.code == "D1104"  # the closer vectors win on cosine alone
    table = FusionTable(Fusion(0.0), {"tuned": Fusion(1.0)})
    matcher = OccupationMatcher(lambda: collection, occupations, table)
    ranked = matcher.match(text, query, 2)
    assert [s.occupation.code for s in ranked] == ["D1102", "D1104"]  # this collection's model weighs bm25
    assert ranked[0].lexical_score > 0 and "mitron" in ranked[0].matched_terms
    # the arrays `fit` learns from give the same ranking as `match`
    rows = matcher.candidates(text, query)
    assert evaluate([rows], ["D1102"], table.for_model("tuned"))["top1"] == 1.0
    assert ranked[0].score == pytest.approx(table.for_model("tuned").score(rows.dense[0].tolist(), rows.lexical[0]))
    # entries left out count as never indexed: without its title and tasks, D1102 keeps its label only
    kept = {e.id for e in entries(occupations[0]) if e.kind == "label"}
    without = frozenset(e.id for e in entries(occupations[0])) - kept
    fewer = matcher.candidates(text, query, without)
    assert np.isinf(fewer.dense[fewer.codes.index("D1102")][1:]).all() and np.isfinite(fewer.dense[fewer.codes.index("D1102")][0])
    assert fewer.lexical[fewer.codes.index("D1102")] < rows.lexical[rows.codes.index("D1102")]
    manager.close()


def test_cross_validation_scores_each_fold_with_a_fusion_fitted_on_the_others():
    """Half the queries need some lexical share, half are hurt by a large one: only a fitted weight
    (0.05-0.1) serves both, and every fold's fit finds it; the unfitted fusions each miss a half."""
    needs_words = candidates(["A0001", "B0002"], [[0.80, INF, INF, INF], [0.83, INF, INF, INF]], [1.0, 0.1])
    hurt_by_words = candidates(["A0001", "B0002"], [[0.90, INF, INF, INF], [0.80, INF, INF, INF]], [0.0, 1.0])
    rows = [needs_words, hurt_by_words] * 5
    scores = cross_validate(rows, ["A0001"] * 10, folds=5)
    assert scores["fitted"]["top1"] == 1.0
    assert scores["handset"]["top1"] == 0.5  # lexical 0.35 puts B first on the second kind
    assert scores["dense"]["top1"] == 0.5  # no lexical share puts B first on the first kind


def test_cross_validation_needs_a_query_per_fold():
    rows = [candidates(["A0001"], [[0.8, INF, INF, INF]], [1.0])] * 3
    with pytest.raises(ValueError, match="3 queries in 5 folds"):
        cross_validate(rows, ["A0001"] * 3, folds=5)
