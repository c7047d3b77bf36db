"""A collection: store (truth) + vector index (derived, snapshotted) + lexical side.

Writes commit to SQLite first and are acknowledged after the commit; the
FAISS index then applies the same change. On open, the index snapshot is
loaded, checked against the store, and rows newer than its sequence are
replayed; a missing, torn or inconsistent snapshot is rebuilt from the store
with a warning. Collections live in generation folders (see layout.py).
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from openemploi.kernels import fusion_candidates

from . import layout, snapshot
from .durable import SWAP_STAGED, SWAP_SWITCHED, crash_point
from .layout import NAME_PATTERN
from .rebuild import IndexBuilder, Rebuilder, build_index
from .search import Hit, SearchQuery, SearchResult, fuse
from .store import NewDocument, StorageFull, Store, StoredDocument, storage_full
from .text import LEXICAL_FORM_VERSION, fts_query
from .vectors import MAX_K, GpuPool, IndexParams, VectorIndex

log = logging.getLogger(__name__)

EXACT_FILTER_MAX = 20_000  # filtered searches over at most this many docs are exact


class CollectionError(Exception):
    """Base of the errors the API maps to status codes."""


class CollectionNotFound(CollectionError):
    def __init__(self, message: str, resource_name: str = "") -> None:
        super().__init__(message)
        self.resource_name = resource_name  # the collection: the API's ResourceInfo


class CollectionExists(CollectionError):
    pass


class InvalidQuery(CollectionError):
    pass


class CollectionReplaced(CollectionError):
    """The collection object was swapped out (re-embedded or dropped) while a write waited: retry."""


class CollectionUnavailable(CollectionError):
    """The collection is on disk but could not be opened at start: it is set aside, the others serve."""


class ShardUnavailable(CollectionError):
    """A shard of a sharded collection (scaleout) did not answer: retry; acknowledged writes are on its disk."""


@dataclass(frozen=True)
class CollectionSpec:
    name: str
    model: str
    model_version: str
    dim: int
    params: IndexParams = field(default_factory=IndexParams)
    created_at: str = ""


class Collection:
    SNAPSHOT_EVERY = 20_000  # changes between automatic index snapshots
    SNAPSHOT_RETRY_EVERY = 2_000  # changes before an automatic snapshot that failed (full disk) is tried again

    def __init__(
        self, folder: Path, spec: CollectionSpec, store: Store, gpus: GpuPool | None, build: IndexBuilder = build_index
    ) -> None:
        self.folder = folder
        self.spec = spec
        self.store = store
        self.gpus = gpus
        self.index = VectorIndex(spec.dim, spec.params, gpus, spec.name)  # swapped whole by a background rebuild
        self._write_lock = threading.RLock()  # writes and snapshots; reads never take it
        self._applied_seq = 0
        self._snapshot_seq = 0
        self._snapshot_retry_seq = 0  # after a failed automatic snapshot, none before this sequence
        self.closed = False
        self.rebuilds = Rebuilder(self, build)  # kind switches and tombstone clean-ups, in the background

    # -- lifecycle ---------------------------------------------------------------
    @classmethod
    def create(
        cls, folder: Path, spec: CollectionSpec, gpus: GpuPool | None = None, build: IndexBuilder = build_index
    ) -> Collection:
        folder.mkdir(parents=True, exist_ok=False)
        store = Store(folder / "store.sqlite", spec.dim)
        created = spec.created_at or dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        try:  # on a full disk (StorageFull) close the store: the caller removes the folder
            store.set_info(
                {
                    "name": spec.name,
                    "model": spec.model,
                    "model_version": spec.model_version,
                    "dim": str(spec.dim),
                    "index_params": spec.params.to_json(),
                    "created_at": created,
                    "last_seq": "0",
                    "lexical_form": LEXICAL_FORM_VERSION,
                }
            )
            spec = CollectionSpec(spec.name, spec.model, spec.model_version, spec.dim, spec.params, created)
            collection = cls(folder, spec, store, gpus, build)
            collection.snapshot()
        except BaseException:
            store.close()
            raise
        return collection

    @classmethod
    def open(cls, folder: Path, gpus: GpuPool | None = None, build: IndexBuilder = build_index) -> Collection:
        probe = Store(folder / "store.sqlite", 1)
        info = {k: probe.get_info(k) for k in ("name", "model", "model_version", "dim", "index_params", "created_at")}
        probe.close()
        spec = CollectionSpec(
            info["name"],
            info["model"],
            info["model_version"],
            int(info["dim"]),
            IndexParams.from_json(info["index_params"]),
            info["created_at"],
        )
        collection = cls(folder, spec, Store(folder / "store.sqlite", spec.dim), gpus, build)
        try:
            refolded = collection.store.refresh_lexical()
            if refolded:
                log.warning("collection %s: lexical index rebuilt for the current word folding (%d rows)", spec.name, refolded)
            collection._recover()
        except BaseException:
            collection.store.close()
            raise
        return collection

    def _recover(self) -> None:
        snapshot.remove_temps(self.folder)
        try:
            state, seq = snapshot.read(self.folder, self.spec.dim)
            if seq > self.store.last_seq():
                raise snapshot.SnapshotUnusable(f"snapshot sequence {seq} is ahead of the store ({self.store.last_seq()})")
            snapshot.check_against_store(state, seq, self.store.live_seqs_at(seq), self.spec.dim)
            self.index.restore(state)
            change = self.store.changes_since(seq)
            self.index.remove(change.removed_ids)
            self.index.add(change.added_ids, change.added_vectors)
            self._applied_seq = self._snapshot_seq = seq
            replayed = len(change.added_ids) + len(change.removed_ids)
            if replayed:
                log.info("collection %s: replayed %d changes after snapshot %d", self.spec.name, replayed, seq)
        except Exception as exc:  # missing, torn or inconsistent snapshot: the store is the truth
            log.warning("collection %s: index snapshot unusable (%s); rebuilding from the store", self.spec.name, exc)
            self._rebuild()
        self._applied_seq = self.store.last_seq()
        self.rebuilds.maybe_start()

    def _rebuild(self) -> None:
        """Inline, while opening: there is no index to serve from until it is built."""
        kind = self.index.target_kind(self.store.count())
        self.index.rebuild(kind, self.store.live_vectors())
        self._applied_seq = self.store.last_seq()
        self._snapshot_or_log()

    def snapshot(self) -> None:
        """Write the index with its sequence as one file, switched by one rename (see snapshot.py).

        Under the write lock, so the saved index holds exactly the changes up to the saved sequence:
        replay after a crash then never re-adds a vector the snapshot already has.
        """
        with self._write_lock:
            self._write_snapshot()

    def _write_snapshot(self) -> None:
        """A write that fails (full disk) removes its temp file and leaves the previous snapshot whole.

        Dead rows are purged only once the new snapshot is durable: replay from the previous one needs them.
        """
        seq = self._applied_seq
        temp = snapshot.temp_path(self.folder)
        try:
            snapshot.write_temp(self.folder, self.index.state(), seq, self.spec.dim)
        except Exception as exc:
            full = storage_full(exc, self.folder, f"the index snapshot of {self.spec.name!r} at sequence {seq}", (temp,))
            temp.unlink(missing_ok=True)
            if full is not None:
                raise full from exc
            raise
        snapshot.switch(self.folder)
        self._snapshot_seq = seq
        try:
            self.store.purge_dead(self.rebuilds.purge_floor(seq))
        except sqlite3.Error as exc:  # only housekeeping: the next snapshot purges them
            log.warning("collection %s: dead rows not purged after snapshot %d (%s)", self.spec.name, seq, exc)

    def _snapshot_or_log(self) -> bool:
        """Snapshot, or log why not and go on: a snapshot only shortens the replay at the next start.

        The store holds every committed change, so when the snapshot cannot be written (full disk)
        the previous one stays and a restart replays the store on top of it; writes and searches go on.
        """
        try:
            self.snapshot()
            return True
        except (StorageFull, OSError, RuntimeError) as exc:
            self._snapshot_retry_seq = self._applied_seq + self.SNAPSHOT_RETRY_EVERY
            log.error(
                "collection %s: index snapshot not written (%s); the snapshot at sequence %d stays and a restart "
                "replays the store from it",
                self.spec.name,
                exc,
                self._snapshot_seq,
            )
            return False

    def close(self) -> None:
        self.rebuilds.stop()  # before the write lock, which a rebuild's last step takes
        with self._write_lock:
            try:
                if self._applied_seq != self._snapshot_seq:
                    self._snapshot_or_log()
            finally:
                self.store.close()

    # -- writes ------------------------------------------------------------------
    def upsert(self, documents: Sequence[NewDocument]) -> int:
        for doc in documents:
            self.check_vector(doc.vector, f"document {doc.id!r}")
        with self._write_lock:
            self._check_open()
            change = self.store.upsert(documents, self.spec.model_version)
            self.index.remove(change.removed_ids)
            self.index.add(change.added_ids, change.added_vectors)
            self._after_change(change.last_seq)
        return change.last_seq

    def delete(self, ids: Sequence[str]) -> int:
        with self._write_lock:
            self._check_open()
            change = self.store.delete(ids)
            self.index.remove(change.removed_ids)
            self._after_change(change.last_seq)
        return len(change.removed_ids)

    def _check_open(self) -> None:
        if self.closed:
            raise CollectionReplaced(f"collection {self.spec.name!r} was replaced or dropped during this write; retry it")

    def _after_change(self, seq: int) -> None:
        self._applied_seq = seq
        self.rebuilds.maybe_start()
        if self._applied_seq - self._snapshot_seq >= self.SNAPSHOT_EVERY and self._applied_seq >= self._snapshot_retry_seq:
            self._snapshot_or_log()  # the change is committed: a snapshot failure must not fail its write

    def check_vector(self, vector: np.ndarray, what: str) -> None:
        if vector.shape != (self.spec.dim,):
            raise InvalidQuery(
                f"{what}: vector has dimension {vector.size}, collection {self.spec.name!r} expects {self.spec.dim}"
            )
        if not np.all(np.isfinite(vector)):
            raise InvalidQuery(f"{what}: vector contains NaN or infinity")

    # -- reads -------------------------------------------------------------------
    def get(self, ids: Sequence[str], include_vectors: bool = False) -> dict[str, StoredDocument]:
        return self.store.by_ids(list(ids), include_vectors)

    def size(self) -> int:
        return self.store.count()

    def search(self, query: SearchQuery) -> SearchResult:
        dense, lexical = self.candidates(query)
        if not query.hybrid:
            docs = self.store.by_seqs([s for s, _ in dense], query.include_vectors)
            hits = [Hit(docs[s], score, score, 0.0, rank, 0) for rank, (s, score) in enumerate(dense, 1) if s in docs]
            return SearchResult(hits[: query.k], "score = cosine(query, document)")
        return self._fuse(query, dense, lexical)

    def candidates(
        self, query: SearchQuery, unknown_fields_match_nothing: bool = False
    ) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """The query checked, then the dense and lexical candidates (FAISS id, score) that `search` fuses.

        Apart so a sharded collection (scaleout) fuses the candidates of all its shards at once; a shard
        that lacks a filter field another shard has matches nothing (`unknown_fields_match_nothing`).
        """
        if not 1 <= query.k <= MAX_K:
            raise InvalidQuery(f"k must be between 1 and {MAX_K}, got {query.k}")
        if query.vector is None:
            raise InvalidQuery("a query vector (or text) is required")
        self.check_vector(query.vector, "query")
        unknown = False
        for name, values in query.filters:
            if not values:
                raise InvalidQuery(f"filter on {name!r} has no values")
            if not self.store.has_field(name):
                if not unknown_fields_match_nothing:
                    raise InvalidQuery(f"filter on unknown field {name!r}: no document in {self.spec.name!r} has it")
                unknown = True
        if unknown:
            return [], []
        allowed = None
        if query.filters or query.skills_all or query.skills_any:
            allowed = self.store.filtered_seqs(query.filters, query.skills_all, query.skills_any)
        pool = query.candidates or max(4 * query.k, 50)
        pool = min(pool, MAX_K)
        dense = self._dense(query.vector, pool if query.hybrid else query.k, allowed)
        if not query.hybrid:
            return dense, []
        lexical = self.store.lexical(fts_query(query.text), pool, allowed) if query.text else []
        return dense, lexical

    def _dense(self, vector: np.ndarray, k: int, allowed: np.ndarray | None) -> list[tuple[int, float]]:
        if allowed is not None and len(allowed) <= EXACT_FILTER_MAX:
            return self._exact(vector, k, allowed)
        scores, ids = self.index.search(vector[None, :], k, allowed)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def _exact(self, vector: np.ndarray, k: int, allowed: np.ndarray) -> list[tuple[int, float]]:
        """Filtered to a few documents: score them all (exact, whatever the index type)."""
        if len(allowed) == 0:
            return []
        docs = self.store.by_seqs(allowed.tolist(), include_vectors=True)
        seqs = np.fromiter(docs.keys(), np.int64)
        matrix = np.stack([cast(np.ndarray, docs[int(s)].vector) for s in seqs])
        scores = matrix @ vector.astype(np.float32)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(int(seqs[i]), float(scores[i])) for i in order]

    def _fuse(self, query: SearchQuery, dense: list[tuple[int, float]], lexical: list[tuple[int, float]]) -> SearchResult:
        """Every candidate gets its exact cosine (lexical-only ones too), so the dense score shown
        and the weighted fusion never rely on a missing value."""
        candidates = fusion_candidates([s for s, _ in dense], [s for s, _ in lexical]).tolist()
        docs = self.store.by_seqs(candidates, include_vectors=True)
        cosine = {s: float(cast(np.ndarray, doc.vector) @ query.vector) for s, doc in docs.items()}
        return fuse(query, dense, lexical, docs, cosine)


class CollectionManager:
    """All collections under one folder; creation, re-embedding switches and drops are atomic on disk.

    Lock order: a collection's write lock, then the manager's lock; the manager's lock is never held
    while waiting for a write lock, so a re-embed's switch, a drop and a shutdown cannot deadlock.
    """

    def __init__(self, root: Path, build: IndexBuilder = build_index) -> None:
        self.root = Path(root)
        self._build = build
        self.root.mkdir(parents=True, exist_ok=True)
        self.gpus = GpuPool()
        self._lock = threading.Lock()
        self._closed = False
        self._collections: dict[str, Collection] = {}
        self._unavailable: dict[str, str] = {}  # name -> why it could not be opened at start
        for name, folder in layout.recover(self.root).folders.items():
            try:
                self._collections[name] = Collection.open(folder, self.gpus, self._build)
            except Exception as exc:  # one broken collection must not keep the others from serving
                self._unavailable[name] = f"{type(exc).__name__}: {exc}"
                log.error("collection %s could not be opened and is set aside (%s); the others serve", name, exc)

    def create(self, spec: CollectionSpec) -> Collection:
        if not NAME_PATTERN.fullmatch(spec.name):
            raise InvalidQuery(f"collection name {spec.name!r} must match {NAME_PATTERN.pattern}")
        problems = spec.params.out_of_bounds()
        if problems:
            raise InvalidQuery(f"index parameters out of bounds: {problems}")
        with self._lock:
            if spec.name in self._collections or spec.name in self._unavailable:
                raise CollectionExists(f"collection {spec.name!r} already exists")
            staging = self.root / f".creating-{spec.name}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                collection = Collection.create(staging, spec, self.gpus, self._build)
            except BaseException:  # e.g. StorageFull: leave no half-made folder behind
                shutil.rmtree(staging, ignore_errors=True)
                raise
            collection.store.close()
            generation = layout.install(self.root, staging, spec.name)
            layout.point(self.root, spec.name, generation)
            collection = Collection.open(generation, self.gpus, self._build)
            self._collections[spec.name] = collection
            return collection

    def get(self, name: str) -> Collection:
        collection = self._collections.get(name)
        if collection is None:
            if name in self._unavailable:
                raise CollectionUnavailable(
                    f"collection {name!r} could not be opened at start ({self._unavailable[name]}); "
                    "see the server log, then repair or drop it"
                )
            raise CollectionNotFound(f"collection {name!r} does not exist (have: {sorted(self._collections)})", name)
        return collection

    def names(self) -> list[str]:
        return sorted(self._collections)

    def replace(self, name: str, staged: Path, expected: Collection) -> Collection:
        """Switch `name` to a fully built staging folder, if it still holds `expected`.

        The caller holds `expected`'s write lock. CollectionReplaced when the collection was dropped
        (and maybe recreated) meanwhile, or the manager closed: the staging folder is then the caller's.
        """
        with self._lock:
            if self._closed or self._collections.get(name) is not expected or expected.closed:
                raise CollectionReplaced(f"collection {name!r} was dropped, replaced or shut down during the re-embedding")
            generation = layout.install(self.root, staged, name)
            crash_point(SWAP_STAGED)
            expected.closed = True
            expected.rebuilds.cancel()
            expected.store.close()
            if layout.is_legacy(self.root, name):
                layout.retire(self.root, self.root / name, name)
            old_folder = layout.current_folder(self.root, name)
            layout.point(self.root, name, generation)
            crash_point(SWAP_SWITCHED)
            fresh = Collection.open(generation, self.gpus, self._build)
            self._collections[name] = fresh
            shutil.rmtree(old_folder, ignore_errors=True)
            return fresh

    def drop(self, name: str) -> None:
        """Take the name away durably, then remove its folder; waits for a write in progress."""
        dropped: Collection | None = None
        while dropped is None:
            with self._lock:
                if name in self._unavailable:
                    del self._unavailable[name]
                    folder = layout.unpoint(self.root, name)
                    break
                collection = self.get(name)
            with collection._write_lock, self._lock:
                if self._collections.get(name) is not collection:
                    continue  # switched by a re-embed while we waited: drop the new one
                del self._collections[name]
                collection.closed = True
                collection.rebuilds.cancel()
                collection.store.close()
                folder = layout.unpoint(self.root, name)
                dropped = collection
        if dropped is not None:
            dropped.rebuilds.join()  # outside the write lock, which a rebuild's last step takes
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            collections = list(self._collections.values())
            self._collections.clear()
        for collection in collections:
            collection.close()
