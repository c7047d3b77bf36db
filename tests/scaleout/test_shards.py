"""Sharded collections on real CollectionManagers in temp folders, reached in process (no Ray cluster).

The reference is one unsharded CollectionManager holding the same documents: a sharded search must
return what it returns. Calls go through LocalShardBackend, which pickles them as Ray would.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import grpc
import numpy as np
import pytest

from openemploi.api.errors import Resource, details_for, status_for
from openemploi.api.index import collection_info
from openemploi.index.collection import (
    CollectionManager,
    CollectionNotFound,
    CollectionReplaced,
    CollectionSpec,
    InvalidQuery,
    ShardUnavailable,
)
from openemploi.index.search import SearchQuery
from openemploi.index.store import NewDocument
from openemploi.index.vectors import IndexParams
from openemploi.scaleout.shard_service import ShardService
from openemploi.scaleout.shards import FENCE_HOLD_S, LocalShardBackend, ShardedCollectionManager, route

DIM = 16
REGIONS = ("idf", "bretagne", "occitanie")
SKILLS = ("soudure", "caces", "cuisine", "comptabilite")


def unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def vector_of(text: str, salt: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256((salt + text).encode()).digest()[:8], "little")
    return unit(np.random.default_rng(seed))[0]


def open_shards(root: Path, count: int) -> ShardedCollectionManager:
    return ShardedCollectionManager([LocalShardBackend(ShardService(root / f"shard-{i}")) for i in range(count)])


def spec(name: str = "offres", model: str = "m1", version: str = "v1") -> CollectionSpec:
    return CollectionSpec(name, model, version, DIM, IndexParams(kind="flat"))


def random_docs(rng: np.random.Generator, n: int, prefix: str = "doc") -> list[NewDocument]:
    vectors = unit(rng, n)
    docs = []
    for i in range(n):
        metadata = {"region": REGIONS[int(rng.integers(len(REGIONS)))]}
        skills = tuple(s for s in SKILLS if rng.random() < 0.4)
        docs.append(NewDocument(f"{prefix}-{i:05d}", f"offre {prefix} {i}", vectors[i], metadata, skills))
    return docs


@pytest.fixture
def pair(tmp_path):
    """(sharded over 3 parts, one reference collection), both empty; closed at the end."""
    sharded = open_shards(tmp_path / "sharded", 3)
    reference = CollectionManager(tmp_path / "single")
    yield sharded, reference
    sharded.close()
    reference.close()


def both(pair, documents, deletes=()):
    sharded, reference = pair
    a, b = sharded.create(spec()), reference.create(spec())
    for start in range(0, len(documents), 250):  # several batches: parts see interleaved sequences
        a.upsert(documents[start : start + 250])
        b.upsert(documents[start : start + 250])
    if deletes:
        assert a.delete(list(deletes)) == b.delete(list(deletes))
    return a, b


def dense_view(result):
    return [(h.document.id, h.score, h.dense_score, h.dense_rank, h.document.text, h.document.metadata) for h in result.hits]


def same_dense(got, expected, exact_scores: bool) -> None:
    """Same hits in the same order; scores bitwise equal from the index, within float32 rounding when a
    filter sent the search to numpy's exact scoring (its rounding depends on which rows it scores together,
    in one collection too)."""
    strip = [(i, rank, text, meta) for i, _, _, rank, text, meta in dense_view(expected)]
    assert [(i, rank, text, meta) for i, _, _, rank, text, meta in dense_view(got)] == strip
    tolerance = 0.0 if exact_scores else 1e-6
    assert [h.score for h in got.hits] == pytest.approx([h.score for h in expected.hits], abs=tolerance, rel=0)
    assert [h.dense_score for h in got.hits] == [h.score for h in got.hits]


def test_dense_search_equals_one_collection(pair):
    rng = np.random.default_rng(7)
    documents = random_docs(rng, 900)
    updated = [NewDocument(d.id, d.text + " maj", unit(rng)[0], d.metadata, d.skills) for d in documents[:100]]
    a, b = both(pair, documents, deletes=[d.id for d in documents[100:160]])
    a.upsert(updated)
    b.upsert(updated)
    assert a.size() == b.size() == 840
    queries = [
        {},
        {"filters": (("region", ("idf",)),)},
        {"filters": (("region", ("idf", "bretagne")),), "skills_all": ("Soudure",)},
        {"skills_any": ("caces", "cuisine")},
    ]
    for extra in queries:
        for k in (1, 10, 100, 2048):
            query = SearchQuery(vector=unit(rng)[0], k=k, **extra)
            expected = b.search(query)
            same_dense(a.search(query), expected, exact_scores=not extra)
            assert expected.hits and (len(expected.hits) == k or k > 100)
    with_vectors = SearchQuery(vector=unit(rng)[0], k=5, include_vectors=True)
    for x, y in zip(a.search(with_vectors).hits, b.search(with_vectors).hits, strict=True):
        np.testing.assert_array_equal(x.document.vector, y.document.vector)


def test_a_filter_field_only_some_parts_hold_filters_like_one_collection(pair):
    rng = np.random.default_rng(3)
    documents = random_docs(rng, 60)
    rare = next(d for d in documents if route(d.id, 3) == 2)
    documents = [NewDocument(d.id, d.text, d.vector, {**d.metadata, "contrat": "cdi"}) if d is rare else d for d in documents]
    a, b = both(pair, documents)
    query = SearchQuery(vector=unit(rng)[0], k=5, filters=(("contrat", ("cdi",)),))
    same_dense(a.search(query), b.search(query), exact_scores=False)
    assert a.search(query).hits[0].document.id == rare.id
    unknown = SearchQuery(vector=unit(rng)[0], k=5, filters=(("salaire", ("haut",)),))
    with pytest.raises(InvalidQuery) as single:
        b.search(unknown)
    with pytest.raises(InvalidQuery) as sharded:
        a.search(unknown)
    assert str(sharded.value) == str(single.value)
    with pytest.raises(InvalidQuery, match="k must be between"):
        a.search(SearchQuery(vector=unit(rng)[0], k=0))


def lexically_even_docs(rng: np.random.Generator, parts: int, per_part: int, with_term: int) -> list[NewDocument]:
    """Documents whose parts have the same lexical statistics for the term 'plombier' (document count,
    documents holding it, total length), with every (term count, length) pair different: one-term bm25
    is then the same up to a factor on every part, and no two candidates tie. Ids sort in insertion order."""
    pairs = [(tf, length) for tf in (1, 2, 3) for length in range(tf + 1, 40)]
    chosen = [pairs[i] for i in rng.permutation(len(pairs))[: parts * with_term]]
    shaped: list[list[tuple[int, int]]] = [chosen[p * with_term : (p + 1) * with_term] for p in range(parts)]
    fillers = per_part - with_term
    totals = [sum(length for _, length in shape) + 3 * (fillers - 1) for shape in shaped]
    target = max(totals) + 5
    texts: list[list[str]] = []
    for shape, total in zip(shaped, totals):
        words = [" ".join(["plombier"] * tf + ["chauffage"] * (length - tf)) for tf, length in shape]
        words += ["cuisine service salle"] * (fillers - 1) + [" ".join(["cuisine"] * (3 + target - total))]
        texts.append(words)
    queues: list[list[str]] = [list(t) for t in texts]
    documents, n = [], 0
    while any(queues):
        doc_id = f"doc-{n:06d}"
        n += 1
        queue = queues[route(doc_id, parts)]
        if queue:
            documents.append(NewDocument(doc_id, queue.pop(), unit(rng)[0]))
    return documents


def hybrid_view(result):
    return [(h.document.id, h.dense_score, h.dense_rank, h.lexical_rank) for h in result.hits]


def test_hybrid_search_equals_one_collection_when_part_statistics_agree(pair):
    rng = np.random.default_rng(11)
    a, b = both(pair, lexically_even_docs(rng, parts=3, per_part=40, with_term=12))
    for fusion in ("rrf", "weighted"):
        for k in (5, 20, 120):
            query = SearchQuery(vector=unit(rng)[0], k=k, text="plombier", hybrid=True, fusion=fusion)
            got, expected = a.search(query), b.search(query)
            assert hybrid_view(got) == hybrid_view(expected)
            assert [h.score for h in got.hits] == pytest.approx([h.score for h in expected.hits], abs=1e-6)
            assert got.explanation == expected.explanation
            assert any(h.lexical_rank for h in got.hits) and any(h.dense_rank for h in got.hits)


def test_weighted_fusion_normalises_bm25_by_the_best_of_all_parts(pair):
    rng = np.random.default_rng(5)
    documents = random_docs(rng, 90)
    documents = [NewDocument(d.id, f"{d.text} plombier" if i % 3 == 0 else d.text, d.vector) for i, d in enumerate(documents)]
    a, _ = both(pair, documents)
    weight = 0.6
    result = a.search(
        SearchQuery(vector=unit(rng)[0], k=200, text="plombier chauffage", hybrid=True, fusion="weighted", dense_weight=weight)
    )
    best = max(h.lexical_score for h in result.hits)
    part_best = {route(h.document.id, 3): 0.0 for h in result.hits}
    for h in result.hits:
        part_best[route(h.document.id, 3)] = max(part_best[route(h.document.id, 3)], h.lexical_score)
    assert best > 0 and min(part_best.values()) < best  # a part normalised on its own would score its best as 1
    for h in result.hits:
        assert h.score == pytest.approx(weight * h.dense_score + (1 - weight) * h.lexical_score / best, abs=1e-6)


def test_routing_is_stable_and_each_part_holds_its_documents(tmp_path):
    assert [route(f"offre-{i}", 4) for i in range(8)] == [route(f"offre-{i}", 4) for i in range(8)]
    assert route("offre-1", 4) == int.from_bytes(hashlib.blake2b(b"offre-1", digest_size=8).digest(), "big") % 4
    manager = open_shards(tmp_path, 3)
    documents = random_docs(np.random.default_rng(1), 200)
    collection = manager.create(spec(), shards=3)
    assert collection.upsert(documents) == 200  # the collection's sequence: the sum of its parts'
    for i, backend in enumerate(manager.backends):
        part = backend.service.manager.get("offres")
        assert part.store.live_ids() == {d.id for d in documents if route(d.id, 3) == i}
        assert 0 < part.size() < 200
    found = collection.get(["doc-00003", "doc-00150", "absent"], include_vectors=True)
    assert set(found) == {"doc-00003", "doc-00150"}
    np.testing.assert_array_equal(found["doc-00150"].vector, documents[150].vector)
    assert collection.delete(["doc-00003", "doc-00150", "absent"]) == 2
    assert collection.size() == 198 and collection.store.last_seq() == 202
    manager.close()


def test_a_batch_with_one_bad_vector_stores_nothing_on_any_part(tmp_path):
    manager = open_shards(tmp_path, 2)
    collection = manager.create(spec())
    documents = random_docs(np.random.default_rng(2), 20)
    bad = NewDocument("bad", "x", np.full(DIM, np.nan, np.float32))
    with pytest.raises(InvalidQuery, match="NaN"):
        collection.upsert([*documents, bad])
    assert collection.size() == 0
    manager.close()


def test_shard_count_is_checked_recorded_and_honoured_after_a_restart(tmp_path):
    manager = open_shards(tmp_path, 3)
    for count in (0, 4):
        with pytest.raises(InvalidQuery, match="shard count must be between 1 and 3") as refused:
            manager.create(spec(), shards=count)
        assert status_for(refused.value).code == grpc.StatusCode.INVALID_ARGUMENT
    two = manager.create(spec(), shards=2)
    catalogue = manager.create(spec("rome"), shards=1)
    documents = random_docs(np.random.default_rng(4), 120)
    two.upsert(documents)
    catalogue.upsert(documents[:10])
    catalogue.store.set_info({"catalogue_version": "2025-01"})
    assert manager.backends[2].service.manager.names() == []
    query = SearchQuery(vector=documents[0].vector, k=7)
    before = dense_view(two.search(query))
    manager.close()

    reopened = open_shards(tmp_path, 3)
    assert reopened.names() == ["offres", "rome"]
    again = reopened.get("offres")
    assert (again.count, again.size(), again.spec) == (2, 120, two.spec)
    assert dense_view(again.search(query)) == before
    assert set(again.get([d.id for d in documents])) == {d.id for d in documents}
    rome = reopened.get("rome")
    assert (rome.count, rome.size(), rome.store.get_info("catalogue_version")) == (1, 10, "2025-01")
    info = collection_info(again)  # what ListCollections answers
    assert (info.size, info.index_kind, info.last_sequence, info.created_at) == (120, "flat", 120, two.spec.created_at)
    reopened.close()


def test_drop_removes_every_part_and_a_half_dropped_collection_never_serves(tmp_path):
    manager = open_shards(tmp_path, 3)
    collection = manager.create(spec())
    collection.upsert(random_docs(np.random.default_rng(6), 60))
    manager.drop("offres")
    assert manager.names() == [] and all(b.service.manager.names() == [] for b in manager.backends)
    with pytest.raises(CollectionNotFound):
        manager.drop("offres")
    with pytest.raises(CollectionNotFound) as missing:
        manager.get("offres")
    assert details_for(missing.value).resource == Resource("collection", "offres")  # rebuilt whole on this side

    # A crash after shard 0's part went (it is dropped first) leaves parts 1 and 2: the collection is gone.
    old = manager.create(spec())
    old.upsert(random_docs(np.random.default_rng(8), 60, prefix="old"))
    manager.call(0, "drop_part", "offres", old.ref.shard_set)
    manager.close()
    restarted = open_shards(tmp_path, 3)
    assert restarted.names() == []
    with pytest.raises(CollectionNotFound):
        restarted.get("offres")
    # Creating the name again replaces the orphans: nothing of the old creation comes back.
    fresh = restarted.create(spec())
    assert fresh.size() == 0 and fresh.get(["old-00001", "old-00002", "old-00003"]) == {}
    with pytest.raises(CollectionReplaced):  # a gateway still holding the old collection is refused, not served
        restarted.call(1, "info", old.ref)
    restarted.close()


def test_a_creation_cut_short_is_invisible_and_can_be_done_again(tmp_path):
    manager = open_shards(tmp_path, 3)
    manager.call(1, "create_part", spec(), "unfinished", 1, 3)  # parts 1..n-1 first, shard 0 last
    manager.call(2, "create_part", spec(), "unfinished", 2, 3)
    manager.backends[0].service.manager.create(spec())  # shard 0's, before its place was recorded
    assert manager.names() == []
    with pytest.raises(CollectionNotFound):
        manager.get("offres")
    collection = manager.create(spec())
    collection.upsert(random_docs(np.random.default_rng(9), 30))
    assert collection.size() == 30 and manager.names() == ["offres"]
    manager.close()


class UnreachableShard:
    """A shard whose replica is gone, as RayShardBackend reports it."""

    def submit(self, method, *args):
        raise ShardUnavailable(f"CollectionShard1 did not answer {method} (ActorDiedError); retry")

    def close(self):
        pass


def test_an_unreachable_shard_fails_the_call_with_unavailable_and_its_writes_come_back(tmp_path):
    manager = open_shards(tmp_path, 2)
    collection = manager.create(spec())
    documents = random_docs(np.random.default_rng(10), 80)
    collection.upsert(documents)
    query = SearchQuery(vector=documents[5].vector, k=10)
    before = dense_view(collection.search(query))
    manager.close()

    down = ShardedCollectionManager([LocalShardBackend(ShardService(tmp_path / "shard-0")), UnreachableShard()])
    with pytest.raises(ShardUnavailable) as failed:
        down.get("offres").search(query)
    assert status_for(failed.value).code == grpc.StatusCode.UNAVAILABLE
    down.close()

    back = open_shards(tmp_path, 2)  # the replica restarted on its folder
    assert back.get("offres").size() == 80 and dense_view(back.get("offres").search(query)) == before
    back.close()


async def new_model(texts: list[str]) -> np.ndarray:
    return np.stack([vector_of(t, "m2") for t in texts])


def test_reembed_switches_every_part_and_keeps_writes_made_meanwhile(tmp_path):
    manager = open_shards(tmp_path, 3)
    collection = manager.create(spec())
    documents = [NewDocument(f"d{i}", f"offre {i}", vector_of(f"offre {i}", "m1")) for i in range(700)]
    collection.upsert(documents)
    calls = 0

    async def embed(texts: list[str]) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 1:  # a write that lands while the copy runs, with the old model's vector
            await asyncio.to_thread(collection.upsert, [NewDocument("late", "offre tardive", vector_of("offre tardive", "m1"))])
            await asyncio.to_thread(collection.delete, ["d0"])
        return await new_model(texts)

    switched = asyncio.run(manager.reembed("offres", "m2", "v2", DIM, embed, progress=False))
    assert (switched.spec.model, switched.spec.model_version, switched.count) == ("m2", "v2", 3)
    assert switched.size() == 700
    found = switched.get(["late", "d0", "d1", "d699"], include_vectors=True)
    assert set(found) == {"late", "d1", "d699"}
    for doc in found.values():
        np.testing.assert_array_equal(doc.vector, vector_of(doc.text, "m2"))
    with pytest.raises(CollectionReplaced):  # the old handle meets parts on another model: refused, not mixed
        collection.search(SearchQuery(vector=vector_of("offre 1", "m1"), k=3))
    hits = manager.get("offres").search(SearchQuery(vector=vector_of("offre 1", "m2"), k=1)).hits
    assert hits[0].document.id == "d1"
    manager.close()


def test_a_reembed_cut_short_between_switches_refuses_searches_until_run_again(tmp_path):
    manager = open_shards(tmp_path, 2)
    collection = manager.create(spec())
    collection.upsert([NewDocument(f"d{i}", f"offre {i}", vector_of(f"offre {i}", "m1")) for i in range(50)])
    ref = collection.ref
    for i in (0, 1):  # what reembed() does, up to the gateway dying after shard 1's switch
        assert manager.call(i, "reembed_begin", ref, "m2", "v2", DIM)
        rows, _ = manager.call(i, "reembed_rows", ref, 0)
        texts = [d.text for d, _ in rows]
        manager.call(i, "reembed_put", ref, [NewDocument(d.id, d.text, vector_of(d.text, "m2")) for d, _ in rows])
        manager.call(i, "reembed_fence", ref, FENCE_HOLD_S)
        assert texts
    manager.call(1, "reembed_switch", ref, 10_000)
    manager.call(0, "reembed_abort", ref)  # the fence of the dead gateway's job lifts

    stale = manager.get("offres")
    assert stale.spec.model_version == "v1"  # shard 0 names the collection's model: it had not switched
    with pytest.raises(CollectionReplaced):
        stale.search(SearchQuery(vector=vector_of("offre 1", "m1"), k=3))
    switched = asyncio.run(manager.reembed("offres", "m2", "v2", DIM, new_model, progress=False))
    assert switched.spec.model_version == "v2" and switched.size() == 50
    assert switched.search(SearchQuery(vector=vector_of("offre 7", "m2"), k=1)).hits[0].document.id == "d7"
    manager.close()


def test_a_failed_reembed_leaves_the_collection_on_its_model_and_writable(tmp_path):
    manager = open_shards(tmp_path, 2)
    collection = manager.create(spec())
    collection.upsert([NewDocument(f"d{i}", f"offre {i}", vector_of(f"offre {i}", "m1")) for i in range(600)])

    async def failing(texts: list[str]) -> np.ndarray:
        raise RuntimeError("embedder lost")

    with pytest.raises(RuntimeError, match="embedder lost"):  # the embedder's own error, not a group of them
        asyncio.run(manager.reembed("offres", "m2", "v2", DIM, failing, progress=False))
    assert not any((tmp_path / f"shard-{i}" / ".reembed-offres").exists() for i in (0, 1))
    current = manager.get("offres")
    assert current.spec.model_version == "v1" and current.size() == 600
    current.upsert([NewDocument("after", "offre apres", vector_of("offre apres", "m1"))])

    # A fence lifted by an abort (its gateway gave up) frees the writers at once.
    ref = current.ref
    manager.call(0, "reembed_begin", ref, "m2", "v2", DIM)
    manager.call(0, "reembed_fence", ref, FENCE_HOLD_S)
    part = manager.backends[0].service.manager.get("offres")
    assert not part._write_lock.acquire(blocking=False)
    manager.call(0, "reembed_abort", ref)
    assert part._write_lock.acquire(blocking=False)
    part._write_lock.release()
    assert asyncio.run(manager.reembed("offres", "m2", "v2", DIM, new_model, progress=False)).size() == 601
    manager.close()
