"""Edge devices: the detector + recipe + codebook as one ONNX graph (:mod:`.export`, needs torch), the torch-free
runner that ships codes (:mod:`.runner`), the records files it writes (:mod:`.records`) and their ingest into an
index (:mod:`.ingest`).

``from yolo_vq.edge import EdgeModel, run`` imports numpy, onnxruntime and OpenCV only, never torch or
ultralytics: the names load lazily (PEP 562). The torch-free modules live in :mod:`yolo_vq_edge`.
"""

from yolo_vq_edge import __all__, __getattr__  # noqa: F401  the same lazy names (EdgeModel, run, records)
