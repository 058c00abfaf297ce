"""Frames from videos, image folders and streams (OpenCV), with a content fingerprint per source.

"OpenCV returned a frame" does not validate a source (PITFALLS 12): OpenCV's FFmpeg backend renders text and binary
files as video, and YOLO then finds "persons" in the rendered text. :func:`open_source` therefore checks what FFmpeg
reads a file as (its codec) and refuses the text-art family, and checks every file of an image folder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from ._format import SourceInfo
from .errors import SourceError

__all__ = ["SourceInfo", "VideoSource", "chunks", "fingerprint_file", "fingerprint_name", "open_source"]

T = TypeVar("T")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}

_EXPECTED = "expected a video file (mp4/avi/mkv/mov/webm/...), an image folder, a webcam index or a stream URL"

# FFmpeg demuxers that turn non-video files into frames, measured by opening text, random, zero and crafted files
# under ~300 extensions (every extension of libavformat 63.1's 359 demuxers plus common ones) with OpenCV 5.1.0:
#   tty  (.ans .art .asc .diz .ice .nfo .txt .vt; .txt only when it holds text) -> codec ansi, FOURCC 'ansi'
#   bin  (.bin whose size is a multiple of 160, or ANY file ending in a SAUCE record) -> codec bintext
#   xbin (a file starting with "XBIN\x1a", any extension) -> codec bintext
#   adf  (.adf starting with byte 1) -> codec bintext;  idf (a file starting with 04 31 2E 34) -> codec idf
#   cdg  (.cdg, any bytes) -> codec cdgraphics (CD+G karaoke graphics)
# OpenCV 5.1 takes the FOURCC from FFmpeg's codec tag tables; bintext, idf and cdgraphics have no tag, so their
# FOURCC is 0 and the sign left is the palette (PAL8) frame format all of them decode to. Builds that derive the
# FOURCC from the codec name instead report 'bint', 'xbin', 'idf\0', 'cdgr': those are refused by name.
_TEXT_ART_FOURCC = {"ansi": "ansi", "bint": "bintext", "xbin": "xbin", "idf": "idf", "cdgr": "cdgraphics"}
_PAL8 = int.from_bytes(b"PAL\x08", "little")  # CAP_PROP_CODEC_PIXEL_FORMAT of an 8-bit palette stream
# What names the demuxer of an untagged palette stream (FFmpeg libavformat/bintext.c, cdg.c probe these).
_TEXT_ART_MAGIC = [(b"XBIN\x1a", "codec 'bintext' of its xbin demuxer: an XBIN header"),
                   (b"\x04\x31\x2e\x34", "codec 'idf': an iCE Draw header")]
_TEXT_ART_SUFFIX = {".bin": "codec 'bintext': binary text", ".adf": "codec 'bintext': Artworx ADF",
                    ".idf": "codec 'idf': iCE Draw", ".cdg": "codec 'cdgraphics': CD+G karaoke graphics"}


def _fourcc(cap: cv2.VideoCapture) -> str:
    """CAP_PROP_FOURCC as 4 characters; '' when OpenCV gives none (0 or -1)."""
    v = int(cap.get(cv2.CAP_PROP_FOURCC))
    return "" if v in (0, -1) else (v & 0xFFFFFFFF).to_bytes(4, "little").decode("latin-1")


def _text_art(fourcc: str) -> str | None:
    """What FFmpeg reads a capture as when its FOURCC names a text-art codec (for the error), else None."""
    codec = _TEXT_ART_FOURCC.get(fourcc.strip(" \0").lower())
    return None if codec is None else f"text art (codec {codec!r}, FOURCC {fourcc!r})"


def _palette_art(p: Path) -> str:
    """What FFmpeg read file ``p`` as, an untagged palette stream, named by its signature (for the error)."""
    with open(p, "rb") as f:
        head = f.read(16)
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 128))
        tail = f.read(7)
    for magic, what in _TEXT_ART_MAGIC:
        if head.startswith(magic):
            return f"text art ({what})"
    if tail == b"SAUCE00":
        return "text art (codec 'bintext': a SAUCE record at its end)"
    what = _TEXT_ART_SUFFIX.get(p.suffix.lower())
    return (f"text art ({what})" if what else
            "palette graphics with no video codec tag (FOURCC 0, 8-bit palette: what its bintext/idf/cdg renderers make)")


def _real_container(p: Path) -> bool:
    """Whether ``p`` starts as a video container or image does: an untagged palette stream in one (8-bit raw AVI,
    a palette BMP) is a real picture, not text art."""
    with open(p, "rb") as f:
        head = f.read(12)
    return (head[:4] in (b"RIFF", b"\x1aE\xdf\xa3", b"OggS") or head[:3] == b"FLV"
            or head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip") or cv2.haveImageReader(str(p)))


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


@dataclass(frozen=True)
class VideoSource(SourceInfo):
    """An opened source: its :class:`SourceInfo` and the capture. Iterate :meth:`frames` for ``(index, time_s, BGR
    uint8 image)``."""

    _images: list[Path] | None = None
    _cap: cv2.VideoCapture | None = None

    def frames(self, *, start: int = 0, stride: int = 1) -> Iterator[tuple[int, float, np.ndarray]]:
        """Frames ``start, start + stride, ...`` (indices of the source's own frame numbering).

        A live stream (no frame count) does not replay what an earlier run read: its frames are numbered from
        ``start`` on, so a resumed run continues the numbering instead of skipping ``start`` new frames."""
        if self._images is not None:
            for i in range(start, len(self._images), stride):
                img = cv2.imread(str(self._images[i]))
                if img is None:  # its header passed the check at open: the data is damaged (or the file went away)
                    raise SourceError(f"cannot decode image {str(self._images[i])!r}: expected an image OpenCV reads "
                                      f"(its header is one, its data is not): re-export the file or remove it")
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

    Validated here, before any frame reaches a model:

    * a **file** must be non-empty, open in OpenCV, and not be read by FFmpeg as text art: FOURCC 'ansi' (its tty
      demuxer renders .txt/.nfo/.asc/.ans/... as frames) or 'bint'/'xbin'/'idf'/'cdgr' is refused, and so is an
      untagged (FOURCC 0) 8-bit palette stream unless the file starts as a video container or image (that is how the
      bintext, xbin, adf, idf and cdg demuxers show up in OpenCV 5.1); FOURCC 0/-1 with frame width 0 (no video
      stream) is refused; then one frame must decode.
    * an **image folder** must hold files with image suffixes, each with a header OpenCV recognises
      (``cv2.haveImageReader``; hidden files such as macOS ``._a.jpg`` are skipped), and its first image must
      decode; a later image that fails to decode raises :class:`SourceError` from :meth:`VideoSource.frames`.
    * a **stream** must open; its FOURCC must not be a text-art codec.

    Text containers FFmpeg reads as real video (local .m3u8 playlists, ffconcat scripts) are kept: the checks are on
    the codec FFmpeg finds, not on whether the file is text (no text file passed them in the measurements above).

    Raises:
        FileNotFoundError: a path that does not exist.
        SourceError: (a ``ValueError``) anything else above, in one line naming the source, what was found, what
            was expected and the fix.
    """
    s = str(source)
    if s.isdigit() or "://" in s:
        cap = cv2.VideoCapture(int(s) if s.isdigit() else s)
        if not cap.isOpened():
            raise SourceError(f"cannot open stream {s!r}: expected a webcam index or an RTSP/HTTP URL OpenCV can read: "
                              f"check the camera index or the URL")
        art = _text_art(_fourcc(cap))
        if art is not None:
            cap.release()
            raise SourceError(f"stream {s!r} is not video: FFmpeg reads it as {art}; {_EXPECTED}: "
                              f"point the URL at the video itself")
        fps = cap.get(cv2.CAP_PROP_FPS) or None
        return VideoSource(s, fingerprint_name(s), fps, None,
                           int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) or None,
                           int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) or None, None, cap)
    p = Path(s)
    if not p.exists():
        raise FileNotFoundError(f"video {s!r} does not exist: pass a video file, an image folder, a webcam index "
                                f"or an RTSP URL")
    if p.is_dir():
        return _open_folder(p, s)
    if not os.access(p, os.R_OK):
        raise SourceError(f"video {s!r} is not readable: check its permissions")
    if p.stat().st_size == 0:
        raise SourceError(f"{s!r} is empty (0 bytes), not a video; {_EXPECTED}: pass the finished file (was it copied "
                          f"or written completely?)")
    cap = cv2.VideoCapture(str(p))
    try:
        if not cap.isOpened():
            raise SourceError(f"{s!r} is not a video OpenCV can open (no FFmpeg demuxer reads it); {_EXPECTED}: "
                              f"pass the video itself, or convert it (e.g. ffmpeg -i IN OUT.mp4)")
        fourcc = _fourcc(cap)
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        art = _text_art(fourcc)
        if art is None and not fourcc and width > 0 and \
                int(cap.get(getattr(cv2, "CAP_PROP_CODEC_PIXEL_FORMAT", -1))) == _PAL8 and not _real_container(p):
            art = _palette_art(p)
        if art is not None:
            raise SourceError(f"{s!r} is not a video: FFmpeg reads it as {art}; {_EXPECTED}: pass the video file "
                              f"itself (text rendered as frames gives false detections)")
        if not fourcc and width <= 0:
            raise SourceError(f"{s!r} has no video stream: OpenCV opened it (FOURCC 0) but found no frame size; "
                              f"{_EXPECTED}: pass a file with video in it")
        if not cap.grab():
            raise SourceError(f"{s!r} is not a video OpenCV can decode (FOURCC {fourcc or 0!r}, no frame decodes); "
                              f"{_EXPECTED}: check the file is complete, or convert it (e.g. ffmpeg -i IN OUT.mp4)")
    except SourceError:
        cap.release()
        raise
    # Reopen instead of seeking back: after a grab, set(CAP_PROP_POS_FRAMES, 0) leaves a single-image file (FFmpeg's
    # image2/*_pipe demuxers) at its end, and it then yields no frame at all.
    cap.release()
    cap = cv2.VideoCapture(str(p))
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    return VideoSource(str(p.resolve()), fingerprint_file(p), cap.get(cv2.CAP_PROP_FPS) or None, count,
                       int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), None, cap)


def _open_folder(p: Path, s: str) -> VideoSource:
    """An image folder: every file with an image suffix must have an image header, the first must decode."""
    files = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith("."))
    images = [q for q in files if q.suffix.lower() in IMAGE_SUFFIXES]
    suffixes = "/".join(x[1:] for x in sorted(IMAGE_SUFFIXES))
    if not images:
        raise SourceError(f"folder {s!r} has no images (no {suffixes} file among its {len(files)} files); "
                          f"{_EXPECTED}: pass a folder of images or the video file itself")
    bad = [q for q in images if not cv2.haveImageReader(str(q))]
    if bad:
        raise SourceError(f"folder {s!r}: {bad[0].name!r} is not an image OpenCV can read ({len(bad)} of "
                          f"{len(images)} image files have no image header); expected an image folder of decodable "
                          f"{suffixes} files: remove or re-export the bad files")
    first = cv2.imread(str(images[0]))
    if first is None:
        raise SourceError(f"folder {s!r}: first image {images[0].name!r} cannot be decoded (its header is an image's, "
                          f"its data is not); expected decodable images: re-export the file or remove it")
    h = hashlib.sha256()
    for q in images:
        h.update(q.name.encode() + fingerprint_file(q).encode())
    height, width = first.shape[:2]
    return VideoSource(str(p.resolve()), h.hexdigest()[:32], None, len(images), width, height, images, None)


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
