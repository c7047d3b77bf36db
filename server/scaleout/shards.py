"""Collections sharded across replicas: the gateway's drop-in for `CollectionManager` and `Collection`.

`ShardedCollectionManager(backends)` meets `index.protocols.SelfReembedding` and hands out
`ShardedCollection`s (`index.protocols.CollectionLike`), so the servicers, the catalogue bootstraps and
the matchers run on it unchanged. Backend i reaches shard i (`ShardBackend`: `submit(method, *args)`
returns a pending call whose `result()` blocks; the methods are `shard_service.ShardService`'s):
`LocalShardBackend` in process, `shard_replica.RayShardBackend` through Ray Serve. Calls block, so
the servicers keep running them on their work pool; one from an event loop thread is the backend's
to take off the loop (Ray's does).

- Shard count: fixed at creation (default: every shard backend), recorded in each part's store info,
  read back from shard 0's part after a restart. More than the backends: INVALID_ARGUMENT.
- Routing: a document goes to part `blake2b(id) mod count`, stable across processes and restarts.
  Get/Delete/Upsert split their ids per part and send the parts concurrently; size() and the
  collection's last_sequence are sums over the parts (both grow with every change, as one collection's).
  An upsert is atomic per part, not across parts: after a failure some parts may hold the batch;
  upserts and deletes are idempotent, so the caller retries the whole batch.
- Existence: shard 0's part is created last and dropped first, so it alone says whether a collection
  exists. A crash in the middle of a creation or a drop leaves parts on other shards without shard 0's:
  invisible, never served, and replaced when that name is created again.
- Search: exact merge (merge.py). Dense search (filters apply on each part) returns what one collection
  holding every document returns, ids and scores, for exact indexes (flat, and filtered searches over at
  most EXACT_FILTER_MAX documents per part); ties are ordered by document id. Approximate indexes
  (HNSW, IVF) search each part approximately. Hybrid search fuses the parts' candidates once, globally:
  the pools, the ranks and the normalisation by the best bm25 are global. What cannot be exact is bm25
  itself: FTS5 computes it from each part's own statistics (document count, mean length, how many
  documents hold a term), so a term's weight differs by part and from one collection's. The result is
  exact when the parts' statistics agree (the tests build such data) and close when parts are large.
- Re-embedding: the gateway drives it with the embedder it was given (`reembed`): each part stages a
  new collection of its rows; all parts are fenced (writers wait), the last rows copied, then the parts
  switch, shard 0 last. A search in that window meets a part on the other model and is refused
  (ABORTED, retry) rather than mixing vector spaces. If the gateway dies in the window, the parts
  already switched stay switched and the others hold the old model: the collection answers ABORTED
  until Reembed is run again with the same model, which re-embeds only the parts left behind.
- A shard that cannot be reached fails the call with ShardUnavailable (UNAVAILABLE); what it
  acknowledged is on its disk and served again when it is back.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import pickle
import threading
import uuid
from collections.abc import Coroutine, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from ..index.collection import (
    CollectionExists,
    CollectionNotFound,
    CollectionReplaced,
    CollectionSpec,
    CollectionUnavailable,
    InvalidQuery,
)
from ..index.layout import NAME_PATTERN
from ..index.protocols import EmbedTexts
from ..index.search import SearchQuery, SearchResult
from ..index.store import NewDocument, StoredDocument
from .merge import merge
from .shard_service import PartInfo, Ref, ShardService, invoke

log = logging.getLogger(__name__)

FENCE_HOLD_S = 60.0  # the longest writers of a re-embedded collection wait for its switch (< the Ray call timeout)


class PendingCall(Protocol):
    def result(self) -> Any: ...


class ShardBackend(Protocol):
    """Reaches one shard; `submit` sends the call at once, `result()` waits for it (and raises its failure)."""

    def submit(self, method: str, *args: Any) -> PendingCall: ...

    def close(self) -> None: ...


class LocalShardBackend:
    """A shard in this process. Arguments and results are pickled on the way, as Ray would, so the
    tests meet the same copies and the same rebuilt exceptions as the cluster."""

    def __init__(self, service: ShardService, workers: int = 8) -> None:
        self.service = service
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="openemploi-shard")

    def submit(self, method: str, *args: Any) -> PendingCall:
        payload = pickle.dumps(args)
        future: Future[bytes] = self._pool.submit(lambda: pickle.dumps(invoke(self.service, method, pickle.loads(payload))))
        return _Unpickled(future)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.service.close()


@dataclass
class _Unpickled:
    future: Future[bytes]

    def result(self) -> Any:
        return pickle.loads(self.future.result()).unwrap()


def route(doc_id: str, count: int) -> int:
    """The part of a document: stable across processes (unlike the salted hash())."""
    digest = hashlib.blake2b(doc_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


class ShardedCollectionManager:
    def __init__(self, backends: Sequence[ShardBackend]) -> None:
        if not backends:
            raise ValueError("a sharded collection manager needs at least one shard backend")
        self.backends = list(backends)
        self._lock = threading.Lock()
        self._cache: dict[str, ShardedCollection] = {}

    def call(self, shard: int, method: str, *args: Any) -> Any:
        return self.backends[shard].submit(method, *args).result()

    def close(self) -> None:
        for backend in self.backends:
            backend.close()

    def fan_out(self, calls: Sequence[tuple[int, str, tuple[Any, ...]]]) -> list[Any]:
        """Send every call at once, then wait for each; the first failure is raised once all have ended."""
        pending = [self.backends[shard].submit(method, *args) for shard, method, args in calls]
        results: list[Any] = []
        failure: BaseException | None = None
        for call in pending:
            try:
                results.append(call.result())
            except Exception as exc:
                failure = failure or exc
                results.append(None)
        if failure is not None:
            raise failure
        return results

    # -- the CollectionManager side -----------------------------------------------------------
    def create(self, spec: CollectionSpec, shards: int | None = None) -> ShardedCollection:
        count = len(self.backends) if shards is None else shards
        if not 1 <= count <= len(self.backends):
            raise InvalidQuery(f"shard count must be between 1 and {len(self.backends)} (the shard deployments), got {count}")
        if not NAME_PATTERN.fullmatch(spec.name):
            raise InvalidQuery(f"collection name {spec.name!r} must match {NAME_PATTERN.pattern}")
        if spec.name in self.names():
            raise CollectionExists(f"collection {spec.name!r} already exists")
        created = spec.created_at or dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        spec = replace(spec, created_at=created)
        shard_set = uuid.uuid4().hex
        try:
            self.fan_out([(i, "create_part", (spec, shard_set, i, count)) for i in range(1, count)])
            info = self.call(0, "create_part", spec, shard_set, 0, count)
        except BaseException:
            self._drop_parts(spec.name, shard_set, range(count))
            raise
        collection = ShardedCollection(self, info)
        with self._lock:
            self._cache[spec.name] = collection
        return collection

    def get(self, name: str) -> ShardedCollection:
        collection = self._cache.get(name)
        if collection is not None:
            return collection
        info: PartInfo = self.call(0, "describe", name)
        if not info.shard_set:  # shard 0's part of a creation cut short
            raise CollectionNotFound(f"collection {name!r} does not exist", name)
        collection = ShardedCollection(self, info)
        with self._lock:
            self._cache[name] = collection
        return collection

    def forget(self, name: str) -> None:
        """Drop what this gateway knows of `name`: the next call reads it from the shards again."""
        with self._lock:
            self._cache.pop(name, None)

    def names(self) -> list[str]:
        return sorted(p.spec.name for p in self.call(0, "parts") if p.shard_set)

    def drop(self, name: str) -> None:
        self.forget(name)
        try:
            info: PartInfo = self.call(0, "describe", name)
        except CollectionUnavailable:  # shard 0's part cannot be read: it goes, the others are orphans then
            self.call(0, "drop_part", name, None)
            return
        self._drop_parts(name, info.shard_set, range(info.count))

    def _drop_parts(self, name: str, shard_set: str, parts: range) -> None:
        """Shard 0 first: once its part is gone the collection is, whatever becomes of the others."""
        if 0 in parts:
            self.call(0, "drop_part", name, shard_set)
        self.fan_out([(i, "drop_part", (name, shard_set)) for i in parts if i > 0])

    # -- re-embedding, driven from here: the embedder lives with the gateway --------------------------
    async def reembed(
        self, name: str, model: str, model_version: str, dim: int, embed: EmbedTexts, progress: bool = True
    ) -> ShardedCollection:
        self.forget(name)
        collection = await asyncio.to_thread(self.get, name)
        ref = collection.ref
        parts = list(range(collection.count))
        try:
            begun = await asyncio.to_thread(self.fan_out, [(i, "reembed_begin", (ref, model, model_version, dim)) for i in parts])
            parts = [i for i in parts if begun[i]]  # the others switched in an earlier run cut short
            seen = await _together(self._copy(i, ref, 0, embed) for i in parts)
            await asyncio.to_thread(self.fan_out, [(i, "reembed_fence", (ref, FENCE_HOLD_S)) for i in parts])
            seen = await _together(self._copy(i, ref, after, embed) for i, after in zip(parts, seen))
            for i, after in sorted(zip(parts, seen), reverse=True):  # shard 0 last: it names the collection's model
                await asyncio.to_thread(self.call, i, "reembed_switch", ref, after)
        except BaseException:
            await asyncio.to_thread(self._abort, ref, parts)
            raise
        finally:
            self.forget(name)
        log.info("collection %s re-embedded with %s/%s on %d shards", name, model, model_version, len(parts))
        return await asyncio.to_thread(self.get, name)

    async def _copy(self, shard: int, ref: Ref, after: int, embed: EmbedTexts) -> int:
        """Copy the part's live rows changed after `after` into its staged collection; returns the sequence reached."""
        while True:
            rows, reached = await asyncio.to_thread(self.call, shard, "reembed_rows", ref, after)
            if not rows:
                return max(after, reached)
            vectors = await embed([d.text for d, _ in rows])
            documents = [
                NewDocument(d.id, d.text, vectors[n], d.metadata, tuple(d.skills), lexical) for n, (d, lexical) in enumerate(rows)
            ]
            await asyncio.to_thread(self.call, shard, "reembed_put", ref, documents)
            after = rows[-1][0].seq

    def _abort(self, ref: Ref, parts: list[int]) -> None:
        for i in parts:
            try:
                self.call(i, "reembed_abort", ref)
            except Exception as exc:  # the part's staging is dropped at its next start or re-embedding
                log.warning("collection %s: re-embedding not cleaned up on shard %d (%s)", ref.name, i, exc)


async def _together(coroutines: Iterable[Coroutine[Any, Any, int]]) -> list[int]:
    """Run them at once; the first failure cancels the others and is raised itself (not as a group)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class ShardedCollection:
    """One collection split over `count` parts on shards 0..count-1."""

    def __init__(self, manager: ShardedCollectionManager, info: PartInfo) -> None:
        self._manager = manager
        self.spec = info.spec
        self.count = info.count
        self.ref = Ref(info.spec.name, info.shard_set, info.spec.model, info.spec.model_version)
        self.store = ShardedStore(self)
        self.index = ShardedIndex(self)

    def call_all(self, method: str, *args: Any) -> list[Any]:
        return self.fan_out([(i, method, args) for i in range(self.count)])

    def fan_out(self, calls: Sequence[tuple[int, str, tuple[Any, ...]]]) -> list[Any]:
        """The manager's fan-out; a part that was replaced makes this gateway read the collection again."""
        try:
            return self._manager.fan_out([(i, method, (self.ref, *args)) for i, method, args in calls])
        except (CollectionReplaced, CollectionNotFound):
            self._manager.forget(self.spec.name)
            raise

    def _split(self, ids: Sequence[str]) -> dict[int, list[str]]:
        parts: dict[int, list[str]] = {}
        for doc_id in ids:
            parts.setdefault(route(doc_id, self.count), []).append(doc_id)
        return parts

    # -- writes ------------------------------------------------------------------------------
    def upsert(self, documents: Sequence[NewDocument]) -> int:
        """Returns the collection's sequence after the write: the sum of its parts'."""
        for doc in documents:  # the whole batch before any part: a bad vector must not leave half of it stored
            check_vector(self.spec, doc.vector, f"document {doc.id!r}")
        parts: dict[int, list[NewDocument]] = {}
        for doc in documents:
            parts.setdefault(route(doc.id, self.count), []).append(doc)
        calls = [(i, "upsert", (parts[i],)) if i in parts else (i, "last_seq", ()) for i in range(self.count)]
        return sum(self.fan_out(calls))

    def delete(self, ids: Sequence[str]) -> int:
        return sum(self.fan_out([(i, "delete", (part,)) for i, part in self._split(ids).items()]))

    # -- reads -------------------------------------------------------------------------------
    def get(self, ids: Sequence[str], include_vectors: bool = False) -> dict[str, StoredDocument]:
        found: dict[str, StoredDocument] = {}
        for part in self.fan_out([(i, "get", (part, include_vectors)) for i, part in self._split(ids).items()]):
            found.update(part)
        return found

    def size(self) -> int:
        return sum(p.size for p in self.call_all("info"))

    def search(self, query: SearchQuery) -> SearchResult:
        return merge(query, self.spec.name, self.call_all("candidates", query))

    def snapshot(self) -> None:
        self.call_all("snapshot")


class ShardedStore:
    """The store info a caller reads and writes: kept on every part, read from shard 0's."""

    def __init__(self, collection: ShardedCollection) -> None:
        self._collection = collection

    def get_info(self, key: str, default: str = "") -> str:
        return str(self._collection.fan_out([(0, "get_info", (key, default))])[0])

    def set_info(self, values: dict[str, str]) -> None:
        self._collection.call_all("set_info", values)

    def last_seq(self) -> int:
        return sum(self._collection.call_all("last_seq"))


class ShardedIndex:
    """Kind and device as ListCollections shows them: one value when the parts agree, else each part's."""

    def __init__(self, collection: ShardedCollection) -> None:
        self._collection = collection

    def _each(self, attribute: str) -> str:
        values = [getattr(p, attribute) for p in self._collection.call_all("info")]
        return values[0] if len(set(values)) == 1 else ",".join(values)

    @property
    def kind(self) -> str:
        return self._each("index_kind")

    @property
    def device(self) -> str:
        return self._each("device")


def check_vector(spec: CollectionSpec, vector: np.ndarray, what: str) -> None:
    """Collection.check_vector's refusals, before a batch is split: no part may take half of a bad batch."""
    if vector.shape != (spec.dim,):
        raise InvalidQuery(f"{what}: vector has dimension {vector.size}, collection {spec.name!r} expects {spec.dim}")
    if not np.all(np.isfinite(vector)):
        raise InvalidQuery(f"{what}: vector contains NaN or infinity")
