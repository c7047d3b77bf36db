"""The shipped ROME catalogue: what the `rome` collection indexes, and when it must be re-indexed."""

from __future__ import annotations

import json
import shutil
from collections import Counter

from openemploi.matching.catalogue import (
    DATA_DIR,
    EXAMPLES,
    catalogue_files,
    catalogue_version,
    entries,
    load_catalogue,
    load_examples,
)
from openemploi.matching.fusion import EntryKind


def test_every_occupation_has_example_queries_as_entries_of_their_own_kind():
    occupations = load_catalogue()
    all_entries = [e for o in occupations for e in entries(o)]
    assert len({e.id for e in all_entries}) == len(all_entries)
    examples = Counter(e.code for e in all_entries if e.kind == EntryKind.EXAMPLE.value)
    assert set(examples) == {o.code for o in occupations}
    assert min(examples.values()) >= 2  # at least the two seeker sentences
    assert {e.kind for e in all_entries} == {k.value for k in EntryKind}
    baker = next(o for o in occupations if o.code == "D1102")
    baker_examples = [e for e in entries(baker) if e.kind == EntryKind.EXAMPLE.value]
    assert [e.text for e in baker_examples] == list(baker.examples)
    assert all(e.text == e.lexical_text for e in baker_examples)  # bm25 reads them as written


def test_examples_are_read_by_code_in_file_order_without_repeats(tmp_path):
    path = tmp_path / EXAMPLES
    rows = [("je fais le pain", "D1102"), ("je fais le pain", "D1102"), ("boulanger nuit", "D1102"), ("je coupe", "A1201")]
    path.write_text("\n".join(json.dumps({"text": t, "code": c, "style": "seeker"}) for t, c in rows) + "\n\n")
    assert load_examples(path) == {"D1102": ["je fais le pain", "boulanger nuit"], "A1201": ["je coupe"]}
    assert load_examples(tmp_path / "absent.jsonl") == {}


def test_a_change_to_the_examples_changes_the_catalogue_version(tmp_path):
    """The `rome` collection re-indexes when its version changes: an edited example must reach it."""
    for path in catalogue_files():
        shutil.copy(path, tmp_path / path.name)
    before = catalogue_version(tmp_path)
    assert before == catalogue_version(DATA_DIR)
    with open(tmp_path / EXAMPLES, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "je pétris la pâte à 3 heures du matin", "code": "D1102", "style": "seeker"}) + "\n")
    assert catalogue_version(tmp_path) != before
    assert "je pétris la pâte à 3 heures du matin" in next(o for o in load_catalogue(tmp_path) if o.code == "D1102").examples
