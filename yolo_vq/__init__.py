"""yolo_vq: a searchable, compressed visual memory for Ultralytics YOLO pipelines."""

from importlib.metadata import PackageNotFoundError, version

from .config import DEFAULT_RECIPE, ColourSpec, EmbedConfig, LevelSpec, list_recipes, load_recipe
from .detections import Detections
from .embed import BoxEmbedder
from .embedder import Embedder
from .indexer import Indexer
from .memory import Memory
from .store import Store
from .tap import Tap, TapInfo, resolve_layers

try:
    __version__ = version("yolo-vq")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

__all__ = [
    "DEFAULT_RECIPE",
    "BoxEmbedder",
    "ColourSpec",
    "Detections",
    "EmbedConfig",
    "Embedder",
    "Indexer",
    "LevelSpec",
    "Memory",
    "Store",
    "Tap",
    "TapInfo",
    "__version__",
    "list_recipes",
    "load_recipe",
    "resolve_layers",
]
