"""Frames -> detections + embeddings + codes -> the store: the indexing job behind ``yolo-vq index``."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import DEFAULT_RECIPE, EmbedConfig
from .detections import Detections
from .embedder import Embedder
from .quant import codebook_paths
from .store import Frame, Store, StoreError
from .thumbs import Thumbnailer
from .video import VideoSource, open_source

__all__ = ["CODEBOOK_STEM", "IndexSummary", "Indexer"]

CODEBOOK_STEM = "codebook"  # <index>/codebook.safetensors + codebook.json


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

    def line(self) -> str:
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        thumbs = "" if self.thumb_bytes is None else \
            f" + {self.thumb_bytes / max(self.detections, 1):.0f} B thumbnails"
        return (f"{self.source}: {self.frames} frames ({self.skipped_frames} already indexed), {self.detections} "
                f"detections, {self.bytes_per_detection} B codes{thumbs} per detection, {self.seconds:.1f} s "
                f"({fps:.1f} frames/s)")


class Indexer:
    """Index sources into ``index`` with ``model``, attaching embeddings and codebook codes to every detection.

    The index directory keeps its own copy of the codebook; opening an existing index with a codebook of another
    model or recipe fails with the codebook's own error, before anything is written.

    Args:
        model: an ``ultralytics.YOLO`` with PyTorch weights.
        index: the index directory (created if missing).
        codebook: a saved codebook path (required for a new index; an existing index uses its own).
        recipe: embedding recipe; must be the codebook's.
        track: run Ultralytics' tracker (``tracker``) and store track ids.
        batch: frames per inference call; commit_every: frames per store transaction.
        thumbs: keep a small JPEG crop (longest side 96 px) of every ``thumbs``-th detection of each track (always
            its first; every untracked detection), written with the detection, so search results can be shown
            without the video (:func:`yolo_vq.thumbs.pictures`). None: no thumbnails.
        predict_args: passed to ``model.predict``/``model.track`` (imgsz, conf, classes, device, ...).
    """

    def __init__(
        self, model: Any, index: str | Path, *, codebook: str | Path | None = None,
        recipe: str | Path | dict | EmbedConfig = DEFAULT_RECIPE, track: bool = False,
        tracker: str = "bytetrack.yaml", batch: int = 8, commit_every: int = 64, thumbs: int | None = None,
        **predict_args: Any,
    ):
        if batch < 1 or commit_every < 1:
            raise ValueError(f"batch and commit_every must be >= 1, got batch={batch}, commit_every={commit_every}")
        self.thumbnailer = None if thumbs is None else Thumbnailer(thumbs)
        self.model, self.track, self.tracker = model, track, tracker
        self.batch, self.commit_every = batch, commit_every
        self.predict_args = {"verbose": False, **predict_args}
        self.index = Path(index)
        existing = (self.index / "index.db").is_file()
        own = self.index / f"{CODEBOOK_STEM}.json"
        if codebook is None and not own.is_file():
            raise ValueError(f"{self.index} has no codebook yet: pass one (train it with `yolo-vq fit`)")
        self.embedder = Embedder(model, recipe)
        # validate (fingerprint, dim) before touching the index
        self.embedder.codebook = self.embedder.load_codebook(own if codebook is None else codebook)
        if existing and codebook is not None and own.is_file():
            theirs = json.loads(own.read_text()).get("tensors", {}).get("sha256")
            if self.embedder.codebook.meta.get("tensors", {}).get("sha256") != theirs:
                raise StoreError(f"{self.index} was indexed with another codebook ({own}); index into a new "
                                 f"directory or omit the codebook to use the index's own")
        self.store = Store(self.index, create=True)
        if not own.is_file():  # a new index keeps its codebook
            for path, suffix in zip(codebook_paths(codebook), (".safetensors", ".json")):
                shutil.copyfile(path, self.index / f"{CODEBOOK_STEM}{suffix}")
            self.store.set_meta("embedding", self.embedder.describe())
            self.store.set_meta("model_fingerprint", self.embedder.fingerprint)
            self.store.set_meta("names", {int(k): v for k, v in getattr(model, "names", {}).items()})
        self.names = {int(k): v for k, v in (self.store.get_meta("names") or {}).items()}

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Indexer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def index_source(self, source: str | int | Path, *, stride: int = 1, progress: bool = True) -> IndexSummary:
        """Index one source, resuming after the last frame stored for the same content (idempotent)."""
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        src = open_source(source)
        try:
            return self._run(src, stride, progress)
        finally:
            src.close()

    def _run(self, src: VideoSource, stride: int, progress: bool) -> IndexSummary:
        from tqdm import tqdm

        rec = self.store.add_source(src.uri, src.fingerprint, fps=src.fps, frame_count=src.frame_count,
                                    width=src.width, height=src.height)
        done = self.store.frames_done(rec.id)
        start = int(done.max()) + 1 if len(done) else 0
        # track ids restart at 1 in a new run: shift them past this source's stored ids
        offset = self.store.max_track_id(rec.id)
        for tracker in getattr(getattr(self.model, "predictor", None), "trackers", []):
            tracker.reset()  # a new source starts new tracks
        total = None if src.frame_count is None else max(0, (src.frame_count - start + stride - 1) // stride)
        bar = tqdm(total=total, unit="frame", desc=Path(src.uri).name, disable=not progress, dynamic_ncols=True)
        if self.thumbnailer is not None:
            self.thumbnailer.reset()  # new tracks: each starts with a thumbnail
        t0, frames, dets, thumb_bytes, pending = time.perf_counter(), 0, 0, 0, []
        with self.embedder:
            for chunk in _chunks(src.frames(start=start, stride=stride), self.batch):
                for (i, t, img), r in zip(chunk, self._infer([img for _, _, img in chunk])):
                    d = Detections.from_ultralytics(r)
                    if self.track and len(d):
                        d.track_id[d.track_id >= 0] += offset
                    thumbs = None if self.thumbnailer is None else self.thumbnailer(img, d)
                    thumb_bytes += sum(len(b) for b in thumbs or () if b is not None)
                    pending.append(Frame(i, t, d, thumbs))
                if len(pending) >= self.commit_every:
                    dets += self.store.add_frames(rec.id, pending)
                    pending = []
                frames += len(chunk)
                bar.update(len(chunk))
            dets += self.store.add_frames(rec.id, pending)
        bar.close()
        size = self.store.get_meta("code_size") or 0
        return IndexSummary(src.uri, frames, len(done), dets, int(size), time.perf_counter() - t0,
                            None if self.thumbnailer is None else thumb_bytes)

    def _infer(self, images: Sequence[np.ndarray]) -> list:
        if self.track:
            return self.model.track(list(images), persist=True, tracker=self.tracker, **self.predict_args)
        return self.model.predict(list(images), **self.predict_args)


def _chunks(it: Iterable, n: int):
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
