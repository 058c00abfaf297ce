"""The embedded store: one index directory holding ``index.db`` (SQLite in WAL mode) with sources, detections and codes.

Writes go in batches, one transaction per batch, and each processed frame is recorded in ``frames`` in the same
transaction as its detections: a crash loses at most the batch in flight, and re-running the same job skips every
frame already recorded (idempotent per source fingerprint + frame). WAL lets other processes search while one writes.

Optional parts, same schema version: a JPEG thumbnail per detection (``detections.thumb``), and the float16
embedding of each detection in a separate ``vectors`` table (for exact re-ranking of a search shortlist), created by
the first batch that keeps vectors. Stores without that table are complete version-1 stores (older yolo_vq versions
read stores with it and ignore it); ``meta['vectors']`` says whether, and with what dim, vectors are kept.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .detections import Detections
from .errors import StoreError

__all__ = ["CODEBOOK_STEM", "DB_NAME", "SCHEMA_VERSION", "VECTOR_DTYPE", "Frame", "Source", "Store", "StoreError"]

SCHEMA_VERSION = 1
DB_NAME = "index.db"
CODEBOOK_STEM = "codebook"  # <index>/codebook.safetensors + codebook.json: the codebook of every stored code

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
    thumb BLOB
);
CREATE INDEX IF NOT EXISTS detections_source_frame ON detections (source_id, frame);
CREATE INDEX IF NOT EXISTS detections_class ON detections (class_id);
CREATE INDEX IF NOT EXISTS detections_track ON detections (source_id, track_id);
"""
_VECTORS = "CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY REFERENCES detections(id), vector BLOB NOT NULL)"
VECTOR_DTYPE = np.dtype("<f2")  # float16, little-endian: 2 bytes per dimension


@dataclass(frozen=True)
class Source:
    """A video, image folder or stream that was indexed; ``fingerprint`` identifies its content."""

    id: int
    uri: str
    fingerprint: str
    fps: float | None
    frame_count: int | None
    width: int | None
    height: int | None


@dataclass(frozen=True)
class Frame:
    """One processed frame to store: its index, timestamp (s) and detections (with codes, maybe thumbnails)."""

    frame: int
    time: float
    detections: Detections
    thumbs: Sequence[bytes | None] | None = None


class Store:
    """Open (or with ``create=True`` make) the index directory ``directory``.

    Args:
        directory: the index directory; ``index.db`` lives inside.
        create: make the directory and an empty store if missing.
        readonly: open read-only (searchers); never blocks the writer.
        timeout: seconds to wait for another writer's lock.

    Raises:
        StoreError: no store there (without ``create``), or a store of another schema version; nothing is modified.
    """

    def __init__(self, directory: str | Path, *, create: bool = False, readonly: bool = False, timeout: float = 30.0):
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        if not self.path.is_file():
            if not create or readonly:
                raise StoreError(
                    f"no index at {self.directory} ({DB_NAME} missing): create one with `yolo-vq index VIDEO "
                    f"--index {self.directory}` or Store(..., create=True)"
                )
            self.directory.mkdir(parents=True, exist_ok=True)
        if readonly:
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=timeout, isolation_level=None)
        else:
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        self.readonly = readonly
        try:
            self._open(create and not readonly)
        except BaseException:
            self._db.close()
            raise

    def _open(self, create: bool) -> None:
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables and create:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(f"BEGIN;{_SCHEMA}COMMIT;")
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (json.dumps(SCHEMA_VERSION),))
        version = self.get_meta("schema_version") if "meta" in tables or create else None
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version!r}, this yolo_vq reads version {SCHEMA_VERSION}: index into "
                f"a new directory (or use the yolo_vq version that wrote it); the existing index was left untouched"
            )
        self._db.execute("PRAGMA foreign_keys=ON")
        if not self.readonly:
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- metadata --------------------------------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        """A JSON value stored under ``key`` (schema version, codebook and model fingerprints, embedding config)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def keep_codebook(self, codebook: str | Path, *, embedding: Any, model_fingerprint: Any,
                      names: dict[int, str]) -> None:
        """Make ``codebook`` (a saved codebook's stem or file) this new index's own (``CODEBOOK_STEM`` in its
        directory) and record what its codes belong to: the embedding, the model fingerprint, the class names."""
        from .quant.io import codebook_paths

        for path, suffix in zip(codebook_paths(codebook), (".safetensors", ".json")):
            shutil.copyfile(path, self.directory / f"{CODEBOOK_STEM}{suffix}")
        self.set_meta("embedding", embedding)
        self.set_meta("model_fingerprint", model_fingerprint)
        self.set_meta("names", {int(k): v for k, v in names.items()})

    def set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    # -- sources ---------------------------------------------------------------------------------------------------
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

    def source(self, source_id: int | None = None, *, fingerprint: str | None = None) -> Source:
        """A source by id or fingerprint; ``KeyError`` if unknown."""
        where, arg = ("id = ?", source_id) if fingerprint is None else ("fingerprint = ?", fingerprint)
        row = self._db.execute(f"SELECT id, uri, fingerprint, fps, frame_count, width, height FROM sources "
                               f"WHERE {where}", (arg,)).fetchone()
        if row is None:
            raise KeyError(f"no source with {where.split()[0]} {arg!r} in {self.path}")
        return Source(*row)

    def sources(self) -> list[Source]:
        rows = self._db.execute("SELECT id, uri, fingerprint, fps, frame_count, width, height FROM sources ORDER BY id")
        return [Source(*r) for r in rows]

    def frames_done(self, source_id: int) -> np.ndarray:
        """Sorted int64 indices of the frames of ``source_id`` already stored (with or without detections)."""
        rows = self._db.execute("SELECT frame FROM frames WHERE source_id = ? ORDER BY frame", (source_id,))
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    # -- writing ---------------------------------------------------------------------------------------------------
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
                rows = [(source_id, int(f.frame), float(f.time), *map(float, d.xyxy[i]), int(d.class_id[i]),
                         float(d.confidence[i]), int(d.track_id[i]),
                         None if d.codes is None else d.codes[i].tobytes(), thumbs[i]) for i in range(len(d))]
                sql = ("INSERT INTO detections (source_id, frame, time, x1, y1, x2, y2, class_id, confidence, "
                       "track_id, codes, thumb) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
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
            cur.execute("ROLLBACK")
            raise
        return inserted

    # -- reading ---------------------------------------------------------------------------------------------------
    @contextmanager
    def snapshot(self) -> Iterator[Store]:
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
        finally:
            self._db.execute("COMMIT")

    def track_ids(self, source_id: int, track_id: int) -> np.ndarray:
        """Ids (int64, ascending) of the detections of one track of one source."""
        rows = self._db.execute("SELECT id FROM detections WHERE source_id = ? AND track_id = ? ORDER BY id",
                                (int(source_id), int(track_id)))
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def max_track_id(self, source_id: int) -> int:
        """The largest stored track id of a source (0 when none): new runs number their tracks after it."""
        return self._db.execute("SELECT COALESCE(MAX(track_id), 0) FROM detections WHERE source_id = ?",
                                (int(source_id),)).fetchone()[0]

    def longest_track(self) -> tuple[int, int, int] | None:
        """``(track_id, detections, first detection id)`` of the track with the most detections, or None."""
        return self._db.execute("SELECT track_id, COUNT(*) c, MIN(id) FROM detections WHERE track_id >= 0 "
                                "GROUP BY source_id, track_id ORDER BY c DESC LIMIT 1").fetchone()

    @property
    def vector_dim(self) -> int | None:
        """Dimension of the float16 vectors this index keeps, or None when it keeps none."""
        kept = self.get_meta("vectors")
        return None if kept is None else int(kept["dim"])

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

    def thumbs(self, ids: Sequence[int] | np.ndarray) -> list[bytes | None]:
        """The stored JPEG thumbnail of each detection id, in the order given (None where none was kept)."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        found = dict(self._db.execute(f"SELECT id, thumb FROM detections WHERE id IN ({','.join('?' * len(ids))})",
                                      ids))
        return [found.get(i) for i in ids]

    def nearest_thumb(self, source_id: int, track_id: int, frame: int) -> bytes | None:
        """The thumbnail of the same track's detection nearest in frames to ``frame`` (None when the track has
        none, or for untracked detections, ``track_id < 0``)."""
        if track_id < 0:
            return None
        row = self._db.execute("SELECT thumb FROM detections WHERE source_id = ? AND track_id = ? AND thumb IS NOT "
                               "NULL ORDER BY ABS(frame - ?), frame LIMIT 1",
                               (int(source_id), int(track_id), int(frame))).fetchone()
        return None if row is None else row[0]

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM detections").fetchone()[0]

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
        codes = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.uint8).reshape(len(rows), code_size)
        return ids, codes

    def columns(self, *, after_id: int = 0) -> dict[str, np.ndarray]:
        """Filterable columns of detections with codes and ``id > after_id``, in id order (the rows of
        :meth:`codes`): ``id`` int64, ``class_id`` int64, ``source_id`` int64, ``time`` float64, ``confidence``
        float32."""
        rows = self._db.execute("SELECT id, class_id, source_id, time, confidence FROM detections "
                                "WHERE id > ? AND codes IS NOT NULL ORDER BY id", (after_id,)).fetchall()
        a = np.array(rows, dtype=np.float64).reshape(-1, 5)
        return {"id": a[:, 0].astype(np.int64), "class_id": a[:, 1].astype(np.int64),
                "source_id": a[:, 2].astype(np.int64), "time": a[:, 3], "confidence": a[:, 4].astype(np.float32)}

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
