"""Rebuild a collection's vector index in the background, on a copy, and swap it in.

A rebuild (Flat to HNSW past flat_max, IVF training, an HNSW index shedding its tombstones) takes
minutes at a million vectors: inline, it held the write lock all that time. Here a thread builds a
fresh index from the store's live rows as of one sequence (read in one SQLite read transaction, so
rows and sequence agree), catches up with the changes committed since while writes and searches go
on against the current index, and writes the fresh index's snapshot under its own temp name. Only
the last step holds the write lock: apply the few changes left, switch the snapshot by one rename,
swap the index in.

The store stays the truth. Until the switch the old snapshot is what a restart loads, after it the
new one, each consistent with the store at its own sequence; the dead rows a catch-up or a replay
still needs are not purged meanwhile (`purge_floor`). A rebuild that fails leaves the old index
serving (logged, counted in `failed`) and is tried again only after RETRY_AFTER_CHANGES more changes;
one cancelled by a close, a drop or a re-embedding's switch stops between chunks and swaps nothing.
At most one runs per collection.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from . import snapshot
from .vectors import VectorIndex

if TYPE_CHECKING:
    from .collection import Collection

log = logging.getLogger(__name__)

TOMBSTONE_REBUILD_SHARE = 0.2  # an HNSW index is rebuilt without its tombstones past this share of its vectors
RETRY_AFTER_CHANGES = 2_000  # a failed rebuild is tried again only after this many more changes
FINAL_DELTA = 512  # catch up outside the write lock until fewer changes than this remain

Batches = list[tuple[np.ndarray, np.ndarray]]
# Builds the given index as `kind` from (ids, vectors) batches, calling the check (it raises once the
# rebuild is cancelled) between chunks. A parameter so tests can hold a rebuild at a known point.
IndexBuilder = Callable[[VectorIndex, str, Batches, Callable[[], None]], None]


def build_index(index: VectorIndex, kind: str, batches: Batches, check: Callable[[], None]) -> None:
    index.rebuild(kind, batches, check)


class RebuildCancelled(Exception):
    """A close, a drop or a re-embedding's switch asked the running rebuild to stop."""


def rebuild_reason(index: VectorIndex, live: int) -> str:
    """Why `index` should be rebuilt for `live` vectors, or "" when it should not."""
    target = index.target_kind(live)
    if target != index.kind:
        return f"{index.kind} -> {target} at {live} vectors"
    if index.kind == "hnsw" and index.tombstone_share > TOMBSTONE_REBUILD_SHARE:
        return f"{index.tombstone_share:.0%} of its vectors are tombstones"
    return ""


class Rebuilder:
    """The background index rebuilds of one collection, one at a time."""

    def __init__(self, collection: Collection, build: IndexBuilder = build_index) -> None:
        self._collection = collection
        self._build = build
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._base_seq: int | None = None  # the store's sequence when the running rebuild started
        self._retry_seq = 0  # after a failed rebuild, none before this sequence
        self.completed = 0
        self.failed = 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def purge_floor(self, seq: int) -> int:
        """How far dead rows may be purged: the running rebuild's catch-up needs those that died after its start."""
        base = self._base_seq
        return seq if base is None else min(seq, base)

    def maybe_start(self) -> None:
        """Start a rebuild if the index needs one; the caller holds the write lock (or is opening the collection)."""
        collection = self._collection
        if self._cancel.is_set() or self.running or collection.closed or collection._applied_seq < self._retry_seq:
            return
        live = collection.store.count()
        reason = rebuild_reason(collection.index, live)
        if not reason:
            return
        self._base_seq = collection._applied_seq
        kind = collection.index.target_kind(live)
        self._thread = threading.Thread(
            target=self._run, args=(kind, reason), name=f"rebuild-{collection.spec.name}", daemon=True
        )
        self._thread.start()

    def cancel(self) -> None:
        """Stop the running rebuild at its next check and start no other; fine under the write lock."""
        self._cancel.set()

    def stop(self) -> None:
        """Cancel, then wait for the rebuild to end: never under the write lock, which its last step takes."""
        self.cancel()
        self.join()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the running rebuild, if any; True once none runs."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.running

    def _check(self) -> None:
        if self._cancel.is_set() or self._collection.closed:
            raise RebuildCancelled

    def _run(self, kind: str, reason: str) -> None:
        collection = self._collection
        name = collection.spec.name
        log.info("collection %s: rebuilding its index in the background (%s)", name, reason)
        try:
            fresh = VectorIndex(collection.spec.dim, collection.spec.params, collection.gpus, name)
            with collection.store.read_transaction():
                seq = collection.store.last_seq()
                batches = list(collection.store.live_vectors())
            self._check()
            self._build(fresh, kind, batches, self._check)
            del batches
            while collection.store.last_seq() - seq > FINAL_DELTA:
                seq = self._catch_up(fresh, seq)
            written = self._write_snapshot(fresh, seq)
            with collection._write_lock:
                self._check()
                self._catch_up(fresh, seq)
                if written:
                    snapshot.switch(collection.folder, snapshot.REBUILD_TEMP_SUFFIX)
                    collection._snapshot_seq = seq
                collection.index = fresh
        except RebuildCancelled:
            log.info("collection %s: background index rebuild cancelled; the current index stays", name)
        except Exception as exc:
            if self._cancel.is_set() or collection.closed:  # its folder or store went away under it
                log.info("collection %s: background index rebuild cancelled (%s)", name, exc)
            else:
                self.failed += 1
                self._retry_seq = collection._applied_seq + RETRY_AFTER_CHANGES
                log.error("collection %s: background index rebuild failed (%s); the current index keeps serving", name, exc)
        else:
            self.completed += 1
            log.info("collection %s: rebuilt index (%s) swapped in at sequence %d", name, fresh.kind, collection._applied_seq)
        finally:
            self._base_seq = None
            snapshot.temp_path(collection.folder, snapshot.REBUILD_TEMP_SUFFIX).unlink(missing_ok=True)

    def _catch_up(self, fresh: VectorIndex, seq: int) -> int:
        """Apply to `fresh` the changes committed after `seq`; returns the sequence it then holds."""
        store = self._collection.store
        with store.read_transaction():
            change = store.changes_since(seq)
        fresh.remove(change.removed_ids)
        fresh.add(change.added_ids, change.added_vectors)
        return change.last_seq

    def _write_snapshot(self, fresh: VectorIndex, seq: int) -> bool:
        """The fresh index's snapshot, under its own temp name (switched with the swap); False when it failed.

        No lock: nothing else touches `fresh` yet. Failing to write it only leaves the old snapshot, which a
        restart replays from, and the next automatic snapshot writes the rebuilt index.
        """
        collection = self._collection
        try:
            snapshot.write_temp(collection.folder, fresh.state(), seq, collection.spec.dim, snapshot.REBUILD_TEMP_SUFFIX)
            return True
        except OSError as exc:
            log.error("collection %s: snapshot of the rebuilt index not written (%s)", collection.spec.name, exc)
            snapshot.temp_path(collection.folder, snapshot.REBUILD_TEMP_SUFFIX).unlink(missing_ok=True)
            return False
