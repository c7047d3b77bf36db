"""Clause splitting of French job ads, CVs and keyword lists."""

from __future__ import annotations

from openemploi.skills.split import GROUP_RATIO, MAX_CLAUSE_CHARS, length_groups, split_clauses


def test_a_job_ad_sentence_is_cut_at_its_commas_and_can_be_kept_whole():
    text = "Nous recherchons un cariste titulaire du CACES R489, rigoureux, pour charger et décharger les camions"
    assert split_clauses(text) == [
        "Nous recherchons un cariste titulaire du CACES R489",
        "rigoureux",
        "pour charger et décharger les camions",
    ]
    assert split_clauses(text, with_lines=True) == [*split_clauses(text), text]


def test_length_groups_keep_each_batch_within_the_ratio_and_cover_every_text():
    texts = ["Excel", "permis B", "charger et décharger les camions", "x" * 60, "y" * 130, "CACES R489"]
    groups = length_groups(texts)
    assert sorted(i for g in groups for i in g) == list(range(len(texts)))
    assert groups[:2] == [[0, 1, 5, 2], [3]]  # shortest first, whatever their order in the text
    for group in groups:
        sizes = [max(len(texts[i]), 24) for i in group]
        assert max(sizes) <= GROUP_RATIO * min(sizes)
    assert length_groups([]) == []


def test_bullets_newlines_semicolons_and_sentence_ends_cut():
    text = "Missions :\n- Accueillir les clients.\n• Gérer les stocks ; passer les commandes\n* Encaissement. Profil : autonome."
    assert split_clauses(text, with_lines=False) == [
        "Missions",
        "Accueillir les clients",
        "Gérer les stocks",
        "passer les commandes",
        "Encaissement",
        "Profil : autonome",
    ]


def test_a_keyword_list_gives_one_clause_per_keyword():
    assert split_clauses("Excel, Word, permis B, anglais courant", with_lines=False) == [
        "Excel",
        "Word",
        "permis B",
        "anglais courant",
    ]


def test_short_items_joined_by_et_are_two_but_a_task_stays_one():
    assert split_clauses("ponctuel, rigoureux et autonome", with_lines=False) == ["ponctuel", "rigoureux", "autonome"]
    assert split_clauses("charger et décharger les camions") == ["charger et décharger les camions"]


def test_a_long_sentence_with_commas_stays_whole():
    text = (
        "Vous accompagnez les personnes âgées dans les gestes de la vie quotidienne au domicile, en lien avec "
        "l'infirmière coordinatrice du service et les familles des bénéficiaires"
    )
    assert split_clauses(text) == [text]


def test_duplicates_empty_pieces_and_punctuation_only_are_dropped():
    assert split_clauses("Excel\nExcel\n - \n ; ... \n\n") == ["Excel"]
    assert split_clauses("") == []


def test_a_run_without_punctuation_is_wrapped_and_clauses_can_be_capped():
    text = " ".join(f"soudure{i}" for i in range(200))
    clauses = split_clauses(text)
    assert len(clauses) > 1 and all(len(c) <= MAX_CLAUSE_CHARS for c in clauses) and " ".join(clauses) == text
    assert split_clauses("a1, b2, c3, d4", max_clauses=2) == ["a1", "b2"]
