"""Edge records -> the store: what ``yolo-vq ingest detections.jsonl|.parquet --index DIR`` does.

The edge file's codebook fingerprint (the sha256 of the codebook tensors baked into the ONNX graph) must be the
index's own; a new index takes its codebook from ``codebook=`` and must match too. Ingesting is idempotent per
(source content, frame), like indexing: a re-run or an overlapping file adds nothing twice.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..detections import LIST_ID, Detections
from ..errors import CodebookError
from ..index.registry import open_store, store_exists
from ..index.store import CodebookBinding, Frame, Store, StoreError
from ..index.upkeep import ListKeeper
from ..quant.io import codebook_checksum, codebook_paths
from ._format import SOURCE_FIELDS, Key, SourceInfo
from .records import BadRecord, read_records

__all__ = ["IngestSummary", "ingest"]


class _Index:
    """The index an ingest writes to. Checked on construction (codebook, code size) and written to only by
    :meth:`add`: a new index is made (and bound to its codebook), and each source registered, with its first stored
    frames, so a file refused before its first valid frame leaves no trace, not even a directory."""

    def __init__(self, index: str | Path, header: dict[str, Any], codebook: str | Path | None):
        self.index, self.header = index, header
        want = header[Key.CODEBOOK_FINGERPRINT]
        self._store: Store | None = None
        self._bind: CodebookBinding | None = None  # the codebook to bind with the first stored frames
        self._ids: dict[str, int] = {}  # source fingerprint -> store id
        self._lists: ListKeeper | None = None  # the index's search lists (with the store's first write)
        if store_exists(index):
            self._store = open_store(index)  # reads only until add(); refuses a damaged index (its own error)
            try:
                self._check(want, codebook)
            except BaseException:
                self._store.close()
                raise
        else:
            self._bind = self._binding(_checked_codebook(index, header, codebook))

    def _check(self, want: str, codebook: str | Path | None) -> None:
        have = self._store.codebook_sha256
        if have is None:
            self._bind = self._binding(_checked_codebook(self.index, self.header, codebook))
        elif have != want:
            raise CodebookError(f"the edge file was encoded with codebook {want[:16]}..., index {self.index} holds "
                             f"codebook {have[:16]}...: ingest into an index built with the codebook the graph was "
                             f"exported with (or a new directory with --codebook)")
        else:
            _check_code_size(codebook_paths(self._store.codebook_path())[1], self.header)
        stored = self._store.get_meta("code_size")
        if stored is not None and stored != self.header[Key.CODE_SIZE]:
            raise StoreError(f"the edge file holds {self.header[Key.CODE_SIZE]}-byte codes, index {self.index} stores "
                             f"{stored}-byte codes: ingest into an index built with the graph's codebook")

    def _binding(self, codebook: str | Path) -> CodebookBinding:
        h = self.header
        return CodebookBinding(codebook, embedding=h.get(Key.EMBEDDING), model_fingerprint=h.get(Key.MODEL_FINGERPRINT),
                               names=h[Key.NAMES])

    def frames_done(self, fingerprint: str) -> set[int]:
        """Frames of the source with this content fingerprint already stored (none if the index lacks it)."""
        if self._store is None:
            return set()
        if (found := self._store.find_source(fingerprint)) is None:
            return set()
        sid = self._ids[fingerprint] = found.id
        return set(self._store.frames_done(sid).tolist())

    def add(self, source: dict[str, Any], frames: list[Frame]) -> int:
        """Store ``frames`` of ``source`` (a checked source record), making the index (bound to its codebook) and
        registering the source first if needed. Returns the detections inserted."""
        if self._store is None:
            self._store = open_store(self.index, create=True, codebook=self._bind)
        elif self._bind is not None:
            self._store.bind_codebook(self._bind)
        self._bind = None
        sid = self._ids.get(source["fingerprint"])
        if sid is None:
            sid = self._ids[source["fingerprint"]] = self._store.add_source(
                SourceInfo(**{f: source[f] for f in SOURCE_FIELDS})).id
        if self._lists is None:
            from ..quant import load_codebook

            self._lists = ListKeeper(self._store, load_codebook(self._store.codebook_path()))
        if self._lists.active and frames:
            lists = self._lists.assign(codes=np.concatenate([f.detections.codes for f in frames]))
            for f, part in zip(frames, np.split(lists, np.cumsum([len(f.detections) for f in frames])[:-1])):
                f.detections.data[LIST_ID] = part
        ids = self._store.add_frames(sid, frames)
        self._lists.stored(sid, frames, ids)
        return len(ids)

    def close(self) -> None:
        if self._store is None:
            return
        try:
            if self._lists is not None:
                self._lists.sync()
        except OSError as e:  # the records are stored; the lists only lag behind (searched as the tail)
            warnings.warn(f"{self.index}: the search lists were not brought up to date ({e.strerror or e}); the "
                          f"detections are stored and searched all the same, and the next ingest (or `yolo-vq "
                          f"upgrade --index {self.index}`) catches up", stacklevel=3)
        finally:
            self._store.close()


def _checked_codebook(index: str | Path, header: dict[str, Any], codebook: str | Path | None) -> str | Path:
    """``codebook`` for an index without one, checked to be the edge file's; writes nothing."""
    want = header[Key.CODEBOOK_FINGERPRINT]
    if codebook is None:
        raise StoreError(f"{index} has no codebook yet: pass the codebook the edge graph was exported with "
                         f"(--codebook), or ingest into an index made by `yolo-vq index`")
    st, js = codebook_paths(codebook)
    if not js.is_file() or not st.is_file():
        raise StoreError(f"codebook {codebook}: {js.name} and {st.name} are both needed")
    if codebook_checksum(js) != want:
        raise CodebookError(f"codebook {js} is not the one the edge graph was exported with (fingerprint "
                         f"{str(codebook_checksum(js))[:16]}... vs {want[:16]}...)")
    _check_code_size(js, header)
    return codebook


def _check_code_size(js: Path, header: dict[str, Any]) -> None:
    """The header's code size must be its codebook's (matched by fingerprint): else the header was altered."""
    try:
        have = json.loads(js.read_text()).get("code_size")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        have = None  # the codebook's own checks report an unreadable file
    if have is not None and have != header[Key.CODE_SIZE]:
        raise StoreError(f"the edge file's header says {header[Key.CODE_SIZE]}-byte codes, its codebook {js} makes "
                         f"{have}-byte codes: the header was altered; ingest the file `yolo-vq edge` wrote")


class IngestSummary(dict):
    """``{"sources", "frames", "skipped_frames", "detections"}`` of one ingest: sources with frames in the file,
    frames stored now, frames skipped (stored before, or twice in the file), detections stored now."""

    def line(self) -> str:
        return (f"ingested {self['frames']} frames ({self['skipped_frames']} already stored) from {self['sources']} "
                f"source(s): {self['detections']} detections")


def ingest(path: str | Path, index: str | Path, *, codebook: str | Path | None = None,
           commit_every: int = 256) -> IngestSummary:
    """Add an edge records file (``.jsonl`` or ``.parquet``, see :mod:`yolo_vq.edge.records`) to the index ``index``.

    Frames are stored in batches of ``commit_every``, each source registered (and a new index made) with its
    first stored frames. A malformed record stops the ingest: the frames before it are stored, then the error says
    where and how many; a re-run of the same file skips them and stops at the same place.

    Raises:
        RecordError: not an edge file, or a malformed record (:class:`~yolo_vq.edge.records.BadRecord`, ``file:line:``
            first; the frames before it are stored, and the index is untouched if there were none).
        StoreError: codebook (or code size) mismatch, or a new index without ``codebook``: nothing is written
            then; or a fault while writing (the batches committed before it are kept).
    """
    path = Path(path)
    header, records = read_records(path)  # a bad header is refused here, before the index is looked at
    target = _Index(index, header, codebook)
    dtype = np.dtype(header[Key.CODE_DTYPE])
    width = header[Key.CODE_SIZE] // dtype.itemsize
    summary = IngestSummary(sources=0, frames=0, skipped_frames=0, detections=0)
    declared: dict[int, dict[str, Any]] = {}  # the file's source number -> its source record
    done: dict[str, set[int]] = {}  # source fingerprint -> its frames stored (before, or now)
    pending: list[Frame] = []
    current: int | None = None  # the source of the pending frames

    def flush() -> None:
        if pending:
            summary["detections"] += target.add(declared[current], pending)
            summary["frames"] += len(pending)
            pending.clear()

    try:
        for _, rec in records:
            k = rec["source"]
            if rec["type"] == "source":
                declared[k] = rec
                continue
            fp = declared[k]["fingerprint"]
            if fp not in done:
                done[fp] = target.frames_done(fp)
                summary["sources"] += 1
            if rec["frame"] in done[fp]:
                summary["skipped_frames"] += 1
                continue
            frame = Frame(rec["frame"], rec["time"], _detections(rec, dtype, width))
            if k != current:
                flush()
                current = k
            pending.append(frame)
            done[fp].add(rec["frame"])
            if len(pending) >= commit_every:
                flush()
        flush()
    except BadRecord as e:
        flush()
        raise BadRecord(e.where, e.at, f"{e.problem}: {_stored(summary)}; {_fix(path, e.at, summary)}") from None
    finally:
        target.close()
    return summary


def _stored(summary: IngestSummary) -> str:
    new, old = summary["frames"], summary["skipped_frames"]
    if new + old == 0:
        return "no frame came before it, nothing was stored"
    if old == 0:
        return f"the {_frames(new)} before it {'was' if new == 1 else 'were'} stored"
    if new == 0:
        return f"the {_frames(old)} before it {'was' if old == 1 else 'were'} already stored (0 new)"
    return f"the {_frames(new + old)} before it are stored ({new} now, {old} already)"


def _frames(n: int) -> str:
    return f"{n} frame{'s' * (n != 1)}"


def _fix(path: Path, at: str, summary: IngestSummary) -> str:
    if not summary["frames"] + summary["skipped_frames"]:
        return f"fix {at} and re-run"
    how = f"fix or cut the file at {at}" if path.suffix == ".jsonl" else f"fix {at}"
    return f"{how} and re-run (stored frames are skipped)"


def _detections(rec: dict[str, Any], dtype: np.dtype, width: int) -> Detections:
    """A checked frame record's boxes and codes (``width`` codes of ``dtype`` per box)."""
    codes = np.frombuffer(b"".join(rec["codes"]), dtype=dtype).reshape(len(rec["codes"]), width)
    return Detections(np.asarray(rec["xyxy"], np.float32).reshape(-1, 4), rec["confidence"], rec["class_id"],
                      codes=codes)
