"""The durable store of one collection: SQLite in WAL mode with synchronous=FULL.

It is the source of truth. Every change gets a sequence number; a document's
row keeps the number of the change that made it (`seq`, also its FAISS id) and
of the change that superseded or deleted it (`dead_at`), so the derived index
can be replayed from any snapshot sequence. A write returns only after its
transaction is committed to disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from .text import LEXICAL_FORM_VERSION, fold_skill, lexical_form

SCHEMA = """
CREATE TABLE IF NOT EXISTS info(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs(
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    skills TEXT NOT NULL,
    vector BLOB,
    model_version TEXT NOT NULL,
    dead_at INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS docs_live_id ON docs(id) WHERE dead_at IS NULL;
CREATE INDEX IF NOT EXISTS docs_dead_at ON docs(dead_at);
CREATE TABLE IF NOT EXISTS meta(seq INTEGER NOT NULL, field TEXT NOT NULL, value TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS meta_field_value ON meta(field, value, seq);
CREATE INDEX IF NOT EXISTS meta_seq ON meta(seq);
CREATE TABLE IF NOT EXISTS skills(seq INTEGER NOT NULL, skill TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS skills_skill ON skills(skill, seq);
CREATE INDEX IF NOT EXISTS skills_seq ON skills(seq);
CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(text, tokenize='unicode61 remove_diacritics 2');
"""


@dataclass(frozen=True)
class NewDocument:
    id: str
    text: str
    vector: np.ndarray
    metadata: dict[str, str] = field(default_factory=dict)
    skills: tuple[str, ...] = ()
    lexical_text: str = ""  # what the lexical side indexes; defaults to `text`


@dataclass(frozen=True)
class StoredDocument:
    seq: int
    id: str
    text: str
    metadata: dict[str, str]
    skills: list[str]
    vector: np.ndarray | None
    model_version: str


@dataclass(frozen=True)
class Change:
    """What the derived index must apply: vectors to add, FAISS ids to remove."""

    added_ids: np.ndarray
    added_vectors: np.ndarray
    removed_ids: np.ndarray
    last_seq: int


class StoreError(RuntimeError):
    pass


class StorageFull(StoreError):
    """No room for a write (full disk, quota, file-size limit); nothing of it was committed.

    Its own type so the API answers RESOURCE_EXHAUSTED, which a caller can retry once space
    is freed, rather than INTERNAL.
    """


NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
LOW_SPACE_BYTES = 1 << 20  # below this much free space, a failed write is put down to a full disk
_SQLITE_IOERR = 10  # primary code of SQLite's I/O errors (extended codes keep it in the low byte)


def no_room_reason(folder: Path, written: Sequence[Path] = ()) -> str:
    """Why writes under `folder` find no room, or "" when there seems to be room.

    SQLite reports ENOSPC as SQLITE_FULL but a write past the file-size limit (EFBIG) as a plain
    I/O error, and faiss reports no errno at all: so look at the disk and the limit themselves.
    Call it before removing a half-written file (`written`, looked at first): it is what reached the limit.
    """
    try:
        stat = os.statvfs(folder)
        free = stat.f_bavail * stat.f_frsize
        if free < LOW_SPACE_BYTES:
            return f"{free} bytes free on the file system of {folder}"
    except OSError:
        pass
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        with contextlib.suppress(OSError):
            for path in [*written, *sorted(Path(folder).iterdir())]:
                if path.is_file() and path.stat().st_size + 65536 > limit:
                    return f"{path.name} reached this process's file size limit of {limit} bytes (RLIMIT_FSIZE)"
    return ""


def storage_full(exc: BaseException, folder: Path, what: str, written: Sequence[Path] = ()) -> StorageFull | None:
    """A StorageFull for `exc` when it comes from a lack of room under `folder`, else None."""
    if isinstance(exc, StorageFull):
        return exc
    code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.Error) else None
    if isinstance(exc, OSError) and exc.errno in NO_ROOM_ERRNOS:
        fallback = os.strerror(exc.errno)
    elif code == sqlite3.SQLITE_FULL:
        fallback = "SQLite reports the database or disk full"
    elif (code is not None and code & 0xFF == _SQLITE_IOERR) or type(exc) is RuntimeError:  # faiss: RuntimeError
        fallback = ""  # an I/O error is put down to a full disk only when the disk or the limit says so
    else:
        return None
    reason = no_room_reason(folder, written) or fallback
    if not reason:
        return None
    return StorageFull(
        f"collection storage is full ({reason}): {what} was not stored; free disk space (or raise the limit), then retry"
    )


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def _unblob(blob: bytes | None, dim: int) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype="<f4", count=dim).astype(np.float32)


class Store:
    def __init__(self, path: Path, dim: int) -> None:
        self.path = Path(path)
        self.dim = dim
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._writer = self._connect()
        with self._storage_errors("the collection's schema"):
            self._writer.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA foreign_keys=OFF")
        return connection

    def _reader(self) -> sqlite3.Connection:
        """One read connection per thread: WAL lets reads run while a write commits."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
        return connection

    @contextlib.contextmanager
    def read_transaction(self) -> Iterator[None]:
        """Reads in this thread see one state of the store (a WAL snapshot) until the block ends,
        whatever commits meanwhile: a background rebuild reads its rows and their sequence together."""
        db = self._reader()
        db.execute("BEGIN")
        try:
            yield
        finally:
            db.execute("COMMIT")

    # -- info ---------------------------------------------------------------
    def get_info(self, key: str, default: str = "") -> str:
        row = self._reader().execute("SELECT value FROM info WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_info(self, values: dict[str, str]) -> None:
        with self._transaction() as db:
            db.executemany("INSERT OR REPLACE INTO info(key, value) VALUES (?, ?)", list(values.items()))

    def last_seq(self) -> int:
        return int(self.get_info("last_seq", "0"))

    def refresh_lexical(self) -> int:
        """Re-index the lexical side when it was built with another `lexical_form`; returns the rows redone.

        The lexical text of a document lives only in the FTS table; its words refold the same way.
        """
        if self.get_info("lexical_form") == LEXICAL_FORM_VERSION:
            return 0
        with self._transaction() as db:
            rows = db.execute("SELECT rowid, text FROM fts").fetchall()
            db.execute("DELETE FROM fts")
            db.executemany("INSERT INTO fts(rowid, text) VALUES (?, ?)", [(r[0], lexical_form(r[1])) for r in rows])
            db.execute("INSERT OR REPLACE INTO info(key, value) VALUES ('lexical_form', ?)", (LEXICAL_FORM_VERSION,))
        return len(rows)

    # -- writes -------------------------------------------------------------
    @contextlib.contextmanager
    def _storage_errors(self, what: str = "this write") -> Iterator[None]:
        """SQLite errors that come from a full disk become StorageFull; others pass unchanged."""
        try:
            yield
        except sqlite3.Error as exc:
            full = storage_full(exc, self.path.parent, what)
            if full is None:
                raise
            raise full from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One writer at a time; BEGIN IMMEDIATE ... COMMIT, rolled back on any error.

        After SQLITE_FULL or an I/O error SQLite has already rolled the transaction back: a second
        ROLLBACK would fail and hide the real error, so it runs only while a transaction is open.
        """
        with self._write_lock, self._storage_errors():
            db = self._writer
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

    def _kill_live(self, db: sqlite3.Connection, doc_id: str, dead_at: int) -> int | None:
        """Retire the live version of `doc_id`, if any; return its FAISS id."""
        old = db.execute("SELECT seq FROM docs WHERE id=? AND dead_at IS NULL", (doc_id,)).fetchone()
        if old is None:
            return None
        self._kill(db, old[0], dead_at)
        return int(old[0])

    def upsert(self, documents: Sequence[NewDocument], model_version: str) -> Change:
        """Commit new versions of the documents; earlier versions of the same ids die."""
        ids = [d.id for d in documents]
        if len(set(ids)) != len(ids):
            raise StoreError("duplicate ids in one upsert")
        removed: list[int] = []
        added_ids: list[int] = []
        with self._transaction() as db:
            seq = self._committed_seq(db)
            for doc in documents:
                seq += 1
                old = self._kill_live(db, doc.id, seq)
                if old is not None:
                    removed.append(old)
                db.execute(
                    "INSERT INTO docs(seq, id, text, metadata, skills, vector, model_version) VALUES (?,?,?,?,?,?,?)",
                    (
                        seq,
                        doc.id,
                        doc.text,
                        json.dumps(doc.metadata, ensure_ascii=False),
                        json.dumps(list(doc.skills), ensure_ascii=False),
                        _blob(doc.vector),
                        model_version,
                    ),
                )
                db.executemany(
                    "INSERT INTO meta(seq, field, value) VALUES (?,?,?)", [(seq, k, v) for k, v in doc.metadata.items()]
                )
                folded = sorted({fold_skill(s) for s in doc.skills if fold_skill(s)})
                db.executemany("INSERT INTO skills(seq, skill) VALUES (?,?)", [(seq, s) for s in folded])
                db.execute("INSERT INTO fts(rowid, text) VALUES (?, ?)", (seq, lexical_form(doc.lexical_text or doc.text)))
                added_ids.append(seq)
            db.execute("INSERT OR REPLACE INTO info(key, value) VALUES ('last_seq', ?)", (str(seq),))
        vectors = (
            np.stack([np.asarray(d.vector, dtype=np.float32) for d in documents])
            if documents
            else np.zeros((0, self.dim), np.float32)
        )
        return Change(np.asarray(added_ids, np.int64), vectors, np.asarray(removed, np.int64), seq)

    @staticmethod
    def _committed_seq(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM info WHERE key='last_seq'").fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _kill(db: sqlite3.Connection, seq: int, dead_at: int) -> None:
        db.execute("UPDATE docs SET dead_at=?, vector=NULL WHERE seq=?", (dead_at, seq))
        db.execute("DELETE FROM meta WHERE seq=?", (seq,))
        db.execute("DELETE FROM skills WHERE seq=?", (seq,))
        db.execute("DELETE FROM fts WHERE rowid=?", (seq,))

    def delete(self, ids: Iterable[str]) -> Change:
        removed: list[int] = []
        with self._transaction() as db:
            seq = self._committed_seq(db)
            for doc_id in dict.fromkeys(ids):
                old = self._kill_live(db, doc_id, seq + 1)
                if old is not None:
                    seq += 1
                    removed.append(old)
            db.execute("INSERT OR REPLACE INTO info(key, value) VALUES ('last_seq', ?)", (str(seq),))
        return Change(np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32), np.asarray(removed, np.int64), seq)

    def purge_dead(self, up_to_seq: int) -> int:
        """Forget rows that died at or before a persisted snapshot: replay no longer needs them."""
        with self._write_lock:
            cursor = self._writer.execute("DELETE FROM docs WHERE dead_at IS NOT NULL AND dead_at <= ?", (up_to_seq,))
            return cursor.rowcount

    # -- reads --------------------------------------------------------------
    def count(self) -> int:
        return int(self._reader().execute("SELECT count(*) FROM docs WHERE dead_at IS NULL").fetchone()[0])

    def changes_since(self, seq: int) -> Change:
        db = self._reader()
        added = db.execute("SELECT seq, vector FROM docs WHERE seq > ? AND dead_at IS NULL ORDER BY seq", (seq,)).fetchall()
        removed = db.execute("SELECT seq FROM docs WHERE seq <= ? AND dead_at > ?", (seq, seq)).fetchall()
        ids = np.asarray([r[0] for r in added], np.int64)
        vectors = (
            np.stack(cast("list[np.ndarray]", [_unblob(r[1], self.dim) for r in added]))
            if added
            else np.zeros((0, self.dim), np.float32)
        )
        return Change(ids, vectors, np.asarray([r[0] for r in removed], np.int64), self.last_seq())

    def live_seqs_at(self, seq: int) -> np.ndarray:
        """The FAISS ids that were live just after change `seq`: what a snapshot at `seq` must hold."""
        rows = (
            self._reader()
            .execute("SELECT seq FROM docs WHERE seq <= ? AND (dead_at IS NULL OR dead_at > ?)", (seq, seq))
            .fetchall()
        )
        return np.asarray([r[0] for r in rows], np.int64)

    def live_vectors(self, batch: int = 50_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        db = self._reader()
        last = 0
        while True:
            rows = db.execute(
                "SELECT seq, vector FROM docs WHERE dead_at IS NULL AND seq > ? ORDER BY seq LIMIT ?", (last, batch)
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield (
                np.asarray([r[0] for r in rows], np.int64),
                np.stack(cast("list[np.ndarray]", [_unblob(r[1], self.dim) for r in rows])),
            )

    def _rows(self, where: str, params: Sequence, include_vectors: bool) -> list[StoredDocument]:
        column = "vector" if include_vectors else "NULL"
        rows = (
            self._reader()
            .execute(
                f"SELECT seq, id, text, metadata, skills, {column}, model_version FROM docs WHERE dead_at IS NULL AND {where}",
                params,
            )
            .fetchall()
        )
        return [StoredDocument(r[0], r[1], r[2], json.loads(r[3]), json.loads(r[4]), _unblob(r[5], self.dim), r[6]) for r in rows]

    def by_ids(self, ids: Sequence[str], include_vectors: bool = False) -> dict[str, StoredDocument]:
        found: dict[str, StoredDocument] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            for doc in self._rows(f"id IN ({marks})", chunk, include_vectors):
                found[doc.id] = doc
        return found

    def by_seqs(self, seqs: Sequence[int], include_vectors: bool = False) -> dict[int, StoredDocument]:
        found: dict[int, StoredDocument] = {}
        for start in range(0, len(seqs), 500):
            chunk = [int(s) for s in seqs[start : start + 500]]
            marks = ",".join("?" * len(chunk))
            for doc in self._rows(f"seq IN ({marks})", chunk, include_vectors):
                found[doc.seq] = doc
        return found

    def live_after(self, seq: int, limit: int) -> list[tuple[StoredDocument, str]]:
        """Live documents with a sequence above `seq`, in order, with their lexical text."""
        rows = self._rows("seq > ? ORDER BY seq LIMIT ?", (seq, limit), include_vectors=False)
        db = self._reader()
        lexical = []
        for doc in rows:
            found = db.execute("SELECT text FROM fts WHERE rowid=?", (doc.seq,)).fetchone()
            lexical.append(found[0] if found else doc.text)
        return list(zip(rows, lexical))

    def live_ids(self) -> set[str]:
        return {r[0] for r in self._reader().execute("SELECT id FROM docs WHERE dead_at IS NULL")}

    def has_field(self, name: str) -> bool:
        return self._reader().execute("SELECT 1 FROM meta WHERE field=? LIMIT 1", (name,)).fetchone() is not None

    def filtered_seqs(
        self, filters: Sequence[tuple[str, Sequence[str]]], skills_all: Sequence[str], skills_any: Sequence[str]
    ) -> np.ndarray:
        """Live FAISS ids whose metadata and skills satisfy every condition."""
        clauses, params = [], []
        for name, values in filters:
            marks = ",".join("?" * len(values))
            clauses.append(f"seq IN (SELECT seq FROM meta WHERE field=? AND value IN ({marks}))")
            params += [name, *values]
        for skill in skills_all:
            clauses.append("seq IN (SELECT seq FROM skills WHERE skill=?)")
            params.append(fold_skill(skill))
        if skills_any:
            marks = ",".join("?" * len(skills_any))
            clauses.append(f"seq IN (SELECT seq FROM skills WHERE skill IN ({marks}))")
            params += [fold_skill(s) for s in skills_any]
        where = " AND ".join(["dead_at IS NULL", *clauses])
        rows = self._reader().execute(f"SELECT seq FROM docs WHERE {where}", params).fetchall()
        return np.asarray([r[0] for r in rows], np.int64)

    def lexical(self, match: str, limit: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """(FAISS id, bm25 with higher = better) for an FTS5 MATCH expression."""
        if not match:
            return []
        db = self._reader()
        if allowed is None:
            rows = db.execute(
                "SELECT rowid, bm25(fts) FROM fts WHERE fts MATCH ? ORDER BY bm25(fts) LIMIT ?", (match, limit)
            ).fetchall()
        else:
            if len(allowed) == 0:
                return []
            db.execute("CREATE TEMP TABLE IF NOT EXISTS allowed_seqs(seq INTEGER PRIMARY KEY)")
            db.execute("DELETE FROM allowed_seqs")
            db.executemany("INSERT INTO allowed_seqs(seq) VALUES (?)", [(int(s),) for s in allowed])
            rows = db.execute(
                "SELECT rowid, bm25(fts) FROM fts WHERE fts MATCH ? AND rowid IN (SELECT seq FROM allowed_seqs) "
                "ORDER BY bm25(fts) LIMIT ?",
                (match, limit),
            ).fetchall()
        return [(int(r[0]), -float(r[1])) for r in rows]

    def close(self) -> None:
        self._writer.close()
