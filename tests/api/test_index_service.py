"""IndexService through a real gRPC channel: collections, upsert, filters, hybrid, restart."""

from __future__ import annotations

import dataclasses
import time

import grpc
import numpy as np
import pytest
from harness import ServerThread, expect, make_config

from openemploi.v1 import index_pb2 as ipb
from openemploi.v1 import index_pb2_grpc as ipb_grpc

DIM = 384
OFFERS = [
    (
        "o1",
        "Boulangère en CDI, fabrication du pain et des viennoiseries la nuit",
        {"ville": "Lyon", "contrat": "CDI"},
        ["panification", "HACCP"],
    ),
    (
        "o2",
        "Cariste CACES R489 cat. 3 pour entrepôt logistique, horaires d'équipe",
        {"ville": "Lyon", "contrat": "CDD"},
        ["CACES R489", "gestion des stocks"],
    ),
    (
        "o3",
        "Aide-soignant(e) en EHPAD, soins d'hygiène et de confort aux résidents",
        {"ville": "Paris", "contrat": "CDI"},
        ["soins d'hygiène", "bienveillance"],
    ),
    (
        "o4",
        "Développeur web Python / Django, API REST et bases PostgreSQL",
        {"ville": "Paris", "contrat": "CDI"},
        ["Python", "SQL"],
    ),
    (
        "o5",
        "Maçon coffreur sur chantiers de gros œuvre, lecture de plans",
        {"ville": "Nantes", "contrat": "Intérim"},
        ["coffrage", "lecture de plans"],
    ),
]


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


MAX_QUERY_TERMS = 16
MAX_FILTER_TERMS = 64


@pytest.fixture(scope="module")
def server(default_version, tmp_path_factory):
    config = make_config(collections_dir=tmp_path_factory.mktemp("collections"))
    limits = dataclasses.replace(config.limits, max_query_terms=MAX_QUERY_TERMS, max_filter_terms=MAX_FILTER_TERMS)
    running = ServerThread(dataclasses.replace(config, limits=limits))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield ipb_grpc.IndexServiceStub(channel)


@pytest.fixture(scope="module")
def offers(stub):
    stub.CreateCollection(ipb.CreateCollectionRequest(name="offres"), timeout=30)
    documents = [ipb.Document(id=i, text=t, metadata=m, skills=s) for i, t, m, s in OFFERS]
    response = stub.Upsert(ipb.UpsertRequest(collection="offres", documents=documents), timeout=60)
    assert response.upserted == len(OFFERS)
    return "offres"


@pytest.fixture(scope="module")
def random_collection(stub):
    """400 random vectors with random metadata and skills, and the exact numpy reference."""
    rng = np.random.default_rng(7)
    vectors = unit(rng, 400)
    cities = np.array(["Lyon", "Paris", "Nantes", "Lille"])
    skills_pool = ["python", "sql", "caces", "haccp", "soins"]
    meta, skills = [], []
    documents = []
    for i in range(400):
        m = {"ville": str(cities[rng.integers(4)]), "niveau": str(rng.integers(3))}
        s = [x for x in skills_pool if rng.random() < 0.4]
        meta.append(m)
        skills.append(s)
        documents.append(ipb.Document(id=f"r{i}", vector=vectors[i].tolist(), metadata=m, skills=s))
    stub.CreateCollection(ipb.CreateCollectionRequest(name="aleatoire", index=ipb.IndexSpec(kind=ipb.FLAT)), timeout=30)
    for start in range(0, len(documents), 100):  # stay under the test server's 256 KiB message limit
        stub.Upsert(ipb.UpsertRequest(collection="aleatoire", documents=documents[start : start + 100]), timeout=60)
    return vectors, meta, skills


def test_create_list_drop_and_their_errors(stub, default_version):
    created = stub.CreateCollection(ipb.CreateCollectionRequest(name="cv-2026"), timeout=30).collection
    assert (created.model, created.model_version, created.dim, created.size) == (
        "multilingual-e5-small",
        default_version.version,
        DIM,
        0,
    )
    assert created.index_kind == "flat" and created.device == "cpu"
    names = [c.name for c in stub.ListCollections(ipb.ListCollectionsRequest(), timeout=30).collections]
    assert "cv-2026" in names
    expect(lambda: stub.CreateCollection(ipb.CreateCollectionRequest(name="cv-2026"), timeout=30), grpc.StatusCode.ALREADY_EXISTS)
    expect(
        lambda: stub.CreateCollection(ipb.CreateCollectionRequest(name="Bad Name!"), timeout=30), grpc.StatusCode.INVALID_ARGUMENT
    )
    expect(
        lambda: stub.CreateCollection(ipb.CreateCollectionRequest(name="x", model="nope"), timeout=30), grpc.StatusCode.NOT_FOUND
    )
    assert stub.DropCollection(ipb.DropCollectionRequest(name="cv-2026"), timeout=30).dropped
    expect(lambda: stub.DropCollection(ipb.DropCollectionRequest(name="cv-2026"), timeout=30), grpc.StatusCode.NOT_FOUND)
    expect(lambda: stub.Search(ipb.SearchRequest(collection="cv-2026", text="x", k=1), timeout=30), grpc.StatusCode.NOT_FOUND)


def test_text_search_finds_the_matching_offer(stub, offers):
    cases = {
        "je fais du pain la nuit": "o1",
        "conduite de chariot élévateur en entrepôt": "o2",
        "prendre soin des personnes âgées en maison de retraite": "o3",
        "programmeur backend python": "o4",
        "ouvrier du bâtiment, béton et coffrage": "o5",
    }
    for text, expected in cases.items():
        hits = stub.Search(ipb.SearchRequest(collection=offers, text=text, k=2), timeout=30).hits
        assert hits[0].id == expected, (text, [h.id for h in hits])
        assert hits[0].score == pytest.approx(hits[0].dense_score)


def test_get_upsert_replace_and_delete(stub, offers):
    got = stub.Get(ipb.GetRequest(collection=offers, ids=["o2", "zzz", "o1"], include_vectors=True), timeout=30)
    assert [d.id for d in got.documents] == ["o2", "o1"] and list(got.missing) == ["zzz"]
    assert len(got.documents[0].vector) == DIM and got.documents[0].metadata["contrat"] == "CDD"
    stub.Upsert(
        ipb.UpsertRequest(
            collection=offers, documents=[ipb.Document(id="tmp", text="Serveur en brasserie", metadata={"ville": "Lille"})]
        ),
        timeout=30,
    )
    stub.Upsert(
        ipb.UpsertRequest(
            collection=offers, documents=[ipb.Document(id="tmp", text="Plombier chauffagiste", metadata={"ville": "Lyon"})]
        ),
        timeout=30,
    )
    replaced = stub.Get(ipb.GetRequest(collection=offers, ids=["tmp"]), timeout=30).documents[0]
    assert replaced.text == "Plombier chauffagiste" and replaced.metadata["ville"] == "Lyon"
    hits = stub.Search(ipb.SearchRequest(collection=offers, text="plomberie et chauffage", k=10), timeout=30).hits
    assert [h.id for h in hits].count("tmp") == 1
    assert stub.Delete(ipb.DeleteRequest(collection=offers, ids=["tmp", "absent"]), timeout=30).deleted == 1
    hits = stub.Search(ipb.SearchRequest(collection=offers, text="plomberie et chauffage", k=10), timeout=30).hits
    assert "tmp" not in [h.id for h in hits]


def exact_reference(vectors, meta, skills, query, k, cities=None, niveau=None, skills_all=(), skills_any=()):
    keep = []
    for i in range(len(vectors)):
        if cities and meta[i]["ville"] not in cities:
            continue
        if niveau and meta[i]["niveau"] != niveau:
            continue
        if any(s not in skills[i] for s in skills_all):
            continue
        if skills_any and not any(s in skills[i] for s in skills_any):
            continue
        keep.append(i)
    scores = vectors[keep] @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [f"r{keep[j]}" for j in order], scores[order]


@pytest.mark.parametrize(
    ("cities", "niveau", "skills_all", "skills_any"),
    [
        (None, None, (), ()),
        (("Lyon",), None, (), ()),
        (("Lyon", "Lille"), "1", (), ()),
        (None, None, ("python", "sql"), ()),
        (("Paris",), None, (), ("caces", "haccp")),
    ],
)
def test_filters_match_an_exact_reference(stub, random_collection, cities, niveau, skills_all, skills_any):
    vectors, meta, skills = random_collection
    rng = np.random.default_rng(hash((cities, niveau, skills_all, skills_any)) % 2**32)
    query = unit(rng, 1)[0]
    filters = []
    if cities:
        filters.append(ipb.Filter(field="ville", values=list(cities)))
    if niveau:
        filters.append(ipb.Filter(field="niveau", values=[niveau]))
    response = stub.Search(
        ipb.SearchRequest(
            collection="aleatoire",
            vector=query.tolist(),
            k=15,
            filters=filters,
            skills_all=list(skills_all),
            skills_any=list(skills_any),
        ),
        timeout=30,
    )
    ids, scores = exact_reference(vectors, meta, skills, query, 15, cities, niveau, skills_all, skills_any)
    assert [h.id for h in response.hits] == ids
    np.testing.assert_allclose([h.score for h in response.hits], scores, atol=1e-5)


def test_hybrid_search_fuses_accent_folded_lexical_matches(stub, offers):
    response = stub.Search(ipb.SearchRequest(collection=offers, text="boulangere viennoiseries", k=3, hybrid=True), timeout=30)
    top = response.hits[0]
    assert top.id == "o1" and top.lexical_rank == 1 and top.lexical_score > 0 and top.dense_rank >= 1
    assert "reciprocal rank fusion" in response.explanation
    weighted = stub.Search(
        ipb.SearchRequest(
            collection=offers, text="boulangere viennoiseries", k=3, hybrid=True, fusion=ipb.WEIGHTED, dense_weight=0.5
        ),
        timeout=30,
    )
    assert weighted.hits[0].id == "o1" and "0.5 * cosine" in weighted.explanation
    assert weighted.hits[0].score == pytest.approx(0.5 * weighted.hits[0].dense_score + 0.5 * 1.0, abs=1e-5)


def test_bad_search_and_upsert_inputs(stub, offers):
    good = [0.0] * DIM
    good[0] = 1.0
    bad = {
        "wrong dim": (ipb.SearchRequest(collection=offers, vector=[0.1] * 10, k=3), grpc.StatusCode.INVALID_ARGUMENT),
        "nan": (ipb.SearchRequest(collection=offers, vector=[float("nan")] * DIM, k=3), grpc.StatusCode.INVALID_ARGUMENT),
        "k=0": (ipb.SearchRequest(collection=offers, vector=good, k=0), grpc.StatusCode.INVALID_ARGUMENT),
        "k<0": (ipb.SearchRequest(collection=offers, vector=good, k=-4), grpc.StatusCode.INVALID_ARGUMENT),
        "k>2048": (ipb.SearchRequest(collection=offers, vector=good, k=2049), grpc.StatusCode.INVALID_ARGUMENT),
        "unknown field": (
            ipb.SearchRequest(collection=offers, vector=good, k=3, filters=[ipb.Filter(field="salaire", values=["2000"])]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "other model": (
            ipb.SearchRequest(collection=offers, vector=good, k=3, vector_model="all-MiniLM-L6-v2"),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        "no query": (ipb.SearchRequest(collection=offers, k=3), grpc.StatusCode.INVALID_ARGUMENT),
        "hybrid without text": (
            ipb.SearchRequest(collection=offers, vector=good, k=3, hybrid=True),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    }
    for name, (request, code) in bad.items():
        details = expect(lambda request=request: stub.Search(request, timeout=30), code)
        assert details, name
    bad_upserts = [
        ipb.UpsertRequest(collection=offers),
        ipb.UpsertRequest(collection=offers, documents=[ipb.Document(id="v", vector=[1.0] * 5)]),
        ipb.UpsertRequest(collection=offers, documents=[ipb.Document(id="n", vector=[float("inf")] * DIM)]),
        ipb.UpsertRequest(collection=offers, documents=[ipb.Document(text="sans id")]),
        ipb.UpsertRequest(collection=offers, documents=[ipb.Document(id="vide")]),
        ipb.UpsertRequest(collection=offers, documents=[ipb.Document(id="d", text="a"), ipb.Document(id="d", text="b")]),
    ]
    for request in bad_upserts:
        expect(lambda request=request: stub.Upsert(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
    size = next(c.size for c in stub.ListCollections(ipb.ListCollectionsRequest(), timeout=30).collections if c.name == offers)
    assert size == len(OFFERS)


def test_a_maximal_hybrid_query_keeps_its_first_max_query_terms_terms(stub, offers):
    """~2,600 distinct words would be as many OR'ed FTS terms: only the first limits.max_query_terms are searched."""
    filler = " ".join(f"mot{i}" for i in range(2_600))[:19_000]

    def lexical_ranks(text: str) -> dict[str, int]:
        hits = stub.Search(ipb.SearchRequest(collection=offers, text=text, k=5, hybrid=True), timeout=60).hits
        return {h.id: h.lexical_rank for h in hits}

    assert lexical_ranks("viennoiseries " + filler)["o1"] == 1
    late = " ".join(f"mot{i}" for i in range(MAX_QUERY_TERMS)) + " viennoiseries"
    assert lexical_ranks(late).get("o1", 0) == 0  # its 17th term: past the cap, not searched
    assert lexical_ranks(filler + " viennoiseries").get("o1", 0) == 0


def test_filter_lists_over_max_filter_terms_are_invalid_argument_naming_the_key(stub, offers):
    """About 1,000 conditions would overflow SQLite's expression tree (INTERNAL): refused before the query."""
    good = [1.0] + [0.0] * (DIM - 1)
    requests = {
        "skills_all": ipb.SearchRequest(collection=offers, vector=good, k=3, skills_all=[f"s{i}" for i in range(1_000)]),
        "filters": ipb.SearchRequest(
            collection=offers, vector=good, k=3, filters=[ipb.Filter(field="ville", values=["Lyon"])] * 1_000
        ),
        "values": ipb.SearchRequest(
            collection=offers, vector=good, k=3, filters=[ipb.Filter(field="ville", values=["Lyon"] * (MAX_FILTER_TERMS + 1))]
        ),
        "skills_any": ipb.SearchRequest(collection=offers, vector=good, k=3, skills_any=["x"] * (MAX_FILTER_TERMS + 1)),
    }
    for name, request in requests.items():
        details = expect(lambda request=request: stub.Search(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
        assert f"over the limit of {MAX_FILTER_TERMS} (limits.max_filter_terms)" in details, name
    at_limit = ipb.SearchRequest(
        collection=offers, vector=good, k=3, filters=[ipb.Filter(field="ville", values=["Lyon"])] * MAX_FILTER_TERMS
    )
    assert {h.id for h in stub.Search(at_limit, timeout=30).hits} == {"o1", "o2"}


def test_own_vectors_must_come_from_the_collections_model_and_have_unit_length(stub, default_version):
    name = "propres-vecteurs"
    stub.CreateCollection(ipb.CreateCollectionRequest(name=name), timeout=30)
    vector = unit(np.random.default_rng(3), 1)[0]

    def upsert(values, vector_model: str = "") -> None:
        document = ipb.Document(id="v", vector=list(values), vector_model=vector_model)
        stub.Upsert(ipb.UpsertRequest(collection=name, documents=[document]), timeout=30)

    for other in ("all-MiniLM-L6-v2", "multilingual-e5-small/not-this-version"):
        details = expect(lambda other=other: upsert(vector, other), grpc.StatusCode.FAILED_PRECONDITION)
        assert other in details and "documents[0]" in details
    details = expect(lambda: upsert(10 * vector), grpc.StatusCode.INVALID_ARGUMENT)
    assert details.startswith("documents[0].vector has norm 10;")
    expect(
        lambda: stub.Search(ipb.SearchRequest(collection=name, vector=(10 * vector).tolist(), k=1), timeout=30),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    infos = stub.ListCollections(ipb.ListCollectionsRequest(), timeout=30).collections
    assert next(c.size for c in infos if c.name == name) == 0  # every refusal came before the write
    upsert(vector)  # empty: the collection's model
    upsert(vector, "multilingual-e5-small")
    upsert(vector, f"multilingual-e5-small/{default_version.version}")
    hit = stub.Search(ipb.SearchRequest(collection=name, vector=vector.tolist(), k=1), timeout=30).hits[0]
    assert hit.id == "v" and hit.score == pytest.approx(1.0, abs=1e-5)
    got = stub.Get(ipb.GetRequest(collection=name, ids=["v"], include_vectors=True), timeout=30).documents[0]
    assert got.vector_model == f"multilingual-e5-small/{default_version.version}"


@pytest.mark.parametrize("kind", [ipb.HNSW, ipb.IVF])
def test_approximate_index_kinds_serve_searches(stub, kind):
    name = f"kind-{kind}"
    stub.CreateCollection(ipb.CreateCollectionRequest(name=name, index=ipb.IndexSpec(kind=kind, flat_max=100)), timeout=30)
    vectors = unit(np.random.default_rng(kind), 300)
    documents = [ipb.Document(id=f"v{i}", vector=v.tolist()) for i, v in enumerate(vectors)]
    for start in range(0, len(documents), 100):
        stub.Upsert(ipb.UpsertRequest(collection=name, documents=documents[start : start + 100]), timeout=60)
    expected_kind = "hnsw" if kind == ipb.HNSW else "ivf"
    deadline = time.monotonic() + 120  # the switch to an approximate index is a background rebuild
    while True:
        info = next(c for c in stub.ListCollections(ipb.ListCollectionsRequest(), timeout=30).collections if c.name == name)
        if info.index_kind == expected_kind or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert info.index_kind == expected_kind and info.size == 300
    found = sum(
        stub.Search(ipb.SearchRequest(collection=name, vector=vectors[i].tolist(), k=1), timeout=30).hits[0].id == f"v{i}"
        for i in range(0, 300, 10)
    )
    assert found >= 27  # self-retrieval on an approximate index


def test_collections_survive_a_restart_and_a_corrupt_snapshot(default_version, tmp_path):
    first = ServerThread(make_config(collections_dir=tmp_path))
    try:
        with grpc.insecure_channel(first.address) as channel:
            stub = ipb_grpc.IndexServiceStub(channel)
            stub.CreateCollection(ipb.CreateCollectionRequest(name="durable"), timeout=30)
            docs = [ipb.Document(id=i, text=t, metadata=m, skills=s) for i, t, m, s in OFFERS]
            stub.Upsert(ipb.UpsertRequest(collection="durable", documents=docs), timeout=60)
            stub.Delete(ipb.DeleteRequest(collection="durable", ids=["o5"]), timeout=30)
    finally:
        first.stop()
    (tmp_path / "durable" / "index.faiss").write_bytes(b"not an index")
    second = ServerThread(make_config(collections_dir=tmp_path))
    try:
        with grpc.insecure_channel(second.address) as channel:
            stub = ipb_grpc.IndexServiceStub(channel)
            info = stub.ListCollections(ipb.ListCollectionsRequest(), timeout=30).collections[0]
            assert info.size == 4
            hits = stub.Search(ipb.SearchRequest(collection="durable", text="programmeur python", k=4), timeout=30).hits
            assert hits[0].id == "o4" and "o5" not in [h.id for h in hits]
    finally:
        second.stop()
