"""k-means in torch, batched over independent sub-problems.

One call trains ``b`` codebooks at once (the ``m`` sub-spaces of a product quantizer) with ``bmm``, the way
faiss ``contrib/torch/clustering.py`` trains one: ``||x - c||^2 = ||x||^2 - 2 (x.c - ||c||^2 / 2)``, the bracket
for all centroids in one GEMM over chunks of rows (never an ``n x k x d`` tensor), float32 with autocast off.
Empty clusters are re-seeded explicitly (faiss ``Clustering.cpp`` splits the largest cluster; here the rows worst
served by the current centroids are taken, farthest-first, which also separates duplicated rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ._tensor import as_tensor, exporting, fp32

__all__ = ["KMeansResult", "assign", "check_init", "exporting", "fp32", "kmeans"]  # exporting, fp32: as before

_INITS = ("auto", "kmeans++", "random")

# Bytes of scores computed per chunk of rows: large enough that Python overhead per chunk is small, small enough
# to stay in cache (measured on a 2-core Xeon: 16-32 MiB best for PQ training).
_CHUNK_BYTES = 1 << 24


def check_init(init: object) -> None:
    """Raise ValueError unless ``init`` names a k-means initialisation."""
    if not isinstance(init, Tensor) and init not in _INITS:
        raise ValueError(f"init must be one of {_INITS} or a tensor of centroids, got {init!r}")


def _augment(x: Tensor) -> Tensor:
    """(b, n, d) -> (b, n, d + 1) with a trailing column of ones."""
    return torch.cat([x, torch.ones_like(x[..., :1])], -1)


def _scorer(centroids: Tensor) -> Tensor:
    """(b, k, d) -> (b, d + 1, k): ``[c, -||c||^2 / 2]^T`` so that ``_augment(x) @ scorer = x.c - ||c||^2 / 2``,
    whose argmax is the nearest centroid (``||x - c||^2 = ||x||^2 - 2 (x.c - ||c||^2 / 2)``) in one GEMM."""
    return torch.cat([centroids, -0.5 * centroids.pow(2).sum(-1, keepdim=True)], -1).transpose(1, 2)


def _nearest(
    xa: Tensor, scorer: Tensor, chunk_size: int | None = None, prev: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Nearest centroid from augmented rows ``(b, n, d+1)`` and ``_scorer`` ``(b, d+1, k)``.

    Returns ``(index (b, n) int64, best score (b, n) float32)``; the score is None while exporting (one matmul +
    argmax then, so the batch dimension stays dynamic in the graph). With ``prev`` (the last k-means assignment)
    only rows whose previous centroid stopped being the best get an index search: on CPU the values-only ``amax``
    is vectorised while index-tracking ``max`` is not, and after a few Lloyd iterations few rows move. Ties keep
    ``prev``; without it they go to the lowest index.
    """
    if exporting():
        return (xa @ scorer).argmax(-1), None
    b, n, _ = xa.shape
    k = scorer.shape[2]
    rows = max(1, min(n, chunk_size or _CHUNK_BYTES // (4 * b * k)))
    buf = torch.empty(b * rows * k, device=xa.device)  # reused: allocating every chunk costs page faults
    idx = torch.empty(b, n, dtype=torch.int64, device=xa.device)
    best = torch.empty(b, n, device=xa.device)
    if prev is not None:
        kept = torch.empty(b, n, 1, device=xa.device)  # score of the previous centroid
    for s in range(0, n, rows):
        r = min(rows, n - s)
        scores = torch.bmm(xa[:, s : s + r], scorer, out=buf[: b * r * k].view(b, r, k))
        if prev is None:
            torch.max(scores, -1, out=(best[:, s : s + r], idx[:, s : s + r]))
        else:
            torch.amax(scores, -1, out=best[:, s : s + r])
            torch.gather(scores, 2, prev[:, s : s + r].unsqueeze(-1), out=kept[:, s : s + r])
    if prev is not None:
        idx.copy_(prev)
        moved = kept.squeeze(-1) < best  # (b, n): the previous centroid is no longer the nearest
        for j, count in enumerate(moved.sum(1).tolist()):
            if count:
                r = moved[j].nonzero().squeeze(1)
                idx[j].index_copy_(0, r, (xa[j].index_select(0, r) @ scorer[j]).max(-1)[1])
    return idx, best


def assign(
    x: Tensor, centroids: Tensor, *, with_distance: bool = True, chunk_size: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """Nearest centroid of every row, in chunks of rows (no ``n x k x d`` tensor, at most ~16 MiB of scores).

    Args:
        x: ``(n, d)`` or ``(b, n, d)`` float32.
        centroids: ``(k, d)`` or ``(b, k, d)`` float32, same leading ``b`` as ``x``.
        with_distance: also return the squared distance to the nearest centroid (computed exactly as
            ``||x - c||^2`` for the chosen centroid).
        chunk_size: rows per chunk; ignored while exporting (one matmul + argmax, dynamic batch).

    Returns:
        ``(index, distance)``: int64 and float32 tensors of shape ``(n,)`` or ``(b, n)``; ``distance`` is None
        when ``with_distance`` is False. Ties go to the lowest index.
    """
    squeeze = x.dim() == 2
    if squeeze:
        x, centroids = x.unsqueeze(0), centroids.unsqueeze(0)
    idx, _ = _nearest(_augment(x), _scorer(centroids), chunk_size)
    dist = _sq_dist(x, centroids, idx) if with_distance else None
    if squeeze:
        idx = idx.squeeze(0)
        dist = dist.squeeze(0) if dist is not None else None
    return idx, dist


def _sq_dist(x: Tensor, centroids: Tensor, idx: Tensor) -> Tensor:
    """||x - centroids[idx]||^2 per row: (b, n, d), (b, k, d), (b, n) -> (b, n)."""
    # one sub-problem at a time: (b, n, d) temporaries would cost more in page faults than in arithmetic
    return torch.stack([(xj - cj.index_select(0, ij)).pow_(2).sum(-1) for xj, cj, ij in zip(x, centroids, idx)])


@dataclass
class KMeansResult:
    """Output of :func:`kmeans`.

    Attributes:
        centroids: ``(k, d)`` or ``(b, k, d)`` float32, on the input's device.
        assignments: ``(n,)`` or ``(b, n)`` int64: nearest of the returned centroids for every row.
        distances: ``(n,)`` or ``(b, n)`` float32: squared distance of every row to its assigned centroid.
        distortion: mean over rows of ``distances``, summed over the ``b`` sub-problems (for a PQ: the
            reconstruction error per vector).
        iterations: assignment + update steps run (one more assignment follows them).
        reseeded: empty clusters re-seeded, all iterations together.
        history: distortion at every assignment step, the last one included.
    """

    centroids: Tensor
    assignments: Tensor
    distances: Tensor
    distortion: float
    iterations: int
    reseeded: int
    history: list[float] = field(default_factory=list)


def _as_batched(x, name: str) -> Tensor:
    x = as_tensor(x, name, "(n, d) or (b, n, d)")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be (n, d) or (b, n, d), got shape {tuple(x.shape)}")
    return x.unsqueeze(0) if x.dim() == 2 else x


def _init_random(x: Tensor, k: int, g: torch.Generator) -> Tensor:
    b, n, _ = x.shape
    idx = torch.rand(b, n, generator=g, device=x.device).topk(k, dim=1).indices  # k distinct rows per sub-problem
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))


def _init_kmeanspp(x: Tensor, k: int, g: torch.Generator, max_points: int) -> Tensor:
    """k-means++ (Arthur & Vassilvitskii 2007) on a seeded subsample of at most ``max_points`` rows."""
    b, n, d = x.shape
    if n > max_points:
        x = _init_random(x, max_points, g)
    ar = torch.arange(b, device=x.device)
    c = x.new_empty(b, k, d)
    xn = x.pow(2).sum(-1)  # (b, n)
    pick = torch.randint(x.shape[1], (b,), generator=g, device=x.device)
    d2 = torch.full_like(xn, float("inf"))
    for j in range(k):
        if j:
            # all-zero weights (fewer distinct rows than k): uniform; the duplicate centroid is re-seeded later
            cdf = (d2 + (d2.sum(1, keepdim=True) <= 0).float()).cumsum(1)  # (b, n); sampling by inverse CDF
            u = torch.rand(b, 1, generator=g, device=x.device) * cdf[:, -1:]
            pick = torch.searchsorted(cdf, u).squeeze(1).clamp_max_(x.shape[1] - 1)
        cj = x[ar, pick]  # (b, d)
        c[:, j] = cj
        # ||x - c||^2 via one matvec per sub-problem (memory-bound pass over x, no (b, n, d) temporary)
        dj = torch.baddbmm((xn + cj.pow(2).sum(-1, keepdim=True)).unsqueeze(-1), x, cj.unsqueeze(-1), alpha=-2.0)
        torch.minimum(d2, dj.squeeze(-1).clamp_min_(0), out=d2)
    return c


class _Sums:
    """Per-cluster sums and counts of the assigned rows, updated with the rows that changed cluster only.

    After the first Lloyd iterations few rows move, so this is much cheaper than summing all rows every time;
    sums are kept in float64 (float32 on MPS) so the running updates do not drift from the exact means.
    """

    def __init__(self, x: Tensor, k: int) -> None:
        b, n, d = x.shape
        self.x, self.k, self.flat = x.reshape(b * n, d), k, None
        self.offset = torch.arange(b, device=x.device).unsqueeze(1) * k
        self.dtype = torch.float32 if x.device.type == "mps" else torch.float64

    def means(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """Assignment (b, n) -> (centroids (b, k, d) float32 with zeros for empty clusters, counts (b, k))."""
        flat = (a + self.offset).reshape(-1)
        b, bk = a.shape[0], self.offset.numel() * self.k
        if self.flat is None:
            self.sums = torch.zeros(bk, self.x.shape[1], device=self.x.device).index_add_(0, flat, self.x)
            self.sums, self.counts = self.sums.to(self.dtype), torch.bincount(flat, minlength=bk)
        else:
            moved = (flat != self.flat).nonzero().squeeze(1)
            if moved.numel():
                xm, new, old = self.x.index_select(0, moved).to(self.dtype), flat[moved], self.flat[moved]
                self.sums.index_add_(0, new, xm).index_add_(0, old, xm, alpha=-1)
                self.counts += torch.bincount(new, minlength=bk) - torch.bincount(old, minlength=bk)
        self.flat = flat
        c = self.sums / self.counts.clamp_min(1).unsqueeze(1)
        return c.to(torch.float32).view(b, self.k, -1), self.counts.view(b, self.k)


def _update(x: Tensor, a: Tensor, dist: Tensor, sums: _Sums, farthest_first: int = 64) -> tuple[Tensor, int]:
    """Centroids as means of their rows; empty clusters take the rows worst served so far.

    Up to ``farthest_first`` empty clusters per sub-problem are filled one at a time, each pick lowering the error
    of the rows it now serves (so copies of one row are not picked twice); beyond that, the worst rows are taken
    at once and any duplicate left empty is re-seeded again at the next iteration.
    """
    c, counts = sums.means(a)
    empty = counts == 0
    reseeded = 0
    for bi in empty.any(1).nonzero().flatten().tolist():
        slots = empty[bi].nonzero().flatten()
        reseeded += slots.numel()
        if slots.numel() > farthest_first:
            c[bi, slots] = x[bi, dist[bi].topk(slots.numel()).indices]
            continue
        err = dist[bi].clone()
        for j in slots.tolist():
            i = int(err.argmax())
            c[bi, j] = x[bi, i]
            err = torch.minimum(err, (x[bi] - x[bi, i]).pow(2).sum(-1))
    return c, reseeded


def kmeans(
    x: Tensor | np.ndarray,
    k: int,
    *,
    iters: int = 25,
    tol: float = 1e-4,
    init: str | Tensor = "auto",
    seed: int = 0,
    max_init_points: int | None = None,
    chunk_size: int | None = None,
) -> KMeansResult:
    """Lloyd's k-means on ``(n, d)`` rows, or on ``b`` independent sets of rows at once.

    Args:
        x: ``(n, d)`` or ``(b, n, d)`` float array (numpy or torch); computed in float32 on ``x``'s device.
        k: centroids per sub-problem; needs ``n >= k``.
        iters: maximum assignment + update iterations.
        tol: stop when the distortion falls by less than ``tol`` (relative) in one iteration; 0 runs all ``iters``.
        init: ``"kmeans++"``, ``"random"`` (k distinct rows, as faiss), ``"auto"`` (k-means++ for a single problem
            with k <= 1024, else random: k-means++ takes k sequential passes, which low-dimensional PQ sub-spaces
            do not repay) or a ``(k, d)`` / ``(b, k, d)`` tensor to warm-start from.
        seed: seeds the ``torch.Generator`` used for initialisation; same seed, input and device -> same result
            (bit for bit on CPU; CUDA's atomic ``index_add_`` may change the last bits of the first cluster sums).
        max_init_points: k-means++ runs on a seeded subsample of this many rows (default ``16 * k``).
        chunk_size: rows per distance chunk (default: about 16 MiB of scores).

    Returns:
        :class:`KMeansResult`; ``centroids`` has ``x``'s leading shape: ``(k, d)`` or ``(b, k, d)``.
    """
    batched = isinstance(x, (Tensor, np.ndarray)) and x.ndim == 3
    xb = _as_batched(x, "x")
    b, n, d = xb.shape
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if n < k:
        raise ValueError(f"k-means needs at least k={k} training rows, got n={n}: pass more data or lower k")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    g = torch.Generator(device=xb.device).manual_seed(seed)
    with fp32(xb.device):
        if isinstance(init, Tensor):
            c = init.to(xb.device, torch.float32).reshape(b, k, d).clone() if init.numel() == b * k * d else None
            if c is None:
                raise ValueError(f"init tensor must be ({b}, {k}, {d}) or ({k}, {d}), got {tuple(init.shape)}")
        elif init == "kmeans++" or (init == "auto" and b == 1 and k <= 1024):
            c = _init_kmeanspp(xb, k, g, max_init_points or 16 * k)
        else:
            check_init(init)
            c = _init_random(xb, k, g)
        history: list[float] = []
        reseeded = 0
        xa, xn, sums = _augment(xb), xb.pow(2).sum(-1), _Sums(xb, k)
        a: Tensor | None = None
        for it in range(iters):
            a, best = _nearest(xa, _scorer(c), chunk_size, prev=a)
            dist = (xn - 2 * best).clamp_min_(0)  # ||x - c||^2 = ||x||^2 - 2 (x.c - ||c||^2 / 2)
            history.append(float(dist.mean(1).sum()))
            c, r = _update(xb, a, dist, sums)
            reseeded += r
            if tol > 0 and it > 0 and r == 0 and history[-2] - history[-1] <= tol * history[-2]:
                break
        steps = len(history)
        # a last assignment so that assignments and distortion describe the returned centroids
        a, _ = _nearest(xa, _scorer(c), chunk_size, prev=a)
        dist = _sq_dist(xb, c, a)
        history.append(float(dist.mean(1).sum()))
    if not batched:
        c, a, dist = c.squeeze(0), a.squeeze(0), dist.squeeze(0)
    return KMeansResult(c, a, dist, history[-1], steps, reseeded, history)
