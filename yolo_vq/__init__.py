"""yolo_vq: a searchable, compressed visual memory for Ultralytics YOLO pipelines.

Names load lazily (PEP 562), so ``import yolo_vq.edge`` on an edge device pulls in numpy, onnxruntime and OpenCV
only, never torch or ultralytics.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("yolo-vq")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

# The public API, by stage (the rest lives in the sub-packages: features, quant, index, edge).
_EXPORTS = {
    "DEFAULT_RECIPE": "config", "EmbedConfig": "config", "list_recipes": "config", "load_recipe": "config",
    "Detections": "detections",
    "YoloVQError": "errors",
    "Tap": "features.tap", "Embedder": "features.embedder",
    "fit_codebook": "fit",
    "Indexer": "index.indexer", "Memory": "index.memory", "Store": "index.store", "open_store": "index.registry",
    "export": "edge.export", "EdgeModel": "edge.runner", "ingest": "edge.ingest",
}
# Submodules reachable as attributes after a bare ``import yolo_vq`` (the README's ``yolo_vq.assets.pose_weights()``).
_SUBMODULES = {"assets", "edge", "errors", "features", "index", "quant"}

__all__ = [
    "DEFAULT_RECIPE", "Detections", "EdgeModel", "EmbedConfig", "Embedder", "Indexer", "Memory", "Store", "Tap",
    "YoloVQError", "__version__", "export", "fit_codebook", "ingest", "list_recipes", "load_recipe", "open_store",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)  # the import binds it as an attribute: no second lookup
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'yolo_vq' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return __all__
