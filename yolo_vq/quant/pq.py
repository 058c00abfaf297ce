"""Product quantizer (Jégou et al. 2011) with optional centering, PCA and OPQ rotation (Ge et al. 2013).

A vector x (D) is mapped to ``y = (x - mean) @ transform`` (D -> D', orthonormal columns), ``y`` is cut into ``m``
sub-vectors of D'/m dims and each is replaced by the index of its nearest of K (256) centroids: ``m`` bytes.
``transform`` is PCA (top ``pca_dim`` eigenvectors of the training covariance) times a random rotation times the OPQ
rotation (each optional), or the
identity; ``mean`` is the training mean when ``center`` or ``pca_dim`` is set, else zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .base import KMeansSettings, Quantizer
from .kmeans import assign

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

__all__ = ["ProductQuantizer"]


def _divisors(n: int, limit: int = 1 << 16) -> list[int]:
    """Divisors of ``n`` up to ``limit``: hints for an error message, which a dim of 10**12 + 1 must not hang."""
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


class ProductQuantizer(Quantizer):
    """``m`` sub-quantizers of ``codebook_size`` centroids each, trained together with batched k-means.

    Args:
        dim: input size D.
        m: sub-spaces; must divide ``pca_dim or dim``. Code: ``m`` bytes (uint8) per vector, or ``2 m`` (uint16) when
            ``codebook_size > 256``.
        codebook_size: centroids per sub-space K (default 256: 8-bit codes).
        center: subtract the training mean before quantizing.
        pca_dim: project onto the top ``pca_dim`` principal axes first (implies centering); ``pca_dim == dim``
            rotates without dropping dims. PCA alone piles the variance into the first sub-spaces: pair it with
            ``opq=True`` to spread it again.
        rotation: ``"random"`` applies a seeded random orthogonal rotation (after centering/PCA) so variance spreads
            evenly over the sub-spaces instead of following the embedding's block layout (stripes, colour bins);
            FAISS' ``RR`` transform, and the start point of its OPQ. ``None``: no rotation.
        rotation_blocks: ``[(start, stop), ...]`` disjoint dim ranges (of the centred/PCA space): with
            ``rotation="random"``, each block gets its own random rotation and dims outside every block stay on their
            axes (block-diagonal). For embeddings made of parts: ``fit_codebook`` rotates the channels of each pooled
            cell among themselves and the colour histogram as a whole (measured in docs/benchmarks.md). None: one
            block of all dims.
        opq: learn an orthogonal rotation by alternating PQ training and orthogonal Procrustes
            (R = U V^T from the SVD of Y^T Y_decoded), ``opq_iters`` rounds of ``opq_kmeans_iters`` k-means
            iterations each, warm-started; the final codebooks then get ``iters`` more iterations.
        iters, tol, init, max_train, seed: training settings (see :class:`Quantizer`; ``init="auto"`` is random rows
            per sub-space, as faiss, when ``m > 1``).

    Buffers: ``mean`` (D,), ``transform`` (D, D'), ``codebooks`` (m, K, D'/m), all float32.

    ``distance_tables(q)[i, j, k] = ||y_ij - codebooks[j, k]||^2`` with ``y = (q - mean) @ transform``, plus, in
    ``[:, 0, :]`` only, the query's energy outside the kept sub-space ``||q - mean||^2 - ||y||^2`` (zero unless
    PCA drops dims). Summing the ``m`` looked-up entries therefore gives ``||q - decode(codes)||^2`` exactly, with
    or without centering, PCA and rotation (orthonormal ``transform`` preserves distances in its span).
    """

    def __init__(
        self,
        *,
        dim: int,
        m: int,
        codebook_size: int = 256,
        center: bool = False,
        pca_dim: int | None = None,
        rotation: str | None = None,
        rotation_blocks: Sequence[tuple[int, int]] | None = None,
        opq: bool = False,
        opq_iters: int = 10,
        opq_kmeans_iters: int = 4,
        **settings: Unpack[KMeansSettings],
    ) -> None:
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"m must be a positive int, got {m!r}")
        if pca_dim is not None and (not isinstance(pca_dim, int) or not 1 <= pca_dim <= dim):
            raise ValueError(f"pca_dim must be an int in [1, dim={dim}] or None, got {pca_dim!r}")
        if rotation not in (None, "random"):
            raise ValueError(f"rotation must be None or 'random', got {rotation!r}")
        d_out = pca_dim or dim
        if d_out % m:
            near = sorted(_divisors(d_out), key=lambda v: abs(v - m))[:3]
            raise ValueError(
                f"D={d_out} ({'pca_dim' if pca_dim else 'dim'}) is not divisible by m={m}: choose m dividing D "
                f"(e.g. {sorted(near)}) or set pca_dim to a multiple of m (e.g. {max(m, d_out // m * m)})"
            )
        if rotation_blocks is not None:
            blocks = sorted((int(a), int(b)) for a, b in rotation_blocks)
            ok = rotation == "random" and blocks and all(0 <= a < b <= d_out for a, b in blocks) and all(
                b0 <= a1 for (_, b0), (a1, _) in pairwise(blocks))
            if not ok:
                raise ValueError(f"rotation_blocks={rotation_blocks!r} needs rotation='random' and disjoint ranges "
                                 f"(start, stop) with 0 <= start < stop <= {d_out}")
            rotation_blocks = blocks
        super().__init__(dim=dim, code_len=m, codebook_size=codebook_size, **settings)
        self.m, self.dim_out, self.dsub = m, d_out, d_out // m
        self.center, self.pca_dim, self.opq = bool(center or pca_dim), pca_dim, bool(opq)
        self.rotation, self.rotation_blocks = rotation, rotation_blocks
        self.opq_iters, self.opq_kmeans_iters = opq_iters, opq_kmeans_iters
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("transform", torch.eye(dim, d_out))
        self.register_buffer("codebooks", torch.zeros(m, codebook_size, self.dsub))

    @property
    def _rotates(self) -> bool:
        return self.pca_dim is not None or self.opq or self.rotation is not None

    # -- transform -----------------------------------------------------------------------------------------------
    def _project(self, x: Tensor) -> Tensor:
        """(n, D) -> (n, D') in the quantized space."""
        if self.center:
            x = x - self.mean
        if not self._rotates:
            return x
        if self.rotation_blocks and self.pca_dim is None and not self.opq:
            return self._project_blocks(x)
        return x @ self.transform

    def _project_blocks(self, x: Tensor) -> Tensor:
        """``x @ transform`` for a block-diagonal transform (``rotation_blocks``, no PCA or OPQ), block by block: a run
        of k equal blocks of size s is one (k, n, s) @ (k, s, s) product, dims outside the blocks pass unchanged. In
        an exported graph the weights shrink to the blocks (1088-d default recipe: 3.2x fewer than the dense matrix)."""
        parts, at, runs = [], 0, []
        for lo, hi in self.rotation_blocks:
            if runs and runs[-1][1] == lo and hi - lo == runs[-1][2]:
                runs[-1][1] = hi
            else:
                runs.append([lo, hi, hi - lo])
        for lo, hi, s in runs:
            if lo > at:
                parts.append(x[:, at:lo])
            k = (hi - lo) // s
            if k == 1:  # a plain 2-D product (onnxruntime pre-packs its constant weights)
                parts.append(x[:, lo:hi] @ self.transform[lo:hi, lo:hi])
            else:
                w = torch.stack([self.transform[a : a + s, a : a + s] for a in range(lo, hi, s)])  # (k, s, s)
                y = torch.matmul(x[:, lo:hi].reshape(-1, k, s).transpose(0, 1), w)  # (k, n, s)
                parts.append(y.transpose(0, 1).reshape(-1, hi - lo))
            at = hi
        if at < self.dim:
            parts.append(x[:, at:])
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def _split(self, y: Tensor) -> Tensor:
        """(n, D') -> (m, n, D'/m) sub-vectors, one batch per sub-space."""
        return y.reshape(-1, self.m, self.dsub).transpose(0, 1)

    def _fit(self, x: Tensor) -> dict[str, Any]:
        stats = {}
        if self.center:
            self.mean.copy_(x.mean(0))
        y = x - self.mean if self.center else x
        t = torch.eye(self.dim, self.dim_out, device=x.device)
        dropped = 0.0  # mean energy outside the PCA sub-space: part of the reconstruction error
        if self.pca_dim is not None:
            evals, evecs = torch.linalg.eigh((y.T @ y).double())  # D x D: float64 only where it is cheap
            p = evecs.flip(1)[:, : self.pca_dim]
            p = p * torch.sign(p[p.abs().argmax(0), torch.arange(p.shape[1], device=x.device)])  # fixed signs
            t = p.float()
            stats["pca_energy_kept"] = float(evals.flip(0)[: self.pca_dim].sum() / evals.sum().clamp_min(1e-30))
            norm2 = y.pow(2).sum(1)
            y = y @ t
            dropped = float((norm2 - y.pow(2).sum(1)).clamp_min(0).mean())
        if self.rotation == "random":
            g = torch.Generator().manual_seed(self.seed)
            rot = torch.eye(self.dim_out, device=x.device)
            for lo, hi in self.rotation_blocks or [(0, self.dim_out)]:
                q, r = torch.linalg.qr(torch.randn(hi - lo, hi - lo, generator=g, dtype=torch.float64))
                rot[lo:hi, lo:hi] = (q * torch.sign(torch.diagonal(r))).float().to(x.device)  # Haar, fixed signs
            t, y = t @ rot, y @ rot
        cb: Tensor | str = self.init
        if self.opq:
            r = torch.eye(self.dim_out, device=x.device, dtype=torch.float64)
            for it in range(self.opq_iters):
                z = y @ r.float()
                km = self._kmeans(
                    self._split(z).contiguous(), iters=self.opq_kmeans_iters, tol=0, init=cb, seed=self.seed + it
                )
                cb = km.centroids
                zhat = cb[torch.arange(self.m, device=x.device).unsqueeze(1), km.assignments]  # (m, n, dsub)
                zhat = zhat.transpose(0, 1).reshape(-1, self.dim_out)
                u, _, vh = torch.linalg.svd((y.T @ zhat).double())  # orthogonal Procrustes: R = U V^T
                r = u @ vh
            t = t @ r.float()
            y = y @ r.float()
        km = self._kmeans(self._split(y).contiguous(), init=cb)
        self.transform.copy_(t)
        self.codebooks.copy_(km.centroids)
        return {
            **stats,
            "kmeans_iterations": km.iterations,
            "kmeans_reseeded": km.reseeded,
            "distortion": km.distortion + dropped,  # the transform is orthonormal: errors add up
        }

    # -- coding --------------------------------------------------------------------------------------------------
    def _encode(self, x: Tensor) -> Tensor:
        """``(n, m)`` codes: brute-force nearest centroid per sub-space, one ``bmm`` over the sub-spaces (ONNX opset
        18)."""
        idx, _ = assign(self._split(self._project(x)), self.codebooks, with_distance=False)  # (m, n)
        return idx.transpose(0, 1)

    def _decode(self, codes: Tensor) -> Tensor:
        """``(n, m)`` codes -> ``(n, dim)``, back in the input space."""
        y = self.codebooks[torch.arange(self.m, device=codes.device), codes].reshape(-1, self.dim_out)  # (n, m, dsub)
        if self._rotates:
            y = y @ self.transform.T
        return y + self.mean if self.center else y

    def _distance_tables(self, query: Tensor) -> Tensor:
        """``(q, m, K)``; see the class docstring for exactly what they hold."""
        y = self._project(query)
        z = self._split(y)  # (m, q, dsub)
        cn = self.codebooks.pow(2).sum(-1).unsqueeze(1)  # (m, 1, K)
        t = torch.baddbmm(cn, z, self.codebooks.transpose(1, 2), alpha=-2.0) + z.pow(2).sum(-1, keepdim=True)
        t = t.clamp_min(0).transpose(0, 1).contiguous()  # (q, m, K)
        if self.dim_out < self.dim:
            qc = query - self.mean
            t[:, 0, :] += (qc.pow(2).sum(-1) - y.pow(2).sum(-1)).clamp_min(0).unsqueeze(-1)
        return t
