"""Training pairs for `models finetune`, and the near-duplicate check that keeps the dev set out."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from openemploi.build.finetune_data import (
    NEAR_DUPLICATE_JACCARD,
    STYLES,
    AnchorSource,
    NearDuplicateIndex,
    Pair,
    _elide,
    catalogue_pairs,
    epoch_batches,
    jaccard,
    load_queries,
    pairs_digest,
    paraphrase_pairs,
    template_pairs,
    without_near_duplicates,
)
from openemploi.matching.catalogue import Occupation, load_catalogue

REPO_ROOT = Path(__file__).resolve().parents[2]
DEV_SET = REPO_ROOT / "benchmarks" / "data" / "rome_dev.jsonl"


def _welder() -> Occupation:
    return Occupation(
        "H2913",
        "Soudeur / Soudeuse",
        masculine=("Soudeur",),
        feminine=("Soudeuse",),
        titles=("soudeur TIG", "soudeur MIG-MAG"),
        abbreviations=("TIG",),
        tasks=("assembler des pièces métalliques", "interpréter un plan", "affûter les électrodes"),
        skills=("soudure à l'arc", "lecture de plans", "sécurité"),
    )


def test_template_pairs_speak_each_style_from_the_occupations_own_words():
    welder = _welder()
    pairs = template_pairs([welder], random.Random(5), per_style=2)
    assert {p.style for p in pairs} == set(STYLES)
    assert all(p.source is AnchorSource.TEMPLATE and p.code == "H2913" for p in pairs)
    assert len(pairs) == 2 * len(STYLES)
    own_words = (*welder.tasks, *welder.skills)
    assert all(any(w in p.anchor for w in own_words) for p in pairs)
    for pair in pairs:
        assert "{" not in pair.anchor
        if pair.style == "seeker":
            assert not any(t.casefold() in pair.anchor.casefold() for t in ("soudeur", "soudeuse"))
    assert template_pairs([welder], random.Random(5), per_style=2) == pairs  # seeded: same data


def test_templates_elide_before_a_vowel_only():
    assert _elide("Poste de agent de accueil : il faut que il sache") == "Poste d'agent d'accueil : il faut qu'il sache"
    assert _elide("Poste de soudeur, la équipe, le hôtel") == "Poste de soudeur, l'équipe, l'hôtel"
    assert _elide("garde enfants") == "garde enfants"  # "de" inside a word is not the article


def test_template_pairs_skip_an_occupation_without_tasks_or_skills():
    bare = Occupation("X0000", "Métier", masculine=(), feminine=(), titles=(), abbreviations=(), tasks=(), skills=())
    assert template_pairs([bare], random.Random(0)) == []


def test_catalogue_pairs_cover_titles_abbreviations_tasks_and_skills():
    nurse = Occupation(
        "J1506",
        "Infirmier / Infirmière en soins généraux",
        masculine=("Infirmier en soins généraux",),
        feminine=("Infirmière en soins généraux",),
        titles=("infirmier", "Infirmier / Infirmière en soins généraux"),
        abbreviations=("IDE",),
        tasks=("réaliser les soins",),
        skills=("gestes d'urgence",),
    )
    pairs = catalogue_pairs([nurse])
    assert {(p.anchor, p.source) for p in pairs} == {
        ("Infirmier en soins généraux", AnchorSource.TITLE),
        ("Infirmière en soins généraux", AnchorSource.TITLE),
        ("infirmier", AnchorSource.TITLE),
        ("IDE", AnchorSource.ABBREVIATION),
        ("réaliser les soins", AnchorSource.TASK),
        ("gestes d'urgence", AnchorSource.SKILL),
    }  # the label itself is the positive, never an anchor
    assert {p.code for p in pairs} == {"J1506"}


def test_the_paraphrase_file_spans_many_codes_in_the_four_styles():
    codes = {o.code for o in load_catalogue()}
    pairs = paraphrase_pairs(codes=codes)  # an unknown code raises
    assert len(pairs) >= 300
    assert len({p.code for p in pairs}) >= 100
    assert {p.style for p in pairs} == set(STYLES)
    assert min(sum(p.style == s for p in pairs) for s in STYLES) >= 50


def test_no_paraphrase_is_a_near_duplicate_of_a_dev_query():
    queries = [q["query"] for q in load_queries(DEV_SET)]
    assert NearDuplicateIndex(queries).duplicates(p.anchor for p in paraphrase_pairs()) == []


def test_near_duplicates_are_reworded_copies_not_texts_about_the_same_trade():
    query = "je fais le pain et les croissants la nuit dans une boulangerie"
    assert jaccard(query, "Je fais le pain, et les croissants, la nuit dans une boulangerie !") == 1.0
    assert jaccard(query, "je fais le pain et les croissants de nuit en boulangerie") >= NEAR_DUPLICATE_JACCARD
    assert jaccard(query, "boulanger : pétrir la pâte, façonner et cuire les baguettes") < NEAR_DUPLICATE_JACCARD
    assert jaccard("aide-soignante EHPAD", "aide soignante ehpad") == 1.0


def test_the_index_finds_every_query_above_its_threshold_and_the_closest_one():
    queries = ["chauffeur poids lourd permis C", "chauffeur poids lourd", "boulanger de nuit"]
    index = NearDuplicateIndex(queries, threshold=0.3)
    text = "chauffeur poids lourd permis C et EC"
    assert {d.query for d in index.near(text)} == set(queries[:2])
    assert all(d.similarity == pytest.approx(jaccard(text, d.query)) for d in index.near(text))
    assert index.closest(text).query == queries[0]
    assert index.near("pâtissier") == [] and index.closest("xyz") is None


def test_without_near_duplicates_drops_every_pair_close_to_a_query():
    pairs = [
        Pair("chauffeur poids lourd permis C", "N4101", AnchorSource.PARAPHRASE, "keywords"),
        Pair("Chauffeur poids-lourd, permis C !", "N4101", AnchorSource.PARAPHRASE, "keywords"),
        Pair("je livre les magasins avec mon camion", "N4101", AnchorSource.PARAPHRASE, "seeker"),
    ]
    kept, dropped = without_near_duplicates(pairs, ["chauffeur poids lourd permis c"])
    assert [p.anchor for p in kept] == ["je livre les magasins avec mon camion"]
    assert {d.text for d in dropped} == {pairs[0].anchor, pairs[1].anchor}


def test_the_dev_set_split_is_stable_and_balanced():
    dev = load_queries(DEV_SET)
    assert {d["split"] for d in dev} == {"tune", "heldout"}
    for style in STYLES:
        parts = [d["split"] for d in dev if d["style"] == style]
        assert abs(parts.count("tune") - parts.count("heldout")) <= 1


def test_epoch_batches_never_repeat_a_code_and_are_seeded():
    occupations = load_catalogue()[:60]
    pairs = catalogue_pairs(occupations) + [
        Pair(f"paraphrase {i}", occupations[i % 5].code, AnchorSource.PARAPHRASE, "seeker") for i in range(20)
    ]
    first = epoch_batches(pairs, 16, random.Random(3), per_code=2, paraphrase_repeats=2)
    again = epoch_batches(pairs, 16, random.Random(3), per_code=2, paraphrase_repeats=2)
    assert first == again
    assert all(len({p.code for p in batch}) == len(batch) for batch in first)
    assert all(2 <= len(batch) <= 16 for batch in first)
    seen = [p for batch in first for p in batch]
    assert sum(p.source is AnchorSource.PARAPHRASE for p in seen) >= 30  # repeats survive, bar a last same-code tail
    assert pairs_digest(pairs) == pairs_digest(list(reversed(pairs)))
    assert pairs_digest(pairs) != pairs_digest(pairs[1:])
