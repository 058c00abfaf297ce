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

The codebook binding: an index's codes belong to one codebook, copied into the directory (``codebook.safetensors`` +
``codebook.json``) and identified by the sha256 of its tensors in ``meta['codebook_sha256']``. The binding is decided
once, in the transaction that creates the schema (:meth:`SQLiteStore.bind_codebook`), so two processes creating one
index cannot both win; the files are verified against the recorded checksum whenever the codebook is used, and a
missing or damaged copy is an error (never a reason to fit a new one).

Faults (a damaged or foreign file, a read-only folder, a full disk, a lock held too long) surface as one
:class:`StoreError` naming the file and what to do; a failed write transaction is rolled back whole.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar
from urllib.request import pathname2url

import numpy as np

from ..detections import LIST_ID, Detections
from ..errors import CodebookError, StoreError
from .store import CODEBOOK_STEM, SCHEMA_VERSION, VECTOR_DTYPE, CodebookBinding, Frame, Source, Store

__all__ = ["DB_NAME", "SQLiteStore"]

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
CREATE INDEX IF NOT EXISTS detections_class ON detections (class_id);
CREATE INDEX IF NOT EXISTS detections_track ON detections (source_id, track_id);
"""
_VECTORS = "CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY REFERENCES detections(id), vector BLOB NOT NULL)"
# The columns every version-1 store has (``vectors`` is optional): checked at open, so a damaged schema is one error.
_COLUMNS = {
    "meta": {"key", "value"},
    "sources": {"id", "uri", "fingerprint", "fps", "frame_count", "width", "height", "added_utc"},
    "frames": {"source_id", "frame", "detections"},
    "detections": {"id", "source_id", "frame", "time", "x1", "y1", "x2", "y2", "class_id", "confidence", "track_id",
                   "codes", "thumb"},
}
_RESTORE = "restore it from a backup, or index into a new directory"


def _columns(path: Path, rows: list) -> dict[str, np.ndarray]:
    """Rows of (id, class_id, source_id, time, confidence, track_id) -> the typed columns.

    Raises:
        StoreError: a value that is no number (a damaged database), naming the index."""
    try:
        a = np.array(rows, dtype=np.float64).reshape(-1, 6)
    except (ValueError, TypeError) as e:
        raise StoreError(f"{path}: detection rows hold values that are no numbers ({e}): the database is damaged; "
                         f"re-index into a new directory") from None
    return {"id": a[:, 0].astype(np.int64), "class_id": a[:, 1].astype(np.int64),
            "source_id": a[:, 2].astype(np.int64), "time": a[:, 3], "confidence": a[:, 4].astype(np.float32),
            "track_id": a[:, 5].astype(np.int64)}


def _code_matrix(path: Path, blobs: list, code_size: Any) -> np.ndarray:
    """Code blobs of one length -> (n, code_size) uint8. Raises StoreError (naming the index) for a blob of another
    length or type, or a code_size that is no positive int (a damaged database)."""
    try:
        return np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), code_size)
    except (ValueError, TypeError) as e:
        raise StoreError(f"{path}: stored codes are not all {code_size!r} bytes long ({e}): the database is damaged; "
                         f"re-index into a new directory") from None


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


_NOT_JSON = object()
# What the meta values the code reads must be (a key not set reads as the default): checked as they are read.
_META_FORMS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "codebook_sha256": (lambda v: isinstance(v, str), "a sha256 hex string"),
    "code_size": (_count, "a positive int"),
    "names": (lambda v: isinstance(v, dict) and all(k.isascii() and k.isdigit() and isinstance(n, str)
                                                    for k, n in v.items()), "a dict of class id -> name"),
    "vectors": (lambda v: isinstance(v, dict) and _count(v.get("dim")), "a dict with the vectors' dim"),
}


def _sql_fault(path: Path, doing: str, e: sqlite3.Error) -> StoreError:
    """One :class:`StoreError` line for an SQLite error while ``doing`` something with the store at ``path``."""
    msg = str(e)
    low = msg.lower()
    if "disk is full" in low or "disk i/o error" in low and _free_bytes(path.parent) == 0:
        return StoreError(f"{path}: the disk is full ({msg}) while {doing}: everything committed before is kept and "
                          f"this batch was rolled back; free space on the disk of {path.parent} and re-run the same "
                          f"command to resume")
    writable = os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))
    if "readonly" in low or "read-only" in low or "unable to open" in low and not writable:
        return StoreError(f"{path} is read-only ({msg}) while {doing}: make the index folder and its files writable, "
                          f"or index into a writable directory (search works on a read-only index)")
    if "locked" in low or "busy" in low:
        return StoreError(f"{path}: another process held its write lock for too long ({msg}) while {doing}: wait for "
                          f"it to finish (or stop it) and re-run")
    if "unable to open" in low:
        return StoreError(f"{path}: SQLite cannot open it ({msg}) while {doing}: check that the folder exists and is "
                          f"readable")
    return StoreError(f"{path} is damaged or not a yolo_vq index ({msg}) while {doing}: {_RESTORE} (nothing was "
                      f"changed)")


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


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
                raise StoreError(f"{self.path} is not a regular file: {_RESTORE}")
            if own.is_file():  # an index's codebook without its database: the database was lost
                raise StoreError(f"{self.directory} holds an index codebook but no {DB_NAME}: the database was "
                                 f"deleted or moved; {_RESTORE} (nothing was changed)")
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
                                 f"the index database was truncated or never written; {_RESTORE} (nothing was "
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
                raise StoreError(f"{self.path} is damaged: table {table!r} lacks columns {missing}; {_RESTORE} "
                                 f"(nothing was changed)")
        self._db.execute("PRAGMA foreign_keys=ON")
        if not self.readonly:
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        self._lists = "list_id" in {r[1] for r in self._db.execute("PRAGMA table_info(detections)")}
        if not self._lists and not self.readonly:  # an index made before partitioned search: one nullable column
            with suppress(sqlite3.OperationalError):  # another process added it first
                self._db.execute("ALTER TABLE detections ADD COLUMN list_id INTEGER")
            self._lists = True
        if codebook is not None:
            self.bind_codebook(codebook)

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
                if codebook is not None:
                    self._bind(codebook)
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

    # -- metadata --------------------------------------------------------------------------------------------------
    @_guard("reading its metadata")
    def get_meta(self, key: str, default: Any = None) -> Any:
        """A JSON value stored under ``key`` (schema version, codebook and model fingerprints, embedding config).

        Raises:
            StoreError: the value is not JSON, or not of the form its key has (a damaged index).
        """
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            return default
        try:
            value = json.loads(row[0])
        except (TypeError, ValueError, RecursionError):
            value = _NOT_JSON
        if value is _NOT_JSON or key in _META_FORMS and not _META_FORMS[key][0](value):  # never stored as null
            raise StoreError(f"{self.path} is damaged: its meta {key!r} is {str(row[0])[:40]!r}, not "
                             f"{_META_FORMS.get(key, (None, 'JSON'))[1]}; {_RESTORE} (nothing was changed)")
        return value

    # -- the codebook binding -------------------------------------------------------------------------------------
    @property
    def codebook_sha256(self) -> str | None:
        """The sha256 of the tensors of the codebook every stored code belongs to (``meta['codebook_sha256']``);
        for an index written before it was recorded, its codebook file's own record. None: no codebook bound."""
        have = self.get_meta("codebook_sha256")
        if have is None and self.get_meta("embedding") is not None:  # bound by an older yolo_vq
            from ..quant.io import codebook_checksum

            have = codebook_checksum(self.directory / CODEBOOK_STEM)
            if have is None:
                raise CodebookError(f"{self.directory}: the index's own codebook ({CODEBOOK_STEM}.json) is missing "
                                    f"or unreadable, and this index (made by an older yolo_vq) has no record of its "
                                    f"checksum: restore the codebook the index was made with into it, or re-index "
                                    f"into a new directory; nothing was changed")
        return have

    def bind_codebook(self, codebook: CodebookBinding) -> bool:
        """Make ``codebook`` this index's own, once: in one write transaction, a new index copies it in (as
        ``CODEBOOK_STEM`` in its directory) and records its checksum, embedding, model fingerprint and class names;
        an index bound before must be bound to the same codebook (its copy is restored if missing or damaged).
        Returns True when this call bound it.

        Raises:
            CodebookError: the index is bound to another codebook (the message names both, and says whether this
                run fitted its codebook while another process bound one), or ``codebook`` is unreadable.
            StoreError: the index has codes stored with no codebook recorded (they could belong to any).
        """
        if self.readonly:
            raise StoreError(f"{self.path} was opened read-only")
        try:
            self._db.execute("BEGIN IMMEDIATE")  # the binding is decided under the write lock
            bound = self._bind(codebook)
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            raise _sql_fault(self.path, "binding its codebook", e) from None
        finally:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        return bound

    def _bind(self, codebook: CodebookBinding) -> bool:
        from ..quant.coarse import coarse_path
        from ..quant.io import codebook_checksum, codebook_paths

        want = codebook_checksum(codebook.path)
        if want is None:
            raise CodebookError(f"codebook {codebook.path}: no readable codebook JSON with a tensor checksum there "
                                f"(expected the .safetensors + .json written by `yolo-vq fit` / save_codebook)")
        have = self.codebook_sha256
        if have is None:
            if self._db.execute("SELECT 1 FROM detections WHERE codes IS NOT NULL LIMIT 1").fetchone():
                raise StoreError(f"{self.path} holds codes but records no codebook: they could belong to any; "
                                 f"index into a new directory")
        elif have != want:
            if codebook.fitted:
                raise CodebookError(
                    f"while this run fitted a codebook ({want[:16]}...) for the new index {self.directory}, another "
                    f"process created it with codebook {have[:16]}...: this run's codebook was not used and nothing "
                    f"was stored; re-run the same command to index with the index's own codebook")
            raise CodebookError(
                f"{self.directory} is bound to codebook {have[:16]}... (its {CODEBOOK_STEM}.json, recorded in "
                f"{DB_NAME}), and the codebook passed, {codebook.path} ({want[:16]}...), is another one: its codes "
                f"could not be compared with the stored ones; omit --codebook to use the index's own, or index into "
                f"a new directory")
        elif self._own_codebook_problem(have) is None:
            if self.get_meta("codebook_sha256") is None:
                self.set_meta("codebook_sha256", have)  # an older index: record what its file says
            return False
        # copy (a first binding, or the same codebook restoring a missing or damaged copy); temp + rename per file,
        # the coarse quantizer (IVF lists) first where the codebook has one, the JSON that lists it last
        files = list(zip(codebook_paths(codebook.path), (".safetensors", ".json")))
        if (coarse := coarse_path(codebook.path)).is_file():
            files.insert(0, (coarse, ".coarse.safetensors"))
        for src, suffix in files:
            dst = self.directory / f"{CODEBOOK_STEM}{suffix}"
            if dst.exists() and dst.samefile(src):
                continue
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
            try:
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
            except OSError as e:  # e.g. the disk is full: the transaction rolls back, no half file stays
                tmp.unlink(missing_ok=True)
                raise StoreError(f"{dst}: cannot copy the codebook into the index ({e.strerror or e}): nothing was "
                                 f"stored; free space or fix permissions of {self.directory} and re-run") from None
        if problem := self._own_codebook_problem(want):
            raise CodebookError(f"codebook {codebook.path} does not match its own checksum once copied ({problem})")
        if have is None:
            self.set_meta("codebook_sha256", want)
            self.set_meta("embedding", codebook.embedding)
            self.set_meta("model_fingerprint", codebook.model_fingerprint)
            self.set_meta("names", {int(k): v for k, v in codebook.names.items()})
        return have is None

    def _own_codebook_problem(self, sha: str) -> str | None:
        """What is wrong with the index's copy of the codebook of checksum ``sha`` (None: nothing)."""
        from ..quant.coarse import load_coarse
        from ..quant.files import file_sha256
        from ..quant.io import codebook_checksum

        st, js = (self.directory / f"{CODEBOOK_STEM}{x}" for x in (".safetensors", ".json"))
        if missing := [p.name for p in (st, js) if not p.is_file()]:
            return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
        if (recorded := codebook_checksum(js)) != sha:
            return f"{js.name} is unreadable" if recorded is None else \
                f"{js.name} describes codebook {recorded[:16]}..., not the index's"
        if file_sha256(st) != sha:
            return f"{st.name} is damaged (its sha256 differs)"
        try:  # the search lists' coarse quantizer, where the JSON lists one
            load_coarse(self.directory / CODEBOOK_STEM)
        except CodebookError as e:
            return str(e).split(": restore it")[0]
        return None

    def codebook_path(self) -> Path | None:
        """The stem of the index's own codebook, verified against the checksum in ``index.db``; None when no codebook
        is bound yet.

        Raises:
            CodebookError: the copy is missing, damaged or another codebook (with how to recover: restore the
                codebook the index was made with, or re-index); nothing is changed.
        """
        with self.snapshot():
            sha = self.codebook_sha256
        if sha is None:
            return None
        if problem := self._own_codebook_problem(sha):
            raise CodebookError(
                f"{self.directory}: the index's own codebook is unusable: {problem}. {DB_NAME} records its checksum "
                f"{sha[:16]}...: restore {CODEBOOK_STEM}.safetensors and {CODEBOOK_STEM}.json with that checksum "
                f"(`yolo-vq index ... --codebook PATH` with the codebook the index was made with puts them back), or "
                f"re-index into a new directory; nothing was changed")
        return self.directory / CODEBOOK_STEM

    @_guard("writing its metadata")
    def set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    # -- sources ---------------------------------------------------------------------------------------------------
    @_guard("registering a source")
    def add_source(
        self, uri: str, fingerprint: str, *, fps: float | None = None, frame_count: int | None = None,
        width: int | None = None, height: int | None = None,
    ) -> Source:
        """Register a source, or return the one with this content fingerprint (re-runs resume it)."""
        self._db.execute(
            "INSERT OR IGNORE INTO sources (uri, fingerprint, fps, frame_count, width, height, added_utc) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (str(uri), fingerprint, fps, frame_count, width, height, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        )
        return self.source(fingerprint=fingerprint)

    @_guard("reading a source")
    def source(self, source_id: int | None = None, *, fingerprint: str | None = None) -> Source:
        """A source by id or fingerprint; ``KeyError`` if unknown."""
        where, arg = ("id = ?", source_id) if fingerprint is None else ("fingerprint = ?", fingerprint)
        row = self._db.execute(f"SELECT id, uri, fingerprint, fps, frame_count, width, height FROM sources "
                               f"WHERE {where}", (arg,)).fetchone()
        if row is None:
            raise KeyError(f"no source with {where.split()[0]} {arg!r} in {self.path}")
        return Source(*row)

    @_guard("reading its sources")
    def sources(self) -> list[Source]:
        rows = self._db.execute("SELECT id, uri, fingerprint, fps, frame_count, width, height FROM sources ORDER BY id")
        return [Source(*r) for r in rows]

    @_guard("reading the frames stored")
    def frames_done(self, source_id: int) -> np.ndarray:
        """Sorted int64 indices of the frames of ``source_id`` already stored (with or without detections)."""
        rows = self._db.execute("SELECT frame FROM frames WHERE source_id = ? ORDER BY frame", (source_id,))
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    # -- writing ---------------------------------------------------------------------------------------------------
    @_guard("storing frames")
    def add_frames(self, source_id: int, frames: Iterable[Frame], *, vectors: bool = False) -> int:
        """Store a batch of frames in one transaction; frames already stored are skipped. Returns rows inserted.

        Codes must all have one length, the store's (``code_size`` meta, set by the first codes stored). With
        ``vectors``, each detection's embedding (``detections.embeddings``, (n, D) float32) is also kept as float16
        in the ``vectors`` table (D fixed by the first vectors stored), for re-ranking.
        """
        if self.readonly:
            raise StoreError(f"{self.path} was opened read-only")
        inserted = 0
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            code_size = self.get_meta("code_size")
            kept = self.get_meta("vectors") if vectors else None
            if vectors:
                cur.execute(_VECTORS)
            for f in frames:
                d = f.detections
                cur.execute("INSERT OR IGNORE INTO frames VALUES (?, ?, ?)", (source_id, int(f.frame), len(d)))
                if cur.rowcount == 0:
                    continue  # stored by an earlier run: idempotent
                if d.codes is not None and len(d):
                    if code_size is None:
                        code_size = int(d.codes.shape[1]) * d.codes.itemsize
                        self.set_meta("code_size", code_size)
                    if d.codes.shape[1] * d.codes.itemsize != code_size:
                        raise StoreError(f"codes of {d.codes.shape[1] * d.codes.itemsize} bytes, this index stores "
                                         f"{code_size}-byte codes: use the index's codebook")
                thumbs = f.thumbs if f.thumbs is not None else [None] * len(d)
                lists = d.data.get(LIST_ID)
                n = len(d)
                # column-wise conversion to Python values (tolist), then one tuple per row: the hot path of bulk adds
                xyxy = np.asarray(d.xyxy, np.float64).T.tolist() if n else [[]] * 4
                rows = list(zip(
                    [source_id] * n, [int(f.frame)] * n, [float(f.time)] * n, *xyxy,
                    np.asarray(d.class_id).tolist(), np.asarray(d.confidence, np.float64).tolist(),
                    np.asarray(d.track_id).tolist(),
                    [None] * n if d.codes is None else [c.tobytes() for c in d.codes], thumbs,
                    [None] * n if lists is None else [None if v < 0 else v for v in np.asarray(lists).tolist()]))
                sql = ("INSERT INTO detections (source_id, frame, time, x1, y1, x2, y2, class_id, confidence, "
                       "track_id, codes, thumb, list_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
                if not (vectors and len(d)):
                    cur.executemany(sql, rows)
                else:
                    if d.dim == 0 or (kept is not None and d.dim != kept["dim"]):
                        raise StoreError(f"detections carry embeddings of dim {d.dim}, this index keeps "
                                         f"{kept['dim'] if kept else 'float'} vectors: keep the embeddings the "
                                         "codes were encoded from (Detections.from_ultralytics of an Embedder's results)")
                    if kept is None:
                        kept = {"dtype": "float16", "dim": d.dim}
                        self.set_meta("vectors", kept)
                    for row, v in zip(rows, d.embeddings.astype(VECTOR_DTYPE)):
                        cur.execute(sql, row)  # executemany does not report the ids
                        cur.execute("INSERT INTO vectors VALUES (?, ?)", (cur.lastrowid, v.tobytes()))
                inserted += len(d)
            cur.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite may have rolled back itself (SQLITE_FULL): no second error
                cur.execute("ROLLBACK")
            raise
        return inserted

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

    @_guard("reading tracks")
    def longest_track(self) -> tuple[int, int, int] | None:
        """``(track_id, detections, first detection id)`` of the track with the most detections, or None."""
        return self._db.execute("SELECT track_id, COUNT(*) c, MIN(id) FROM detections WHERE track_id >= 0 "
                                "GROUP BY source_id, track_id ORDER BY c DESC LIMIT 1").fetchone()

    @property
    def vector_dim(self) -> int | None:
        """Dimension of the float16 vectors this index keeps, or None when it keeps none."""
        kept = self.get_meta("vectors")
        return None if kept is None else int(kept["dim"])

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

    @_guard("reading codes")
    def codes(self, *, after_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (N,) int64, codes (N, code_size) uint8)`` of detections with ``id > after_id``, in id order: a
        contiguous matrix for the scan engine, refreshed incrementally as the store grows."""
        with self.snapshot():  # the meta and the rows of one state (a first batch may commit in between)
            code_size = self.get_meta("code_size")
            rows = self._db.execute("SELECT id, codes FROM detections WHERE id > ? AND codes IS NOT NULL ORDER BY id",
                                    (after_id,)).fetchall()
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0, code_size or 0), np.uint8)
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return ids, _code_matrix(self.path, [r[1] for r in rows], code_size)

    @_guard("reading detection columns")
    def columns(self, *, after_id: int = 0) -> dict[str, np.ndarray]:
        """Filterable columns of detections with codes and ``id > after_id``, in id order (the rows of
        :meth:`codes`): ``id`` int64, ``class_id`` int64, ``source_id`` int64, ``time`` float64, ``confidence``
        float32, ``track_id`` int64."""
        rows = self._db.execute("SELECT id, class_id, source_id, time, confidence, track_id FROM detections "
                                "WHERE id > ? AND codes IS NOT NULL ORDER BY id", (after_id,)).fetchall()
        return _columns(self.path, rows)

    @_guard("reading detections for the search structure")
    def search_rows(self, *, after_id: int = 0, limit: int | None = None) -> dict[str, np.ndarray]:
        with self.snapshot():
            code_size = self.get_meta("code_size") or 0
            rows = self._db.execute(
                f"SELECT id, class_id, source_id, time, confidence, track_id, {'list_id' if self._lists else 'NULL'}, "
                f"codes FROM detections WHERE id > ? AND codes IS NOT NULL ORDER BY id LIMIT ?",
                (int(after_id), -1 if limit is None else int(limit))).fetchall()
        out = _columns(self.path, [r[:6] for r in rows])
        out["list_id"] = np.array([-1 if r[6] is None else r[6] for r in rows], np.int32)
        out["codes"] = _code_matrix(self.path, [r[7] for r in rows], code_size)
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
        return Detections(
            np.array([x[4:8] for x in r], np.float32),
            confidence=np.array([x[9] for x in r]), class_id=np.array([x[8] for x in r]),
            track_id=np.array([x[10] for x in r]),
            codes=None if any(c is None for c in codes) else np.frombuffer(b"".join(codes), np.uint8).reshape(len(r), -1),
            data={"id": np.array(ids, np.int64), "source_id": np.array([x[1] for x in r], np.int64),
                  "frame": np.array([x[2] for x in r], np.int64), "time": np.array([x[3] for x in r])},
        )
