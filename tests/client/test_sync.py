"""The blocking client against a live server: the same vectors as the raw gRPC API, typed results, round trips."""

from __future__ import annotations

import uuid

import grpc
import numpy as np
import pytest

from openemploi.client import (
    Client,
    CollectionInfo,
    Document,
    ExtractedSkill,
    IndexKind,
    IndexSpec,
    Needs,
    NotFound,
    Occupation,
    OccupationMatch,
    SearchHit,
    TextKind,
    Transition,
)
from openemploi.v1 import embedding_pb2, embedding_pb2_grpc

TEXTS = ["Boulanger / Boulangère", "je fais le pain et les croissants la nuit", "cariste CACES R489", "aide-soignante en EHPAD"]
OFFERS = [
    Document("o1", "Boulanger en CDI à Lyon, pétrissage et cuisson", metadata={"ville": "Lyon"}, skills=("pétrir", "cuire")),
    Document("o2", "Cariste CACES 3 en entrepôt logistique", metadata={"ville": "Paris"}, skills=("caces",)),
    Document("o3", "Aide-soignant de nuit en EHPAD", metadata={"ville": "Lyon"}, skills=("soins",)),
]


@pytest.fixture(scope="module")
def raw_embed(live_server):
    with grpc.insecure_channel(live_server.address) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)

        def embed(texts, kind, normalize=True):
            request = embedding_pb2.EmbedRequest(texts=texts, kind=kind, normalize=normalize)
            return stub.Embed(request, timeout=60)

        yield embed


@pytest.mark.parametrize(
    ("kind", "proto_kind"), [(TextKind.QUERY, embedding_pb2.QUERY), (TextKind.PASSAGE, embedding_pb2.PASSAGE)]
)
def test_embed_equals_the_grpc_embed_of_the_same_texts(client, raw_embed, kind, proto_kind):
    vectors = client.embed(TEXTS, kind=kind)
    expected = np.asarray([e.values for e in raw_embed(TEXTS, proto_kind).embeddings], dtype=np.float32)
    assert vectors.dtype == np.float32 and vectors.shape == expected.shape == (4, 384)
    np.testing.assert_array_equal(vectors, expected)


def test_query_and_passage_vectors_differ(client):
    assert not np.allclose(client.embed(TEXTS[0], kind=TextKind.QUERY), client.embed(TEXTS[0], kind=TextKind.PASSAGE))


def test_a_single_string_is_one_text(client):
    vectors = client.embed("Boulanger")
    assert vectors.shape == (1, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_raw_vectors_when_normalize_is_off(client, raw_embed):
    vectors = client.embed(TEXTS[:2], kind=TextKind.PASSAGE, normalize=False)
    expected = np.asarray([e.values for e in raw_embed(TEXTS[:2], embedding_pb2.PASSAGE, False).embeddings], dtype=np.float32)
    np.testing.assert_array_equal(vectors, expected)
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_embed_with_info_says_what_made_the_vectors(client, raw_embed, default_version):
    info = client.embed_with_info(TEXTS, kind=TextKind.QUERY)
    reply = raw_embed(TEXTS, embedding_pb2.QUERY)
    assert (info.model, info.model_version) == ("multilingual-e5-small", default_version.version)
    assert info.token_counts == tuple(reply.token_counts) and info.total_tokens == reply.total_tokens
    assert info.truncated == (False,) * 4


def test_long_lists_go_in_chunks_with_the_same_result(live_server, client):
    texts = [f"{t} ({i})" for i, t in enumerate(TEXTS * 3)]
    with Client(live_server.address, chunk_size=5) as chunked:
        info = chunked.embed_with_info(texts)
    np.testing.assert_allclose(info.vectors, client.embed(texts), atol=1e-6)
    assert len(info.token_counts) == len(texts) == info.vectors.shape[0]


def test_truncate_cuts_long_texts_instead_of_failing(client):
    info = client.embed_with_info(["pain " * 2000], truncate=True)
    assert info.truncated == (True,) and info.token_counts == (512,)


def test_match_occupation_returns_typed_matches(client):
    matches = client.match_occupation("je fais le pain et les croissants la nuit", k=3)
    assert len(matches) == 3 and all(isinstance(m, OccupationMatch) for m in matches)
    assert "D1102" in [m.code for m in matches]
    assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
    assert all(m.label and m.matched_entry and isinstance(m.sectors, tuple) for m in matches)


def test_list_models_names_the_default(client):
    models = {m.name: m for m in client.list_models()}
    default = models["multilingual-e5-small"]
    assert default.is_default and default.dim == 384 and default.current_version
    assert any(v.version == default.current_version and v.state == "current" for v in default.versions)


@pytest.fixture
def offers(client):
    name = f"offres-{uuid.uuid4().hex[:8]}"
    info = client.create_collection(name, index=IndexSpec(kind=IndexKind.FLAT))
    yield name, info
    try:
        client.drop_collection(name)
    except NotFound:
        pass


def test_collections_round_trip(client, offers):
    name, info = offers
    assert isinstance(info, CollectionInfo) and (info.name, info.dim, info.size) == (name, 384, 0)
    assert client.upsert(name, OFFERS).upserted == 3
    assert name in [c.name for c in client.list_collections()]

    found = client.get(name, ["o3", "absent", "o1"], include_vectors=True)
    assert [d.id for d in found.documents] == ["o3", "o1"] and found.missing == ("absent",)
    assert found.documents[1].metadata == {"ville": "Lyon"} and found.documents[1].skills == ("pétrir", "cuire")
    assert found.documents[1].vector is not None and len(found.documents[1].vector) == 384

    hits = client.search(name, text="boulangerie", k=2)
    assert all(isinstance(h, SearchHit) for h in hits) and hits[0].id == "o1" and hits[0].vector is None
    in_lyon = client.search(name, text="entrepôt", filters={"ville": "Lyon"}, k=3)
    assert sorted(h.id for h in in_lyon) == ["o1", "o3"] and all(h.metadata == {"ville": "Lyon"} for h in in_lyon)
    assert client.search(name, vector=found.documents[0].vector, k=1)[0].id == "o3"
    assert client.search(name, text="travail", skills_any=["caces"], k=3)[0].id == "o2"

    assert client.delete(name, ["o2"]) == 1
    assert client.get(name, ["o2"]).missing == ("o2",)
    assert client.drop_collection(name) is True


def test_upsert_by_id_replaces(client, offers):
    name, _ = offers
    client.upsert(name, OFFERS)
    client.upsert(name, [Document("o1", "Pâtissier à Lyon", metadata={"ville": "Lyon"})])
    assert client.get(name, ["o1"]).documents[0].text == "Pâtissier à Lyon"
    assert next(c for c in client.list_collections() if c.name == name).size == 3


def test_match_profile_scores_skill_overlap(client, offers):
    name, _ = offers
    client.upsert(name, OFFERS)
    matches = client.match_profile(name, text="boulanger expérimenté", skills=["pétrir"], k=2)
    assert matches[0].id == "o1" and matches[0].matched_skills == ("pétrir",) and matches[0].missing_skills == ("cuire",)


# -- skills (a server that indexed the ESCO skills) ---------------------------------------------------------------


@pytest.fixture
def skills_client(skills_server):
    with Client(skills_server.address) as client:
        yield client


def test_extract_skills_returns_typed_skills(skills_client):
    skills = skills_client.extract_skills("Vous pétrissez la pâte et façonnez les baguettes chaque nuit.", k=5)
    assert skills and all(isinstance(s, ExtractedSkill) and s.uri.startswith("http") and s.evidence for s in skills)
    assert all(s.label and s.label_fr for s in skills)  # English (ESCO) and French labels both reach the client
    assert [s.score for s in skills] == sorted((s.score for s in skills), reverse=True)


def test_get_occupation_returns_its_profile(skills_client):
    occupation = skills_client.get_occupation("D1102")
    assert isinstance(occupation, Occupation) and occupation.code == "D1102" and "oulang" in occupation.label
    assert occupation.titles and occupation.tasks and occupation.skills


def test_suggest_transitions_from_a_code(skills_client):
    transitions = skills_client.suggest_transitions(code="D1102", k=5)
    assert 0 < len(transitions) <= 5 and all(isinstance(t, Transition) and t.code != "D1102" for t in transitions)
    assert all(len(t.missing_skills_fr) == len(t.missing_skills) for t in transitions)


def test_describe_needs_of_a_job_ad(skills_client):
    needs = skills_client.describe_needs("Boulangerie artisanale recherche boulanger pour la fabrication du pain de nuit.", k=2)
    assert isinstance(needs, Needs) and len(needs.occupations) == 2 and needs.model
    assert needs.occupations[0].code == "D1102"


def test_an_unknown_occupation_is_not_found(skills_client):
    with pytest.raises(NotFound):
        skills_client.get_occupation("Z9999")
