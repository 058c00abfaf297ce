"""The store interface: what an index holds (sources, processed frames, detections with their codes, optional float16
vectors and JPEG thumbnails, metadata, the codebook binding) and the operations the indexer, the search
(:class:`~yolo_vq.index.memory.Memory`), edge ingest and the thumbnail pictures use on it.

:class:`Store` is the abstract base every implementation derives from (this module imports none of them);
:func:`yolo_vq.index.registry.open_store` opens one from a location (a directory path, or ``scheme:PATH``).

Every implementation keeps the same contract: writes go in batches, one transaction per batch, and each processed
frame is recorded in the same transaction as its detections (a crash loses at most the batch in flight; re-running
the same job skips every frame already recorded, idempotent per source fingerprint + frame); readers never block the
writer and see whole committed batches only; an index's codes belong to one codebook, copied into the index
directory (``CODEBOOK_STEM``) and identified by the sha256 of its tensors (``meta['codebook_sha256']``), bound once,
when the index is made; faults (a damaged or foreign index, a read-only folder, a full disk, a lock held too long)
are one :class:`StoreError` naming the file and what to do, and a failed write is rolled back whole.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from yolo_vq_edge._format import SourceInfo

from ..detections import LIST_ID, Detections
from ..errors import StoreError
from .binding import CODEBOOK_STEM, bind, recorded_sha256, verified_codebook
from .faults import damaged

__all__ = ["CODEBOOK_STEM", "FILTER_FIELDS", "ROW_FIELDS", "SCHEMA_VERSION", "VECTOR_DTYPE", "CodebookBinding", "Frame",
           "Source", "SourceInfo", "Store", "StoreError", "frame_columns"]

SCHEMA_VERSION = 1  # the version of what an index holds (meta['schema_version']); another one is refused at open
VECTOR_DTYPE = np.dtype("<f2")  # kept vectors: float16, little-endian, 2 bytes per dimension
# the columns Store.rows reads, besides ``id``: the filters' (FILTER_FIELDS), the rest of a search result's row (the
# frame and the box: the search lists keep them, so results need no lookup in the store), the list and the codes
FILTER_FIELDS = ("class_id", "source_id", "time", "confidence", "track_id")
ROW_FIELDS = (*FILTER_FIELDS, "frame", "x1", "y1", "x2", "y2", "list_id", "codes")


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# What the meta values the package reads must be (a key not set reads as the default): checked as they are read.
META_FORMS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "codebook_sha256": (lambda v: isinstance(v, str), "a sha256 hex string"),
    "code_size": (_count, "a positive int"),
    "schema_revision": (_count, "a positive int"),
    "names": (lambda v: isinstance(v, dict) and all(k.isascii() and k.isdigit() and isinstance(n, str)
                                                    for k, n in v.items()), "a dict of class id -> name"),
    "vectors": (lambda v: isinstance(v, dict) and _count(v.get("dim")), "a dict with the vectors' dim"),
}
_NOT_JSON = object()


@dataclass(frozen=True)
class Source(SourceInfo):
    """A source stored in an index: its :class:`SourceInfo` as registered, and its ``id`` there (keyword)."""

    id: int = field(kw_only=True)


@dataclass(frozen=True)
class Frame:
    """One processed frame to store: its index, timestamp (s) and detections (with codes, maybe thumbnails)."""

    frame: int
    time: float
    detections: Detections
    thumbs: Sequence[bytes | None] | None = None  # JPEG bytes (or None) per detection row


def frame_columns(frames: Sequence[Frame]) -> dict[str, Any]:
    """The per-detection columns of a batch of ``frames``, in order, converted once for the whole batch (what a store
    writes, and the search lists' columns of rows just stored): ``frame`` (n,) int64, ``time`` (n,) float64, ``xyxy``
    (n, 4) float32, ``class_id`` and ``track_id`` (n,) int64, ``confidence`` (n,) float32, ``list_id`` (n,) int32 (-1
    where none was assigned), ``codes`` (n, M) uint8 (None where some frame has none)."""
    frames = [f for f in frames if len(f.detections)]
    dets = [f.detections for f in frames]
    n = [len(d) for d in dets]

    def cat(arrays: list, dtype: Any, shape: tuple[int, ...] = ()) -> np.ndarray:
        return np.concatenate([np.asarray(a, dtype) for a in arrays]) if arrays else np.zeros((0, *shape), dtype)

    lists = [d.data.get(LIST_ID) for d in dets]
    return {
        "frame": np.repeat(np.array([f.frame for f in frames], np.int64), n),
        "time": np.repeat(np.array([f.time for f in frames], np.float64), n),
        "xyxy": cat([d.xyxy for d in dets], np.float32, (4,)),
        "class_id": cat([d.class_id for d in dets], np.int64),
        "confidence": cat([d.confidence for d in dets], np.float32),
        "track_id": cat([d.track_id for d in dets], np.int64),
        "list_id": cat([np.full(len(d), -1) if v is None else np.where(np.asarray(v) < 0, -1, v)
                        for d, v in zip(dets, lists)], np.int32),
        "codes": None if any(d.codes is None for d in dets) else cat([d.codes for d in dets], np.uint8, (0,)),
    }


@dataclass(frozen=True)
class CodebookBinding:
    """A saved codebook to bind to an index (:meth:`Store.bind_codebook`), with what its codes belong to."""

    path: str | Path  # the codebook's stem (or one of its two files)
    embedding: Any  # the embedding description (Embedder.describe()), JSON
    model_fingerprint: Any
    names: dict[int, str]
    fitted: bool = False  # fitted by this run for a new index: words the error when another process bound first


class Store(ABC):
    """An open index: the abstract interface (see the module docstring for the contract every implementation keeps).

    Open one with :func:`~yolo_vq.index.registry.open_store`. Every store has the attributes ``directory`` (:class:`~pathlib.Path`, the index
    directory: it holds the codebook copy), ``path`` (:class:`~pathlib.Path`, what its messages name: SQLite's
    ``index.db``) and ``readonly`` (bool: opened for reading only; every write method then raises
    :class:`StoreError`).

    What an implementation provides is every abstract member; the metadata forms, the codebook binding and the checks
    of a batch's codes and vectors are shared (``get_meta``/``set_meta`` over ``_meta_text``/``_put_meta_text``,
    ``bind_codebook`` inside ``_writing``). Detection ids are positive ints, increasing in the order detections were stored.

    Every method may raise :class:`StoreError` for a fault of the underlying storage (damaged, read-only, full,
    locked), with what failed and the fix; the errors listed per method are those of its arguments or of the index's
    content.
    """

    directory: Path
    path: Path
    readonly: bool

    # -- lifecycle -------------------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def exists(cls, path: str | Path) -> bool:
        """Whether this implementation finds an index at ``path`` (or what is left of one, which opening without
        ``create`` refuses with its reason); False where nothing is stored yet (making one there loses nothing)."""

    @abstractmethod
    def close(self) -> None:
        """Release the store (its connection, files); committed data stays. Other methods must not be called after."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata (shared: JSON values checked against META_FORMS) -----------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        """The JSON value stored under ``key``, or ``default`` when the key is not set.

        Keys the package uses: ``schema_version`` (int), ``codebook_sha256`` (str), ``code_size`` (positive int,
        bytes per code), ``names`` (dict of class id as a decimal string -> name), ``vectors`` (dict with ``dtype``
        and a positive ``dim``), ``embedding`` and ``model_fingerprint`` (JSON), ``index_uuid`` (str: names this
        index to the search structure derived from it).

        Raises:
            StoreError: the value is not JSON, or not of the form its key has (a damaged index).
        """
        text = self._meta_text(key)
        if text is None:
            return default
        try:
            value = json.loads(text)
        except (TypeError, ValueError, RecursionError):
            value = _NOT_JSON
        if value is _NOT_JSON or key in META_FORMS and not META_FORMS[key][0](value):  # never stored as null
            raise damaged(self.path, f"its meta {key!r} is {str(text)[:40]!r}, not "
                                     f"{META_FORMS.get(key, (None, 'JSON'))[1]}")
        return value

    def set_meta(self, key: str, value: Any) -> None:
        """Store the JSON-serialisable ``value`` under ``key`` (replacing any), committed at once unless inside a
        write of this store."""
        self._put_meta_text(key, json.dumps(value))

    @abstractmethod
    def _meta_text(self, key: str) -> str | None:
        """The text stored under ``key`` (None: not set)."""

    @abstractmethod
    def _put_meta_text(self, key: str, text: str) -> None:
        """Store ``text`` under ``key`` (replacing any), committed at once unless inside a write of this store."""

    @abstractmethod
    def _writing(self, doing: str) -> AbstractContextManager[None]:
        """One write transaction under the store's write lock (``doing`` words its faults): what the block writes
        commits when it ends and is rolled back whole when it raises."""

    # -- the codebook binding (shared: yolo_vq.index.binding) ---------------------------------------------------
    @property
    def codebook_sha256(self) -> str | None:
        """The sha256 (hex) of the tensors of the codebook every stored code belongs to; None: no codebook bound.

        Raises:
            CodebookError: an older index records no checksum and its codebook file is unreadable.
        """
        return recorded_sha256(self)

    def bind_codebook(self, codebook: CodebookBinding) -> bool:
        """Make ``codebook`` this index's own, once: in one write, a new index copies it into ``directory`` (as
        ``CODEBOOK_STEM``) and records its checksum, embedding, model fingerprint and class names; an index bound
        before must be bound to the same codebook (its copy is restored if missing or damaged). Returns True when
        this call bound it.

        Raises:
            CodebookError: the index is bound to another codebook (the message names both, and says whether this
                run fitted its codebook while another process bound one), or ``codebook`` is unreadable.
            StoreError: the store is read-only, or holds codes with no codebook recorded (they could belong to any).
        """
        self._check_writable()
        with self._writing("binding its codebook"):
            return bind(self, codebook)

    def codebook_path(self) -> Path | None:
        """The stem of the index's own codebook (in ``directory``), verified against the recorded checksum; None
        when no codebook is bound yet.

        Raises:
            CodebookError: the copy is missing, damaged or another codebook (with how to recover); nothing is changed.
        """
        return verified_codebook(self)

    # -- checks every implementation's writes make (shared) -----------------------------------------------------
    def _check_writable(self) -> None:
        if self.readonly:
            raise StoreError(f"{self.path} was opened read-only")

    def _code_size_after(self, d: Detections, code_size: int | None) -> int | None:
        """The store's code size once ``d``'s codes are stored (``code_size``: before; the first codes stored set
        it, recorded in ``meta['code_size']`` in the same write). Raises StoreError for codes of another size."""
        if d.codes is None or not len(d):
            return code_size
        size = int(d.codes.shape[1]) * d.codes.itemsize
        if code_size is None:
            self.set_meta("code_size", size)
            return size
        if size != code_size:
            raise StoreError(f"codes of {size} bytes, this index stores {code_size}-byte codes: use the index's "
                             f"codebook")
        return code_size

    def _vectors_after(self, d: Detections, kept: dict[str, Any] | None) -> dict[str, Any]:
        """``meta['vectors']`` once ``d``'s embeddings are kept (``kept``: before; the first vectors kept set it, in
        the same write). Raises StoreError for detections without embeddings or of another dim."""
        if d.dim == 0 or (kept is not None and d.dim != kept["dim"]):
            raise StoreError(f"detections carry embeddings of dim {d.dim}, this index keeps "
                             f"{kept['dim'] if kept else 'float'} vectors: keep the embeddings the codes were "
                             "encoded from (Detections.from_ultralytics of an Embedder's results)")
        if kept is None:
            kept = {"dtype": "float16", "dim": d.dim}
            self.set_meta("vectors", kept)
        return kept

    # -- sources ---------------------------------------------------------------------------------------------------
    @abstractmethod
    def add_source(self, source: SourceInfo) -> Source:
        """Register ``source`` (committed at once), or return the one with its content ``fingerprint`` as it was
        registered (re-runs resume it, whatever its ``uri`` now). An opened :class:`~yolo_vq.video.VideoSource` is
        a :class:`SourceInfo`.

        Raises:
            StoreError: the store is read-only.
        """

    @abstractmethod
    def source(self, source_id: int | None = None, *, fingerprint: str | None = None) -> Source:
        """A source by id, or by content ``fingerprint`` when given.

        Raises:
            KeyError: no such source.
        """

    def find_source(self, fingerprint: str) -> Source | None:
        """The source with this content ``fingerprint``, or None when the index has none."""
        try:
            return self.source(fingerprint=fingerprint)
        except KeyError:
            return None

    @abstractmethod
    def sources(self) -> list[Source]:
        """Every source, in id order."""

    @abstractmethod
    def frames_done(self, source_id: int) -> np.ndarray:
        """Sorted (n,) int64 indices of the frames of ``source_id`` already stored (with or without detections);
        empty for an unknown source."""

    # -- writing ---------------------------------------------------------------------------------------------------
    @abstractmethod
    def add_frames(self, source_id: int, frames: Iterable[Frame], *, vectors: bool = False) -> np.ndarray:
        """Store a batch of frames of a registered source in one transaction (all or nothing); frames already stored
        are skipped (idempotent). Returns the ids given to the detections inserted: (n,) int64, ascending, in the
        order of the frames and of their detections (``len()`` of it: how many were inserted).

        Each frame's detections are stored with their boxes, class, confidence, track id, codes ((n, M) uint8, all
        of the store's ``code_size`` bytes, which the first codes stored set) and ``Frame.thumbs``. With ``vectors``,
        each detection's embedding (``detections.embeddings``, (n, D) float32) is also kept as ``VECTOR_DTYPE`` (D
        fixed by the first vectors stored, recorded in ``meta['vectors']``), for re-ranking.

        Raises:
            StoreError: the store is read-only; codes of another size than the store's; with ``vectors``,
                detections without embeddings or of another dim. Nothing of the batch is stored.
        """

    # -- reading ---------------------------------------------------------------------------------------------------
    @abstractmethod
    def snapshot(self) -> AbstractContextManager[Store]:
        """A context manager (yielding this store) inside which every read sees one consistent committed state,
        even while another process commits; re-entrant (inside a snapshot it does nothing more)."""

    @abstractmethod
    def count(self) -> int:
        """The number of detections stored."""

    @abstractmethod
    def rows(self, *, after_id: int = 0, limit: int | None = None, fields: Sequence[str] = ROW_FIELDS,
             before_id: int | None = None) -> dict[str, np.ndarray]:
        """Columns of the detections with codes and ``after_id < id < before_id`` (None: no upper bound), the first
        ``limit`` of them (None: all) in id order: ``id`` (N,) int64 always, and each of ``fields``
        (:data:`ROW_FIELDS`): ``class_id``, ``source_id``, ``track_id``, ``frame`` (N,) int64, ``time`` (N,) float64,
        ``confidence``, ``x1``, ``y1``, ``x2``, ``y2`` (N,) float32, ``list_id`` (N,) int32 (the
        coarse list recorded when it was stored, -1 where none was), ``codes`` (N, code_size) uint8 (contiguous;
        none stored: (0, code_size or 0)). What the scan engine, the filters and the search lists read, refreshed
        incrementally as the store grows (``after_id`` = the last id read).

        Raises:
            ValueError: a field not in :data:`ROW_FIELDS`.
            StoreError: stored values that are not of their column's type (a damaged index).
        """

    def codes(self, *, after_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (N,) int64, codes (N, code_size) uint8)``: :meth:`rows` with the codes only."""
        r = self.rows(after_id=after_id, fields=("codes",))
        return r["id"], r["codes"]

    @abstractmethod
    def stored_bytes(self) -> int:
        """Bytes the store's own files take on disk (not the codebook copy or the search lists)."""

    @abstractmethod
    def max_id(self) -> int:
        """The largest detection id stored (0 when none): a cheap check of what a derived structure covers."""

    @abstractmethod
    def get(self, ids: Sequence[int] | np.ndarray) -> Detections:
        """Detections by id, in the order given: boxes, confidence, class id, track id, codes ((n, code_size) uint8,
        None when any of them has none) and ``data`` = ``id`` int64, ``source_id`` int64, ``frame`` int64, ``time``
        float64.

        Raises:
            KeyError: an id is not stored (the message lists some).
        """

    @property
    def vector_dim(self) -> int | None:
        """Dimension of the float vectors this index keeps (``meta['vectors']``), or None when it keeps none."""
        kept = self.get_meta("vectors")
        return None if kept is None else int(kept["dim"])

    @abstractmethod
    def vectors(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The kept embeddings of detection ids, in the order given: ``((n, D) float32, (n,) bool kept)``; rows of
        detections stored without a vector (e.g. indexed before vectors were kept) are zeros with ``kept`` False.

        Raises:
            StoreError: the index keeps no vectors.
        """

    @abstractmethod
    def thumbnails(self, ids: Sequence[int] | np.ndarray) -> list[bytes | None]:
        """The stored JPEG thumbnail of each detection id, in the order given (None where none was kept, or for an
        id not stored)."""

    @abstractmethod
    def nearest_thumbnail(self, source_id: int, track_id: int, frame: int) -> bytes | None:
        """The JPEG thumbnail of the detection of the same track of ``source_id`` nearest in frames to ``frame``
        (ties: the earlier frame); None when the track has none, or for untracked detections (``track_id < 0``)."""

    @abstractmethod
    def track_ids(self, source_id: int, track_id: int) -> np.ndarray:
        """Ids ((n,) int64, ascending) of the detections of one track of one source."""

    @abstractmethod
    def frame_ids(self, source_id: int, frame: int) -> np.ndarray:
        """Ids ((n,) int64, ascending) of the detections stored for one frame of one source."""

    @abstractmethod
    def max_track_id(self, source_id: int) -> int:
        """The largest stored track id of a source (0 when none): new runs number their tracks after it."""
