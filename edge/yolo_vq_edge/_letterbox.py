"""Letterbox geometry, the one place it is computed: frames -> network input, and boxes between the two.

Ultralytics' ``predict`` letterboxes with ``LetterBox`` (``cv2.resize`` INTER_LINEAR to ``r = min(H / h0, W / w0)``,
each side ``max(round(side * r), 1)``, centred, padded with 114; ``rect=True``: the short side padded only to the next
stride multiple) and maps boxes back with ``ultralytics.utils.ops.scale_boxes`` (``gain = min(in_h / h0, in_w / w0)``,
each side rounded as ``LetterBox`` rounds it, ``pad = round((in - new) / 2 - 0.1)``). So inputs are generally not
square (768x576 at imgsz 1280 -> 1280x960; 640x272 at 640 -> 640x288 with 8 px bands).

* :func:`input_size`: the network input (H, W) an export is traced at (``predict``'s ``rect`` shape for a camera);
* :func:`letterbox_image` / :func:`letterbox_batch`: frames -> input, as ``LetterBox`` (the edge runner, the export's
  self-check);
* :func:`letterbox_params`, :func:`image_region`, :func:`to_input`, :func:`to_original`: boxes between original and
  input pixels; ``to_input`` is the exact inverse of ``scale_boxes`` (the server's Embedder), ``to_original`` is
  ``scale_boxes`` itself (the edge runner). They take torch tensors or numpy arrays alike and return the same kind.

numpy and OpenCV only: torch is never imported here (the edge runner has none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import cv2
import numpy as np

from .errors import ExportError

__all__ = ["PAD_VALUE", "image_region", "input_size", "letterbox_batch", "letterbox_image", "letterbox_params",
           "to_input", "to_original"]

PAD_VALUE = 114  # LetterBox's padding_value (the graph sees 114 / 255)

Boxes = TypeVar("Boxes")  # a torch.Tensor or a numpy array: the functions below return the kind they were given


def _scale(orig_hw: tuple[int, int], input_hw: tuple[int, int]) -> float:
    """``LetterBox``'s ratio: the largest that fits ``orig_hw`` into ``input_hw``."""
    return min(input_hw[0] / orig_hw[0], input_hw[1] / orig_hw[1])


def _resized(orig_hw: tuple[int, int], r: float) -> tuple[int, int]:
    """(h, w) of the resized image: each side rounded, at least 1 px (``LetterBox`` keeps thin images valid)."""
    return max(round(orig_hw[0] * r), 1), max(round(orig_hw[1] * r), 1)


def input_size(imgsz: int | tuple[int, int], source_size: tuple[int, int] | None = None,
               stride: int = 32) -> tuple[int, int]:
    """Network input (H, W) for an export.

    ``source_size`` (h, w) of the camera's frames gives the shape Ultralytics' ``predict`` letterboxes those frames to
    at ``imgsz`` (``rect``: the long side to ``imgsz``, the short side padded to the next multiple of ``stride``).
    Without it, an int ``imgsz`` is a square input and a pair is taken as (H, W); both must be stride multiples.

    Raises:
        ExportError: a ``source_size`` side < 1, or an ``imgsz`` that is not a stride multiple.
    """
    if source_size is not None:
        h0, w0 = (int(v) for v in source_size)
        if min(h0, w0) < 1:
            raise ExportError(f"source_size must be (height, width) > 0, got {source_size!r}")
        side = imgsz if isinstance(imgsz, int) else max(imgsz)
        new_h, new_w = _resized((h0, w0), _scale((h0, w0), (side, side)))
        return new_h + (side - new_h) % stride, new_w + (side - new_w) % stride
    hw = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(int(v) for v in imgsz)
    if len(hw) != 2 or min(hw) < stride or any(v % stride for v in hw):
        raise ExportError(f"imgsz must be a multiple of the model stride {stride} (an int or (H, W)), got {imgsz!r}; "
                          f"e.g. imgsz=640 or imgsz=(384, 640)")
    return hw


def letterbox_image(image: np.ndarray, input_hw: tuple[int, int], *, imgsz: Any = None,
                    source_size: Sequence[int] | None = None) -> np.ndarray:
    """One (h, w, 3) uint8 frame -> (H, W, 3) letterboxed to ``input_hw``, pixel for pixel as ``LetterBox``.

    ``imgsz`` (an int) and ``source_size`` are an export's: a frame of ``source_size`` is scaled as ``predict`` scales
    it at ``imgsz`` (``min(imgsz / h0, imgsz / w0)``, the ``rect`` input ``input_size`` returned, rounding included);
    any other frame to fit ``input_hw``.
    """
    h1, w1 = input_hw
    h0, w0 = image.shape[:2]
    if isinstance(imgsz, int) and source_size is not None and tuple(source_size) == (h0, w0):
        r = _scale((h0, w0), (imgsz, imgsz))  # the camera it was exported for: predict's own scale
    else:
        r = _scale((h0, w0), (h1, w1))
    new_h, new_w = _resized((h0, w0), r)
    if (new_w, new_h) != (w0, h0):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    dw, dh = (w1 - new_w) / 2, (h1 - new_h) / 2
    top, bottom, left, right = round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)
    return cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)


def letterbox_batch(images: Sequence[np.ndarray], input_hw: tuple[int, int], *, imgsz: Any = None,
                    source_size: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """BGR uint8 frames -> a graph's inputs: ``images`` (B, 3, H, W) float32 RGB in [0, 1] and ``regions`` (B, 4)
    float32, each frame's :func:`image_region` (input pixels). ``imgsz``, ``source_size``: see
    :func:`letterbox_image`."""
    out = np.empty((len(images), 3, *input_hw), np.float32)
    regions = np.empty((len(images), 4), np.float32)
    for i, im in enumerate(images):
        lb = letterbox_image(im, input_hw, imgsz=imgsz, source_size=source_size)
        out[i] = lb[..., ::-1].transpose(2, 0, 1)
        regions[i] = image_region(im.shape[:2], input_hw)
    out /= 255.0
    return out, regions


def letterbox_params(orig_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """``(gain_x, gain_y, pad_x, pad_y)`` such that ``input_px = orig_px * gain + pad``, as ``scale_boxes`` has it."""
    h0, w0 = int(orig_hw[0]), int(orig_hw[1])
    h1, w1 = int(input_hw[0]), int(input_hw[1])
    new_h, new_w = _resized((h0, w0), _scale((h0, w0), (h1, w1)))
    pad_x, pad_y = round((w1 - new_w) / 2 - 0.1), round((h1 - new_h) / 2 - 0.1)
    return new_w / w0, new_h / h0, float(pad_x), float(pad_y)


def image_region(orig_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """The original image's area inside the network input, ``(x0, y0, x1, y1)`` in input pixels."""
    gx, gy, px, py = letterbox_params(orig_hw, input_hw)
    return px, py, px + gx * orig_hw[1], py + gy * orig_hw[0]


def _float32(boxes: Any) -> Any:
    """``boxes`` as float32 values: a new numpy array, or the torch tensor's ``float()`` (torch is not imported)."""
    return boxes.astype(np.float32) if isinstance(boxes, np.ndarray) else boxes.float()


def _row(boxes: Any, values: list[float]) -> Any:
    """``values`` as a float32 row of ``boxes``' kind: numpy float32, or a tensor made in ``boxes``' own dtype and
    device, then ``float()`` (as this module always did: a half-precision model's gains are rounded to fp16 first)."""
    return np.float32(values) if isinstance(boxes, np.ndarray) else boxes.new_tensor(values).float()


def to_input(boxes: Boxes, orig_hw: tuple[int, int], input_hw: tuple[int, int]) -> Boxes:
    """Map xyxy boxes (n, 4) from original-image pixels to network-input pixels (new float32 values)."""
    gx, gy, px, py = letterbox_params(orig_hw, input_hw)
    return _float32(boxes) * _row(boxes, [gx, gy, gx, gy]) + _row(boxes, [px, py, px, py])


def to_original(boxes: Boxes, orig_hw: tuple[int, int], input_hw: tuple[int, int], *, clip: bool = False) -> Boxes:
    """Map xyxy boxes (n, 4) from network-input pixels back to original pixels (new float32 values), as
    ``scale_boxes`` does; ``clip``: to the original image, as ``scale_boxes`` clips."""
    gx, gy, px, py = letterbox_params(orig_hw, input_hw)
    b = (_float32(boxes) - _row(boxes, [px, py, px, py])) / _row(boxes, [gx, gy, gx, gy])
    if not clip:
        return b
    high = _row(boxes, [orig_hw[1], orig_hw[0]] * 2)
    return np.clip(b, 0, high) if isinstance(b, np.ndarray) else b.clamp(min=0).minimum(high)
