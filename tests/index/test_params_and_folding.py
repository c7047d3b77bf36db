"""Index parameters that FAISS cannot use are refused at creation, a collection that cannot open is set
aside while the others serve, and the lexical side folds words exactly as queries do (œ, æ, ß, ’)."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from openemploi.index.collection import (
    Collection,
    CollectionManager,
    CollectionSpec,
    CollectionUnavailable,
    InvalidQuery,
)
from openemploi.index.search import SearchQuery
from openemploi.index.store import NewDocument
from openemploi.index.vectors import IndexParams

DIM = 8


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


@pytest.mark.parametrize(
    ("params", "named"),
    [(IndexParams(kind="ivf", ivf_nlist=50_000), "ivf_nlist"), (IndexParams(kind="hnsw", hnsw_m=100_000), "hnsw_m")],
)
def test_unbounded_index_parameters_are_refused_at_creation(tmp_path, params, named):
    manager = CollectionManager(tmp_path)
    with pytest.raises(InvalidQuery, match=named):
        manager.create(CollectionSpec("offres", "m", "v1", DIM, params))
    assert manager.names() == []
    manager.close()


def test_an_existing_ivf_collection_with_more_lists_than_vectors_still_takes_writes(tmp_path):
    """Created before the bounds (no manager check): training must not fail after the commit."""
    params = IndexParams(kind="ivf", ivf_nlist=5_000, flat_max=20)
    collection = Collection.create(tmp_path / "offres", CollectionSpec("offres", "m", "v1", DIM, params))
    collection.upsert([NewDocument(f"d{i}", "x", unit(i)) for i in range(30)])
    assert collection.rebuilds.join(60) and collection.rebuilds.failed == 0  # the switch to IVF runs in the background
    assert collection.index.kind == "ivf" and collection.size() == 30
    collection.close()


def test_a_collection_that_cannot_open_is_set_aside_and_the_others_serve(tmp_path):
    manager = CollectionManager(tmp_path)
    manager.create(CollectionSpec("bonne", "m", "v1", DIM)).upsert([NewDocument("d", "x", unit(1))])
    manager.create(CollectionSpec("cassee", "m", "v1", DIM))
    manager.close()
    with sqlite3.connect(tmp_path / "cassee" / "store.sqlite") as db:
        db.execute("UPDATE info SET value='{\"kind\": \"nope\"}' WHERE key='index_params'")
    restarted = CollectionManager(tmp_path)
    assert restarted.names() == ["bonne"] and restarted.get("bonne").size() == 1
    with pytest.raises(CollectionUnavailable, match="cassee"):
        restarted.get("cassee")
    restarted.drop("cassee")  # the way out: drop it
    assert sorted(p.name for p in tmp_path.iterdir() if "cassee" in p.name) == []
    restarted.close()


FOLDED = {
    "Manœuvre en entrepôt": "manoeuvre",
    "Œnologue en Bourgogne": "oenologue",
    "Main-d’œuvre qualifiée": "d'œuvre",
    "L’apprentie du port": "l'apprentie",
    "Cæcilia, ex-libris": "caecilia",
    "Straße und Bau": "strasse",
    "Responsable ﬁnance": "finance",
}


def lexical_ids(collection: Collection, text: str) -> list[str]:
    query = SearchQuery(vector=unit(0), k=10, text=text, hybrid=True)
    return [h.document.id for h in collection.search(query).hits if h.lexical_score > 0]


@pytest.mark.parametrize(("text", "query"), list(FOLDED.items()))
def test_ligatures_and_apostrophes_match_on_the_lexical_side(tmp_path, text, query):
    collection = Collection.create(tmp_path / "offres", CollectionSpec("offres", "m", "v1", DIM))
    collection.upsert([NewDocument("hit", text, unit(1)), NewDocument("other", "Boulanger à Lyon", unit(2))])
    assert lexical_ids(collection, query) == ["hit"]
    assert lexical_ids(collection, text) == ["hit"]  # the original spelling folds the same way
    collection.close()


def test_a_lexical_side_indexed_with_an_older_folding_is_rebuilt_at_open(tmp_path):
    folder = tmp_path / "offres"
    collection = Collection.create(folder, CollectionSpec("offres", "m", "v1", DIM))
    collection.upsert([NewDocument(f"d{i}", text, unit(i)) for i, text in enumerate(FOLDED)])
    collection.close()
    with sqlite3.connect(folder / "store.sqlite") as db:  # as an older server left it: the raw text
        rows = db.execute("SELECT seq, text FROM docs WHERE dead_at IS NULL").fetchall()
        db.execute("DELETE FROM fts")
        db.executemany("INSERT INTO fts(rowid, text) VALUES (?, ?)", rows)
        db.execute("DELETE FROM info WHERE key='lexical_form'")
    reopened = Collection.open(folder)
    for i, query in enumerate(FOLDED.values()):
        assert lexical_ids(reopened, query) == [f"d{i}"], query
    reopened.close()
