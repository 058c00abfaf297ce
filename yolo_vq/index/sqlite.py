"""The SQLite store: :class:`SQLiteStore`, one index directory holding ``index.db`` (SQLite in WAL mode) with sources,
frames, detections and codes (the :class:`~yolo_vq.index.store.Store` interface; open it with
:func:`~yolo_vq.index.registry.open_store`).

Writes go in batches, one transaction per batch, and each processed frame is recorded in ``frames`` in the same
transaction as its detections: a crash loses at most the batch in flight, and re-running the same job skips every
frame already recorded (idempotent per source fingerprint + frame). WAL lets other processes search while one writes.

Optional parts, same schema version: a JPEG thumbnail per detection (``detections.thumb``), and the float16
embedding of each detection in a separate ``vectors`` table (for exact re-ranking of a search shortlist), created by
the first batch that keeps vectors. Stores without that table are complete version-1 stores (older yolo_vq versions
read stores with it and ignore it); ``meta['vectors']`` says whether, and with what dim, vectors are kept.

The codebook binding (:mod:`yolo_vq.index.binding`), the metadata forms and the wording of faults
(:mod:`yolo_vq.index.faults`) are shared by every store; this module holds the schema, the SQL and how SQLite's own
errors map to those faults.

Faults (a damaged or foreign file, a read-only folder, a full disk, a lock held too long) surface as one
:class:`StoreError` naming the file and what to do; a failed write transaction is rolled back whole.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar
from urllib.request import pathname2url

import numpy as np

from ..detections import Detections
from ..errors import StoreError
from .binding import CODEBOOK_STEM, bind
from .faults import RESTORE, Fault, damaged, fault, free_bytes
from .store import (
    ROW_FIELDS,
    SCHEMA_VERSION,
    VECTOR_DTYPE,
    CodebookBinding,
    Frame,
    Source,
    SourceInfo,
    Store,
    frame_columns,
)

__all__ = ["DB_NAME", "SCHEMA_REVISION", "SQLiteStore"]

DB_NAME = "index.db"  # the database file in the index directory

F = TypeVar("F", bound=Callable[..., Any])

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sources (
    id INTEGER PRIMARY KEY,
    uri TEXT NOT NULL,
    fingerprint TEXT NOT NULL UNIQUE,
    fps REAL, frame_count INTEGER, width INTEGER, height INTEGER,
    added_utc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS frames (
    source_id INTEGER NOT NULL REFERENCES sources(id),
    frame INTEGER NOT NULL,
    detections INTEGER NOT NULL,
    PRIMARY KEY (source_id, frame)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS detections (
    id INTEGER PRIMARY KEY,
    source_id INTEGER NOT NULL REFERENCES sources(id),
    frame INTEGER NOT NULL,
    time REAL NOT NULL,
    x1 REAL NOT NULL, y1 REAL NOT NULL, x2 REAL NOT NULL, y2 REAL NOT NULL,
    class_id INTEGER NOT NULL,
    confidence REAL NOT NULL,
    track_id INTEGER NOT NULL,
    codes BLOB,
    thumb BLOB,
    list_id INTEGER
);
CREATE INDEX IF NOT EXISTS detections_source_frame ON detections (source_id, frame);
CREATE INDEX IF NOT EXISTS detections_track ON detections (source_id, track_id);
"""
# Compatible changes within SCHEMA_VERSION (meta['schema_revision']; none recorded: 1). 2: detections.list_id (the
# coarse list, for the search lists). 3: no index on detections.class_id (nothing queries it: class filters run on the
# search's own columns; one B-tree less to update per stored detection). A store of an older revision is read as it is
# (what it lacks reads as absent: list_id NULL) and brought up to this revision, in one write, when opened for writing
# (:meth:`SQLiteStore._upgrade`); an older yolo_vq reads a newer revision of the same SCHEMA_VERSION (it ignores the
# columns it does not know, and no query of it needs the dropped index).
SCHEMA_REVISION = 3
_COLS = ("source_id", "frame", "time", "x1", "y1", "x2", "y2", "class_id", "confidence", "track_id", "codes", "thumb",
         "list_id")  # the columns a stored detection is given, in the order of _detection_values
_ROWS_PER_INSERT = 128  # detections per multi-row INSERT (13 x 128 parameters, within SQLite's 32766)
_INSERT_ONE = f"INSERT INTO detections ({', '.join(_COLS)}) VALUES ({', '.join('?' * len(_COLS))})"
_INSERT_MANY = _INSERT_ONE + f", ({', '.join('?' * len(_COLS))})" * (_ROWS_PER_INSERT - 1)
_VECTORS = "CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY REFERENCES detections(id), vector BLOB NOT NULL)"
# The columns every version-1 store has (``vectors`` is optional): checked at open, so a damaged schema is one error.
_COLUMNS = {
    "meta": {"key", "value"},
    "sources": {"id", "uri", "fingerprint", "fps", "frame_count", "width", "height", "added_utc"},
    "frames": {"source_id", "frame", "detections"},
    "detections": {"id", "source_id", "frame", "time", "x1", "y1", "x2", "y2", "class_id", "confidence", "track_id",
                   "codes", "thumb"},
}


_NUMERIC = {"id": np.int64, "class_id": np.int64, "source_id": np.int64, "time": np.float64,
            "confidence": np.float32, "track_id": np.int64, "list_id": np.int32, "frame": np.int64,
            "x1": np.float32, "y1": np.float32, "x2": np.float32, "y2": np.float32}


def _numbers(path: Path, values: tuple, dtype: Any) -> np.ndarray:
    """One column's stored values -> (n,) ``dtype``. Raises StoreError (naming the index) for a value that is no
    number (a damaged database)."""
    try:
        return np.array(values, dtype=np.float64).astype(dtype)
    except (ValueError, TypeError) as e:
        raise _no_numbers(path, e) from None


def _no_numbers(path: Path, e: Exception) -> StoreError:
    return StoreError(f"{path}: detection rows hold values that are no numbers ({e}): the database is damaged; "
                      f"re-index into a new directory")


def _code_matrix(path: Path, blobs: list, code_size: Any) -> np.ndarray:
    """Code blobs of one length -> (n, code_size) uint8. Raises StoreError (naming the index) for a blob of another
    length or type, or a code_size that is no positive int (a damaged database)."""
    try:
        return np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), code_size)
    except (ValueError, TypeError) as e:
        raise StoreError(f"{path}: stored codes are not all {code_size!r} bytes long ({e}): the database is damaged; "
                         f"re-index into a new directory") from None


def _detection_values(source_id: int, frames: list[Frame]) -> list:
    """The :data:`_INSERT_ONE` parameters of every detection of ``frames``, in order, one flat list (13 a detection):
    the batch's columns (:func:`frame_columns`) converted to Python values once (``tolist``), not per frame or value."""
    c = frame_columns(frames)
    n = len(c["frame"])
    thumbs = []
    for f in frames:
        if f.thumbs is not None and len(f.thumbs) != len(f.detections):
            raise ValueError(f"frame {f.frame}: {len(f.thumbs)} thumbnails for {len(f.detections)} detections")
        thumbs += f.thumbs if f.thumbs is not None else [None] * len(f.detections)
    if c["codes"] is not None:
        codes = [r.tobytes() for r in c["codes"]]
    else:  # some frames without codes: their rows store none
        codes = [None if d.codes is None else r.tobytes() for d in (f.detections for f in frames)
                 for r in (d.codes if d.codes is not None else range(len(d)))]
    columns = ([source_id] * n, c["frame"].tolist(), c["time"].tolist(), *c["xyxy"].astype(np.float64).T.tolist(),
               c["class_id"].tolist(), c["confidence"].astype(np.float64).tolist(), c["track_id"].tolist(), codes,
               thumbs, [v if v >= 0 else None for v in c["list_id"].tolist()])
    return list(chain.from_iterable(zip(*columns)))


def _insert_detections(cur: sqlite3.Cursor, values: list) -> None:
    """INSERT the flat ``values`` (:func:`_detection_values`), :data:`_ROWS_PER_INSERT` rows a statement: one
    multi-row INSERT binds and steps once for 128 rows (5.1 us a row against 7.6 for one row a statement, measured
    on 262k rows with the conversion included)."""
    width, k = len(_COLS) * _ROWS_PER_INSERT, len(_COLS)
    full = len(values) // width * width
    cur.executemany(_INSERT_MANY, (values[i:i + width] for i in range(0, full, width)))
    cur.executemany(_INSERT_ONE, (values[i:i + k] for i in range(full, len(values), k)))


def _sql_fault(path: Path, doing: str, e: sqlite3.Error) -> StoreError:
    """SQLite's error while ``doing`` something with the store at ``path`` -> the fault it is (one line)."""
    msg = str(e)
    low = msg.lower()
    writable = os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))
    if "disk is full" in low or "disk i/o error" in low and free_bytes(path.parent) == 0:
        kind = Fault.DISK_FULL
    elif "readonly" in low or "read-only" in low or "unable to open" in low and not writable:
        kind = Fault.READ_ONLY
    elif "locked" in low or "busy" in low:
        kind = Fault.LOCKED
    elif "unable to open" in low:
        kind = Fault.UNOPENABLE
    else:
        kind = Fault.DAMAGED
    return fault(kind, path, doing, msg)


def _guard(doing: str) -> Callable[[F], F]:
    """Turn SQLite errors raised by a store method into one :class:`StoreError` saying what failed and the fix."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(self: SQLiteStore, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            except sqlite3.Error as e:
                raise _sql_fault(self.path, doing, e) from None

        return inner  # type: ignore[return-value]

    return wrap


class SQLiteStore(Store):
    """Open (or with ``create=True`` make) the SQLite index in the directory ``directory`` (``index.db`` inside).

    Args:
        directory: the index directory; ``index.db`` lives inside.
        create: make the directory and an empty store if missing.
        readonly: open read-only (searchers); never blocks the writer, and works in a read-only folder.
        timeout: seconds to wait for another writer's lock.
        codebook: bind this codebook (a :class:`CodebookBinding`) in the same transaction that creates the schema;
            on an existing index it must be the index's own (see :meth:`bind_codebook`).

    Raises:
        StoreError: no store there (without ``create``), a damaged, empty or foreign file, a store of another schema
            version, a read-only index opened for writing; nothing is modified.
        CodebookError: ``codebook`` is not the index's own.
    """

    def __init__(self, directory: str | Path, *, create: bool = False, readonly: bool = False, timeout: float = 30.0,
                 codebook: CodebookBinding | None = None):
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        self.readonly = readonly
        self.timeout = timeout
        fresh = self._check_file(create and not readonly)
        try:
            self._db = self._connect(readonly)
        except (sqlite3.Error, UnicodeDecodeError) as e:  # UnicodeDecodeError: SQLite's error quotes a damaged schema
            raise _sql_fault(self.path, "opening it", e) from None
        try:
            self._open(create and not readonly, fresh, codebook)
        except (sqlite3.Error, UnicodeDecodeError) as e:
            self._db.close()
            raise _sql_fault(self.path, "opening it", e) from None
        except BaseException:
            self._db.close()
            raise

    def _check_file(self, create: bool) -> bool:
        """Refuse what must not be opened (or made) as a store; True when a new store is to be made."""
        if self.directory.exists() and not self.directory.is_dir():
            raise StoreError(f"--index {self.directory} is a file, not an index directory: pass a directory")
        own = self.directory / f"{CODEBOOK_STEM}.json"
        if not self.path.is_file():
            if self.path.exists():
                raise StoreError(f"{self.path} is not a regular file: {RESTORE}")
            if own.is_file():  # an index's codebook without its database: the database was lost
                raise StoreError(f"{self.directory} holds an index codebook but no {DB_NAME}: the database was "
                                 f"deleted or moved; {RESTORE} (nothing was changed)")
            if not create:
                raise StoreError(
                    f"no index at {self.directory} ({DB_NAME} missing): create one with `yolo-vq index VIDEO "
                    f"--index {self.directory}` or open_store(..., create=True)"
                )
            self.directory.mkdir(parents=True, exist_ok=True)
            return True
        if self.path.stat().st_size == 0:
            # SQLite takes an empty file for an empty database. A creation killed before its first write leaves
            # one (no codebook copied yet): making the store then loses nothing. Beside a codebook, it is a
            # truncated index, which must not be re-created over.
            if own.is_file() or not create:
                raise StoreError(f"{self.path} is empty (0 bytes){' beside its codebook' if own.is_file() else ''}: "
                                 f"the index database was truncated or never written; {RESTORE} (nothing was "
                                 f"changed)")
            return True
        return False

    def _connect(self, readonly: bool) -> sqlite3.Connection:
        if not readonly:
            return sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        uri = "file:" + pathname2url(str(self.path.resolve()))
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=self.timeout, isolation_level=None)
        try:
            db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            return db
        except sqlite3.OperationalError:
            db.close()
        # A WAL database read-only needs its -shm file, which a read-only folder cannot hold. Without a -wal file
        # holding writes not yet in the database, the file alone is the whole index: read it as immutable.
        wal = self.path.with_name(self.path.name + "-wal")
        if wal.is_file() and wal.stat().st_size > 0:
            raise StoreError(f"{self.path}: its folder is read-only and {wal.name} holds writes not yet checkpointed "
                             f"into it, which SQLite cannot read without a writable folder: open the index once "
                             f"where the folder is writable (any search does), or copy the folder elsewhere")
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, timeout=self.timeout, isolation_level=None)

    def _open(self, create: bool, fresh: bool, codebook: CodebookBinding | None) -> None:
        if not self.readonly and not fresh:
            # a read-only file or folder opens silently read-only: find out now, before any work is done
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ROLLBACK")
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables and create:
            self._create(codebook)
            codebook = None  # bound (or, had another process made the schema first, checked) in the transaction
            tables = set(_COLUMNS)
        if not tables:
            raise StoreError(f"{self.path} holds no index yet: its creation stopped before anything was stored; index "
                             f"into it again (`yolo-vq index VIDEO --index {self.directory}`)")
        version = self.get_meta("schema_version") if "meta" in tables else None
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version!r}, this yolo_vq reads version {SCHEMA_VERSION}: index into "
                f"a new directory (or use the yolo_vq version that wrote it); the existing index was left untouched"
            )
        for table, want in _COLUMNS.items():
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if missing := sorted(want - have):
                raise damaged(self.path, f"table {table!r} lacks columns {missing}")
        self._db.execute("PRAGMA foreign_keys=ON")
        if not self.readonly:
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        if not self.readonly and (self.get_meta("schema_revision") or 1) < SCHEMA_REVISION:
            self._upgrade()
        self._lists = "list_id" in {r[1] for r in self._db.execute("PRAGMA table_info(detections)")}
        if codebook is not None:
            self.bind_codebook(codebook)

    def _upgrade(self) -> None:
        """Bring a store of an older :data:`SCHEMA_REVISION` up to this one, in one write (another process may be
        doing the same: the write lock orders them, and each step checks what is already there)."""
        with self._writing("upgrading its schema"):
            if "list_id" not in {r[1] for r in self._db.execute("PRAGMA table_info(detections)")}:
                self._db.execute("ALTER TABLE detections ADD COLUMN list_id INTEGER")  # revision 2
            self._db.execute("DROP INDEX IF EXISTS detections_class")  # revision 3
            self.set_meta("schema_revision", SCHEMA_REVISION)

    def _create(self, codebook: CodebookBinding | None) -> None:
        """Make the schema (and bind ``codebook``) in one write transaction; another process may be doing the same.

        Two processes making one new database can get SQLITE_BUSY at once, without the busy timeout (the switch to
        WAL mode and a first write lock race for the same fresh file): retried until ``timeout``."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")  # a header write first: no empty file is left behind
                self._db.execute("BEGIN IMMEDIATE")
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                                 (json.dumps(SCHEMA_VERSION),))
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_revision', ?)",
                                 (json.dumps(SCHEMA_REVISION),))
                if codebook is not None:
                    bind(self, codebook)
                self._db.execute("COMMIT")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                    raise
            finally:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            time.sleep(0.05)

    # -- lifecycle -------------------------------------------------------------------------------------------------
    @classmethod
    def exists(cls, path: str | Path) -> bool:
        """An index is here when ``path`` is not a directory (opening refuses it), holds a non-empty ``index.db`` or
        anything in its place, or the index's codebook (its database lost). An empty ``index.db`` alone is a creation
        killed before its first write: nothing is stored."""
        d = Path(path)
        if d.exists() and not d.is_dir():
            return True
        db = d / DB_NAME
        return (d / f"{CODEBOOK_STEM}.json").exists() or db.exists() and not (db.is_file() and db.stat().st_size == 0)

    def close(self) -> None:
        self._db.close()

    def stored_bytes(self) -> int:
        """``index.db`` and its WAL files."""
        return sum(p.stat().st_size for p in self.directory.glob(f"{DB_NAME}*") if p.is_file())

    # -- metadata (the primitives under Store.get_meta / set_meta / bind_codebook) -------------------------------
    @_guard("reading its metadata")
    def _meta_text(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    @_guard("writing its metadata")
    def _put_meta_text(self, key: str, text: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, text))

    @contextmanager
    def _writing(self, doing: str) -> Iterator[None]:
        """One write transaction (under SQLite's write lock): committed when the block ends, rolled back whole when
        it raises."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            yield
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            raise _sql_fault(self.path, doing, e) from None
        finally:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")

    # -- sources ---------------------------------------------------------------------------------------------------
    @_guard("registering a source")
    def add_source(self, source: SourceInfo) -> Source:
        """Register a source, or return the one with this content fingerprint (re-runs resume it)."""
        s = source
        self._db.execute(
            "INSERT OR IGNORE INTO sources (uri, fingerprint, fps, frame_count, width, height, added_utc) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (str(s.uri), s.fingerprint, s.fps, s.frame_count, s.width, s.height,
             time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        )
        return self.source(fingerprint=s.fingerprint)

    @_guard("reading a source")
    def source(self, source_id: int | None = None, *, fingerprint: str | None = None) -> Source:
        """A source by id or fingerprint; ``KeyError`` if unknown."""
        where, arg = ("id = ?", source_id) if fingerprint is None else ("fingerprint = ?", fingerprint)
        row = self._db.execute(f"SELECT id, uri, fingerprint, fps, frame_count, width, height FROM sources "
                               f"WHERE {where}", (arg,)).fetchone()
        if row is None:
            raise KeyError(f"no source with {where.split()[0]} {arg!r} in {self.path}")
        return Source(*row[1:], id=row[0])

    @_guard("reading its sources")
    def sources(self) -> list[Source]:
        rows = self._db.execute("SELECT id, uri, fingerprint, fps, frame_count, width, height FROM sources ORDER BY id")
        return [Source(*r[1:], id=r[0]) for r in rows]

    @_guard("reading the frames stored")
    def frames_done(self, source_id: int) -> np.ndarray:
        """Sorted int64 indices of the frames of ``source_id`` already stored (with or without detections)."""
        rows = self._db.execute("SELECT frame FROM frames WHERE source_id = ? ORDER BY frame", (source_id,))
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    # -- writing ---------------------------------------------------------------------------------------------------
    @_guard("storing frames")
    def add_frames(self, source_id: int, frames: Iterable[Frame], *, vectors: bool = False) -> np.ndarray:
        """Store a batch of frames in one transaction; frames already stored are skipped. Returns the ids inserted.

        Codes must all have one length, the store's (``code_size`` meta, set by the first codes stored). With
        ``vectors``, each detection's embedding (``detections.embeddings``, (n, D) float32) is also kept as float16
        in the ``vectors`` table (D fixed by the first vectors stored), for re-ranking. The detections of every new
        frame go in together, 128 a statement (:func:`_insert_detections`: the hot path of bulk adds); their ids are
        the ``n`` after the largest id before it (SQLite gives a new row the largest rowid + 1, and this transaction
        is the only writer).
        """
        self._check_writable()
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            code_size = self.get_meta("code_size")
            kept = self.get_meta("vectors") if vectors else None
            if vectors:
                cur.execute(_VECTORS)
            new: list[Frame] = []
            for f in frames:
                cur.execute("INSERT OR IGNORE INTO frames VALUES (?, ?, ?)",
                            (source_id, int(f.frame), len(f.detections)))
                if cur.rowcount:  # else stored by an earlier run: idempotent
                    code_size = self._code_size_after(f.detections, code_size)
                    if vectors and len(f.detections):
                        kept = self._vectors_after(f.detections, kept)
                    new.append(f)
            first = cur.execute("SELECT COALESCE(MAX(id), 0) FROM detections").fetchone()[0] + 1
            values = _detection_values(source_id, new)
            _insert_detections(cur, values)
            ids = np.arange(first, first + len(values) // len(_COLS), dtype=np.int64)
            if len(ids) and cur.execute("SELECT last_insert_rowid()").fetchone()[0] != ids[-1]:
                ids = np.array([r[0] for r in cur.execute("SELECT id FROM detections WHERE id >= ? ORDER BY id",
                                                         (first,))], np.int64)  # rowids past 2^63 - 1: random
            if vectors and len(ids):
                v = np.concatenate([f.detections.embeddings for f in new if len(f.detections)]).astype(VECTOR_DTYPE)
                cur.executemany("INSERT INTO vectors VALUES (?, ?)", zip(ids.tolist(), (r.tobytes() for r in v)))
            cur.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite may have rolled back itself (SQLITE_FULL): no second error
                cur.execute("ROLLBACK")
            raise
        return ids

    # -- reading ---------------------------------------------------------------------------------------------------
    @contextmanager
    def snapshot(self) -> Iterator[SQLiteStore]:
        """Run several reads on one consistent state of the store (one read transaction), even while another
        process commits.

        In autocommit mode every statement is its own read transaction: a writer's commit can land between two of
        them (e.g. between reading the ``code_size`` meta and reading the rows its first batch set it with). In WAL
        mode a read transaction sees the database as of its first read until it ends, and never blocks the writer.
        Re-entrant: inside an open transaction it just yields.
        """
        if self._db.in_transaction:
            yield self
            return
        self._db.execute("BEGIN")  # deferred: the snapshot starts at the first read
        try:
            yield self
        except BaseException:
            if self._db.in_transaction:
                with suppress(sqlite3.Error):  # a damaged file fails COMMIT too: the error in flight says so
                    self._db.execute("ROLLBACK")
            raise
        if self._db.in_transaction:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise _sql_fault(self.path, "reading it", e) from None

    @_guard("reading a track")
    def track_ids(self, source_id: int, track_id: int) -> np.ndarray:
        """Ids (int64, ascending) of the detections of one track of one source."""
        rows = self._db.execute("SELECT id FROM detections WHERE source_id = ? AND track_id = ? ORDER BY id",
                                (int(source_id), int(track_id)))
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    @_guard("reading a frame")
    def frame_ids(self, source_id: int, frame: int) -> np.ndarray:
        rows = self._db.execute("SELECT id FROM detections WHERE source_id = ? AND frame = ? ORDER BY id",
                                (int(source_id), int(frame)))
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    @_guard("reading track ids")
    def max_track_id(self, source_id: int) -> int:
        """The largest stored track id of a source (0 when none): new runs number their tracks after it."""
        return self._db.execute("SELECT COALESCE(MAX(track_id), 0) FROM detections WHERE source_id = ?",
                                (int(source_id),)).fetchone()[0]

    @_guard("reading stored vectors")
    def vectors(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The kept embeddings of detection ids, in the order given: ``((n, D) float32, (n,) bool kept)``; rows of
        detections stored without a vector (e.g. indexed before vectors were kept) are zeros with ``kept`` False.

        Raises:
            StoreError: the index keeps no vectors.
        """
        dim = self.vector_dim
        if dim is None:
            raise StoreError(f"{self.directory} keeps no float vectors: index with --keep-vectors "
                             "(Indexer(keep_vectors=True)) to re-rank with them")
        ids = [int(i) for i in ids]
        out, present = np.zeros((len(ids), dim), np.float32), np.zeros(len(ids), bool)
        if ids:
            found = dict(self._db.execute(f"SELECT id, vector FROM vectors WHERE id IN ({','.join('?' * len(ids))})",
                                          ids))
            for k, i in enumerate(ids):
                if (blob := found.get(i)) is not None:
                    out[k] = np.frombuffer(blob, VECTOR_DTYPE)
                    present[k] = True
        return out, present

    @_guard("reading thumbnails")
    def thumbnails(self, ids: Sequence[int] | np.ndarray) -> list[bytes | None]:
        """The stored JPEG thumbnail of each detection id, in the order given (None where none was kept)."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        found = dict(self._db.execute(f"SELECT id, thumb FROM detections WHERE id IN ({','.join('?' * len(ids))})",
                                      ids))
        return [found.get(i) for i in ids]

    @_guard("reading thumbnails")
    def nearest_thumbnail(self, source_id: int, track_id: int, frame: int) -> bytes | None:
        """The thumbnail of the same track's detection nearest in frames to ``frame`` (None when the track has
        none, or for untracked detections, ``track_id < 0``)."""
        if track_id < 0:
            return None
        row = self._db.execute("SELECT thumb FROM detections WHERE source_id = ? AND track_id = ? AND thumb IS NOT "
                               "NULL ORDER BY ABS(frame - ?), frame LIMIT 1",
                               (int(source_id), int(track_id), int(frame))).fetchone()
        return None if row is None else row[0]

    @_guard("counting detections")
    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM detections").fetchone()[0]

    @_guard("reading detections")
    def rows(self, *, after_id: int = 0, limit: int | None = None, fields: Sequence[str] = ROW_FIELDS,
             before_id: int | None = None) -> dict[str, np.ndarray]:
        if bad := [f for f in fields if f not in ROW_FIELDS]:
            raise ValueError(f"unknown row fields {bad}: expected some of {list(ROW_FIELDS)}")
        fields = ["id", *dict.fromkeys(fields)]
        sql = ", ".join("NULL" if f == "list_id" and not self._lists else f for f in fields)
        with self.snapshot():  # the meta and the rows of one state (a first batch may commit in between)
            code_size = self.get_meta("code_size") or 0
            last = (1 << 63) - 1 if before_id is None else int(before_id) - 1
            rows = self._db.execute(f"SELECT {sql} FROM detections WHERE id > ? AND id <= ? AND codes IS NOT NULL "
                                    f"ORDER BY id LIMIT ?", (int(after_id), last, -1 if limit is None else int(limit))
                                    ).fetchall()
        cols = list(zip(*rows)) if rows else [()] * len(fields)
        out = {}
        for f, values in zip(fields, cols):
            if f == "codes":
                out[f] = _code_matrix(self.path, values, code_size)
            elif f == "list_id":
                out[f] = _numbers(self.path, tuple(-1 if v is None else v for v in values), np.int32)
            else:
                out[f] = _numbers(self.path, values, _NUMERIC[f])
        return out

    @_guard("reading the last id")
    def max_id(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(id), 0) FROM detections").fetchone()[0]

    @_guard("reading detections")
    def get(self, ids: Sequence[int] | np.ndarray) -> Detections:
        """Detections by id, in the order given, with ``data`` = id, source_id, frame, time."""
        ids = [int(i) for i in ids]
        if not ids:
            return Detections.empty().with_data(id=np.zeros(0, np.int64), source_id=np.zeros(0, np.int64),
                                               frame=np.zeros(0, np.int64), time=np.zeros(0))
        marks = ",".join("?" * len(ids))
        rows = {r[0]: r for r in self._db.execute(
            f"SELECT id, source_id, frame, time, x1, y1, x2, y2, class_id, confidence, track_id, codes "
            f"FROM detections WHERE id IN ({marks})", ids)}
        if missing := [i for i in ids if i not in rows]:
            raise KeyError(f"no detections with ids {missing[:5]} in {self.path}")
        r = [rows[i] for i in ids]
        codes = [x[11] for x in r]
        try:  # source_id, frame, time, x1, y1, x2, y2, class_id, confidence, track_id
            a = np.array([x[1:11] for x in r], np.float64)
        except (ValueError, TypeError) as e:
            raise _no_numbers(self.path, e) from None
        return Detections(
            a[:, 3:7].astype(np.float32), confidence=a[:, 8], class_id=a[:, 7].astype(np.int64),
            track_id=a[:, 9].astype(np.int64),
            codes=None if any(c is None for c in codes) else np.frombuffer(b"".join(codes), np.uint8).reshape(len(r), -1),
            data={"id": np.array(ids, np.int64), "source_id": a[:, 0].astype(np.int64),
                  "frame": a[:, 1].astype(np.int64), "time": a[:, 2]},
        )
