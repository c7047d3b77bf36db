"""One shard's side of the sharded collections: a real `CollectionManager` on `<collections_dir>/shard-<i>`.

The gateway's `ShardedCollectionManager` (shards.py) calls it through a `ShardBackend`: in process in the
tests (`LocalShardBackend`), through Ray Serve in production (`shard_replica.CollectionShard`). Both go
through `invoke`, with picklable arguments and results, and a failure comes back as its own exception.

Each collection part is an ordinary collection (the durable SQLite + FAISS store of the single process)
whose store info records its place: `shard_set` (one id per creation of the collection, shared by its
parts), `shard_index` and `shard_count`. Every call names the collection by a `Ref` (name, shard set,
model): a part created again meanwhile, or re-embedded with another model, refuses it with
CollectionReplaced (ABORTED: retry), so a gateway never mixes parts or vector spaces.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..index.collection import (
    Collection,
    CollectionManager,
    CollectionNotFound,
    CollectionReplaced,
    CollectionSpec,
    CollectionUnavailable,
    InvalidQuery,
)
from ..index.search import SearchQuery
from ..index.store import NewDocument, StoredDocument

log = logging.getLogger(__name__)

SHARD_SET, SHARD_INDEX, SHARD_COUNT = "shard_set", "shard_index", "shard_count"
REEMBED_BATCH = 256  # rows per re-embedding page, as index/reembed.py
LOCK_WAIT_S = 120.0  # a new replica waits this long for the one it replaces to let go of the folder


@dataclass(frozen=True)
class Ref:
    """Which collection a call means: a part must match all of it."""

    name: str
    shard_set: str
    model: str
    model_version: str


@dataclass(frozen=True)
class PartInfo:
    spec: CollectionSpec
    shard_set: str  # "" for a part whose creation did not finish: an orphan
    index: int
    count: int
    size: int
    last_seq: int
    index_kind: str
    device: str


@dataclass
class Candidates:
    """A part's raw candidates, keyed by document id: what the gateway merges and fuses across parts."""

    dense: list[tuple[str, float]]
    lexical: list[tuple[str, float]]
    docs: dict[str, StoredDocument]  # every candidate; vectors only when the query asks for them
    cosine: dict[str, float]  # hybrid: the exact cosine of every candidate, lexical-only ones too
    unknown_fields: list[str] = field(default_factory=list)  # filter fields no document of this part has


@dataclass
class _Reembed:
    old: Collection
    new: Collection
    staging: Path
    release: threading.Event = field(default_factory=threading.Event)
    fenced: threading.Event = field(default_factory=threading.Event)
    fence: threading.Thread | None = None  # holds the old part's write lock from reembed_fence to the switch
    expired: bool = False

    def lift(self) -> None:
        """Release the fence and wait until the write lock is free again."""
        self.release.set()
        if self.fence is not None:
            self.fence.join()


class ShardService:
    """The parts of every sharded collection that live on this shard."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_file = _exclusive(self.root / ".shard.lock")
        self.manager = CollectionManager(self.root)
        self._reembeds: dict[str, _Reembed] = {}
        self._mutex = threading.Lock()

    def close(self) -> None:
        for name in list(self._reembeds):
            self._abort(name)
        self.manager.close()
        os.close(self._lock_file)

    # -- what lives here -----------------------------------------------------------
    def parts(self) -> list[PartInfo]:
        return [self._info(self.manager.get(name)) for name in self.manager.names()]

    def describe(self, name: str) -> PartInfo:
        return self._info(self.manager.get(name))

    def create_part(self, spec: CollectionSpec, shard_set: str, index: int, count: int) -> PartInfo:
        """Shard 0's part is created last: it alone makes the collection exist, so any other part of that
        name, and a part of shard 0 without its place recorded, is an orphan of an unfinished creation or
        drop and gives way."""
        try:
            existing = self.manager.get(spec.name).store.get_info(SHARD_SET)
        except CollectionNotFound:
            existing = None
        except CollectionUnavailable:  # on disk but unreadable: only shard 0's would keep the name
            existing = "" if index > 0 else "unreadable"
        if existing is not None and (index > 0 or not existing):
            self.drop_part(spec.name, None)
        collection = self.manager.create(spec)
        collection.store.set_info({SHARD_SET: shard_set, SHARD_INDEX: str(index), SHARD_COUNT: str(count)})
        return self._info(collection)

    def drop_part(self, name: str, shard_set: str | None) -> bool:
        """Idempotent: a part already gone, or of another creation of that name, is left alone
        (`shard_set` None: whatever part has that name, readable or not)."""
        if shard_set is not None:
            try:
                if self.manager.get(name).store.get_info(SHARD_SET) != shard_set:
                    return False
            except CollectionNotFound:
                return False
        self._abort(name)
        try:
            self.manager.drop(name)
        except CollectionNotFound:
            return False
        return True

    # -- reads and writes ------------------------------------------------------------
    def info(self, ref: Ref) -> PartInfo:
        return self._info(self._part(ref))

    def get_info(self, ref: Ref, key: str, default: str) -> str:
        return self._part(ref).store.get_info(key, default)

    def set_info(self, ref: Ref, values: dict[str, str]) -> None:
        self._part(ref).store.set_info(values)

    def last_seq(self, ref: Ref) -> int:
        return self._part(ref).store.last_seq()

    def upsert(self, ref: Ref, documents: list[NewDocument]) -> int:
        return self._part(ref).upsert(documents)

    def delete(self, ref: Ref, ids: list[str]) -> int:
        return self._part(ref).delete(ids)

    def get(self, ref: Ref, ids: list[str], include_vectors: bool) -> dict[str, StoredDocument]:
        return self._part(ref).get(ids, include_vectors)

    def snapshot(self, ref: Ref) -> None:
        self._part(ref).snapshot()

    def candidates(self, ref: Ref, query: SearchQuery) -> Candidates:
        """The part's own top candidates (k dense ones; hybrid: the dense and lexical pools, with cosines)."""
        collection = self._part(ref)
        dense, lexical = collection.candidates(query, unknown_fields_match_nothing=True)
        unknown = [name for name, _ in query.filters if not collection.store.has_field(name)]
        seqs = list(dict.fromkeys([s for s, _ in dense] + [s for s, _ in lexical]))
        docs = collection.store.by_seqs(seqs, include_vectors=query.hybrid or query.include_vectors)
        cosine = {}
        if query.hybrid:
            assert query.vector is not None  # candidates() refused a query without one
            cosine = {docs[s].id: float(np.asarray(docs[s].vector) @ query.vector) for s in seqs if s in docs}
        if query.hybrid and not query.include_vectors:
            docs = {s: _without_vector(d) for s, d in docs.items()}
        return Candidates(
            [(docs[s].id, score) for s, score in dense if s in docs],
            [(docs[s].id, score) for s, score in lexical if s in docs],
            {d.id: d for d in docs.values()},
            cosine,
            unknown,
        )

    # -- re-embedding: the gateway embeds, each part stages and switches (see shards.py) ---------------
    def reembed_begin(self, ref: Ref, model: str, model_version: str, dim: int) -> bool:
        """False when this part already holds the target model (a re-embedding cut short after it switched)."""
        old = self._part(ref, check_model=False)
        if (old.spec.model, old.spec.model_version) == (model, model_version):
            return False
        self._part(ref)
        self._abort(ref.name)  # a job its gateway left behind
        staging = self.root / f".reembed-{ref.name}"
        shutil.rmtree(staging, ignore_errors=True)
        new = Collection.create(staging, CollectionSpec(ref.name, model, model_version, dim, old.spec.params), self.manager.gpus)
        new.store.set_info({k: old.store.get_info(k) for k in (SHARD_SET, SHARD_INDEX, SHARD_COUNT)})
        with self._mutex:
            self._reembeds[ref.name] = _Reembed(old, new, staging)
        return True

    def reembed_rows(self, ref: Ref, after: int) -> tuple[list[tuple[StoredDocument, str]], int]:
        """Live rows after sequence `after`, and the sequence that was last when they were read."""
        job = self._job(ref.name)
        reached = job.old.store.last_seq()
        rows = job.old.store.live_after(after, REEMBED_BATCH)
        missing = [d.id for d, _ in rows if not d.text.strip()]
        if missing:
            raise InvalidQuery(f"documents {missing[:5]} have no text to re-embed (they were upserted as vectors)")
        return rows, reached

    def reembed_put(self, ref: Ref, documents: list[NewDocument]) -> None:
        self._job(ref.name).new.upsert(documents)

    def reembed_fence(self, ref: Ref, hold_s: float) -> None:
        """Hold the old part's write lock (writers wait) until the switch, or `hold_s` at most."""
        job = self._job(ref.name)

        def hold() -> None:
            with job.old._write_lock:
                job.fenced.set()
                if not job.release.wait(hold_s):
                    job.expired = True
                    log.warning("collection %s: re-embedding fence released after %.0f s without a switch", ref.name, hold_s)

        job.fence = threading.Thread(target=hold, name=f"reembed-fence-{ref.name}", daemon=True)
        job.fence.start()
        job.fenced.wait()

    def reembed_switch(self, ref: Ref, after: int) -> PartInfo:
        """Switch to the staged part; the gateway has copied every row up to `after` under the fence."""
        job = self._job(ref.name)
        if not job.fenced.is_set() or job.expired or job.release.is_set():
            raise CollectionReplaced(f"collection {ref.name!r}: the re-embedding's final phase ran out of time; retry it")
        if job.old.store.live_after(after, 1):
            raise CollectionReplaced(f"collection {ref.name!r} changed during the re-embedding's final phase; retry it")
        gone = sorted(job.new.store.live_ids() - job.old.store.live_ids())
        if gone:
            job.new.delete(gone)
        job.new.rebuilds.stop()  # the switched generation reopens and rebuilds if it must
        job.new.snapshot()
        job.new.store.close()
        try:
            fresh = self.manager.replace(ref.name, job.staging, job.old)  # under the fence: the old write lock
        finally:
            job.lift()
            with self._mutex:
                self._reembeds.pop(ref.name, None)
        return self._info(fresh)

    def reembed_abort(self, ref: Ref) -> None:
        self._abort(ref.name)

    def _abort(self, name: str) -> None:
        with self._mutex:
            job = self._reembeds.pop(name, None)
        if job is None:
            return
        job.lift()
        job.new.rebuilds.stop()
        job.new.store.close()
        shutil.rmtree(job.staging, ignore_errors=True)

    def _job(self, name: str) -> _Reembed:
        job = self._reembeds.get(name)
        if job is None:
            raise CollectionReplaced(f"collection {name!r} has no re-embedding in progress on this shard (restarted?); retry it")
        return job

    # -- helpers ---------------------------------------------------------------------
    def _part(self, ref: Ref, check_model: bool = True) -> Collection:
        collection = self.manager.get(ref.name)
        if collection.store.get_info(SHARD_SET) != ref.shard_set:
            raise CollectionReplaced(f"collection {ref.name!r} was dropped and created again meanwhile; retry")
        if check_model and (collection.spec.model, collection.spec.model_version) != (ref.model, ref.model_version):
            raise CollectionReplaced(
                f"collection {ref.name!r} was re-embedded meanwhile ({collection.spec.model}/{collection.spec.model_version}); retry"
            )
        return collection

    @staticmethod
    def _info(collection: Collection) -> PartInfo:
        store = collection.store
        return PartInfo(
            collection.spec,
            store.get_info(SHARD_SET),
            int(store.get_info(SHARD_INDEX, "0")),
            int(store.get_info(SHARD_COUNT, "1")),
            collection.size(),
            store.last_seq(),
            collection.index.kind,
            collection.index.device,
        )


def _without_vector(doc: StoredDocument) -> StoredDocument:
    return StoredDocument(doc.seq, doc.id, doc.text, doc.metadata, doc.skills, None, doc.model_version)


def _exclusive(path: Path) -> int:
    """An exclusive lock on the shard's folder: a replica that replaces a dead one waits for it to let go,
    so two processes never write one store and index (the OS drops a dead process's lock)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    event = threading.Event()
    waited = 0.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if waited >= LOCK_WAIT_S:
                os.close(fd)
                raise RuntimeError(f"{path.parent} is held by another process after {LOCK_WAIT_S:.0f} s") from None
            event.wait(0.5)
            waited += 0.5


# -- the wire: how a call and its outcome cross a process boundary --------------------------------------
CALLS = frozenset(
    {
        "parts",
        "describe",
        "create_part",
        "drop_part",
        "info",
        "get_info",
        "set_info",
        "last_seq",
        "upsert",
        "delete",
        "get",
        "snapshot",
        "candidates",
        "reembed_begin",
        "reembed_rows",
        "reembed_put",
        "reembed_fence",
        "reembed_switch",
        "reembed_abort",
    }
)


@dataclass(frozen=True)
class Failure:
    """An exception, rebuilt on the other side with its type, arguments and attributes (`resource_name`...)."""

    type: type[BaseException]
    args: tuple[Any, ...]
    attributes: dict[str, Any]

    @classmethod
    def of(cls, exc: Exception) -> Failure:
        failure = cls(type(exc), exc.args, dict(vars(exc)))
        try:
            pickle.dumps(failure)
        except Exception:  # an attribute that cannot travel: keep the type and the message
            failure = cls(type(exc), tuple(str(a) for a in exc.args), {})
        return failure

    def rebuild(self) -> BaseException:
        exc = self.type.__new__(self.type)
        BaseException.__init__(exc, *self.args)
        vars(exc).update(self.attributes)
        return exc


@dataclass(frozen=True)
class Reply:
    value: Any = None
    failure: Failure | None = None

    def unwrap(self) -> Any:
        if self.failure is not None:
            raise self.failure.rebuild()
        return self.value


def invoke(service: ShardService, method: str, args: tuple[Any, ...]) -> Reply:
    """Run one call on the shard; its failure travels back in the reply rather than as a Ray error."""
    if method not in CALLS:
        return Reply(failure=Failure.of(ValueError(f"no shard call {method!r}")))
    try:
        return Reply(getattr(service, method)(*args))
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in ("openemploi", "builtins", "sqlite3"):
            log.exception("shard call %s failed", method)
        return Reply(failure=Failure.of(exc))
