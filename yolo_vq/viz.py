"""Contact sheets of search results, thumbnails for the store, and image files, with OpenCV only.

A search hit is shown as a :class:`Tile`: a BGR crop cut with :func:`crop`, a caption (e.g. ``"t=12.4s f=310 #7"``)
and a score. :func:`contact_sheet` lays out the query tile and the ranked result tiles in one BGR picture;
:func:`write_image` saves it. :func:`thumbnail` cuts the small aspect-kept picture the store keeps per detection and
:func:`encode_jpeg` / :func:`decode_jpeg` turn it into bytes and back; :func:`placeholder` stands in for a missing
picture.

Images are numpy ``uint8`` arrays of shape ``(H, W, 3)`` in BGR order, as ``cv2.imread`` returns them; sizes are
``(width, height)`` as OpenCV takes them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "CAPTION_H",
    "MARGIN",
    "QUERY_COLOUR",
    "TITLE_H",
    "Tile",
    "contact_sheet",
    "crop",
    "decode_jpeg",
    "encode_jpeg",
    "placeholder",
    "thumbnail",
    "write_image",
]

GREY = 114
"""Letterbox bar value, as Ultralytics' ``LetterBox`` pads."""
MARGIN = 6
"""Pixels between tiles and around the sheet; the query frame is drawn inside it."""
CAPTION_H = 42
"""Height of the caption band under each tile: three lines of text."""
TITLE_H = 24
"""Height of the title band on top of the sheet (0 when there is no title)."""
QUERY_COLOUR = (0, 200, 255)
"""BGR colour (amber) of the frame around the query tile and of its caption."""

_FRAME = 3  # query frame thickness, <= MARGIN so it never covers a neighbour
_BACKGROUND = (32, 32, 32)
_TEXT = (235, 235, 235)
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_SCALE = 0.4  # readable at 96 px wide
_TITLE_SCALE = 0.5
_LINE_H = 13
_LINES = 3
_EXTENSIONS = (".jpg", ".jpeg", ".png")


# -- checks ------------------------------------------------------------------------------------------------------------
def _check_image(name: str, image: object) -> np.ndarray:
    """``image`` as a (H, W, 3) uint8 array, or a TypeError/ValueError naming what came."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array (H, W, 3) uint8 BGR, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(
            f"{name} must be a non-empty (H, W, 3) uint8 BGR array, got {image.shape} {image.dtype}: "
            "read images with cv2.imread, convert grey ones with cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)"
        )
    return image


def _check_size(name: str, size: object) -> tuple[int, int]:
    """``size`` as ``(width, height)`` positive ints."""
    try:
        w, h = (int(s) for s in size)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be (width, height), got {size!r}") from None
    if w < 1 or h < 1:
        raise ValueError(f"{name} must be (width, height) in pixels, both >= 1, got {size!r}")
    return w, h


# -- crops -------------------------------------------------------------------------------------------------------------
def _grey(size: tuple[int, int]) -> np.ndarray:
    return np.full((size[1], size[0], 3), GREY, np.uint8)


def _letterbox(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` resized into ``size`` = (w, h) with its aspect kept, centred on grey bars; a new (h, w, 3) array."""
    tw, th = size
    h, w = image.shape[:2]
    gain = min(tw / w, th / h)
    nw, nh = min(max(round(w * gain), 1), tw), min(max(round(h * gain), 1), th)
    interp = cv2.INTER_AREA if gain < 1 else cv2.INTER_LINEAR  # INTER_AREA avoids aliasing when shrinking
    out = _grey(size)
    x0, y0 = (tw - nw) // 2, (th - nh) // 2
    out[y0:y0 + nh, x0:x0 + nw] = cv2.resize(image, (nw, nh), interpolation=interp)
    return out


def crop(image: np.ndarray, box: Sequence[float] | np.ndarray, *, pad: float = 0.1,
         size: tuple[int, int] = (96, 192)) -> np.ndarray:
    """Cut one box out of an image into a fixed-size tile.

    Args:
        image: (H, W, 3) uint8 BGR image.
        box: 4 floats ``(x1, y1, x2, y2)`` in ``image`` pixels.
        pad: margin added on each side, as a fraction of the box width (left/right) and height (top/bottom); the
            padded box is then clipped to the image.
        size: ``(width, height)`` of the tile; the default suits standing persons.

    Returns:
        (height, width, 3) uint8 BGR tile: the padded box resized with its aspect kept and centred on grey (114)
        bars. A degenerate box (x2 <= x1, y2 <= y1, NaN) or one outside the image gives an all-grey tile.
    """
    size = _check_size("size", size)
    window = _window(image, box, pad)
    return _grey(size) if window is None else _letterbox(window, size)


def _window(image: np.ndarray, box: Sequence[float] | np.ndarray, pad: float) -> np.ndarray | None:
    """The padded box's pixels (a view of ``image``), or None for a degenerate box or one outside the image."""
    image = _check_image("image", image)
    b = np.asarray(box, dtype=np.float64)
    if b.shape != (4,):
        raise ValueError(f"box must be 4 numbers (x1, y1, x2, y2), got shape {b.shape}: pass one row of xyxy")
    if not (isinstance(pad, numbers.Real) and 0 <= pad < math.inf):
        raise ValueError(f"pad must be a finite fraction >= 0 of the box size, got {pad!r}: e.g. 0.1")
    x1, y1, x2, y2 = b
    bw, bh = x2 - x1, y2 - y1
    if not (np.isfinite(b).all() and bw > 0 and bh > 0):
        return None
    h, w = image.shape[:2]
    # Box edges are continuous pixel coordinates: round them to the nearest pixel boundary, then clip.
    c0, r0 = max(round(x1 - pad * bw), 0), max(round(y1 - pad * bh), 0)
    c1, r1 = min(round(x2 + pad * bw), w), min(round(y2 + pad * bh), h)
    return image[r0:r1, c0:c1] if c1 > c0 and r1 > r0 else None


def thumbnail(image: np.ndarray, box: Sequence[float] | np.ndarray, *, longest: int = 96,
              pad: float = 0.1) -> np.ndarray:
    """A small picture of one box that keeps its aspect: what the store keeps per detection (see ``encode_jpeg``).

    Args:
        image: (H, W, 3) uint8 BGR image.
        box: 4 floats ``(x1, y1, x2, y2)`` in ``image`` pixels.
        longest: the longest side in pixels; larger windows are shrunk to it, smaller ones are kept as they are
            (a contact sheet letterboxes them at display time, so enlarging would only cost bytes).
        pad: margin on each side as a fraction of the box size, as in :func:`crop`.

    Returns:
        (h, w, 3) uint8 BGR with ``max(h, w) == min(longest, longest side of the padded box clipped to the image)``;
        a 1x1 grey image for a degenerate box or one outside the image.
    """
    if isinstance(longest, bool) or not isinstance(longest, numbers.Integral) or longest < 1:
        raise ValueError(f"longest must be an int >= 1 (pixels), got {longest!r}: e.g. 96")
    window = _window(image, box, pad)
    if window is None:
        return _grey((1, 1))
    h, w = window.shape[:2]
    gain = longest / max(h, w)
    if gain >= 1:
        return np.ascontiguousarray(window)
    size = (min(max(round(w * gain), 1), longest), min(max(round(h * gain), 1), longest))
    return cv2.resize(window, size, interpolation=cv2.INTER_AREA)


def placeholder(size: tuple[int, int] = (96, 192), text: str = "no picture") -> np.ndarray:
    """A grey (height, width, 3) uint8 tile with ``text`` in its middle: a result with no picture to show."""
    w, h = _check_size("size", size)
    tile = _grey((w, h))
    lines = _wrap(text, w - 8, _LINES)
    y = (h - len(lines) * _LINE_H) // 2
    _put_lines(tile, lines, 2, y, _TEXT)
    return tile


# -- contact sheets ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Tile:
    """One picture on a contact sheet.

    Attributes:
        image: (h, w, 3) uint8 BGR crop, normally from :func:`crop` at the sheet's tile size (other sizes are
            letterboxed into it).
        caption: short text under the tile, e.g. ``"t=12.4s f=310 #7"``; wrapped and truncated to fit.
        score: similarity or distance shown with 3 decimals, or None to show none.
    """

    image: np.ndarray
    caption: str = ""
    score: float | None = None

    def __post_init__(self) -> None:
        _check_image("Tile.image", self.image)
        if not isinstance(self.caption, str):
            raise TypeError(f"Tile.caption must be a str, got {type(self.caption).__name__}: format it first")
        if self.score is not None and not isinstance(self.score, numbers.Real):
            raise TypeError(f"Tile.score must be a number or None, got {type(self.score).__name__}: pass float(score)")


def _fit(text: str, width: int, scale: float = _SCALE) -> str:
    """``text`` cut (ending in "..") so that it is at most ``width`` pixels wide."""
    if cv2.getTextSize(text, _FONT, scale, 1)[0][0] <= width:
        return text
    while text and cv2.getTextSize(text + "..", _FONT, scale, 1)[0][0] > width:
        text = text[:-1]
    return text + ".."


def _wrap(text: str, width: int, lines: int) -> list[str]:
    """Split ``text`` at spaces into at most ``lines`` lines of at most ``width`` pixels; the last one is cut."""
    out: list[str] = []
    words = text.split()
    while words and len(out) < lines - 1:
        line = words.pop(0)
        while words and cv2.getTextSize(f"{line} {words[0]}", _FONT, _SCALE, 1)[0][0] <= width:
            line = f"{line} {words.pop(0)}"
        out.append(_fit(line, width))
    if words:
        out.append(_fit(" ".join(words), width))
    return out


def _put_lines(canvas: np.ndarray, lines: list[str], x: int, y: int, colour: tuple[int, int, int]) -> None:
    """Draw ``lines`` top-down from the top-left corner (x, y) of a caption band."""
    for i, line in enumerate(lines):
        baseline = y + (i + 1) * _LINE_H - 2
        cv2.putText(canvas, line, (x + 2, baseline), _FONT, _SCALE, colour, 1, cv2.LINE_AA)


def contact_sheet(query: Tile, results: Sequence[Tile], *, columns: int = 5, tile: tuple[int, int] = (96, 192),
                  title: str | None = None) -> np.ndarray:
    """Lay out a query and its ranked results in one picture.

    Cells are filled left to right, top to bottom: the query first (framed and captioned in ``QUERY_COLOUR``,
    with its score if any over its caption or "query"), then ``results`` in rank order, each captioned with ``"<rank>. <score>"``
    (rank from 1, score with 3 decimals, left out when None) over its own caption.

    Args:
        query: the query tile.
        results: result tiles, best first; may be empty.
        columns: cells per row, >= 1.
        tile: ``(tile_w, tile_h)`` of each image; tiles of another size are letterboxed into it.
        title: text of a band on top of the sheet, or None / "" for no band.

    Returns:
        (height, width, 3) uint8 BGR sheet with, exactly::

            rows   = ceil((len(results) + 1) / columns)
            width  = columns * (tile_w + MARGIN) + MARGIN
            height = (TITLE_H if title else 0) + rows * (tile_h + CAPTION_H + MARGIN) + MARGIN
    """
    if not isinstance(query, Tile) or not all(isinstance(r, Tile) for r in results):
        raise TypeError("query and every item of results must be a Tile: wrap crops as Tile(crop(image, box), caption)")
    if isinstance(columns, bool) or not isinstance(columns, numbers.Integral) or columns < 1:
        raise ValueError(f"columns must be an int >= 1, got {columns!r}")
    tw, th = _check_size("tile", tile)
    title_h = TITLE_H if title else 0
    rows = math.ceil((len(results) + 1) / columns)
    width = columns * (tw + MARGIN) + MARGIN
    height = title_h + rows * (th + CAPTION_H + MARGIN) + MARGIN
    sheet = np.empty((height, width, 3), np.uint8)
    sheet[:] = _BACKGROUND
    if title:
        text = _fit(title, width - 2 * MARGIN, _TITLE_SCALE)
        cv2.putText(sheet, text, (MARGIN, TITLE_H - 7), _FONT, _TITLE_SCALE, _TEXT, 1, cv2.LINE_AA)

    for i, t in enumerate([query, *results]):
        x = MARGIN + (i % columns) * (tw + MARGIN)
        y = title_h + MARGIN + (i // columns) * (th + CAPTION_H + MARGIN)
        if i == 0:
            sheet[y - _FRAME:y + th + CAPTION_H + _FRAME, x - _FRAME:x + tw + _FRAME] = QUERY_COLOUR
            sheet[y + th:y + th + CAPTION_H, x:x + tw] = _BACKGROUND
        rank = f"{i}." if i else ""
        head = " ".join(s for s in (rank, "" if t.score is None else f"{t.score:.3f}") if s)
        body = _wrap(t.caption or ("" if i else "query"), tw - 4, _LINES - bool(head))
        lines = [_fit(head, tw - 4), *body] if head else body
        image = t.image if t.image.shape[:2] == (th, tw) else _letterbox(t.image, (tw, th))
        sheet[y:y + th, x:x + tw] = image
        _put_lines(sheet, lines, x, y + th, _TEXT if i else QUERY_COLOUR)
    return sheet


# -- bytes and files ---------------------------------------------------------------------------------------------------
def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of a (H, W, 3) uint8 BGR image (a store thumbnail); ``quality`` in 1..100."""
    image = _check_image("image", image)
    if isinstance(quality, bool) or not isinstance(quality, numbers.Integral) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an int in 1..100, got {quality!r}: 85 suits thumbnails")
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # not expected for a valid uint8 BGR array
        raise RuntimeError(f"OpenCV could not JPEG-encode an image of shape {image.shape}")
    return buf.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    """The (H, W, 3) uint8 BGR image in ``data`` (JPEG from :func:`encode_jpeg`; PNG and other OpenCV formats too)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if len(data) else None
    if image is None:
        raise ValueError(
            f"data is not a decodable image ({len(data)} bytes, starting {bytes(data[:8])!r}): pass bytes made "
            "by encode_jpeg or read from a .jpg/.png file (JPEG starts with b'\\xff\\xd8')"
        )
    return image


def write_image(path: str | Path, image: np.ndarray) -> Path:
    """Write a (H, W, 3) uint8 BGR image to ``path`` (.jpg, .jpeg or .png), creating parent folders; returns the path."""
    image = _check_image("image", image)
    path = Path(path)
    if path.suffix.lower() not in _EXTENSIONS:
        raise ValueError(
            f"cannot write {str(path)!r}: extension {path.suffix or '(none)'!r} is not one of "
            f"{', '.join(_EXTENSIONS)}; rename it, e.g. {str(path.with_suffix('.png'))!r}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ok = cv2.imwrite(str(path), image)
    except cv2.error as e:  # OpenCV 5 raises where 4.x returned False
        raise OSError(f"OpenCV could not write {str(path)!r} (expected a .jpg/.jpeg/.png path): {e}") from e
    if not ok:
        raise OSError(f"OpenCV could not write {str(path)!r}: check that the folder is writable and the path is "
                      "ASCII (cv2.imwrite fails on some non-ASCII paths); expected a .jpg/.jpeg/.png path")
    return path
