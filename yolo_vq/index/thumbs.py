"""Thumbnails: small JPEG crops kept in the store per detection, and pictures of stored detections for sheets.

Write side: a :class:`Thumbnailer` decides which detections of a frame get a thumbnail (every detection, or every
n-th of each track, always its first) and cuts them from the original frame (:func:`yolo_vq.viz.thumbnail`, longest
side 96 px, JPEG). The indexer stores them in the same transaction as the detections.

Read side: :func:`pictures` gives one BGR picture per stored detection for a contact sheet: the box cut from the
source's own frame when the source is still there and unchanged, else the detection's thumbnail, else the thumbnail
of the same track nearest in time, else a placeholder tile that says so.
"""

from __future__ import annotations

import numbers
from pathlib import Path

import cv2
import numpy as np

from ..detections import Detections
from ..video import IMAGE_SUFFIXES, fingerprint_file
from ..viz import crop, decode_jpeg, encode_jpeg, placeholder, thumbnail
from . import PREFER
from .store import Source, Store

__all__ = ["PREFER", "THUMB_LONGEST", "SourceFrames", "Thumbnailer", "pictures"]

THUMB_LONGEST = 96
"""Longest side of a stored thumbnail, in pixels (smaller boxes are kept at their own size)."""


class Thumbnailer:
    """Which detections get a thumbnail, and their JPEG bytes.

    Args:
        every: keep every ``every``-th detection of each track (its 1st, (every+1)-th, ...); untracked detections
            (``track_id < 0``) all get one. 1 = every detection.
        longest: longest side of a thumbnail in pixels.
        quality: JPEG quality, 1..100.

    Tracks are counted from the first detection this object sees of them; call :meth:`reset` when the tracker
    starts new tracks (a new source), so a reused track id starts again with a thumbnail.
    """

    def __init__(self, every: int = 1, *, longest: int = THUMB_LONGEST, quality: int = 85):
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"thumbs must be an int >= 1 (keep every n-th detection of each track), got {every!r}: "
                             "1 keeps a thumbnail of every detection")
        self.every, self.longest, self.quality = int(every), longest, quality
        self._seen: dict[int, int] = {}

    def reset(self) -> None:
        self._seen = {}

    def __call__(self, image: np.ndarray, detections: Detections) -> list[bytes | None]:
        """JPEG bytes (or None where skipped) for each row of ``detections`` (boxes in ``image`` pixels)."""
        out: list[bytes | None] = []
        for box, track in zip(detections.xyxy, detections.track_id.tolist()):
            if track >= 0:
                seen = self._seen.get(track, 0)
                self._seen[track] = seen + 1
                if seen % self.every:
                    out.append(None)
                    continue
            out.append(encode_jpeg(thumbnail(image, box, longest=self.longest), self.quality))
        return out


class SourceFrames:
    """Frames of one stored source by index, or None when the source cannot be read back as it was indexed."""

    def __init__(self, source: Source):
        self._cap, self._images = None, None
        p = Path(source.uri)
        if p.is_dir():
            self._images = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file() and fingerprint_file(p) == source.fingerprint:  # same content, not just the same name
            cap = cv2.VideoCapture(str(p))
            self._cap = cap if cap.isOpened() else None

    def read(self, index: int) -> np.ndarray | None:
        if self._images is not None:
            return cv2.imread(str(self._images[index])) if 0 <= index < len(self._images) else None
        if self._cap is None:
            return None
        self._cap.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, image = self._cap.read()
        return image if ok else None

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()


def pictures(store: Store, detections: Detections, *, prefer: str = "video",
             size: tuple[int, int] = (96, 192)) -> list[np.ndarray]:
    """One (h, w, 3) uint8 BGR picture per stored detection, e.g. for :func:`yolo_vq.viz.contact_sheet`.

    Args:
        store: the store the detections come from.
        detections: stored detections, as :meth:`Store.get` or a search returns them (``data`` has ``id``,
            ``source_id`` and ``frame``).
        prefer: ``"video"``: the box cut from the source frame where the source is still readable and unchanged
            (same content fingerprint), thumbnails for the rest; ``"thumbs"``: stored thumbnails only.
        size: ``(width, height)`` of crops cut from frames and of placeholders (thumbnails keep their own size).

    Where a detection has no thumbnail (``--thumbs N`` keeps every n-th of a track), the thumbnail of the same
    track nearest in frames stands in; with none at all, a placeholder tile says "no picture".
    """
    if prefer not in PREFER:
        raise ValueError(f"prefer must be one of {PREFER}, got {prefer!r}")
    for key in ("id", "source_id", "frame"):
        if key not in detections.data:
            raise ValueError(f"detections must be stored ones with data[{key!r}] (from Store.get or a search), got "
                             f"data keys {sorted(detections.data)}")
    n = len(detections)
    out: list[np.ndarray | None] = [None] * n
    src, frame = detections.data["source_id"].tolist(), detections.data["frame"].tolist()
    if prefer == "video":
        readers: dict[int, SourceFrames] = {}
        try:
            for i in sorted(range(n), key=lambda i: (src[i], frame[i])):
                if src[i] not in readers:
                    readers[src[i]] = SourceFrames(store.source(src[i]))
                image = readers[src[i]].read(frame[i])
                if image is not None:
                    out[i] = crop(image, detections.xyxy[i], size=size)
        finally:
            for r in readers.values():
                r.close()
    missing = [i for i in range(n) if out[i] is None]
    for i, blob in zip(missing, store.thumbnails(detections.data["id"][missing])):
        if blob is None:
            blob = store.nearest_thumbnail(src[i], int(detections.track_id[i]), frame[i])
        out[i] = placeholder(size, "no picture: source unreadable, no thumbnail") if blob is None else decode_jpeg(blob)
    return out
