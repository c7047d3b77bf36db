"""A crash between the steps of an index snapshot: the reopened collection holds each live document once.

The snapshot is cut in two ways: in-process, by a rename that "crashes" (raises a BaseException the
code does not catch, and the collection is abandoned unclosed) after the k-th file rename; and for
real, by a child process that SIGKILLs itself at a crash point of openemploi.index.durable.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest

from openemploi.index import snapshot
from openemploi.index.collection import Collection, CollectionSpec
from openemploi.index.durable import SNAPSHOT_RENAMED, SNAPSHOT_WRITTEN
from openemploi.index.search import SearchQuery
from openemploi.index.snapshot import IndexState
from openemploi.index.store import NewDocument
from openemploi.index.vectors import IndexParams

DIM = 16


class SimulatedCrash(BaseException):
    """Not an Exception: no handler of the code under test runs, as after a SIGKILL."""


def documents(start: int, n: int, rng: np.random.Generator) -> list[NewDocument]:
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [NewDocument(f"doc-{start + i}", f"offre {start + i}", vectors[i]) for i in range(n)]


def fill(collection: Collection, rng: np.random.Generator) -> dict[str, NewDocument]:
    """A snapshot, then replacements and deletes after it: what replay must apply exactly once."""
    live = {d.id: d for d in documents(0, 120, rng)}
    collection.upsert(list(live.values()))
    collection.snapshot()
    replaced = documents(0, 30, rng)  # same ids, new vectors
    collection.upsert(replaced)
    live.update((d.id, d) for d in replaced)
    collection.delete([f"doc-{i}" for i in range(30, 60)])
    for i in range(30, 60):
        del live[f"doc-{i}"]
    added = documents(200, 40, rng)
    collection.upsert(added)
    live.update((d.id, d) for d in added)
    return live


def assert_each_once(collection: Collection, live: dict[str, NewDocument]) -> None:
    assert collection.size() == len(live)
    assert collection.index.ntotal == len(live)
    for doc in live.values():
        hits = collection.search(SearchQuery(vector=doc.vector, k=10)).hits
        ids = [h.document.id for h in hits]
        assert ids[0] == doc.id and len(ids) == len(set(ids)), f"{doc.id}: {ids}"
    for i in range(30, 60):  # deleted after the first snapshot: never back
        assert collection.get([f"doc-{i}"]) == {}


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
@pytest.mark.parametrize("crash_after_renames", [1, 2, 3])
def test_a_crash_between_snapshot_renames_never_duplicates_or_resurrects(tmp_path, monkeypatch, kind, crash_after_renames):
    folder = tmp_path / "offres"
    collection = Collection.create(folder, CollectionSpec("offres", "m", "v1", DIM, IndexParams(kind=kind)))
    live = fill(collection, np.random.default_rng(crash_after_renames))
    real_replace = os.replace
    renames = []

    def replace_then_crash(source, target):
        real_replace(source, target)
        renames.append(target)
        if len(renames) == crash_after_renames:
            raise SimulatedCrash(f"after renaming to {target}")

    monkeypatch.setattr(os, "replace", replace_then_crash)
    try:
        collection.snapshot()
    except SimulatedCrash:
        pass
    monkeypatch.setattr(os, "replace", real_replace)
    reopened = Collection.open(folder)  # the crashed collection is abandoned unclosed
    assert_each_once(reopened, live)
    reopened.close()


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_snapshot_crash import fill
    from openemploi.index.collection import Collection, CollectionSpec
    from openemploi.index.durable import set_crash_hook
    from openemploi.index.vectors import IndexParams

    collection = Collection.create(Path({folder!r}), CollectionSpec("offres", "m", "v1", 16, IndexParams(kind={kind!r})))
    fill(collection, np.random.default_rng(7))
    set_crash_hook(lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == {step!r} else None)
    collection.snapshot()
    """
)


@pytest.mark.parametrize("step", [SNAPSHOT_WRITTEN, SNAPSHOT_RENAMED])
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_sigkill_at_each_snapshot_step_reopens_whole(tmp_path, step, kind):
    folder = tmp_path / "offres"
    code = CHILD.format(tests=str(Path(__file__).parent), folder=str(folder), kind=kind, step=step)
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    live = fill(Collection.create(tmp_path / "expected", CollectionSpec("x", "m", "v1", DIM)), np.random.default_rng(7))
    reopened = Collection.open(folder)
    assert_each_once(reopened, live)
    reopened.close()


def _forge(folder: Path, state: IndexState, seq: int) -> None:
    snapshot.write_temp(folder, state, seq, DIM)
    snapshot.switch(folder)


def _index_of(kind: str, ids: np.ndarray, vectors: np.ndarray):
    index = faiss.index_factory(DIM, {"flat": "IDMap2,Flat", "hnsw": "IDMap2,HNSW8"}[kind], faiss.METRIC_INNER_PRODUCT)
    index.add_with_ids(vectors, ids)
    return index


@pytest.mark.parametrize("defect", ["duplicate ids", "deleted vector", "kind lies", "torn"])
def test_a_snapshot_that_disagrees_with_the_store_is_rebuilt_with_a_warning(tmp_path, caplog, defect):
    folder = tmp_path / "offres"
    collection = Collection.create(folder, CollectionSpec("offres", "m", "v1", DIM))
    live = {d.id: d for d in documents(0, 50, np.random.default_rng(5))}
    collection.upsert(list(live.values()))
    collection.delete(["doc-0"])
    del live["doc-0"]
    seq = collection.store.last_seq()
    collection.close()
    vectors = np.stack([d.vector for d in documents(0, 50, np.random.default_rng(5))])
    ids = np.arange(1, 51, dtype=np.int64)
    if defect == "duplicate ids":
        index = _index_of("flat", np.concatenate([ids[1:], ids[1:3]]), np.concatenate([vectors[1:], vectors[1:3]]))
        _forge(folder, IndexState("flat", index, frozenset()), seq)
    elif defect == "deleted vector":  # doc-0 (id 1) deleted at 51 but still in a snapshot claiming 51
        _forge(folder, IndexState("flat", _index_of("flat", ids, vectors), frozenset()), seq)
    elif defect == "kind lies":
        _forge(folder, IndexState("flat", _index_of("hnsw", ids[1:], vectors[1:]), frozenset()), seq)
    else:
        data = (folder / snapshot.SNAPSHOT_FILE).read_bytes()
        (folder / snapshot.SNAPSHOT_FILE).write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="openemploi.index.collection"):
        reopened = Collection.open(folder)
    assert "index snapshot unusable" in caplog.text
    assert reopened.size() == 49 == reopened.index.ntotal
    for doc in live.values():
        ids_found = [h.document.id for h in reopened.search(SearchQuery(vector=doc.vector, k=5)).hits]
        assert ids_found[0] == doc.id and len(ids_found) == len(set(ids_found))
    reopened.close()
