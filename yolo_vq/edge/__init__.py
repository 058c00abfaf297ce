"""Edge devices: the detector + recipe + codebook as one ONNX graph (:mod:`.export`, needs torch), the torch-free
runner that ships codes (:mod:`.runner`), the records files it writes (:mod:`.records`) and their ingest into an
index (:mod:`.ingest`).

``from yolo_vq.edge import EdgeModel, run`` imports numpy, onnxruntime and OpenCV only, never torch or
ultralytics: the names load lazily (PEP 562).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["EdgeModel", "RecordWriter", "read_records", "run"]

_EXPORTS = {"EdgeModel": "runner", "run": "runner", "RecordWriter": "records", "read_records": "records"}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
