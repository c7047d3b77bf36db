"""A collection: store (truth) + vector index (derived, snapshotted) + lexical side.

Writes commit to SQLite first and are acknowledged after the commit; the
FAISS index then applies the same change. On open, the index snapshot is
loaded and rows newer than its sequence are replayed; a missing or corrupt
snapshot is rebuilt from the store with a warning.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from openemploi.kernels import RRF_K, fuse_topk, fusion_candidates

from .store import NewDocument, StorageFull, Store, StoredDocument, storage_full
from .text import fts_query
from .vectors import MAX_K, GpuPool, IndexParams, VectorIndex

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
EXACT_FILTER_MAX = 20_000  # filtered searches over at most this many docs are exact


class CollectionError(Exception):
    """Base of the errors the API maps to status codes."""


class CollectionNotFound(CollectionError):
    pass


class CollectionExists(CollectionError):
    pass


class InvalidQuery(CollectionError):
    pass


class CollectionReplaced(CollectionError):
    """The collection object was swapped out (re-embedded or dropped) while a write waited: retry."""


@dataclass(frozen=True)
class CollectionSpec:
    name: str
    model: str
    model_version: str
    dim: int
    params: IndexParams = field(default_factory=IndexParams)
    created_at: str = ""


@dataclass(frozen=True)
class SearchQuery:
    vector: np.ndarray | None
    k: int
    text: str = ""
    filters: tuple[tuple[str, tuple[str, ...]], ...] = ()
    skills_all: tuple[str, ...] = ()
    skills_any: tuple[str, ...] = ()
    hybrid: bool = False
    fusion: str = "rrf"  # rrf | weighted
    dense_weight: float = 0.7
    candidates: int = 0  # dense/lexical pool before fusion; 0: max(4k, 50)
    include_vectors: bool = False


@dataclass
class Hit:
    document: StoredDocument
    score: float
    dense_score: float
    lexical_score: float
    dense_rank: int
    lexical_rank: int


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    explanation: str


class Collection:
    SNAPSHOT_EVERY = 20_000  # changes between automatic index snapshots
    SNAPSHOT_RETRY_EVERY = 2_000  # changes before an automatic snapshot that failed (full disk) is tried again

    def __init__(self, folder: Path, spec: CollectionSpec, store: Store, gpus: GpuPool | None) -> None:
        self.folder = folder
        self.spec = spec
        self.store = store
        self.index = VectorIndex(spec.dim, spec.params, gpus, spec.name)
        self._write_lock = threading.RLock()  # writes and snapshots; reads never take it
        self._applied_seq = 0
        self._snapshot_seq = 0
        self._snapshot_retry_seq = 0  # after a failed automatic snapshot, none before this sequence
        self.closed = False

    # -- lifecycle ---------------------------------------------------------------
    @classmethod
    def create(cls, folder: Path, spec: CollectionSpec, gpus: GpuPool | None = None) -> Collection:
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
                }
            )
            collection = cls(
                folder, CollectionSpec(spec.name, spec.model, spec.model_version, spec.dim, spec.params, created), store, gpus
            )
            collection.snapshot()
        except BaseException:
            store.close()
            raise
        return collection

    @classmethod
    def open(cls, folder: Path, gpus: GpuPool | None = None) -> Collection:
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
        collection = cls(folder, spec, Store(folder / "store.sqlite", spec.dim), gpus)
        collection._recover()
        return collection

    def _snapshot_paths(self) -> tuple[Path, Path]:
        return self.folder / "index.faiss", self.folder / "index.json"

    def _recover(self) -> None:
        index_path, meta_path = self._snapshot_paths()
        try:
            meta = json.loads(meta_path.read_text())
            self.index.load(index_path)
            if meta.get("dim") != self.spec.dim:
                raise ValueError("dimension mismatch")
            seq = int(meta["last_seq"])
            if seq > self.store.last_seq():
                raise ValueError(f"snapshot sequence {seq} is ahead of the store ({self.store.last_seq()})")
            change = self.store.changes_since(seq)
            self.index.remove(change.removed_ids)
            self.index.add(change.added_ids, change.added_vectors)
            self._applied_seq = self._snapshot_seq = seq
            replayed = len(change.added_ids) + len(change.removed_ids)
            if replayed:
                log.info("collection %s: replayed %d changes after snapshot %d", self.spec.name, replayed, seq)
        except Exception as exc:  # missing, truncated or inconsistent snapshot: the store is the truth
            log.warning("collection %s: index snapshot unusable (%s); rebuilding from the store", self.spec.name, exc)
            self._rebuild()
        self._applied_seq = self.store.last_seq()
        self._maybe_reshape()

    def _rebuild(self) -> None:
        kind = self.index.target_kind(self.store.count())
        self.index.rebuild(kind, self.store.live_vectors())
        self._applied_seq = self.store.last_seq()
        self._snapshot_or_log()

    def _maybe_reshape(self) -> None:
        """Switch index type when the size crosses flat_max, and drop HNSW tombstones when many."""
        live = self.store.count()
        if self.index.target_kind(live) != self.index.kind or self.index.tombstone_share > 0.2:
            self._rebuild()

    def snapshot(self) -> None:
        """Write the index then its sequence, each atomically (write to a temp file, fsync, rename).

        Under the write lock, so the saved index holds exactly the changes up to the saved sequence:
        replay after a crash then never re-adds a vector the snapshot already has.
        """
        with self._write_lock:
            self._write_snapshot()

    def _write_snapshot(self) -> None:
        """Every temp file is written and synced before any rename: a write that fails (full disk)
        removes them and leaves the previous snapshot whole, its index and its sequence together."""
        index_path, meta_path = self._snapshot_paths()
        seq = self._applied_seq
        tmp_index = index_path.with_suffix(".faiss.tmp")
        tmp_tomb = Path(str(tmp_index) + ".tomb.json")
        tmp_meta = meta_path.with_suffix(".json.tmp")
        temps = (tmp_index, tmp_tomb, tmp_meta)
        try:
            self.index.save(tmp_index)
            tmp_meta.write_text(json.dumps({"last_seq": seq, "dim": self.spec.dim, "kind": self.index.kind}))
            for path in temps:
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        except Exception as exc:
            full = storage_full(exc, self.folder, f"the index snapshot of {self.spec.name!r} at sequence {seq}", temps)
            for path in temps:
                path.unlink(missing_ok=True)
            if full is not None:
                raise full from exc
            raise
        os.replace(tmp_tomb, Path(str(index_path) + ".tomb.json"))
        os.replace(tmp_index, index_path)
        os.replace(tmp_meta, meta_path)
        self._snapshot_seq = seq
        try:
            self.store.purge_dead(seq)
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
        self._maybe_reshape()
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
        if not 1 <= query.k <= MAX_K:
            raise InvalidQuery(f"k must be between 1 and {MAX_K}, got {query.k}")
        if query.vector is None:
            raise InvalidQuery("a query vector (or text) is required")
        self.check_vector(query.vector, "query")
        for name, values in query.filters:
            if not values:
                raise InvalidQuery(f"filter on {name!r} has no values")
            if not self.store.has_field(name):
                raise InvalidQuery(f"filter on unknown field {name!r}: no document in {self.spec.name!r} has it")
        allowed = None
        if query.filters or query.skills_all or query.skills_any:
            allowed = self.store.filtered_seqs(query.filters, query.skills_all, query.skills_any)
        pool = query.candidates or max(4 * query.k, 50)
        pool = min(pool, MAX_K)
        dense = self._dense(query.vector, pool if query.hybrid else query.k, allowed)
        if not query.hybrid:
            docs = self.store.by_seqs([s for s, _ in dense], query.include_vectors)
            hits = [Hit(docs[s], score, score, 0.0, rank, 0) for rank, (s, score) in enumerate(dense, 1) if s in docs]
            return SearchResult(hits[: query.k], "score = cosine(query, document)")
        lexical = self.store.lexical(fts_query(query.text), pool, allowed) if query.text else []
        return self._fuse(query, dense, lexical)

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
        """Fuse the two candidate lists with the numba kernel (kernels.fuse_topk, 7x numpy here).

        Every candidate gets its exact cosine (lexical-only ones too), so the dense score shown
        and the weighted fusion never rely on a missing value.
        """
        candidates = fusion_candidates([s for s, _ in dense], [s for s, _ in lexical]).tolist()
        docs = self.store.by_seqs(candidates, include_vectors=True)
        dense = [(s, score) for s, score in dense if s in docs]
        lexical = [(s, score) for s, score in lexical if s in docs]
        union = [s for s in candidates if s in docs]
        cosine = {s: float(cast(np.ndarray, docs[s].vector) @ query.vector) for s in union}
        fused = fuse_topk(
            np.asarray([s for s, _ in dense], np.int64),
            np.asarray([c for _, c in dense], np.float64),
            np.asarray([s for s, _ in lexical], np.int64),
            np.asarray([c for _, c in lexical], np.float64),
            query.k,
            query.fusion,
            query.dense_weight,
            np.asarray([cosine[s] for s in union], np.float64),
        )
        lexical_score = dict(lexical)
        hits = []
        for s, score, dense_rank, lexical_rank in zip(
            fused.ids.tolist(), fused.scores.tolist(), fused.dense_rank.tolist(), fused.lexical_rank.tolist()
        ):
            doc = docs[s]
            if not query.include_vectors:
                doc = StoredDocument(doc.seq, doc.id, doc.text, doc.metadata, doc.skills, None, doc.model_version)
            hits.append(Hit(doc, score, cosine[s], lexical_score.get(s, 0.0), dense_rank, lexical_rank))
        if query.fusion == "weighted":
            explanation = (
                f"score = {query.dense_weight:g} * cosine + {1 - query.dense_weight:g} * bm25 / max bm25 of the candidates"
            )
        else:
            explanation = f"score = sum over the dense and lexical rankings of 1 / ({RRF_K} + rank) (reciprocal rank fusion)"
        return SearchResult(hits, explanation)


class CollectionManager:
    """All collections under one folder; creation and drop are atomic on disk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.gpus = GpuPool()
        self._lock = threading.Lock()
        self._collections: dict[str, Collection] = {}
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and not folder.name.startswith(".") and (folder / "store.sqlite").is_file():
                self._collections[folder.name] = Collection.open(folder, self.gpus)
            elif folder.is_dir() and folder.name.startswith((".creating-", ".reembed-", ".replaced-", ".dropping-")):
                shutil.rmtree(folder, ignore_errors=True)

    def create(self, spec: CollectionSpec) -> Collection:
        if not NAME_PATTERN.fullmatch(spec.name):
            raise InvalidQuery(f"collection name {spec.name!r} must match {NAME_PATTERN.pattern}")
        with self._lock:
            if spec.name in self._collections:
                raise CollectionExists(f"collection {spec.name!r} already exists")
            staging = self.root / f".creating-{spec.name}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                collection = Collection.create(staging, spec, self.gpus)
            except BaseException:  # e.g. StorageFull: leave no half-made folder behind
                shutil.rmtree(staging, ignore_errors=True)
                raise
            collection.store.close()
            os.replace(staging, self.root / spec.name)
            collection = Collection.open(self.root / spec.name, self.gpus)
            self._collections[spec.name] = collection
            return collection

    def get(self, name: str) -> Collection:
        collection = self._collections.get(name)
        if collection is None:
            raise CollectionNotFound(f"collection {name!r} does not exist (have: {sorted(self._collections)})")
        return collection

    def names(self) -> list[str]:
        return sorted(self._collections)

    def replace(self, name: str, staged: Path) -> Collection:
        """Swap a fully built collection folder in for `name` (the caller holds its write lock)."""
        with self._lock:
            old = self.get(name)
            old.closed = True
            old.store.close()
            trash = self.root / f".replaced-{name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.root / name, trash)
            os.replace(staged, self.root / name)
            fresh = Collection.open(self.root / name, self.gpus)
            self._collections[name] = fresh
            shutil.rmtree(trash, ignore_errors=True)
            return fresh

    def drop(self, name: str) -> None:
        with self._lock:
            collection = self.get(name)
            del self._collections[name]
            with collection._write_lock:
                collection.closed = True
                collection.store.close()
            trash = self.root / f".dropping-{name}"
            os.replace(self.root / name, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            for collection in self._collections.values():
                collection.close()
            self._collections.clear()
