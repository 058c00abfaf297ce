"""Plain vector quantizer: one k-means codebook of up to 65536 entries over the whole vector."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import ArrayLike, Quantizer
from .kmeans import assign, check_init, fp32, kmeans

__all__ = ["VectorQuantizer"]


class VectorQuantizer(Quantizer):
    """Nearest of ``codebook_size`` centroids; one code per vector, uint8 when K <= 256 else uint16.

    Args:
        dim: input size D.
        codebook_size: K in [1, 65536]; training needs at least K vectors.
        iters, tol, init: k-means settings (see :func:`yolo_vq.quant.kmeans`).
        max_train: rows sampled for training (bottom-k reservoir over the stream; None keeps all).
        seed: seeds sampling and k-means initialisation.

    Buffer: ``codebook`` (K, D) float32.

    ``distance_tables(q)[i, 0, k] = ||q_i - codebook[k]||^2``: the full squared distance, ``norms`` are zero.
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        iters: int = 25,
        tol: float = 1e-4,
        init: str = "auto",
        max_train: int | None = 256_000,
        seed: int = 0,
    ) -> None:
        super().__init__(dim=dim, code_len=1, codebook_size=codebook_size, max_train=max_train, seed=seed)
        check_init(init)
        self.iters, self.tol, self.init = iters, tol, init
        self.register_buffer("codebook", torch.zeros(codebook_size, dim))

    def config(self) -> dict[str, Any]:
        names = ("dim", "codebook_size", "iters", "tol", "init", "max_train", "seed")
        return {k: getattr(self, k) for k in names}

    def _fit(self, x: Tensor) -> dict[str, Any]:
        if x.shape[0] < self.codebook_size:
            raise ValueError(
                f"training needs at least codebook_size={self.codebook_size} vectors, got {x.shape[0]}: "
                "pass more data or lower codebook_size"
            )
        km = kmeans(x, self.codebook_size, iters=self.iters, tol=self.tol, init=self.init, seed=self.seed)
        self.codebook.copy_(km.centroids)
        return {"kmeans_iterations": km.iterations, "kmeans_reseeded": km.reseeded, "distortion": km.distortion}

    def encode(self, x: ArrayLike) -> Tensor:
        """``(n, dim)`` float -> ``(n, 1)`` uint8/uint16 index of the nearest centroid. ONNX-exportable."""
        x = self._input(x)
        with fp32(x.device):
            idx, _ = assign(x, self.codebook, with_distance=False)
        return idx.unsqueeze(1).to(self.code_dtype)

    def decode(self, codes: ArrayLike) -> Tensor:
        """``(n, 1)`` integer codes -> ``(n, dim)`` float32 centroids."""
        return self.codebook[self._codes(codes)[:, 0]]

    def distance_tables(self, query: ArrayLike) -> Tensor:
        """``(q, dim)`` -> ``(q, 1, K)`` float32 squared distances to every centroid."""
        q = self._input(query, "query")
        with fp32(q.device):
            t = torch.addmm(self.codebook.pow(2).sum(-1), q, self.codebook.T, alpha=-2.0)
            t = (t + q.pow(2).sum(-1, keepdim=True)).clamp_min(0)
        return t.unsqueeze(1)
