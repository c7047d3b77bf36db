"""A full disk: writes fail with StorageFull and commit nothing, reads go on, the previous snapshot stays.

The disk fills for real from SQLite's and faiss's point of view: the process's RLIMIT_FSIZE is lowered
(Python ignores SIGXFSZ, so a write past it fails with EFBIG, which SQLite reports as a plain I/O
error), or a tmpfs of a few MiB fills up (ENOSPC, which SQLite reports as SQLITE_FULL) where this
machine lets us mount one.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import resource
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from openemploi.index.collection import (
    Collection,
    CollectionManager,
    CollectionSpec,
)
from openemploi.index.search import SearchQuery
from openemploi.index.store import NewDocument, StorageFull, Store

DIM = 32

pytestmark = pytest.mark.skipif(
    signal.getsignal(signal.SIGXFSZ) != signal.SIG_IGN, reason="SIGXFSZ is not ignored: a write past the limit would kill us"
)


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Files of this process may not grow past `limit` bytes (the soft limit; restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def documents(start: int, n: int, rng: np.random.Generator) -> list[NewDocument]:
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [
        NewDocument(
            f"doc-{start + i}",
            f"offre {start + i} : cariste à Lyon, " + "détail " * 200,
            vectors[i],
            {"ville": "Lyon"},
            ("CACES R489",),
        )
        for i in range(n)
    ]


def largest_file(folder: Path) -> int:
    return max(p.stat().st_size for p in folder.iterdir() if p.is_file())


def fill_until_full(
    store: Store, rng: np.random.Generator, acknowledged: dict[str, NewDocument]
) -> tuple[list[NewDocument], StorageFull]:
    """Upsert batches until one is refused; return the refused batch and its error."""
    for _ in range(2000):
        batch = documents(len(acknowledged), 10, rng)
        try:
            store.upsert(batch, "v1")
        except StorageFull as exc:
            return batch, exc
        acknowledged.update((d.id, d) for d in batch)
    raise AssertionError("the disk never filled")


def assert_all_there(store: Store, acknowledged: dict[str, NewDocument]) -> None:
    found = store.by_ids(list(acknowledged), include_vectors=True)
    assert sorted(found) == sorted(acknowledged)
    for doc_id, doc in acknowledged.items():
        assert found[doc_id].text == doc.text and np.array_equal(found[doc_id].vector, doc.vector)


def test_a_write_past_the_file_size_limit_is_storage_full_and_commits_nothing(tmp_path):
    rng = np.random.default_rng(1)
    store = Store(tmp_path / "store.sqlite", DIM)
    initial = documents(0, 10, rng)
    store.upsert(initial, "v1")
    acknowledged = {d.id: d for d in initial}
    with file_size_limit(largest_file(tmp_path) + 256 * 1024):
        refused, error = fill_until_full(store, rng, acknowledged)
        assert "collection storage is full" in str(error) and "RLIMIT_FSIZE" in str(error)
        with pytest.raises(StorageFull):  # still full: refused again, not a different error
            store.upsert(refused, "v1")
        assert store.by_ids([d.id for d in refused]) == {}  # all or nothing: nothing
        assert store.count() == len(acknowledged)
        assert_all_there(store, acknowledged)  # reads go on
        last = store.last_seq()
    store.upsert(refused, "v1")  # space freed: the same write now goes through, on the same connection
    acknowledged.update((d.id, d) for d in refused)
    assert store.last_seq() == last + len(refused)
    store.close()
    reopened = Store(tmp_path / "store.sqlite", DIM)
    assert reopened.count() == len(acknowledged)
    assert_all_there(reopened, acknowledged)
    reopened.close()


def test_a_full_tmpfs_is_storage_full_and_freeing_space_resumes_writes(tmp_path):
    """ENOSPC for real, where we may mount a tmpfs (root with CAP_SYS_ADMIN); skipped elsewhere."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        rng = np.random.default_rng(2)
        ballast = mount / "ballast"
        ballast.write_bytes(b"\0" * (1 << 20))  # someone else's file, removed later to free space
        store = Store(mount / "store.sqlite", DIM)
        acknowledged: dict[str, NewDocument] = {}
        refused, error = fill_until_full(store, rng, acknowledged)
        assert "collection storage is full" in str(error) and "bytes free" in str(error)
        assert acknowledged and store.by_ids([d.id for d in refused]) == {}
        assert_all_there(store, acknowledged)
        ballast.unlink()
        store.upsert(refused, "v1")
        acknowledged.update((d.id, d) for d in refused)
        store.close()
        reopened = Store(mount / "store.sqlite", DIM)
        assert reopened.count() == len(acknowledged)
        assert_all_there(reopened, acknowledged)
        reopened.close()
    finally:
        gc.collect()  # the stores' per-thread read connections hold files open
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_failed_snapshot_keeps_the_previous_one_and_a_reopen_replays_the_store(tmp_path, caplog):
    rng = np.random.default_rng(3)
    folder = tmp_path / "offres"
    collection = Collection.create(folder, CollectionSpec("offres", "m", "v1", DIM))
    first, second = documents(0, 300, rng), documents(300, 300, rng)
    collection.upsert(first)
    collection.snapshot()
    snapshot = {name: digest(folder / name) for name in ("index.faiss",)}  # one file: index, sequence, tombstones
    collection.upsert(second)
    limit = 8 * 1024  # the next index.faiss holds 600 x 32 floats: ~80 KiB
    with file_size_limit(limit):
        with pytest.raises(StorageFull, match="index snapshot"):
            collection.snapshot()
        with caplog.at_level(logging.ERROR, logger="openemploi.index.collection"):
            collection.close()  # the shutdown snapshot fails too: logged, the store still closes
    assert "index snapshot not written" in caplog.text
    assert {name: digest(folder / name) for name in snapshot} == snapshot
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]
    reopened = Collection.open(folder)  # the old snapshot (300) plus a replay of the store (300 more)
    assert reopened.size() == 600
    for doc in first + second:
        hits = reopened.search(SearchQuery(vector=doc.vector, k=1)).hits
        assert hits[0].document.id == doc.id
    reopened.close()


def test_creating_a_collection_on_a_full_disk_is_storage_full_and_leaves_no_folder(tmp_path):
    manager = CollectionManager(tmp_path / "collections")
    spec = CollectionSpec("offres", "m", "v1", DIM)
    with file_size_limit(4096), pytest.raises(StorageFull):
        manager.create(spec)
    assert list((tmp_path / "collections").iterdir()) == []
    assert manager.create(spec).size() == 0  # space freed: the same call works
    manager.close()
