"""An index directory opened for search: the store (read-only), its codebook and the code scan engine."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..detections import Detections
from .filters import RowFilter
from .registry import open_store
from .store import FILTER_FIELDS, StoreError

if TYPE_CHECKING:
    from .ivf import ListSearch

__all__ = ["FLAT_BELOW", "MODES", "TRACK_WINDOW", "Memory"]


_DTYPES = {"id": np.int64, "class_id": np.int64, "source_id": np.int64, "time": np.float64, "confidence": np.float32,
           "track_id": np.int64}


_ALL = 1 << 62  # nprobe="all": every list


def _check_nprobe(nprobe: Any) -> int | None:
    """``nprobe`` as an int (``"all"``: every list), None for the default."""
    if nprobe == "all":
        return _ALL
    if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, int | np.integer) or nprobe < 1):
        raise ValueError(f"nprobe must be a positive int (lists a query scans) or 'all', got {nprobe!r}")
    return None if nprobe is None else int(nprobe)


def _stamp(folder: Path) -> tuple | None:
    """What identifies the manifest's current version (it is replaced by rename: a new inode)."""
    try:
        st = os.stat(folder / "manifest.json")
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _check_range(time_from: float | None, time_to: float | None) -> None:
    if time_from is not None and time_to is not None and float(time_from) > float(time_to):
        raise ValueError(f"time_from ({time_from}) is after time_to ({time_to}): pass time_from <= time_to "
                         f"(seconds from the start of each source)")


MODES = ("auto", "flat", "ivf")
_EVERY = slice(None)  # a query's results kept whole
_MINUS_HALF = np.float32(-0.5)
_INTS = (int, np.integer)  # what k may be (a tuple: isinstance with a union type costs ~0.5 us more a call)
# auto mode scans flat below this many stored detections: measured (docs/benchmarks.md, search_scale.py), the flat
# scan takes 1.7 ms at 100k (exact) against 0.5 ms for the lists (recall 0.96), 15 ms at 1M against 0.6 ms: flat
# (exact) while it costs a few ms, lists above
FLAT_BELOW = 200_000
# a stored detection searched from codes alone (no kept vectors) is queried with its track's decoded codes within
# this many frames of it: measured in benchmarks/product_retrieval.py (docs/benchmarks.md)
TRACK_WINDOW = 15


def _cosine(d: np.ndarray) -> np.ndarray:
    """Cosine similarities of unit vectors from their squared distances ``d`` (float32): ``1 - d / 2``."""
    score = d * _MINUS_HALF
    score += 1
    return score


class Memory:
    """Search stored detections by visual similarity.

    Two ways to scan, the same distances (the product quantizer's ADC over the stored codes):

    - flat: every code is loaded once (from ``index.db``) and scanned per query; exact.
    - ivf (partitioned): the codebook has a coarse quantizer and the index an on-disk search structure
      (``<index>/ivf``, :mod:`.segments`); a query scans the ``nprobe`` lists nearest to it, memory-mapped, plus the
      detections stored since the structure was last extended (the *tail*, loaded from ``index.db``). Opening reads
      the segment headers only.

    ``refresh()`` picks up what another process stored meanwhile (new rows, and a structure it extended). Scores are
    cosine similarities estimated from the ADC distance (embeddings are L2-normalised: ``cos = 1 - d / 2``); results
    come as :class:`Detections` with ``data`` = id, source_id, frame, time, score.

    Args:
        index: the index directory.
        engine: the scan engine, ``"auto"`` (FAISS when installed), ``"faiss"`` or ``"numpy"``.
        mode: ``"auto"`` (ivf when the structure holds at least :data:`FLAT_BELOW` detections, else flat),
            ``"flat"`` or ``"ivf"`` (needs usable lists: ``yolo-vq upgrade``).
        nprobe: lists a query scans in ivf mode (default :func:`~yolo_vq.index.ivf.default_nprobe` of the list
            count); more is slower and closer to the flat scan, all lists is exactly the flat scan.

    Lists that are damaged, foreign or stale (another database, codebook or coarse quantizer; rows the database
    lacks) are never searched: a warning says why and the index is searched flat (``why_flat``) until a writer
    rebuilds them (``yolo-vq upgrade``, the next ``index`` or ``ingest``).
    """

    def __init__(self, index: str | Path, *, engine: str = "auto", mode: str = "auto", nprobe: int | None = None):
        from ..quant import load_codebook

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.nprobe = _check_nprobe(nprobe)
        self.index = index  # the location, passed on unchanged (a directory, or scheme:PATH)
        self.store = open_store(self.index, readonly=True)
        try:
            own = self.store.codebook_path()  # verified against index.db's record: CodebookError says how to recover
            if own is None:
                raise StoreError(f"{self.index} has no codebook and no detections yet: index a video into it first")
            self.codebook = load_codebook(own)
            fp = self.store.get_meta("model_fingerprint")
            if self.codebook.meta.get("model_fingerprint") != fp:
                raise StoreError(f"{self.index}: its codebook belongs to model "
                                 f"{self.codebook.meta.get('model_fingerprint')}, the index to {fp}: the index is "
                                 f"inconsistent, re-index it")
            self.names: dict[int, str] = {int(k): v for k, v in (self.store.get_meta("names") or {}).items()}
            self._engine = engine
            self.lists: ListSearch | None = None
            self._lists_nprobe: tuple[int, int] | None = None  # (lists, default nprobe) of self.lists
            self._manifest_stamp: tuple | None = None
            self._reset_tail()
            self.why_flat: str | None = "mode='flat' was asked for"
            if self.codebook.coarse is None:
                self.why_flat = (f"its codebook has no search lists (made before partitioned search, or fitted with "
                                 f"--lists 0): `yolo-vq upgrade --index {self.index}` adds them")
                if mode == "ivf":
                    raise StoreError(f"{self.index}: {self.why_flat}, or search with mode='flat'")
            elif mode != "flat":
                self._open_lists(force=mode == "ivf")
            self.refresh()
        except BaseException:
            self.store.close()
            raise

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the two scans -------------------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """``"ivf"`` or ``"flat"``: how queries are answered now."""
        return "flat" if self.lists is None else "ivf"

    def __len__(self) -> int:
        """Searchable detections (in the lists and the tail, or loaded for the flat scan)."""
        return len(self.scan) + (0 if self.lists is None else self.lists.rows)

    def _reset_tail(self, after: int = 0, scan: Any = None) -> None:
        from .scan import CodeScan

        self.scan = scan if scan is not None else CodeScan(self.codebook, engine=self._engine)
        self._cols: dict[str, np.ndarray] = {}  # filterable columns, rows aligned with the scan's ids
        self._last = after

    def _open_lists(self, *, force: bool) -> None:
        """Open the lists to search them (``self.lists``), or leave them closed and say why (``self.why_flat``).

        A search never writes: lists that are damaged, foreign or stale are reported (a warning, one line) and the
        index is searched flat; a writer (``index``, ``ingest``, ``upgrade``) rebuilds them from ``index.db``."""
        from .segments import ListsProblem, open_lists

        upgrade = f"`yolo-vq upgrade --index {self.index}` (or the next `index` or `ingest` into it) rebuilds them"
        try:
            for attempt in range(3):  # a writer may replace a segment between reading the manifest and mapping it
                lists = open_lists(self.store, self.codebook.coarse)
                if not force and self.store.max_id() < FLAT_BELOW:
                    break
                try:
                    self._use(lists)
                    return
                except ListsProblem:
                    if attempt == 2:
                        raise
        except ListsProblem as e:
            if force:
                raise StoreError(f"{self.index}: its search lists cannot be used: {e}; {upgrade}") from None
            missing = "manifest.json is missing" in str(e)
            self.why_flat = f"its search lists cannot be used ({e}): searched flat; {upgrade}"
            if not missing or self.store.max_id() >= FLAT_BELOW:
                warnings.warn(f"{self.index}: {self.why_flat}", stacklevel=3)
            return
        self.why_flat = (f"it holds fewer than {FLAT_BELOW} detections, where the flat scan is as fast as the "
                         f"lists (docs/benchmarks.md)")

    def _use(self, lists) -> None:
        from .ivf import ListSearch
        from .scan import CodeScan

        scan = CodeScan(self.codebook, engine=self._engine)
        search = ListSearch(lists, self.codebook.coarse, scan)  # may raise ListsProblem: then nothing has changed
        self._reset_tail(lists.high_water, scan)
        self.lists = search
        self._lists_nprobe = None
        self.why_flat = None
        self._manifest_stamp = _stamp(lists.folder)

    def refresh(self) -> int:
        """Pick up detections stored since the last refresh (and a search structure another process extended);
        returns how many detections became searchable."""
        before = len(self)
        if self.lists is not None and _stamp(self.lists.lists.folder) != self._manifest_stamp:
            from .segments import ListsProblem, open_lists

            try:
                self._use(open_lists(self.store, self.codebook.coarse, check=False))
            except ListsProblem:
                pass  # mid-rewrite by another process: keep the structure opened before, try again next refresh
        cols = self.store.rows(after_id=self._last, fields=(*FILTER_FIELDS, "codes"))  # one state, while others write
        ids, codes = cols["id"], cols.pop("codes")
        if len(ids):
            self.scan.add(ids, codes)
            self._cols = {k: np.concatenate([self._cols[k], v]) for k, v in cols.items()} if self._cols else cols
            self._last = int(ids[-1])
        return len(self) - before

    def info(self) -> dict[str, Any]:
        """What is searchable and how (what ``yolo-vq info`` prints): detections, sources, mode (and why flat),
        lists, segments, high_water and tail, nprobe and the recall it was calibrated to, bytes per detection on disk
        (``index.db``, lists) and in RAM for search, the codebook's and coarse quantizer's checksums."""
        n, coarse = len(self), self.codebook.coarse
        out: dict[str, Any] = {
            "index": str(self.index), "detections": n, "sources": len(self.store.sources()), "mode": self.mode,
            "why_flat": self.why_flat, "engine": self.scan.engine, "code_bytes": self.codebook.code_size,
            "codebook_sha256": self.store.codebook_sha256, "coarse_sha256": None if coarse is None else coarse.sha256,
            "lists": None if coarse is None else coarse.lists,
        }
        # RAM for search: the flat scan (or the tail) holds codes + id + filter columns per row; the lists stay on
        # disk, memory-mapped (the page cache, not this process, holds what queries touch), plus their offsets
        ram = len(self.scan) * (self.codebook.code_size + 8 + sum(v.itemsize for v in self._cols.values()))
        db = self.store.stored_bytes()
        lists_bytes = 0
        if self.lists is not None:
            lst = self.lists.lists
            cal = lst.calibration or {}
            lists_bytes = lst.bytes
            ram += sum(s.offsets.nbytes for s in lst.segments) + coarse.centroids.nbytes + coarse.proj.nbytes
            if self.lists._mapped is not None:  # FAISS' list table (3 size_t) and our sizes and starts, per list
                ram += len(lst.segments) * lst.lists * (24 + 8 + 8)
            out.update(segments=len(lst.segments), high_water=lst.high_water, in_lists=lst.rows, tail=len(self.scan),
                       nprobe=self.effective_nprobe(), nprobe_recall_at_10=cal.get("recall"),
                       nprobe_calibrated_at=cal.get("rows"), nprobe_calibration_sample=cal.get("sample_rows"))
        out.update(db_bytes=db, lists_bytes=lists_bytes,
                   disk_bytes_per_detection=round((db + lists_bytes) / max(n, 1), 1),
                   ram_bytes_per_detection=round(ram / max(n, 1), 1))
        return out

    def effective_nprobe(self, nprobe: int | str | None = None) -> int | None:
        """The lists a query scans (None in flat mode): ``nprobe``, else the Memory's, else the one calibrated when
        the lists were last synced (recall@10 >= 0.95 against the flat scan), else
        :func:`~yolo_vq.index.ivf.default_nprobe`."""
        nprobe = _check_nprobe(nprobe) if nprobe is not None else None
        if self.lists is None:
            return None
        if self._lists_nprobe is None:  # the lists' own default: they never change (a refresh opens new ones)
            from .ivf import default_nprobe

            n, cal = self.lists.lists.lists, self.lists.lists.calibration
            self._lists_nprobe = (n, cal["nprobe"] if cal else default_nprobe(n))
        n, default = self._lists_nprobe
        return min(n, nprobe or self.nprobe or default)

    # -- queries ---------------------------------------------------------------------------------------------------
    def class_ids(self, names: Sequence[str | int]) -> list[int]:
        """Class names (or ids) -> ids; an unknown name (or an id the index's model does not have) is an error
        listing the known ones."""
        from ..classes import class_ids

        def unknown(n: str | int, have: dict[int, str]) -> str:
            known = ", ".join(sorted(have.values())[:20])
            return f"unknown class {n!r}: this index knows {known}{' ...' if len(have) > 20 else ''}"

        return class_ids(self.names, names, unknown)

    def where(
        self, *, classes: Sequence[str | int] | None = None, source: int | str | None = None,
        time_from: float | None = None, time_to: float | None = None, min_conf: float | None = None,
        track: tuple[int, int] | None = None,
    ) -> RowFilter | None:
        """The filters resolved to a :class:`~yolo_vq.index.filters.RowFilter` (None when there are none to apply).

        ``classes``: names or ids; ``source``: an id or part of a path/URL; ``time_from``/``time_to``: seconds;
        ``min_conf``; ``track``: ``(source_id, track_id)`` of a stored track.

        Raises:
            ValueError: an unknown class, ``time_from > time_to``, a non-finite bound, a malformed track.
        """
        _check_range(time_from, time_to)
        for name, v in (("time_from", time_from), ("time_to", time_to), ("min_conf", min_conf)):
            if v is not None and not np.isfinite(float(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if track is not None:
            if not (isinstance(track, tuple | list) and len(track) == 2
                    and all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in track)):
                raise ValueError(f"track must be (source_id, track_id), two ints, got {track!r}")
            track = (int(track[0]), int(track[1]))
        f = RowFilter(classes=tuple(self.class_ids(classes)) if classes else None,
                      sources=tuple(self.source_ids(source)) if source is not None else None,
                      time_from=None if time_from is None else float(time_from),
                      time_to=None if time_to is None else float(time_to),
                      min_conf=None if min_conf is None else float(min_conf), track=track)
        return f if f.columns else None

    def filter_ids(self, **filters) -> np.ndarray | None:
        """Ids of the searchable detections passing the filters (see :meth:`where`; None when there are none to
        apply), from the in-memory columns and, in ivf mode, the columns of the on-disk lists (which it reads whole)."""
        f = self.where(**filters)
        if f is None:
            return None
        c = self.all_columns(("id", *f.columns))
        return c["id"][f.mask(c)]

    def all_columns(self, names: Sequence[str] = ("id", *FILTER_FIELDS)) -> dict[str, np.ndarray]:
        """Columns of every searchable detection (ivf mode: read from every segment, ids not in order)."""
        parts = [] if self.lists is None else [
            {n: np.asarray(seg.column(n)) for n in names} for seg in self.lists.lists.segments]
        tail = {n: self._cols[n] for n in names} if self._cols else {n: np.zeros(0, _DTYPES[n]) for n in names}
        if not parts:
            return tail
        return {n: np.concatenate([p[n] for p in parts] + [tail[n]]) for n in names}

    def source_ids(self, source: int | str) -> list[int]:
        """Ids of the sources a ``source`` filter names: an id, or a part of their path/URL."""
        if isinstance(source, int) or str(source).isdigit():
            return [int(source)]
        return [s.id for s in self.store.sources() if str(source) in s.uri]

    def why_empty(self, *, exclude: Sequence[int] = (), classes: Sequence[str | int] | None = None,
                  source: int | str | None = None, time_from: float | None = None, time_to: float | None = None,
                  min_conf: float | None = None, track: tuple[int, int] | None = None) -> str:
        """Why a search with these filters finds nothing: the first filter that leaves no detection, with what the
        index holds instead (e.g. ``time 60-120 s leaves none: stored times span 0.0-9.96 s``)."""
        c = self.all_columns()
        if not c or not len(c["id"]):
            return f"{self.index} holds no detections yet"
        keep = ~np.isin(c["id"], np.asarray(exclude, np.int64))
        if not keep.any():
            return "the index holds no detection besides the query's own"
        f = self.where(classes=classes, source=source, time_from=time_from, time_to=time_to, min_conf=min_conf,
                       track=track)
        context = {}  # each filter: how it reads, what the index holds instead
        if classes:
            have = sorted({self.names.get(int(k), str(int(k))) for k in np.unique(c["class_id"][keep])})
            context["classes"] = (f"class {', '.join(map(str, classes))}", f"stored classes: {', '.join(have[:20])}")
        if source is not None:
            listed = ", ".join(f"{s.id} {Path(s.uri).name}" for s in self.store.sources()[:10])
            context["source"] = (f"source {source!r}", f"sources: {listed}")
        if time_from is not None or time_to is not None:
            lo, hi = float(c["time"][keep].min()), float(c["time"][keep].max())
            context["time"] = (f"time {'' if time_from is None else time_from}-{'' if time_to is None else time_to} s",
                               f"stored times span {lo:.2f}-{hi:.2f} s")
        if min_conf is not None:
            context["min_conf"] = (f"min confidence {min_conf}",
                                   f"the highest stored confidence is {float(c['confidence'][keep].max()):.3f}")
        if track is not None:
            ts = c["track_id"][keep & (c["source_id"] == int(track[0]))]
            context["track"] = (f"track {track[0]}:{track[1]}",
                                f"source {track[0]} has {len(np.unique(ts[ts >= 0]))} stored tracks")
        steps = [(m, *context[name]) for name, m in (f.parts(c) if f is not None else [])]
        for m, what, hint in steps:
            if not (keep & m).any():
                together = " together with the filters before it" if m.any() else ""
                return f"the filter {what} leaves no detection{together} ({hint})"
            keep &= m
        return "no detection matches the filters"

    def vectors_of(self, ids: Sequence[int], *, stored: bool = True) -> np.ndarray:
        """Embeddings of stored detections, (n, D) float32: the kept float16 vectors where the index keeps them
        (``stored``), else decoded from the codes (approximate).

        Raises:
            KeyError: an id the index does not hold. StoreError: a detection without codes (a damaged index)."""
        if not (stored and self.store.vector_dim is not None):
            return self._decoded(ids)
        out, present = self.store.vectors(ids)
        if not present.all():
            missing = np.flatnonzero(~present)
            out[missing] = self._decoded(np.asarray(ids)[missing])
        return out

    def _decoded(self, ids: Sequence[int], *, rows: Detections | None = None) -> np.ndarray:
        """Decoded codes of ``ids`` (``rows``: those detections, already read)."""
        from .ivf import decode_codes

        codes = (self.store.get(ids) if rows is None else rows).codes
        if codes is None:
            raise StoreError(f"{self.index}: detection(s) {list(ids)[:5]} have no codes stored (a damaged index): "
                             f"query with another detection, or re-index into a new directory")
        return decode_codes(self.codebook, codes)

    def detection_vector(self, detection_id: int, *, window: int = TRACK_WINDOW) -> np.ndarray:
        """(1, D) query vector of a stored detection: its kept float16 vector where the index keeps vectors; else,
        for a tracked detection, the L2-normalised mean of the decoded codes of its track's detections within
        ``window`` frames of it (itself included: the codes' error and one frame's appearance noise average out);
        else its decoded codes. ``window=0``: its own vector only.

        Raises:
            KeyError: an id the index does not hold."""
        det = self.store.get([int(detection_id)])
        if self.store.vector_dim is not None or window <= 0 or int(det.track_id[0]) < 0:
            return self.vectors_of([int(detection_id)])
        track = self.store.get(self.store.track_ids(int(det.data["source_id"][0]), int(det.track_id[0])))
        near = track[np.abs(track.data["frame"] - int(det.data["frame"][0])) <= window]
        v = self._decoded(near.data["id"], rows=near).mean(0, keepdims=True)
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def track_vector(self, source_id: int, track_id: int) -> np.ndarray:
        """(1, D) mean decoded embedding of a stored track, L2-normalised."""
        ids = self.store.track_ids(source_id, track_id)
        if not len(ids):
            raise ValueError(f"no detections of track {track_id} in source {source_id} of {self.index}")
        v = self.vectors_of(ids).mean(0, keepdims=True)
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def _per_track(self, query: np.ndarray, k: int, per: int, exclude: Sequence[int], rerank: int | None,
                   nprobe: int | None, filters: dict) -> Detections:
        """:meth:`search` with at most ``per`` hits per track: asks for 4x more results until ``k`` appearances
        are found or everything stored was ranked."""
        fetch = 4 * k
        while True:
            hits = self.search(query[None], fetch, exclude=exclude, rerank=None if rerank is None else max(rerank, fetch),
                               nprobe=nprobe, **filters)[0]
            seen: dict[tuple[int, int], int] = {}
            keep = []
            for i, (src, tid, did) in enumerate(zip(hits.data["source_id"].tolist(), hits.track_id.tolist(),
                                                    hits.data["id"].tolist())):
                key = (src, tid) if tid >= 0 else (-1, did)
                if seen.get(key, 0) < per:
                    seen[key] = seen.get(key, 0) + 1
                    keep.append(i)
                    if len(keep) == k:
                        break
            if len(keep) == k or len(hits) < fetch or fetch >= len(self):
                break
            fetch *= 4
        out = hits[np.asarray(keep, dtype=np.int64)]
        start, end = out.data["time"].astype(np.float64), out.data["time"].astype(np.float64)
        spans: dict[tuple[int, int], tuple[float, float]] = {}
        for i, (src, tid) in enumerate(zip(out.data["source_id"].tolist(), out.track_id.tolist())):
            if tid < 0:
                continue
            if (src, tid) not in spans:
                t = self.store.get(self.store.track_ids(src, tid)).data["time"]
                spans[(src, tid)] = (float(t.min()), float(t.max()))
            start[i], end[i] = spans[(src, tid)]
        return out.with_data(track_start=start, track_end=end)

    # -- pictures --------------------------------------------------------------------------------------------------
    def pictures(self, detections: Detections, *, prefer: str = "video",
                 size: tuple[int, int] = (96, 192)) -> list[np.ndarray]:
        """One (h, w, 3) uint8 BGR picture per stored detection: cut from the source video while it is readable and
        unchanged, else its stored thumbnail (or the nearest one of its track), else a placeholder; ``prefer=
        "thumbs"`` uses thumbnails even where the video is there. See :func:`yolo_vq.index.thumbs.pictures`."""
        from .thumbs import pictures

        return pictures(self.store, detections, prefer=prefer, size=size)

    def contact_sheet(self, results: Detections, query: np.ndarray | Detections | None = None, *,
                      prefer: str = "video", columns: int = 5) -> np.ndarray:
        """A (H, W, 3) uint8 BGR contact sheet of search ``results`` (from :meth:`search`), best first.

        Args:
            results: stored detections with ``data['score']``.
            query: the query's picture, (h, w, 3) uint8 BGR (e.g. ``viz.crop(image, box)``), or one stored
                detection (its picture is found as the results' are), or None (the sheet says "query: not shown").
            prefer: where pictures come from, ``"video"`` or ``"thumbs"`` (see :meth:`pictures`).
            columns: tiles per row.

        Write it with :func:`yolo_vq.viz.write_image`.
        """
        from ..viz import Tile, contact_sheet, placeholder

        spans = (zip(results.data["track_start"].tolist(), results.data["track_end"].tolist())
                 if "track_start" in results.data else [None] * len(results))  # results by appearance
        tiles = [Tile(img, f"t={t:.1f}s f={f} #{k}" if span is None or k < 0 else
                      f"#{k} {span[0]:.1f}-{span[1]:.1f}s", float(s))
                 for img, t, f, k, s, span in zip(self.pictures(results, prefer=prefer), results.data["time"].tolist(),
                                                  results.data["frame"].tolist(), results.track_id.tolist(),
                                                  results.data["score"].tolist(), spans)]
        if isinstance(query, Detections):
            query = self.pictures(query[:1], prefer=prefer)[0]
        q = Tile(placeholder(text="query: not shown") if query is None else query, "query")
        return contact_sheet(q, tiles, columns=columns, title=f"top {len(tiles)} of {len(self)}")

    def _nearest(self, q: np.ndarray, k: int, nprobe: int | str | None) -> Detections | None:
        """:meth:`search`'s common case the short way: one query (D,), no filter, nothing excluded or re-ranked, the
        lists searched by their one-call kernel with no tail beside them (else None: the general path answers)."""
        lst = self.lists
        if lst is None or lst.mapped is None or len(self.scan) or not lst.rows:
            return None
        p = self.effective_nprobe(nprobe)
        if p >= lst.lists.lists:  # every list: scanned in batches by the general path
            return None
        q = np.ascontiguousarray(q)
        d, rows = lst.nearest_rows(q, lst.coarse.probe(q[None], p)[0], min(k, lst.rows), p)
        return lst.detections(rows, None, score=_cosine(d[: len(rows.records)]))

    def search(self, vectors: np.ndarray, k: int = 10, *, exclude: Sequence[int] = (), rerank: int | None = None,
               nprobe: int | None = None, per_track: int | None = None, **filters) -> list[Detections]:
        """Top-``k`` stored detections per query vector (q, D), best first, with ``data['score']``.

        ``per_track=N``: results by appearance, not by frame: at most N hits of each track (an untracked detection
        is an appearance of its own), so the top ``k`` shows up to ``k`` different appearances instead of
        neighbouring frames of one walk; each hit then has ``data['track_start']`` / ``data['track_end']``, the
        first and last time (s) its track was stored.

        Scores are cosine similarities estimated by ADC over the codes; with ``rerank=K`` (K >= k) the ADC
        shortlist of the K best is re-ranked by exact cosine similarity to the kept float16 vectors (the index
        must keep vectors: ``Indexer(keep_vectors=True)``), and scores are those exact cosines. Filters: see
        :meth:`where`; exact over the rows scanned (in ivf mode, the probed lists, widened while they hold fewer
        than ``k`` matches). ``exclude``: stored ids that are the query itself, never results (the scan asks for
        ``k + len(exclude)`` and drops them). ``nprobe``: lists scanned in ivf mode (default: the Memory's).
        ``k`` larger than what is stored returns what is stored.
        """
        if isinstance(k, bool) or not isinstance(k, _INTS) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if rerank is not None:
            if isinstance(rerank, bool) or not isinstance(rerank, int | np.integer) or rerank < k:
                raise ValueError(f"rerank must be an int >= k ({k}), the shortlist size to re-rank exactly, got "
                                 f"{rerank!r}: e.g. rerank={max(10 * k, 100)}")
            if self.store.vector_dim is None:
                raise StoreError(f"{self.index} keeps no float vectors to re-rank with: index it with --keep-vectors "
                                 "(Indexer(keep_vectors=True)), or search without rerank")
        if nprobe is not None:
            _check_nprobe(nprobe)  # a bad value is an error in flat mode too, where it changes nothing
        if per_track is not None:
            if isinstance(per_track, bool) or not isinstance(per_track, int | np.integer) or per_track < 1:
                raise ValueError(f"per_track must be a positive int (hits per track), got {per_track!r}")
            queries = np.asarray(vectors, dtype=np.float32).reshape(-1, self.codebook.dim)
            return [self._per_track(q, k, int(per_track), exclude, rerank, nprobe, filters) for q in queries]
        where = self.where(**filters) if filters else None
        queries = np.asarray(vectors, dtype=np.float32).reshape(-1, self.codebook.dim)
        if (where is None and not len(exclude) and rerank is None and len(queries) == 1
                and (found := self._nearest(queries[0], k, nprobe)) is not None):
            return [found]
        exclude = np.unique(np.asarray(exclude, dtype=np.int64)) if len(exclude) else ()
        # the query's own ids are not a filter: ask for as many more results as are excluded, and drop them
        extra = len(exclude)
        tail = len(self.scan)  # in ivf mode the tail, else every row
        want = min(int(rerank or k), tail + (0 if self.lists is None else self.lists.rows))  # never beyond the stored
        allowed = None
        if where is not None:  # the in-memory rows (all of them when flat, the tail in ivf mode) passing the filters
            allowed = self._cols["id"][where.mask(self._cols)] if self._cols else np.zeros(0, np.int64)
        slot = rows = None  # result rows read from the lists while searching (slot -1: read the row from the store)
        merged = False  # tail rows merged in (their slot is -1)
        if want <= 0:
            dist, ids = np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        elif self.lists is None:
            dist, ids = self.scan.search(queries, want + extra, allowed=allowed)
        else:
            dist, ids, slot, rows = self.lists.search(queries, want + extra, nprobe=self.effective_nprobe(nprobe),
                                                      where=where)
            if tail:  # stored since the lists were last synced
                from .ivf import merge_topk

                d2, i2 = self.scan.search(queries, want + extra, allowed=allowed)
                dist, ids, slot = merge_topk(dist, ids, d2, i2, want + extra, (slot, np.full_like(i2, -1)))
                merged = True
        out = []
        for r, (q, d, i) in enumerate(zip(queries, dist, ids)):
            if not extra and (not len(i) or i[-1] >= 0):  # every result found (a missing one, -1, comes last)
                keep = _EVERY
            else:
                keep = i >= 0
                if extra:  # the query's own ids dropped, the rest cut to want
                    keep &= ~np.isin(i, exclude)
                    keep &= np.cumsum(keep) <= want
            if rerank is None:
                score = _cosine(d[keep])
                if rows is not None and rows[r] is not None and not merged and keep is _EVERY:  # rows in order
                    out.append(self.lists.detections(rows[r], None, score=score))
                elif rows is not None and rows[r] is not None and (s := slot[r][keep]).min(initial=0) >= 0:
                    out.append(self.lists.detections(rows[r], s, score=score))  # every row read from the lists
                else:
                    out.append(self.store.get(i[keep]).with_data(score=score))
                continue
            cand = i[keep]
            v = self.vectors_of(cand)  # rows stored before vectors were kept: decoded from their codes
            cos = (v @ q) / np.maximum(np.linalg.norm(v, axis=1) * np.linalg.norm(q), 1e-12)
            top = np.argsort(-cos, kind="stable")[:k]  # ties keep the ADC order
            out.append(self.store.get(cand[top]).with_data(score=cos[top].astype(np.float32)))
        return out
