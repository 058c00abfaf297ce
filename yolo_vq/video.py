"""Frames from videos, image folders and streams (OpenCV), with a content fingerprint per source."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

__all__ = ["VideoSource", "chunks", "fingerprint_file", "fingerprint_name", "open_source"]

T = TypeVar("T")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def fingerprint_name(name: str) -> str:
    """The fingerprint of a source known only by its name (a stream URL, a webcam index, a live source of
    ``Indexer.add``): the same name is the same source, so re-runs continue it."""
    return hashlib.sha256(str(name).encode()).hexdigest()[:32]


def fingerprint_file(path: str | Path, *, block: int = 1 << 20) -> str:
    """sha256 of a file's size, first and last MiB: identifies content (not name) in O(1) reads."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(block))
        if size > block:
            f.seek(max(block, size - block))
            h.update(f.read(block))
    return h.hexdigest()[:32]


@dataclass
class VideoSource:
    """An opened source. Iterate :meth:`frames` for ``(index, time_s, BGR uint8 image)``."""

    uri: str
    fingerprint: str
    fps: float | None
    frame_count: int | None
    width: int | None
    height: int | None
    _images: list[Path] | None = None
    _cap: cv2.VideoCapture | None = None

    def frames(self, *, start: int = 0, stride: int = 1) -> Iterator[tuple[int, float, np.ndarray]]:
        """Frames ``start, start + stride, ...`` (indices of the source's own frame numbering).

        A live stream (no frame count) does not replay what an earlier run read: its frames are numbered from
        ``start`` on, so a resumed run continues the numbering instead of skipping ``start`` new frames."""
        if self._images is not None:
            for i in range(start, len(self._images), stride):
                img = cv2.imread(str(self._images[i]))
                if img is None:
                    raise ValueError(f"cannot decode image {self._images[i]}: expected an image OpenCV reads")
                yield i, float(i), img
            return
        cap = self._cap
        i = 0
        if start > 0 and self.frame_count:  # files seek
            cap.set(cv2.CAP_PROP_POS_FRAMES, start)
            i = int(cap.get(cv2.CAP_PROP_POS_FRAMES))
        elif start > 0:  # streams go on from where they are now
            i = start
        while True:
            ok = cap.grab()
            if not ok:
                return
            if i >= start and (i - start) % stride == 0:
                ok, img = cap.retrieve()
                if not ok:
                    return
                yield i, (i / self.fps if self.fps else float(i)), img
            i += 1

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()


def open_source(source: str | int | Path) -> VideoSource:
    """Open a video file, an image folder, a webcam index (int or digit string) or a stream URL (rtsp://, http://).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: something OpenCV cannot decode as video (with what was expected).
    """
    s = str(source)
    if s.isdigit() or "://" in s:
        cap = cv2.VideoCapture(int(s) if s.isdigit() else s)
        if not cap.isOpened():
            raise ValueError(f"cannot open stream {s!r}: expected a webcam index or an RTSP/HTTP URL OpenCV can read")
        fps = cap.get(cv2.CAP_PROP_FPS) or None
        return VideoSource(s, fingerprint_name(s), fps, None,
                           int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) or None,
                           int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) or None, None, cap)
    p = Path(s)
    if not p.exists():
        raise FileNotFoundError(f"video {s!r} does not exist: pass a video file, an image folder, a webcam index "
                                f"or an RTSP URL")
    if p.is_dir():
        images = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"folder {s!r} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        h = hashlib.sha256()
        for q in images:
            h.update(q.name.encode() + fingerprint_file(q).encode())
        first = cv2.imread(str(images[0]))
        height, width = (first.shape[:2] if first is not None else (None, None))
        return VideoSource(str(p.resolve()), h.hexdigest()[:32], None, len(images), width, height, images, None)
    if not os.access(p, os.R_OK):
        raise ValueError(f"video {s!r} is not readable: check its permissions")
    cap = cv2.VideoCapture(str(p))
    ok = cap.isOpened() and cap.grab()
    if not ok:
        cap.release()
        raise ValueError(f"{s!r} is not a video OpenCV can decode: expected mp4/avi/mkv/... (or an image folder)")
    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    return VideoSource(str(p.resolve()), fingerprint_file(p), cap.get(cv2.CAP_PROP_FPS) or None, count,
                       int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), None, cap)


def chunks(items: Iterable[T], n: int) -> Iterator[list[T]]:
    """Consecutive lists of ``n`` items (the last one shorter): frames grouped into inference batches."""
    chunk: list[T] = []
    for x in items:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
