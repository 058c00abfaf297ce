"""Frames -> detections + embeddings + codes -> the store: the indexing job behind ``yolo-vq index``.

Two ways in, one write path: :meth:`Indexer.index_source` reads a video, folder or stream itself;
:meth:`Indexer.add` takes what a user's own loop has (BGR frames, or Ultralytics ``Results`` of the indexer's model).
"""

from __future__ import annotations

import itertools
import numbers
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from ..config import DEFAULT_RECIPE, EmbedConfig
from ..detections import LIST_ID, Detections
from ..features.embedder import Embedder
from ..video import VideoSource, chunks, fingerprint_name, open_source
from .registry import open_store, store_exists
from .store import CODEBOOK_STEM, CodebookBinding, Frame, Source, SourceInfo, StoreError
from .thumbs import Thumbnailer
from .upkeep import ListKeeper

__all__ = ["CODEBOOK_STEM", "IndexSummary", "Indexer"]



@dataclass(frozen=True)
class IndexSummary:
    """What one ``index`` call did."""

    source: str
    frames: int
    skipped_frames: int
    detections: int
    bytes_per_detection: int
    seconds: float
    thumb_bytes: int | None = None  # JPEG bytes of the thumbnails written; None when thumbnails are off
    vector_bytes: int | None = None  # bytes of each kept float16 vector; None when vectors are not kept
    resumed_at: int | None = None  # a tracked run that resumed: the first frame it stored
    replayed: int = 0  # frames replayed through the tracker before it (decoded and detected, not stored)
    replay_s: float = 0.0

    def line(self) -> str:
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        extra = "" if self.thumb_bytes is None else \
            f" + {self.thumb_bytes / max(self.detections, 1):.0f} B thumbnails"
        extra += "" if self.vector_bytes is None else f" + {self.vector_bytes} B float16 vectors"
        resumed = "" if self.resumed_at is None else \
            f"; resumed at frame {self.resumed_at}, replayed {self.replayed} frames ({self.replay_s:.1f} s)"
        return (f"{self.source}: {self.frames} frames ({self.skipped_frames} already indexed), {self.detections} "
                f"detections, {self.bytes_per_detection} B codes{extra} per detection, {self.seconds:.1f} s "
                f"({fps:.1f} frames/s){resumed}")


@dataclass
class _Run:
    """The source being written: its row, the frames stored before, the next frame number, the track id offset."""

    source: Source
    stored: int  # frames of this source stored before the run
    next_frame: int
    track_offset: int  # trackers number from 1 again: new tracks' ids are shifted past the source's earlier ones
    tracker_reset: bool = False
    track_map: dict[int, int] = field(default_factory=dict)  # replayed tracker id -> the stored track it continues
    replay: list[tuple[int, float, np.ndarray]] = field(default_factory=list)  # add(): frames before the resume point
    replayed: int = 0  # frames replayed through the tracker before this run stored its first frame
    replay_s: float = 0.0


class Indexer:
    """Index sources into ``index`` with ``model``, attaching embeddings and codebook codes to every detection.

    The index directory keeps its own copy of the codebook; opening an existing index with a codebook of another
    model or recipe fails with the codebook's own error, before anything is written. While open as a context
    manager the indexer keeps its :class:`Embedder` (with the index's codebook) attached to ``model``, so results of
    the user's own ``model.predict``/``model.track`` calls carry the codes :meth:`add` stores.

    Args:
        model: an ``ultralytics.YOLO`` with PyTorch weights.
        index: the index directory (created if missing).
        codebook: a saved codebook path (required for a new index; an existing index uses its own).
        recipe: embedding recipe; must be the codebook's.
        track: run Ultralytics' tracker (``tracker``) and store track ids.
        batch: frames per inference call; commit_every: frames per store transaction.
        thumb_every: keep a small JPEG crop (longest side 96 px) of every ``thumb_every``-th detection of each
            track (always its first; every untracked detection), written with the detection, so search results can
            be shown without the video (:func:`yolo_vq.index.thumbs.pictures`). None: no thumbnails.
        keep_vectors: also keep each detection's embedding as float16 (2 bytes per dimension), so searches can
            re-rank a shortlist exactly (``Memory.search(..., rerank=K)``). None: as the index does (an index that
            keeps vectors goes on keeping them; a new one does not).
        fit_on: sources to fit a codebook on when ``codebook`` is None and the index has none yet (what
            ``yolo-vq index`` without ``--codebook`` does): :func:`yolo_vq.fit.fit_codebook` with ``fit_args``
            (e.g. ``max_frames``, ``code_bytes``, ``codebook_size``, ``conf``). An index that has a codebook never
            gets a new one: a missing or damaged copy is a :class:`~yolo_vq.errors.CodebookError`.
        predict_args: passed to ``model.predict``/``model.track`` (imgsz, conf, classes, device, ...).

    Raises:
        CodebookError: ``codebook`` belongs to another model or recipe, or is not the index's own (also when
            another process bound another codebook to a new index first), or the index's copy is damaged.
        StoreError: a new index without a codebook, a damaged, read-only or foreign index directory.
    """

    def __init__(
        self, model: Any, index: str | Path, *, codebook: str | Path | None = None,
        recipe: str | Path | dict | EmbedConfig = DEFAULT_RECIPE, track: bool = False,
        tracker: str = "bytetrack.yaml", batch: int = 8, commit_every: int = 64, thumb_every: int | None = None,
        keep_vectors: bool | None = None, fit_on: Sequence[str | Path | int] | None = None,
        fit_args: dict[str, Any] | None = None, **predict_args: Any,
    ):
        if batch < 1 or commit_every < 1:
            raise ValueError(f"batch and commit_every must be >= 1, got batch={batch}, commit_every={commit_every}")
        self.thumbnailer = None if thumb_every is None else Thumbnailer(thumb_every)
        self.model, self.track, self.tracker = model, track, tracker
        self.batch, self.commit_every = batch, commit_every
        self.predict_args = {"verbose": False, **predict_args}
        self.index = index  # the location, passed on unchanged (a directory, or scheme:PATH)
        self.embedder = Embedder(model, recipe)
        self.fitted: int | None = None  # detections the codebook was fitted on, when this run fitted it
        with tempfile.TemporaryDirectory(prefix="yolo_vq_fit_") as tmp:
            if codebook is None and fit_on is not None and not Indexer.has_codebook(self.index):
                from ..fit import fit_codebook

                codebook = Path(tmp) / "fitted"
                _, self.fitted = fit_codebook(model, fit_on, codebook, recipe=recipe, **(fit_args or {}))
            binding = None
            if codebook is not None:  # validate (fingerprint, dim) before touching the index
                self.embedder.load_codebook(codebook)
                binding = CodebookBinding(codebook, self.embedder.describe(), self.embedder.fingerprint,
                                          dict(getattr(model, "names", None) or {}), fitted=self.fitted is not None)
            elif not store_exists(self.index):
                raise _no_codebook(self.index)
            # a new index is made and bound to the codebook in one transaction; an existing one must hold it
            self.store = open_store(self.index, create=binding is not None, codebook=binding)
        try:
            own = self.store.codebook_path()  # verified against the checksum index.db records
            if own is None:
                raise _no_codebook(self.index)
            self.embedder.codebook = self.embedder.load_codebook(own)
        except BaseException:
            self.store.close()
            raise
        self.names = {int(k): v for k, v in (self.store.get_meta("names") or {}).items()}
        self.keep_vectors = self.store.vector_dim is not None if keep_vectors is None else bool(keep_vectors)
        self.lists = ListKeeper(self.store, self.embedder.codebook)  # the on-disk lists, where the codebook has them
        self._attached = False  # the embedder's callbacks are on the model (context manager)
        self._run: _Run | None = None
        self._replay_frames: int | None = None
        self._frames: list[tuple[int, float, np.ndarray]] = []  # added frames waiting for a batch
        self._pending: list[Frame] = []  # inferred frames waiting for a commit
        self._written = [0, 0]  # detections and thumbnail bytes committed
        self.last_stored: tuple[str, int] | None = None  # (source, frame) of the last frame committed

    @property
    def stored_detections(self) -> int:
        """Detections this indexer has committed to the store so far."""
        return self._written[0]

    @staticmethod
    def has_codebook(index: str | Path) -> bool:
        """Whether the index at ``index`` has a codebook bound (reading it; a damaged index is a
        :class:`~yolo_vq.errors.StoreError`, a missing one False)."""
        if not store_exists(index):
            return False  # a new index (or one whose creation was interrupted before anything was stored)
        with open_store(index, readonly=True) as st:  # refuses a damaged index, or a codebook without its store
            return st.codebook_sha256 is not None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Store what :meth:`add` still holds (:meth:`flush`), bring the lists up to date, detach the embedder and
        close the store."""
        try:
            self.flush()
            self._sync_lists()
        finally:
            self._release()

    def _sync_lists(self) -> None:
        try:
            self.lists.sync()
        except OSError as e:  # every detection is committed; the lists only lag behind (searched as the tail)
            warnings.warn(f"{self.index}: the search lists were not brought up to date ({e.strerror or e}); the "
                          f"detections are stored and searched all the same, and the next run (or `yolo-vq upgrade "
                          f"--index {self.index}`) catches up", stacklevel=3)

    def _release(self) -> None:
        self._attached = False
        self.embedder.close()
        self.store.close()

    def __enter__(self) -> Indexer:
        self.embedder.__enter__()
        self._attached = True
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an error or Ctrl-C: keep the frames already processed, do not run inference on the rest
            self._commit()
        finally:
            self._release()

    @contextmanager
    def _embedding(self) -> Iterator[None]:
        """The embedder attached for the duration (already attached inside the context manager)."""
        if self._attached:
            yield
            return
        with self.embedder:
            yield

    # -- a source the indexer reads itself -------------------------------------------------------------------------
    def index_source(self, source: str | int | Path, *, stride: int = 1, progress: bool = True) -> IndexSummary:
        """Index one source, resuming after the last frame stored for the same content (idempotent)."""
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        src = open_source(source)
        try:
            return self._index(src, stride, progress)
        finally:
            src.close()

    def _index(self, src: VideoSource, stride: int, progress: bool) -> IndexSummary:
        from tqdm import tqdm

        rec = self.store.add_source(src)
        run = self._start(rec, fresh=True)
        start = run.next_frame
        total = None if src.frame_count is None else max(0, (src.frame_count - start + stride - 1) // stride)
        t0, frames, before = perf_counter(), 0, list(self._written)
        first = start
        if self.track and start > 0:
            if src.frame_count:  # a file or a folder: the frames before the resume point are read again
                first = max(0, start - self.replay_frames * stride)
            else:
                warnings.warn(f"{src.uri} is a live stream: the frames before the resume point cannot be replayed, "
                              f"so its tracks start anew (new track ids after the stored ones)", stacklevel=3)
        stream = src.frames(start=first, stride=stride)
        with self._embedding():
            if first < start:
                replay = []
                for item in stream:
                    if item[0] >= start:
                        stream = itertools.chain([item], stream)
                        break
                    replay.append(item)
                self._replay(replay)
            bar = tqdm(total=total, unit="frame", desc=Path(src.uri).name, disable=not progress, dynamic_ncols=True)
            try:
                for chunk in chunks(stream, self.batch):
                    self._infer(chunk)
                    frames += len(chunk)
                    bar.update(len(chunk))
            finally:
                bar.close()
        self._commit()
        self._run = None  # a later add() to the same source starts a new run (and new tracks)
        size = self.store.get_meta("code_size") or 0
        return IndexSummary(src.uri, frames, run.stored, self._written[0] - before[0], int(size),
                            perf_counter() - t0, None if self.thumbnailer is None else self._written[1] - before[1],
                            2 * self.embedder.dim if self.keep_vectors else None,
                            start if self.track and start > 0 else None, run.replayed, run.replay_s)

    # -- the user's own loop ---------------------------------------------------------------------------------------
    def add(
        self, items: Any, *, source: str = "live", frame_index: int | Sequence[int] | None = None,
        time: float | Sequence[float] | None = None,
    ) -> int:
        """Add frames, or Ultralytics results, of a named source from your own loop. Returns the frames taken.

        Args:
            items: one BGR frame ``(H, W, 3)`` uint8 (as OpenCV reads it), a batch ``(B, H, W, 3)`` or a list of
                frames: the indexer runs inference itself (``batch`` frames at a time, with the tracker if
                ``track``), so detections are stored from :meth:`flush` on at the latest. Or one ``Results`` or a
                list of them, from ``model.predict``/``model.track`` run by you inside ``with Indexer(...)`` (the
                attached embedder gives them ``vq_codes``); their track ids are stored as they come.
            source: the source's name (a camera, a stream URL). The same name is the same source: a later run
                continues its frame numbering; with ``track``, frames fed again from before the resume point (the
                tracker's ``track_buffer`` of them) are replayed through the new tracker, storing nothing, so tracks
                alive at the resume point keep their ids (new tracks are numbered after the stored ones).
            frame_index: the first item's frame number (then consecutive), or one per item; default: continue after
                the last frame of this source. Frames numbered below the source's next frame are skipped as
                already stored, so re-adding never duplicates.
            time: timestamp in seconds, one per item (a float for one item); default ``frame_index / fps`` when
                the source has an fps, else ``float(frame_index)``. Pass ``time.time()`` for wall-clock times.

        Raises:
            TypeError / ValueError: items that are neither frames nor Results, results without codes, malformed
                frame numbers or times (the message says what was expected).
        """
        kind, items = _items(items)
        if not isinstance(source, str) or not source:
            raise ValueError(f"source must be a non-empty name (e.g. 'cam0' or the stream URL), got {source!r}")
        if not items:
            return 0
        if kind == "results":
            for r in items:
                self._check_codes(r)
        frames = _frame_numbers(frame_index, len(items))
        times = _times(time, len(items))
        rec = self._run.source if self._run is not None and self._run.source.uri == source else \
            self.store.add_source(SourceInfo(source, fingerprint_name(source)))
        run = self._start(rec, fresh=False)
        if frames is None:
            frames = list(range(run.next_frame, run.next_frame + len(items)))
        if kind == "results" and self._frames:
            self._infer(self._take_frames())  # keep the source's order
        taken = 0
        for k, (item, i) in enumerate(zip(items, frames)):
            if i < run.next_frame:  # stored before (or added already): idempotent
                if kind == "frames" and self.track and not run.tracker_reset \
                        and i >= run.next_frame - self.replay_frames:
                    run.replay.append((i, 0.0, item))  # the tracker replays them before the first new frame
                continue
            if run.replay:
                self._replay(run.replay)
                run.replay = []
            t = times[k] if times is not None else (i / rec.fps if rec.fps else float(i))
            run.next_frame = i + 1
            taken += 1
            if kind == "results":
                self._record(i, t, item.orig_img, item)
                continue
            self._frames.append((i, t, item))
            if len(self._frames) >= self.batch:
                self._infer(self._take_frames())
        return taken

    def flush(self) -> int:
        """Run inference on the frames :meth:`add` still holds and commit everything; returns detections stored."""
        if self._frames:
            self._infer(self._take_frames())
        return self._commit()

    # -- one write path --------------------------------------------------------------------------------------------
    def _start(self, rec: Source, *, fresh: bool) -> _Run:
        """Make ``rec`` the source being written (committing the previous one's frames first)."""
        if not fresh and self._run is not None and self._run.source.id == rec.id:
            return self._run
        self.flush()
        done = self.store.frames_done(rec.id)
        self._run = _Run(rec, len(done), int(done[-1]) + 1 if len(done) else 0, self.store.max_track_id(rec.id))
        if self.thumbnailer is not None:
            self.thumbnailer.reset()  # new tracks: each starts with a thumbnail
        return self._run

    def _take_frames(self) -> list[tuple[int, float, np.ndarray]]:
        frames, self._frames = self._frames, []
        return frames

    def _infer(self, chunk: list[tuple[int, float, np.ndarray]]) -> None:
        """Detect, embed and encode ``(frame, time, image)`` items in one call, and record them."""
        for (i, t, img), r in zip(chunk, self._detect([img for _, _, img in chunk])):
            self._record(i, t, img, r)

    def _detect(self, images: list[np.ndarray]) -> list[Any]:
        """``model.track`` (the run's tracker, new for a new run) or ``model.predict`` on a batch of images."""
        run = self._run
        with self._embedding():
            if not self.track:
                return self.model.predict(images, **self.predict_args)
            if not run.tracker_reset:  # a new source (or run) starts new tracks
                for tracker in getattr(getattr(self.model, "predictor", None), "trackers", None) or []:
                    tracker.reset()
                run.tracker_reset = True
            return self.model.track(images, persist=True, tracker=self.tracker, **self.predict_args)

    @property
    def replay_frames(self) -> int:
        """Frames a resumed tracked run replays before its resume point: the tracker's ``track_buffer`` (how long it
        keeps a lost track), so every track it could still continue is known to it again."""
        if self._replay_frames is None:
            import yaml
            from ultralytics.utils.checks import check_yaml

            cfg = yaml.safe_load(Path(check_yaml(self.tracker)).read_text()) or {}
            self._replay_frames = max(1, int(cfg.get("track_buffer", 30)))
        return self._replay_frames

    def _replay(self, frames: list[tuple[int, float, np.ndarray]]) -> None:
        """Run the (new) tracker over the frames just before the resume point, storing nothing, so that its state is
        what the interrupted run's was; then map its track ids to the stored tracks they continue (boxes of the same
        frame and class overlapping by IoU >= 0.5, the latest frames first, one to one)."""
        run = self._run
        t0 = perf_counter()
        seen: list[tuple[int, Any]] = []
        for s in range(0, len(frames), self.batch):
            part = frames[s : s + self.batch]
            seen += [(i, r) for (i, _, _), r in zip(part, self._detect([img for _, _, img in part]))]
        taken_replay, taken_stored = set(), set()
        for i, r in reversed(seen):
            if r.boxes is None or r.boxes.id is None or not len(r.boxes):
                continue
            stored = self.store.get(self.store.frame_ids(run.source.id, i))
            keep = stored.track_id >= 0
            if not keep.any():
                continue
            rid = r.boxes.id.int().cpu().numpy()
            iou = _iou(r.boxes.xyxy.cpu().numpy(), stored.xyxy[keep])
            iou[r.boxes.cls.int().cpu().numpy()[:, None] != stored.class_id[keep][None, :]] = 0
            sid = stored.track_id[keep]
            for a, b in zip(*np.unravel_index(np.argsort(-iou, axis=None), iou.shape)):
                if iou[a, b] < 0.5:
                    break
                if int(rid[a]) not in taken_replay and int(sid[b]) not in taken_stored:
                    run.track_map[int(rid[a])] = int(sid[b])
                    taken_replay.add(int(rid[a]))
                    taken_stored.add(int(sid[b]))
        run.replayed, run.replay_s = len(frames), perf_counter() - t0

    def _check_codes(self, result: Any) -> None:
        codes = getattr(result, self.embedder.codes_attr, None)
        if codes is None:
            raise ValueError(
                f"results carry no {self.embedder.codes_attr}: run model.predict/model.track inside `with "
                f"Indexer(model, {str(self.index)!r}) as ix:` (it attaches its Embedder with the index's codebook "
                f"to model), or attach yolo_vq.Embedder(model, codebook={str(self.store.directory / CODEBOOK_STEM)!r}) "
                f"yourself before predicting"
            )
        want = self.embedder.codebook.code_len
        if np.ndim(codes) != 2 or np.shape(codes)[1] != want:
            raise ValueError(f"results carry {self.embedder.codes_attr} of shape {np.shape(codes)}, this index "
                             f"stores (n, {want}) codes: they were encoded with another codebook; produce them "
                             f"inside `with Indexer(...)`, which attaches the index's own")

    def _record(self, frame: int, t: float, image: np.ndarray, result: Any) -> None:
        """Queue one frame's detections (with codes and thumbnails) for the next commit."""
        self._check_codes(result)
        d = Detections.from_ultralytics(result)
        if len(d):
            run = self._run
            d.track_id[:] = [run.track_map.get(t, t + run.track_offset) if t >= 0 else t for t in d.track_id.tolist()]
        if len(d) and (lists := self.lists.assign(vectors=d.embeddings)) is not None:
            d.data[LIST_ID] = lists
        thumbs = None if self.thumbnailer is None else self.thumbnailer(image, d)
        self._pending.append(Frame(frame, t, d, thumbs))
        if len(self._pending) >= self.commit_every:
            self._commit()

    def _commit(self) -> int:
        """Store the queued frames in one transaction; returns detections stored."""
        if not self._pending:
            return 0
        frames, self._pending = self._pending, []
        ids = self.store.add_frames(self._run.source.id, frames, vectors=self.keep_vectors)
        n = len(ids)
        self.last_stored = (self._run.source.uri, int(frames[-1].frame))
        self.lists.stored(self._run.source.id, frames, ids)
        self._written[0] += n
        self._written[1] += sum(len(b) for f in frames for b in f.thumbs or () if b is not None)
        return n


def _no_codebook(index: str | Path) -> StoreError:
    return StoreError(f"{index} has no codebook yet: pass one (train it with `yolo-vq fit`), or fit_on=[sources] to "
                      f"fit one as `yolo-vq index` does")


def _items(items: Any) -> tuple[str, list]:
    """``("frames" | "results", list)`` from what :meth:`Indexer.add` was given, or a TypeError/ValueError."""
    if isinstance(items, np.ndarray) and items.ndim == 4:
        items = list(items)
    elif isinstance(items, np.ndarray) or _is_result(items):
        items = [items]
    elif isinstance(items, list | tuple):
        items = list(items)
    else:
        hint = ": to index a video file, folder or stream use index_source(path)" if isinstance(
            items, str | Path) else ""
        raise TypeError(f"add() takes BGR frames (numpy (H, W, 3) uint8, a (B, H, W, 3) batch or a list) or "
                        f"Ultralytics Results, got {type(items).__name__}{hint}")
    frames = [isinstance(x, np.ndarray) for x in items]
    if any(frames) and not all(frames) or not any(frames) and not all(_is_result(x) for x in items):
        kinds = sorted({type(x).__name__ for x in items})
        raise TypeError(f"add() takes a list of frames or a list of Results, not a mix or other things: got {kinds}")
    for k, x in enumerate(items if all(frames) else ()):
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3 or 0 in x.shape:
            raise ValueError(f"frame {k} must be (H, W, 3) uint8 BGR as cv2 reads it, got {x.shape} {x.dtype}: "
                             f"convert grey or RGB frames with cv2.cvtColor, scale floats to 0..255 uint8")
    return ("frames" if all(frames) else "results"), items


def _is_result(x: Any) -> bool:
    return hasattr(x, "orig_img") and hasattr(x, "boxes")


def _frame_numbers(frame_index: Any, n: int) -> list[int] | None:
    if frame_index is None:
        return None
    if isinstance(frame_index, numbers.Integral) and not isinstance(frame_index, bool):
        frames = list(range(int(frame_index), int(frame_index) + n))
    else:
        frames = [int(i) for i in np.asarray(frame_index).reshape(-1)] if np.ndim(frame_index) == 1 and \
            np.issubdtype(np.asarray(frame_index).dtype, np.integer) else None
        if frames is None or len(frames) != n:
            raise ValueError(f"frame_index must be an int (the first item's frame) or {n} ints (one per item), got "
                             f"{frame_index!r}")
    if frames and min(frames) < 0:
        raise ValueError(f"frame_index must be >= 0, got {min(frames)}")
    return frames


def _times(time: Any, n: int) -> list[float] | None:
    if time is None:
        return None
    try:
        t = np.asarray(time, dtype=np.float64).reshape(-1) if np.ndim(time) <= 1 else None
    except (TypeError, ValueError):
        t = None
    if t is None or len(t) != n or not np.isfinite(t).all():
        raise ValueError(f"time must be one finite number per item ({n} here; a float for one item), got {time!r}")
    return t.tolist()


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``a`` (n, 4) and ``b`` (m, 4) xyxy: (n, m) float64."""
    import torch
    from torchvision.ops import box_iou

    return box_iou(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)).numpy()
