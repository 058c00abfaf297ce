"""Stage 3, codes -> a searchable memory: the store (:mod:`.store`: sources, frames, detections, codes, the codebook
binding; SQLite), the indexing job that writes it (:mod:`.indexer`), the ADC scan over stored codes (:mod:`.scan`),
an index opened for search (:mod:`.memory`) and stored crops and pictures of results (:mod:`.thumbs`)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["ENGINES", "PREFER", "Indexer", "Memory", "Store", "open_store"]

ENGINES = ("auto", "faiss", "numpy")  # code scan engines (:class:`.scan.CodeScan`); here so the CLI needs no torch
PREFER = ("video", "thumbs")  # where result pictures come from (:func:`.thumbs.pictures`); here for the same reason

_EXPORTS = {"Indexer": "indexer", "Memory": "memory", "Store": "store", "open_store": "registry"}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
