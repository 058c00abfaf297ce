"""Tensor plumbing shared by k-means and the quantizers: inputs in, float32 math, export detection.

Everything that enters :func:`~yolo_vq.quant.kmeans` or a quantizer as numpy or torch passes :func:`as_tensor`
once (faiss ``contrib`` style: numpy or torch in, torch inside).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import Tensor

__all__ = ["as_tensor", "exporting", "fp32"]


def exporting() -> bool:
    """True while tracing or exporting (``torch.onnx.export``, ``torch.jit.trace``, ``torch.compile``).

    Encoders then skip the chunk loop over rows so that the batch dimension stays dynamic in the graph.
    """
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def fp32(device: torch.device) -> contextlib.AbstractContextManager:
    """Context that disables autocast on ``device`` so distances are computed in float32."""
    if device.type in ("cpu", "cuda", "mps", "xpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def as_tensor(x: object, name: str, shape: str, *, codes: bool = False) -> Tensor:
    """A numpy array or torch tensor as a tensor: the one conversion of every input (numpy -> cpu, no copy when
    contiguous; tensors stay on their device).

    Vectors must be floating point and come back float32. With ``codes``, numpy codes of any numeric dtype are cast
    to int64 (so uint16 arrays work with every torch), tensor codes must be integers and keep their dtype (the caller
    moves and widens them in one step). ``name`` and ``shape`` (e.g. ``"(n, 64)"``) word the TypeError raised for
    anything else; checking the shape is the caller's.
    """
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
        x = torch.from_numpy(x.astype(np.int64, copy=False) if codes else x)
    if codes:
        if not isinstance(x, Tensor) or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"{name} must be an integer array {shape}, got {kind}")
        return x
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a numpy array or torch tensor of shape {shape}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point {shape}, got {x.dtype}: cast it to float32")
    return x.float()
