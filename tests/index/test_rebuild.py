"""Background index rebuilds: writes and searches go on while one runs, the swapped-in index holds exactly
what the store holds, kind switches have hysteresis, and a failed, cancelled or crashed rebuild loses nothing.

The builder is a parameter of the collection: these tests hold a rebuild at a known point with an Event
(`Gate`), never with sleeps.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from openemploi.index import snapshot
from openemploi.index.collection import Collection, CollectionManager, CollectionSpec
from openemploi.index.durable import SNAPSHOT_RENAMED, SNAPSHOT_WRITTEN
from openemploi.index.rebuild import RETRY_AFTER_CHANGES, Batches, build_index
from openemploi.index.search import SearchQuery
from openemploi.index.store import NewDocument
from openemploi.index.vectors import IndexParams, VectorIndex

DIM = 16
FLAT_MAX = 50
GUARD_S = 60  # only a hang reaches this: the tests wait on events


def documents(prefix: str, n: int, seed: int = 0) -> list[NewDocument]:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [NewDocument(f"{prefix}{i}", f"offre {prefix}{i}", vectors[i]) for i in range(n)]


class Gate:
    """A builder that says when it starts, then builds once released; a cancel (check raises) ends its wait."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, index: VectorIndex, kind: str, batches: Batches, check) -> None:
        self.started.set()
        while not self.release.wait(0.01):
            check()
        build_index(index, kind, batches, check)


def create(tmp_path: Path, build=build_index, kind: str = "auto") -> Collection:
    spec = CollectionSpec("offres", "m", "v1", DIM, IndexParams(kind=kind, flat_max=FLAT_MAX))
    return Collection.create(tmp_path / "offres", spec, build=build)


def in_thread(action) -> threading.Event:
    done = threading.Event()

    def run() -> None:
        action()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done


def assert_matches_store(collection: Collection, live: dict[str, NewDocument], gone: set[str]) -> None:
    """Every live document is found first by its own vector, once; a deleted one never comes back."""
    assert collection.size() == len(live) == collection.index.ntotal
    matrix = np.stack([d.vector for d in live.values()])
    names = list(live)
    for doc in live.values():
        hits = [h.document.id for h in collection.search(SearchQuery(vector=doc.vector, k=10)).hits]
        exact = [names[i] for i in np.argsort(-(matrix @ doc.vector), kind="stable")[:10]]
        assert hits[0] == doc.id and len(hits) == len(set(hits)), f"{doc.id}: {hits}"
        assert set(hits) == set(exact) and not gone & set(hits)


def test_writes_and_searches_go_on_while_a_rebuild_runs(tmp_path):
    gate = Gate()
    collection = create(tmp_path, gate)
    live = {d.id: d for d in documents("d", FLAT_MAX + 1)}
    collection.upsert(list(live.values()))  # past flat_max: a Flat -> HNSW rebuild starts
    assert gate.started.wait(GUARD_S)
    late = documents("late", 10, seed=1)
    replaced = documents("d", 5, seed=2)  # d0..d4, new vectors

    def write() -> None:
        collection.upsert(late)
        collection.upsert(replaced)
        collection.delete(["d10", "d11"])

    written = in_thread(write)
    assert written.wait(GUARD_S), "a write waited for the rebuild"
    assert collection.rebuilds.running and not gate.release.is_set()
    live.update((d.id, d) for d in late + replaced)
    del live["d10"], live["d11"]
    assert collection.index.kind == "flat"  # searches answer from the current index meanwhile
    assert_matches_store(collection, live, {"d10", "d11"})
    gate.release.set()
    assert collection.rebuilds.join(GUARD_S)
    assert collection.index.kind == "hnsw" and collection.rebuilds.completed == 1
    assert_matches_store(collection, live, {"d10", "d11"})  # caught up with the writes made during the build
    collection.close()
    reopened = Collection.open(tmp_path / "offres")  # its snapshot is the rebuilt index
    assert reopened.index.kind == "hnsw"
    assert_matches_store(reopened, live, {"d10", "d11"})
    reopened.close()


@pytest.mark.parametrize(("kind", "larger", "grow_at"), [("auto", "hnsw", FLAT_MAX + 1), ("ivf", "ivf", FLAT_MAX)])
def test_hovering_around_the_mark_rebuilds_once_each_way(tmp_path, kind, larger, grow_at):
    collection = create(tmp_path, kind=kind)
    docs = documents("d", grow_at + 10)
    collection.upsert(docs[:grow_at])
    assert collection.rebuilds.join(GUARD_S) and collection.index.kind == larger
    for _ in range(3):  # down to just under the mark and back up: no rebuild either way
        collection.delete([d.id for d in docs[grow_at - 3 : grow_at]])
        collection.upsert(docs[grow_at - 3 : grow_at])
        assert not collection.rebuilds.running
    assert collection.rebuilds.completed == 1 and collection.index.kind == larger
    shrink_to = int(0.8 * grow_at) - 1  # below SHRINK_MARK x the mark: back to Flat, once
    collection.delete([d.id for d in docs[shrink_to:grow_at]])
    assert collection.rebuilds.join(GUARD_S) and collection.index.kind == "flat"
    collection.upsert(docs[shrink_to : grow_at - 1])  # up to just under the mark: stays Flat
    assert collection.rebuilds.join(GUARD_S)
    assert collection.rebuilds.completed == 2 and collection.index.kind == "flat"
    assert_matches_store(collection, {d.id: d for d in docs[: grow_at - 1]}, set())
    collection.close()


def test_an_hnsw_index_sheds_its_tombstones_in_the_background(tmp_path):
    collection = create(tmp_path, kind="hnsw")
    docs = documents("d", 40)
    collection.upsert(docs)
    collection.upsert(documents("d", 9, seed=3))  # 9 of 49 vectors tombstoned: under the share
    assert not collection.rebuilds.running and collection.rebuilds.completed == 0
    collection.delete(["d30"])  # 10 of 49
    assert collection.rebuilds.join(GUARD_S) and collection.rebuilds.completed == 1
    assert collection.index.tombstone_share == 0
    live = {d.id: d for d in docs} | {d.id: d for d in documents("d", 9, seed=3)}
    del live["d30"]
    assert_matches_store(collection, live, {"d30"})
    collection.close()


def test_a_failed_rebuild_leaves_the_index_serving_and_waits_before_trying_again(tmp_path, caplog):
    def broken(index: VectorIndex, kind: str, batches: Batches, check) -> None:
        raise RuntimeError("out of memory (simulated)")

    collection = create(tmp_path, broken)
    docs = documents("d", FLAT_MAX + 1)
    with caplog.at_level(logging.ERROR, logger="openemploi.index.rebuild"):
        collection.upsert(docs)
        assert collection.rebuilds.join(GUARD_S)
    assert "background index rebuild failed (out of memory (simulated))" in caplog.text
    assert collection.rebuilds.failed == 1 and collection.index.kind == "flat"
    more = documents("e", 20, seed=4)
    collection.upsert(more)  # writes go on, with no rebuild before RETRY_AFTER_CHANGES more changes
    assert not collection.rebuilds.running and collection.rebuilds.failed == 1
    assert RETRY_AFTER_CHANGES > 20
    assert_matches_store(collection, {d.id: d for d in docs + more}, set())
    assert not snapshot.temp_path(collection.folder, snapshot.REBUILD_TEMP_SUFFIX).exists()
    collection.close()


def test_close_cancels_a_running_rebuild_and_keeps_every_document(tmp_path):
    gate = Gate()
    collection = create(tmp_path, gate)
    docs = documents("d", FLAT_MAX + 1)
    collection.upsert(docs)
    assert gate.started.wait(GUARD_S)
    assert in_thread(collection.close).wait(GUARD_S)  # cancels the rebuild held by the gate, never released
    assert collection.rebuilds.completed == 0 and collection.rebuilds.failed == 0
    reopened = Collection.open(tmp_path / "offres")  # the Flat snapshot close wrote; reopening rebuilds
    assert reopened.rebuilds.join(GUARD_S) and reopened.index.kind == "hnsw"
    assert_matches_store(reopened, {d.id: d for d in docs}, set())
    reopened.close()


def test_a_drop_cancels_a_running_rebuild(tmp_path):
    gate = Gate()
    manager = CollectionManager(tmp_path, gate)
    collection = manager.create(CollectionSpec("offres", "m", "v1", DIM, IndexParams(flat_max=FLAT_MAX)))
    collection.upsert(documents("d", FLAT_MAX + 1))
    assert gate.started.wait(GUARD_S)
    assert in_thread(lambda: manager.drop("offres")).wait(GUARD_S)  # the gate is never released
    assert not collection.rebuilds.running and collection.rebuilds.completed == 0
    assert manager.names() == [] and [p.name for p in tmp_path.iterdir()] == []
    manager.close()


CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_rebuild import FLAT_MAX, Gate, create, documents
    from openemploi.index.durable import set_crash_hook

    gate = Gate()
    collection = create(Path({folder!r}), gate)
    collection.upsert(documents("d", FLAT_MAX + 1))
    gate.started.wait()
    collection.upsert(documents("late", 10, seed=1))
    collection.delete(["d10", "d11"])
    if {step!r} == "building":
        os.kill(os.getpid(), signal.SIGKILL)
    set_crash_hook(lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == {step!r} else None)
    gate.release.set()
    collection.rebuilds.join()
    """
)


@pytest.mark.parametrize("step", ["building", SNAPSHOT_WRITTEN, SNAPSHOT_RENAMED])
def test_a_sigkill_during_a_background_rebuild_loses_nothing(tmp_path, step):
    code = CHILD.format(tests=str(Path(__file__).parent), folder=str(tmp_path), step=step)
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    live = {d.id: d for d in documents("d", FLAT_MAX + 1) + documents("late", 10, seed=1)}
    del live["d10"], live["d11"]
    temp = snapshot.temp_path(tmp_path / "offres", snapshot.REBUILD_TEMP_SUFFIX)
    assert temp.exists() == (step == SNAPSHOT_WRITTEN)
    gate = Gate()
    reopened = Collection.open(tmp_path / "offres", build=gate)
    assert not temp.exists()  # what the crash left is removed at open, before any rebuild of its own
    gate.release.set()
    assert reopened.rebuilds.join(GUARD_S) and reopened.index.kind == "hnsw"
    assert_matches_store(reopened, live, {"d10", "d11"})
    reopened.close()
