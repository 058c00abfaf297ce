"""Quantizers that turn embeddings into a few bytes: product (PQ/OPQ), residual (RQ) and plain k-means (VQ).

All share :class:`Quantizer`: ``fit``, ``encode`` -> uint8/uint16 codes, ``decode``, ``code_size``,
``distance_tables`` (+ ``norms`` for RQ) for asymmetric distance search; files via :func:`save_codebook` /
:func:`load_codebook` (safetensors + JSON, never pickle).
"""

from .base import Quantizer, sample_training
from .coarse import CoarseQuantizer, load_coarse
from .io import (
    CodebookError,
    codebook_checksum,
    codebook_paths,
    fingerprint_module,
    load_codebook,
    save_coarse,
    save_codebook,
)
from .kmeans import KMeansResult, assign, kmeans
from .pq import ProductQuantizer
from .rq import ResidualQuantizer
from .vq import VectorQuantizer

__all__ = [
    "CoarseQuantizer",
    "CodebookError",
    "KMeansResult",
    "ProductQuantizer",
    "Quantizer",
    "ResidualQuantizer",
    "VectorQuantizer",
    "assign",
    "codebook_checksum",
    "codebook_paths",
    "fingerprint_module",
    "kmeans",
    "load_coarse",
    "load_codebook",
    "sample_training",
    "save_coarse",
    "save_codebook",
]
