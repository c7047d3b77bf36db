"""The index snapshot of a collection: one file, switched by one rename, checked against the store on load.

`index.faiss` holds the FAISS index, then a trailer with the sequence it covers, its kind, its
HNSW tombstones and a checksum. It is written to a temp file, fsynced, renamed over the old one
and the folder fsynced: a crash leaves the old snapshot or the new one, never a mix of the two.
A loaded snapshot must hold exactly the store's live rows at its sequence, once each, in an index
of the kind it claims; anything else is refused, and the collection rebuilds from the store.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .durable import SNAPSHOT_RENAMED, SNAPSHOT_WRITTEN, crash_point, fsync_dir

SNAPSHOT_FILE = "index.faiss"
TEMP_SUFFIX = ".tmp"
REBUILD_TEMP_SUFFIX = ".rebuild.tmp"  # a background rebuild's snapshot, written while foreground snapshots go on
LEGACY_FILES = ("index.json", "index.faiss.tomb.json")  # the sidecars of the older three-file snapshot
MAGIC = b"OPENEMPLOI-INDEX-SNAPSHOT-1\n"
END_MAGIC = b"\nEND-OF-SNAPSHOT"
_LENGTH_BYTES = 8
_KIND_OF_INNER = {"IndexFlat": "flat", "IndexHNSW": "hnsw", "IndexIVF": "ivf"}


class SnapshotUnusable(ValueError):
    """The snapshot is missing, torn, or does not match the store: the store is the truth, rebuild."""


@dataclass(frozen=True)
class IndexState:
    """What a snapshot holds besides its sequence: the FAISS index, its kind and its tombstones."""

    kind: str
    index: Any  # a faiss IndexIDMap2
    tombstones: frozenset[int]


def temp_path(folder: Path, suffix: str = TEMP_SUFFIX) -> Path:
    return folder / (SNAPSHOT_FILE + suffix)


def remove_temps(folder: Path) -> None:
    """Temp snapshots a crash left behind: never read, only in the way."""
    for suffix in (TEMP_SUFFIX, REBUILD_TEMP_SUFFIX):
        temp_path(folder, suffix).unlink(missing_ok=True)


def write_temp(folder: Path, state: IndexState, seq: int, dim: int, suffix: str = TEMP_SUFFIX) -> Path:
    """Write and fsync the snapshot under its temp name; nothing the next start reads is touched yet."""
    path = temp_path(folder, suffix)
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        handle.write(MAGIC)

        def write(block: bytes) -> int:
            digest.update(block)
            return handle.write(block)

        payload_start = handle.tell()
        faiss.write_index(state.index, faiss.PyCallbackIOWriter(write))
        trailer = json.dumps(
            {
                "last_seq": seq,
                "dim": dim,
                "kind": state.kind,
                "tombstones": sorted(state.tombstones),
                "payload_bytes": handle.tell() - payload_start,
                "sha256": digest.hexdigest(),
            }
        ).encode()
        handle.write(trailer)
        handle.write(len(trailer).to_bytes(_LENGTH_BYTES, "little"))
        handle.write(END_MAGIC)
        handle.flush()
        os.fsync(handle.fileno())
    return path


def switch(folder: Path, suffix: str = TEMP_SUFFIX) -> None:
    """Rename the written temp snapshot over the current one and make the rename durable."""
    crash_point(SNAPSHOT_WRITTEN)
    os.replace(temp_path(folder, suffix), folder / SNAPSHOT_FILE)
    crash_point(SNAPSHOT_RENAMED)
    fsync_dir(folder)
    for name in LEGACY_FILES:
        (folder / name).unlink(missing_ok=True)


def read(folder: Path, dim: int) -> tuple[IndexState, int]:
    """The snapshot's index state and sequence, or SnapshotUnusable when it is missing or torn."""
    try:
        data = (folder / SNAPSHOT_FILE).read_bytes()
    except OSError as exc:
        raise SnapshotUnusable(f"no readable snapshot ({exc.strerror})") from exc
    if not data.startswith(MAGIC) or not data.endswith(END_MAGIC):
        raise SnapshotUnusable("not a complete snapshot file (older format, torn or overwritten)")
    tail = len(data) - len(END_MAGIC)
    trailer_bytes = int.from_bytes(data[tail - _LENGTH_BYTES : tail], "little")
    trailer_start = tail - _LENGTH_BYTES - trailer_bytes
    if trailer_start < len(MAGIC):
        raise SnapshotUnusable("snapshot trailer is out of bounds")
    try:
        trailer = json.loads(data[trailer_start : tail - _LENGTH_BYTES])
        payload = memoryview(data)[len(MAGIC) : trailer_start]
        intact = len(payload) == trailer["payload_bytes"] and hashlib.sha256(payload).hexdigest() == trailer["sha256"]
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotUnusable(f"snapshot trailer unreadable ({exc})") from exc
    if not intact:
        raise SnapshotUnusable("snapshot checksum mismatch")
    if trailer["dim"] != dim:
        raise SnapshotUnusable(f"snapshot has dimension {trailer['dim']}, the collection {dim}")
    try:
        index = faiss.deserialize_index(np.frombuffer(payload, np.uint8))
        state = IndexState(str(trailer["kind"]), index, frozenset(int(t) for t in trailer["tombstones"]))
        return state, int(trailer["last_seq"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise SnapshotUnusable(f"snapshot unreadable ({exc})") from exc


def check_against_store(state: IndexState, seq: int, live_at_seq: np.ndarray, dim: int) -> None:
    """Refuse a snapshot whose ids are not exactly the store's live rows at `seq`, once each, or whose kind lies.

    Replay after the snapshot adds rows above `seq` and removes those that died after it: it is right
    only on top of a snapshot that holds exactly the live rows at `seq`.
    """
    index = state.index
    if index.d != dim:
        raise SnapshotUnusable(f"snapshot index has dimension {index.d}, the collection {dim}")
    inner = type(faiss.downcast_index(index.index)).__name__
    actual = next((kind for prefix, kind in _KIND_OF_INNER.items() if inner.startswith(prefix)), inner)
    if actual != state.kind:
        raise SnapshotUnusable(f"snapshot claims a {state.kind} index but holds {inner}")
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    if len(np.unique(ids)) != len(ids):
        raise SnapshotUnusable(f"snapshot holds {len(ids) - len(np.unique(ids))} duplicate ids")
    tombstones = np.fromiter(state.tombstones, np.int64, len(state.tombstones))
    if not np.isin(tombstones, ids).all():
        raise SnapshotUnusable("snapshot tombstones name ids it does not hold")
    live = np.sort(ids[~np.isin(ids, tombstones)])
    if not np.array_equal(live, np.sort(live_at_seq)):
        raise SnapshotUnusable(
            f"snapshot holds {len(live)} live vectors, the store {len(live_at_seq)} live rows at sequence {seq}"
        )
