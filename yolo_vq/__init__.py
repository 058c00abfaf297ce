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

_EXPORTS = {
    "DEFAULT_RECIPE": "config",
    "ColourSpec": "config",
    "EmbedConfig": "config",
    "LevelSpec": "config",
    "list_recipes": "config",
    "load_recipe": "config",
    "Detections": "detections",
    "BoxEmbedder": "features.pool",
    "Embedder": "features.embedder",
    "EdgeModel": "edge.runner",
    "export": "edge.export",
    "ingest": "edge.ingest",
    "Indexer": "index.indexer",
    "Memory": "index.memory",
    "Store": "index.store",
    "open_store": "index.store",
    "Tap": "features.tap",
    "TapInfo": "features.tap",
    "resolve_layers": "features.tap",
    "YoloVQError": "errors",
}
# Submodules reachable as attributes after a bare ``import yolo_vq`` (the README's ``yolo_vq.assets.pose_weights()``).
_SUBMODULES = {"assets", "edge", "errors", "features", "index", "quant"}

__all__ = [
    "DEFAULT_RECIPE", "BoxEmbedder", "ColourSpec", "Detections", "EdgeModel", "EmbedConfig", "Embedder", "Indexer",
    "LevelSpec", "Memory", "Store", "Tap", "TapInfo", "__version__", "export", "ingest", "list_recipes", "load_recipe",
    "open_store", "YoloVQError", "resolve_layers",
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
