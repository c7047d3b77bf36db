"""The French words a clause shares with a skill's wordings: folding, stems, idf weights, one clause at a time."""

from __future__ import annotations

import numpy as np
import pytest

from openemploi.skills.lexical import LexicalIndex, terms


def test_terms_fold_accents_drop_stop_words_and_join_word_forms():
    assert terms("Conduite des chariots élévateurs") == terms("je conduis un chariot elevateur")
    assert terms("de la et pour un") == frozenset()
    assert "eleva" in terms("ÉLÉVATEUR") and "caces" in terms("CACES R489")
    assert terms("main-d'œuvre") == terms("main d oeuvre") == {"main", "oeuvr"}


SKILLS = [
    "conduire un chariot élévateur, cariste",
    "conduire un camion, chauffeur poids lourd",
    "gérer une équipe",
    "gérer un budget",
    "",
]


def test_coverage_is_the_idf_weighted_share_of_the_skills_words_one_clause_holds():
    index = LexicalIndex.build(SKILLS)
    everything = np.arange(len(SKILLS))
    coverage = index.coverage(["je suis cariste et je conduis un chariot élévateur"], everything)
    assert coverage[0] == pytest.approx(1.0)
    assert 0 < coverage[1] < 0.5  # "conduire" alone: a word two skills share, so worth little
    assert coverage[2] == coverage[3] == coverage[4] == 0.0  # no shared word; no words at all
    rare_word = index.coverage(["budget"], np.array([3]))[0]
    common_word = index.coverage(["gérer"], np.array([3]))[0]
    assert rare_word > 0.5 > common_word


def test_coverage_takes_the_best_single_clause_and_only_the_candidates_asked():
    index = LexicalIndex.build(SKILLS)
    split = index.coverage(["conduire", "chariot élévateur cariste"], np.array([0]))
    whole = index.coverage(["conduire un chariot élévateur, cariste"], np.array([0]))
    assert split[0] < whole[0] == pytest.approx(1.0)
    assert index.coverage(["gérer un budget"], np.array([3, 2])).tolist() == pytest.approx(
        [1.0, index.idf["gerer"] / index.totals[2]]
    )
