"""Residual quantizer (Juang & Gray 1982; beam encoding as in faiss ``ResidualQuantizer``, Babenko & Lempitsky 2014).

Level l quantizes what levels 0..l-1 left over: ``x ~ sum_l codebooks[l, codes[l]]``, one byte per level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._tensor import exporting
from .base import ArrayLike, KMeansSettings, Quantizer
from .kmeans import _CHUNK_BYTES, assign

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

__all__ = ["ResidualQuantizer"]


class ResidualQuantizer(Quantizer):
    """``levels`` full-dimension codebooks of ``codebook_size`` centroids, applied to successive residuals.

    Args:
        dim: input size D.
        levels: stages; code of ``levels`` bytes (uint8) per vector, ``2 * levels`` when ``codebook_size > 256``.
        codebook_size: centroids per level K (default 256).
        beam_size: 1 encodes greedily (nearest centroid per level); B > 1 keeps the B best partial encodings per
            vector at every level (distortion <= greedy on average, cost ~B times). Overridable per ``encode`` call.
        iters, tol, init, max_train, seed: training settings (see :class:`Quantizer`; level l seeds k-means with
            ``seed + l``).

    Training is greedy: level l is k-means on the residuals of levels < l.

    Buffer: ``codebooks`` (levels, K, D) float32.

    ADC (``needs_norms = True``): ``||q - x||^2 = ||q||^2 - 2 sum_l <q, c_l> + ||sum_l c_l||^2``.
    ``distance_tables(q)[i, l, k] = -2 <q_i, codebooks[l, k]>``, plus ``||q_i||^2`` in ``[:, 0, :]`` only;
    ``norms(codes) = ||decode(codes)||^2`` (store it, e.g. as float32, next to each code at encode time). Summed
    lookups + norm equal ``||q - decode(codes)||^2`` up to float cancellation.
    """

    needs_norms = True

    def __init__(
        self,
        *,
        dim: int,
        levels: int,
        codebook_size: int = 256,
        beam_size: int = 1,
        **settings: Unpack[KMeansSettings],
    ) -> None:
        if not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be a positive int, got {levels!r}")
        _check_beam(beam_size)
        super().__init__(dim=dim, code_len=levels, codebook_size=codebook_size, **settings)
        self.levels, self.beam_size = levels, beam_size
        self.register_buffer("codebooks", torch.zeros(levels, codebook_size, dim))

    def _fit(self, x: Tensor) -> dict[str, Any]:
        r, per_level, reseeded = x.clone(), [], 0
        for level in range(self.levels):
            km = self._kmeans(r, seed=self.seed + level)
            self.codebooks[level].copy_(km.centroids)
            r -= km.centroids[km.assignments]  # k-means' last assignment is the greedy encoding
            per_level.append(km.distortion)
            reseeded += km.reseeded
        stats = {"greedy_distortion_per_level": per_level, "kmeans_reseeded": reseeded}
        return {**stats, "distortion": per_level[-1]} if self.beam_size == 1 else stats

    # -- coding --------------------------------------------------------------------------------------------------
    def encode(self, x: ArrayLike, *, beam_size: int | None = None) -> Tensor:
        """``(n, dim)`` float -> ``(n, levels)`` uint8 codes (uint16 if K > 256). ONNX-exportable (a fixed loop
        over levels; beam search uses TopK). ``beam_size`` overrides the constructor's for this call."""
        return super().encode(x, beam_size=beam_size)

    def _encode(self, x: Tensor, *, beam_size: int | None = None) -> Tensor:
        beam = self.beam_size if beam_size is None else _check_beam(beam_size)
        if beam == 1:
            return self._greedy(x)
        if exporting():
            return self._beam(x, beam)
        rows = max(64, _CHUNK_BYTES // (4 * beam * self.codebook_size))
        return torch.cat([self._beam(xs, beam) for xs in x.split(rows)] or [self._beam(x, beam)])

    def _greedy(self, x: Tensor) -> Tensor:
        r, codes = x, []
        for level in range(self.levels):
            idx, _ = assign(r, self.codebooks[level], with_distance=False)
            r = r - self.codebooks[level][idx]
            codes.append(idx)
        return torch.stack(codes, 1)

    def _beam(self, x: Tensor, beam: int) -> Tensor:
        """Beam search: keep the ``beam`` lowest-error partial codes per vector at each level."""
        k = self.codebook_size
        r = x.unsqueeze(1)  # (n, b, D) residuals of the kept candidates, b = 1 at the start
        err = r.pow(2).sum(-1)  # (n, b)
        codes, nb = None, 1  # (n, b, level) codes of the candidates; nb = b as a Python int (fixed in the graph)
        for level in range(self.levels):
            c = self.codebooks[level]
            d = err.unsqueeze(-1) - 2.0 * (r @ c.T) + c.pow(2).sum(-1)  # (n, b, K) error after adding c_k
            nb = min(beam, nb * k)
            _, flat = d.flatten(1).topk(nb, dim=1, largest=False)  # (n, nb)
            parent, idx = flat // k, flat % k
            r = torch.gather(r, 1, parent.unsqueeze(-1).expand(-1, -1, self.dim)) - c[idx]
            new = idx.unsqueeze(-1)
            codes = (
                new
                if codes is None
                else torch.cat([torch.gather(codes, 1, parent.unsqueeze(-1).expand(-1, -1, level)), new], -1)
            )
            err = r.pow(2).sum(-1)  # recomputed, not accumulated, so rounding does not drift
        best = err.argmin(1)
        return torch.gather(codes, 1, best.view(-1, 1, 1).expand(-1, 1, self.levels)).squeeze(1)

    def _decode(self, codes: Tensor) -> Tensor:
        """``(n, levels)`` codes -> ``(n, dim)``, the sum of the chosen centroids."""
        return self.codebooks[torch.arange(self.levels, device=codes.device), codes].sum(1)

    def _distance_tables(self, query: Tensor) -> Tensor:
        """``(q, levels, K)``: ``-2 <q, c_lk>``, ``+ ||q||^2`` in level 0 (class docstring)."""
        t = -2.0 * torch.einsum("qd,lkd->qlk", query, self.codebooks)
        t[:, 0, :] += query.pow(2).sum(-1, keepdim=True)
        return t

    def _norms(self, codes: Tensor) -> Tensor:
        """``||decode(codes)||^2``, ``(n,)`` float32: the per-vector term of the ADC distance."""
        return self._decode(codes).pow(2).sum(-1)


def _check_beam(beam_size: int) -> int:
    if not isinstance(beam_size, int) or isinstance(beam_size, bool) or beam_size < 1:
        raise ValueError(f"beam_size must be an int >= 1 (1 = greedy), got {beam_size!r}")
    return beam_size
