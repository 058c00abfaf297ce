"""Plain vector quantizer: one k-means codebook of up to 65536 entries over the whole vector."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .base import KMeansSettings, Quantizer
from .kmeans import assign

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

__all__ = ["VectorQuantizer"]


class VectorQuantizer(Quantizer):
    """Nearest of ``codebook_size`` centroids; one code per vector, uint8 when K <= 256 else uint16.

    Args:
        dim: input size D.
        codebook_size: K in [1, 65536]; training needs at least K vectors.
        iters, tol, init, max_train, seed: training settings (see :class:`Quantizer`).

    Buffer: ``codebook`` (K, D) float32.

    ``distance_tables(q)[i, 0, k] = ||q_i - codebook[k]||^2``: the full squared distance, ``norms`` are zero.
    """

    def __init__(self, *, dim: int, codebook_size: int, **settings: Unpack[KMeansSettings]) -> None:
        super().__init__(dim=dim, code_len=1, codebook_size=codebook_size, **settings)
        self.register_buffer("codebook", torch.zeros(codebook_size, dim))

    def _fit(self, x: Tensor) -> dict[str, Any]:
        km = self._kmeans(x)
        self.codebook.copy_(km.centroids)
        return {"kmeans_iterations": km.iterations, "kmeans_reseeded": km.reseeded, "distortion": km.distortion}

    def _encode(self, x: Tensor) -> Tensor:
        """``(n, 1)`` index of the nearest centroid."""
        idx, _ = assign(x, self.codebook, with_distance=False)
        return idx.unsqueeze(1)

    def _decode(self, codes: Tensor) -> Tensor:
        """``(n, 1)`` codes -> ``(n, dim)`` centroids."""
        return self.codebook[codes[:, 0]]

    def _distance_tables(self, query: Tensor) -> Tensor:
        """``(q, 1, K)`` squared distances to every centroid."""
        t = torch.addmm(self.codebook.pow(2).sum(-1), query, self.codebook.T, alpha=-2.0)
        t = (t + query.pow(2).sum(-1, keepdim=True)).clamp_min(0)
        return t.unsqueeze(1)
