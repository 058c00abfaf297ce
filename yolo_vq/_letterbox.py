"""Box coordinates between original-image pixels and the letterboxed network input.

``to_input`` is the exact inverse of ``ultralytics.utils.ops.scale_boxes`` (which maps network-input boxes back to the
original image): ``gain = min(in_h / h0, in_w / w0)``, each side rounded as ``LetterBox`` rounds it, and
``pad = round((in - new) / 2 - 0.1)``. Ultralytics' ``predict`` letterboxes with ``rect=True``, so inputs are
generally not square (768x576 at imgsz 1280 -> 1280x960; 640x272 at 640 -> 640x288 with 8 px bands).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at import: the edge runner (no torch) uses letterbox_params
    import torch

__all__ = ["image_region", "letterbox_params", "to_input", "to_original"]


def letterbox_params(orig_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """``(gain_x, gain_y, pad_x, pad_y)`` such that ``input_px = orig_px * gain + pad``, as Ultralytics letterboxes."""
    h0, w0 = int(orig_hw[0]), int(orig_hw[1])
    h1, w1 = int(input_hw[0]), int(input_hw[1])
    gain = min(h1 / h0, w1 / w0)
    new_h, new_w = max(round(h0 * gain), 1), max(round(w0 * gain), 1)
    pad_x, pad_y = round((w1 - new_w) / 2 - 0.1), round((h1 - new_h) / 2 - 0.1)
    return new_w / w0, new_h / h0, float(pad_x), float(pad_y)


def image_region(orig_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """The original image's area inside the network input, ``(x0, y0, x1, y1)`` in input pixels."""
    gx, gy, px, py = letterbox_params(orig_hw, input_hw)
    return px, py, px + gx * orig_hw[1], py + gy * orig_hw[0]


def to_input(boxes: torch.Tensor, orig_hw: tuple[int, int], input_hw: tuple[int, int]) -> torch.Tensor:
    """Map xyxy boxes (n, 4) from original-image pixels to network-input pixels (a new float32 tensor)."""
    gx, gy, px, py = letterbox_params(orig_hw, input_hw)
    scale = boxes.new_tensor([gx, gy, gx, gy]).float()
    shift = boxes.new_tensor([px, py, px, py]).float()
    return boxes.float() * scale + shift


def to_original(boxes: torch.Tensor, orig_hw: tuple[int, int], input_hw: tuple[int, int]) -> torch.Tensor:
    """Map xyxy boxes (n, 4) from network-input pixels back to original pixels (not clipped)."""
    gx, gy, px, py = letterbox_params(orig_hw, input_hw)
    scale = boxes.new_tensor([gx, gy, gx, gy]).float()
    shift = boxes.new_tensor([px, py, px, py]).float()
    return (boxes.float() - shift) / scale
