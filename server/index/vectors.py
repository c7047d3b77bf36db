"""A small face over FAISS index types: Flat, HNSW and IVF behind one class.

Ids are the store's sequence numbers (IndexIDMap2). HNSW cannot remove
vectors, so removed ids become tombstones excluded at search time until the
next rebuild. When faiss has GPUs, Flat and IVF searches run on a GPU copy;
each device has its own StandardGpuResources, used by one search at a time.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

from . import flat
from .snapshot import IndexState

log = logging.getLogger(__name__)

MAX_K = 2048  # the deepest search the index runs; limits.max_k, what callers may ask, stays within it
KINDS = ("auto", "flat", "hnsw", "ivf")
IVF_MIN_TRAIN = 10_000
# Hysteresis: an `auto` index grows to HNSW past flat_max and an `ivf` one trains at its threshold
# (min(IVF_MIN_TRAIN, flat_max)); each goes back to Flat only below SHRINK_MARK x that mark, so a
# collection hovering around a mark is not rebuilt on every write (see VectorIndex.target_kind).
SHRINK_MARK = 0.8
ADD_CHUNK = 10_000  # vectors per FAISS add in a rebuild: a cancelled rebuild stops between chunks
# Bounds a new collection's parameters must stay within: past them FAISS fails to train or to allocate
# only once documents arrive, after their write has committed.
FLAT_MAX_LIMIT = 100_000_000
HNSW_M_RANGE = (4, 128)
HNSW_EF_LIMIT = 4 * MAX_K  # ef_search and ef_construction
IVF_NLIST_LIMIT = 16_384  # and at most the vectors it trains on (see VectorIndex.rebuild)


@dataclass(frozen=True)
class IndexParams:
    kind: str = "auto"
    flat_max: int = 100_000
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    hnsw_ef_construction: int = 80
    ivf_nlist: int = 0  # 0: 4 * sqrt(n) when trained
    ivf_nprobe: int = 16

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {self.kind!r}")
        if self.flat_max < 1 or self.hnsw_m < 4 or self.hnsw_ef_search < 1 or self.ivf_nprobe < 1 or self.ivf_nlist < 0:
            raise ValueError("index parameters must be positive (hnsw_m >= 4)")

    def out_of_bounds(self) -> str:
        """Why these parameters are refused for a new collection, or "" when they are within bounds."""
        bounds = {
            "flat_max": (self.flat_max, 1, FLAT_MAX_LIMIT),
            "hnsw_m": (self.hnsw_m, *HNSW_M_RANGE),
            "hnsw_ef_search": (self.hnsw_ef_search, 1, HNSW_EF_LIMIT),
            "hnsw_ef_construction": (self.hnsw_ef_construction, 1, HNSW_EF_LIMIT),
            "ivf_nlist": (self.ivf_nlist, 0, IVF_NLIST_LIMIT),
            "ivf_nprobe": (self.ivf_nprobe, 1, IVF_NLIST_LIMIT),
        }
        return "; ".join(
            f"{name} must be between {low} and {high}, got {value}"
            for name, (value, low, high) in bounds.items()
            if not low <= value <= high
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> IndexParams:
        return cls(**json.loads(text))


class GpuPool:
    """One StandardGpuResources per device, each guarded so concurrent searches never share one."""

    def __init__(self) -> None:
        self.count = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        self._resources: list[object] = []
        self._locks: list[threading.Lock] = []
        if self.count:
            for _ in range(self.count):
                self._resources.append(faiss.StandardGpuResources())
                self._locks.append(threading.Lock())
        log.info("faiss GPUs: %d (%s)", self.count, "GPU search for flat/ivf" if self.count else "CPU search")

    def device_for(self, key: str) -> int:
        return hash(key) % self.count if self.count else -1


def _normalise_rows(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)


class VectorIndex:
    def __init__(self, dim: int, params: IndexParams, gpus: GpuPool | None = None, name: str = "") -> None:
        self.dim = dim
        self.params = params
        self._gpus = gpus
        self._name = name
        self._lock = threading.RLock()
        self._tombstones: set[int] = set()
        self._gpu_copy: Any = None  # a faiss GPU index
        self._gpu_dirty = True
        self.kind = "hnsw" if params.kind == "hnsw" else "flat"
        self._index = self._empty(self.kind)

    # -- construction ---------------------------------------------------------
    def _empty(self, kind: str, nlist: int = 0):
        """index_factory builds an IDMap2 that owns its inner index (no dangling Python refs)."""
        description = {"flat": "IDMap2,Flat", "hnsw": f"IDMap2,HNSW{self.params.hnsw_m}", "ivf": f"IDMap2,IVF{nlist},Flat"}[kind]
        index = faiss.index_factory(self.dim, description, faiss.METRIC_INNER_PRODUCT)
        inner = faiss.downcast_index(index.index)
        if kind == "hnsw":
            inner.hnsw.efConstruction = self.params.hnsw_ef_construction
            inner.hnsw.efSearch = self.params.hnsw_ef_search
        elif kind == "ivf":
            inner.nprobe = self.params.ivf_nprobe
        return index

    def target_kind(self, live: int) -> str:
        """The kind this index should be for `live` vectors, given the kind it is now (hysteresis, SHRINK_MARK)."""
        kind = self.params.kind
        if kind not in ("auto", "ivf"):
            return kind
        larger, mark = ("hnsw", self.params.flat_max) if kind == "auto" else ("ivf", min(IVF_MIN_TRAIN, self.params.flat_max))
        if self.kind == larger:
            return larger if live >= SHRINK_MARK * mark else "flat"
        grows = live > mark if kind == "auto" else live >= mark
        return larger if grows else "flat"

    def rebuild(self, kind: str, batches, check: Callable[[], None] = lambda: None) -> None:
        """Build a fresh index of `kind` from (ids, vectors) batches, then swap it in.

        `check` runs between chunks of ADD_CHUNK vectors; whatever it raises abandons the build.
        """
        ids_all, vectors_all = [], []
        for ids, vectors in batches:
            ids_all.append(ids)
            vectors_all.append(_normalise_rows(vectors))
        ids = np.concatenate(ids_all) if ids_all else np.zeros(0, np.int64)
        vectors = np.concatenate(vectors_all) if vectors_all else np.zeros((0, self.dim), np.float32)
        nlist = 0
        if kind == "ivf":
            wanted = self.params.ivf_nlist or max(16, int(4 * math.sqrt(max(len(ids), 1))))
            nlist = max(1, min(wanted, len(ids)))  # k-means cannot make more lists than it has vectors
            if nlist < wanted:
                log.warning("index %s: %d IVF lists asked, %d vectors to train on: using %d", self._name, wanted, len(ids), nlist)
        fresh = self._empty(kind, nlist)
        if kind == "ivf":
            sample = vectors[np.random.default_rng(0).permutation(len(vectors))[: nlist * 64]]
            fresh.train(sample)
        for start in range(0, len(ids), ADD_CHUNK):
            check()
            fresh.add_with_ids(vectors[start : start + ADD_CHUNK], ids[start : start + ADD_CHUNK])
        with self._lock:
            self._index, self.kind = fresh, kind
            self._tombstones.clear()
            self._gpu_dirty = True
        log.info("index %s rebuilt as %s with %d vectors", self._name, kind, len(ids))

    # -- mutation -------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        with self._lock:
            self._index.add_with_ids(_normalise_rows(vectors), np.asarray(ids, np.int64))
            self._gpu_dirty = True

    def remove(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        with self._lock:
            if self.kind == "hnsw":
                self._tombstones.update(int(i) for i in ids)
            else:
                self._index.remove_ids(np.asarray(ids, np.int64))
            self._gpu_dirty = True

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal) - len(self._tombstones)

    @property
    def tombstone_share(self) -> float:
        total = int(self._index.ntotal)
        return len(self._tombstones) / total if total else 0.0

    @property
    def device(self) -> str:
        if self._gpus and self._gpus.count and self.kind in ("flat", "ivf"):
            return f"cuda:{self._gpus.device_for(self._name)}"
        return "cpu"

    # -- search ---------------------------------------------------------------
    def _params(self, selector):
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.params.hnsw_ef_search, 1)
        elif self.kind == "ivf":
            params = faiss.SearchParametersIVF()
            params.nprobe = self.params.ivf_nprobe
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        return params

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products; `allowed` restricts to those ids. Missing slots have id -1."""
        queries = _normalise_rows(queries.reshape(-1, self.dim))
        k = max(1, min(k, MAX_K))
        with self._lock:
            selector = None
            keep = []
            if allowed is not None:
                allowed_ids = np.asarray(allowed, np.int64)
                if self._tombstones:
                    allowed_ids = allowed_ids[~np.isin(allowed_ids, np.fromiter(self._tombstones, np.int64))]
                keep.append(faiss.IDSelectorBatch(allowed_ids))
                selector = keep[-1]
            elif self._tombstones:
                keep.append(faiss.IDSelectorBatch(np.fromiter(self._tombstones, np.int64)))
                keep.append(faiss.IDSelectorNot(keep[-1]))
                selector = keep[-1]
            if self._use_gpu(selector):
                return self._gpu_search(queries, k)
            exact = flat.search(self._index, queries, k, allowed, self._tombstones) if self.kind == "flat" else None
            if exact is not None:  # BLAS beats faiss's Flat kernel below its BLAS threshold (flat.py)
                return exact
            ef = max(self.params.hnsw_ef_search, k)
            params = self._params(selector)
            if self.kind == "hnsw":
                params.efSearch = ef
            scores, ids = self._index.search(queries, k, params=params)
        return scores, ids

    def _use_gpu(self, selector) -> bool:
        return bool(self._gpus and self._gpus.count and self.kind in ("flat", "ivf") and selector is None)

    def _gpu_search(self, queries: np.ndarray, k: int):
        assert self._gpus is not None  # only called when _use_gpu(): a pool with GPUs
        device = self._gpus.device_for(self._name)
        with self._gpus._locks[device]:
            if self._gpu_dirty or self._gpu_copy is None:
                self._gpu_copy = faiss.index_cpu_to_gpu(self._gpus._resources[device], device, self._index)
                self._gpu_dirty = False
            return self._gpu_copy.search(queries, k)

    # -- persistence ------------------------------------------------------------
    def state(self) -> IndexState:
        """A consistent view of the index for a snapshot (taken under the index lock)."""
        with self._lock:
            return IndexState(self.kind, self._index, frozenset(self._tombstones))

    def restore(self, state: IndexState) -> None:
        if state.index.d != self.dim:
            raise ValueError(f"snapshot has dim {state.index.d}, collection has {self.dim}")
        with self._lock:
            self._index = state.index
            self.kind = state.kind
            self._tombstones = set(state.tombstones)
            self._gpu_dirty = True
