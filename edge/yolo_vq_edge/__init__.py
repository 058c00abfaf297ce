"""yolo_vq_edge: the torch-free part of yolo_vq that runs on devices.

It runs a graph exported by ``yolo-vq export`` (detector + embedding + codebook) with onnxruntime and OpenCV, and
writes the detections' codes as records for ``yolo-vq ingest`` on a server. Its modules: the runner (:mod:`.runner`),
the records files (:mod:`.records`), the export metadata (:mod:`._format`), letterbox geometry (:mod:`._letterbox`),
video sources (:mod:`.video`) and the errors (:mod:`.errors`).

Two distributions ship it from one source tree: ``yolo-vq-edge`` (this package only: numpy, onnxruntime,
opencv-python-headless, tqdm) for devices, and ``yolo-vq`` (everything, torch and Ultralytics included), where
``yolo_vq.edge`` and the other old module names are these same modules.

    from yolo_vq_edge import EdgeModel, run
    run("model_vq.onnx", "video.mp4", "detections.jsonl")

The names load lazily (PEP 562): importing the package imports nothing but the standard library.
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
