"""Stage 1, frames -> per-detection embeddings: forward hooks on the model (:mod:`.tap`), pooling of boxes on the
tapped maps as plain tensor ops (:mod:`.pool`), and the Ultralytics callbacks that attach embeddings and codes to
every result (:mod:`.embedder`)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["BoxEmbedder", "Embedder", "Tap", "TapInfo", "resolve_layers"]

_EXPORTS = {"BoxEmbedder": "pool", "Embedder": "embedder", "Tap": "tap", "TapInfo": "tap", "resolve_layers": "tap"}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
