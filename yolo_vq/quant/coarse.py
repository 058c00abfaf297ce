"""The coarse quantizer of partitioned (IVF) search: which list a detection goes to, which lists a query scans.

Vectors (D, the embedding) are projected to a reduced space, ``z = (x - mean) @ proj`` (``proj`` (D, d): the top
``d`` principal axes of the training vectors), and assigned to the nearest of ``lists`` k-means centroids there.
The reduced space keeps the assignment cheap (``d = 64`` against 1088-d embeddings: the projection is one small GEMM,
the centroid search ~d/D of the work), and it is only used to *partition*: distances stay the product quantizer's
own ADC distances over the codes, which the coarse quantizer never changes (PQ codes are not residuals of the list
centroid, so codes from edge devices and older indexes are valid in every list).

- ``assign(x)``: the list of each stored vector; exact nearest centroid (FAISS ``IndexFlatL2``) up to
  :data:`NESTED_ABOVE` lists; above, an inverted file over the centroids themselves (FAISS ``IndexIVFFlat``: the
  centroids k-means-clustered into ``4 sqrt(lists)`` groups, the :data:`NESTED_NPROBE` nearest groups searched), so
  adding detections does not slow down with the list count.
- ``probe(x, nprobe)``: the ``nprobe`` nearest lists of each query, exact (flat over the centroids: a query is one
  ``lists x d`` product), nearest first.

Files: ``<codebook stem>.coarse.safetensors`` (``mean`` (D,), ``proj`` (D, d), ``centroids`` (lists, d), float32),
listed in the codebook's JSON under ``"coarse"`` with its sha256. The product quantizer's own tensor file and its
checksum (what indexes and exported graphs identify the codebook by) are unchanged by adding one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ..errors import CodebookError
from .files import bytes_sha256, coarse_path, codebook_paths

__all__ = ["NESTED_ABOVE", "CoarseQuantizer", "coarse_path", "load_coarse", "supported_lists"]

NESTED_ABOVE = 4096  # lists above which assign() searches an inverted file of the centroids instead of all of them
# Groups of centroids searched per vector. On the 16,384 lists of the search_scale benchmark (65k of its vectors, one
# thread, per vector): 512 groups, 4 searched: 3.8 us, the exact nearest list for 99.20% (8: 6.1 us, 99.83%; 6: 4.9 us,
# 99.66%); the HNSW graph used before (M 32, efSearch 16): 9.4 us, 99.71%; exact: ~36 us. Measured with an ad-hoc
# script. A row off its nearest list lies in a neighbouring one, which a query near it probes too: the 10M benchmark's
# recall@10 at the calibrated nprobe went from 0.9875 (8 searched) to 0.9865 (4), the bulk add rate up by ~2 us a row.
NESTED_NPROBE = 4
MIN_PER_LIST = 16  # training vectors per list at least: k-means with fewer leaves lists empty or degenerate
FORMAT = 1


def supported_lists(n_train: int, requested: int | str = "auto") -> int:
    """The list count for ``n_train`` training vectors: ``requested`` (an int), capped at what the data supports
    (:data:`MIN_PER_LIST` vectors per list), or with ``"auto"`` the power of two nearest ``4 sqrt(n_train)`` within that
    cap (FAISS' guideline ``4 sqrt(N)`` to ``16 sqrt(N)`` lists, N the rows to be searched: a codebook is fitted on a
    sample of what it will index). At least 1."""
    cap = max(1, n_train // MIN_PER_LIST)
    if requested == "auto":
        want = 2 ** round(np.log2(max(1.0, 4 * np.sqrt(max(n_train, 1)))))
        return int(min(want, 2 ** int(np.log2(cap))))
    if isinstance(requested, bool) or not isinstance(requested, int | np.integer) or requested < 1:
        raise ValueError(f"lists must be a positive int or 'auto', got {requested!r}")
    return int(min(requested, cap))


class CoarseQuantizer:
    """A trained coarse quantizer: ``mean`` (D,), ``proj`` (D, d) and ``centroids`` (lists, d), float32 numpy.

    Build one with :meth:`fit` or :func:`load_coarse`; ``sha256`` is that of its tensor file once saved or loaded.
    """

    def __init__(self, mean: np.ndarray, proj: np.ndarray, centroids: np.ndarray, *, sha256: str | None = None,
                 stats: dict[str, Any] | None = None) -> None:
        mean, proj, centroids = (np.ascontiguousarray(a, np.float32) for a in (mean, proj, centroids))
        if mean.ndim != 1 or proj.ndim != 2 or centroids.ndim != 2 or proj.shape[0] != mean.shape[0] \
                or centroids.shape[1] != proj.shape[1] or not len(centroids):
            raise CodebookError(f"coarse quantizer tensors do not fit together: mean {mean.shape}, proj {proj.shape}, "
                                f"centroids {centroids.shape} (expected (D,), (D, d), (lists, d))")
        if not (np.isfinite(mean).all() and np.isfinite(proj).all() and np.isfinite(centroids).all()):
            raise CodebookError("coarse quantizer tensors hold NaN or infinite values: re-train it")
        self.mean, self.proj, self.centroids = mean, proj, centroids
        self._mean_proj = np.asarray(mean @ proj, np.float32)  # reduce(): x @ proj - mean @ proj, no (n, D) temporary
        self.sha256 = sha256
        self.stats = dict(stats or {})
        self._flat: Any = None
        self._assigner: Any = None
        self._assigner_parts: tuple[Any, ...] = ()

    @property
    def dim(self) -> int:
        """D, the embedding size it takes."""
        return self.mean.shape[0]

    @property
    def lists(self) -> int:
        return self.centroids.shape[0]

    @property
    def reduced_dim(self) -> int:
        """d, the size of the space it partitions."""
        return self.proj.shape[1]

    def __repr__(self) -> str:
        return f"CoarseQuantizer(dim={self.dim}, reduced_dim={self.reduced_dim}, lists={self.lists})"

    # -- training --------------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, x: Any, lists: int | str = "auto", *, reduced_dim: int = 64, iters: int = 20, seed: int = 0,
            max_train: int = 1 << 18) -> CoarseQuantizer:
        """PCA to ``reduced_dim`` then k-means with ``lists`` centroids (see :func:`supported_lists`) on ``x`` (n, D).

        At most ``max_train`` rows (a seeded sample) are used. Raises ValueError for fewer than 2 rows or a
        non-finite input."""
        import torch

        from .kmeans import kmeans

        x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, np.float32)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"coarse quantizer training needs (n >= 2, D) vectors, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("coarse quantizer training vectors hold NaN or infinite values")
        if isinstance(reduced_dim, bool) or not isinstance(reduced_dim, int) or reduced_dim < 1:
            raise ValueError(f"reduced_dim must be a positive int, got {reduced_dim!r}")
        rng = np.random.default_rng(seed)
        if len(x) > max_train:
            x = x[np.sort(rng.choice(len(x), max_train, replace=False))]
        n_lists = supported_lists(len(x), lists)
        d = min(reduced_dim, x.shape[1])
        mean = x.mean(0)
        xc = x - mean
        # principal axes: eigenvectors of the covariance, largest first (float64 for a stable decomposition)
        w, v = np.linalg.eigh((xc.T.astype(np.float64) @ xc) / len(xc))
        proj = v[:, ::-1][:, :d].astype(np.float32)
        z = xc @ proj
        res = kmeans(torch.from_numpy(z), n_lists, iters=iters, seed=seed)
        kept = float(w[::-1][:d].sum() / max(w.sum(), 1e-30))
        stats = {"lists": n_lists, "lists_requested": lists, "reduced_dim": d, "train_vectors": len(x),
                 "variance_kept": round(kept, 4), "iterations": res.iterations, "distortion": round(float(res.distortion), 6)}
        return cls(mean, proj, res.centroids.numpy(), stats=stats)

    # -- assignment ------------------------------------------------------------------------------------------------
    def reduce(self, x: Any) -> np.ndarray:
        """``(n, D)`` float -> ``(n, d)`` float32 coordinates in the partitioned space."""
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"vectors must be (n, {self.dim}) for this coarse quantizer, got shape {x.shape}: embed "
                             "them with the codebook's recipe")
        return np.ascontiguousarray(x @ self.proj - self._mean_proj)

    def assign(self, x: Any) -> np.ndarray:
        """The list of each vector of ``x`` (n, D): ``(n,)`` int32 in ``[0, lists)``.

        With FAISS the projection runs inside FAISS too (``IndexPreTransform``), so all of it follows the calling
        thread's OpenMP setting: :class:`~yolo_vq.index.bulk.BulkWriter` assigns on one worker thread beside the
        thread storing detections, and numpy's BLAS would start threads of its own there (measured on 2 cores: the
        bulk add rate 75k -> 80k detections/s with the projection in FAISS)."""
        faiss = _faiss()
        if faiss is None:
            z = self.reduce(x)
            return self._nearest(z, 1)[:, 0].astype(np.int32) if len(z) else np.zeros(0, np.int32)
        x = np.ascontiguousarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            self.reduce(x)  # its error
        if not len(x):
            return np.zeros(0, np.int32)
        if self._assigner is None:
            inner = self._nested_index(faiss) if self.lists > NESTED_ABOVE else self._flat_index()
            project = faiss.LinearTransform(self.dim, self.reduced_dim, True)  # x A^T + b: A = proj^T, b = -mean proj
            faiss.copy_array_to_vector(np.ascontiguousarray(self.proj.T).ravel(), project.A)
            faiss.copy_array_to_vector(-self._mean_proj, project.b)
            project.is_trained = True
            self._assigner = faiss.IndexPreTransform(project, inner)
            self._assigner.own_fields = False
            self._assigner_parts = (project, inner)  # FAISS' objects referenced by the wrapper, kept alive here
        _, lists = self._assigner.search(x, 1)
        return lists[:, 0].astype(np.int32)

    def probe(self, x: Any, nprobe: int) -> np.ndarray:
        """The ``nprobe`` nearest lists of each query of ``x`` (q, D), nearest first: ``(q, min(nprobe, lists))``
        int64 (exact: every centroid is compared)."""
        z, k = self.reduce(x), min(int(nprobe), self.lists)
        if _faiss() is None:
            return self._nearest(z, k)
        _, lists = self._flat_index().search(z, k)
        return lists

    def _nearest(self, z: np.ndarray, k: int) -> np.ndarray:
        """numpy's exact k nearest centroids (where FAISS is not installed): ``(n, k)`` int64, nearest first."""
        d = (z * z).sum(1, keepdims=True) - 2 * z @ self.centroids.T + (self.centroids**2).sum(1)[None]
        part = np.argpartition(d, k - 1, axis=1)[:, :k] if k < self.lists else np.tile(np.arange(self.lists), (len(z), 1))
        order = np.argsort(np.take_along_axis(d, part, 1), axis=1, kind="stable")
        return np.take_along_axis(part, order, 1).astype(np.int64)

    def _nested_index(self, faiss: Any) -> Any:
        """FAISS ``IndexIVFFlat`` over the centroids: ``4 sqrt(lists)`` groups (a power of two; seeded k-means of
        the centroids), :data:`NESTED_NPROBE` searched. Its ids are the centroids' row numbers: the list ids."""
        groups = 1 << round(np.log2(4 * np.sqrt(self.lists)))
        top = faiss.IndexFlatL2(self.reduced_dim)
        idx = faiss.IndexIVFFlat(top, self.reduced_dim, groups)  # holds a reference to top (FAISS' wrapper)
        idx.cp.seed, idx.cp.niter, idx.cp.min_points_per_centroid = 0, 20, 1  # 32 centroids a group: no warning
        idx.train(self.centroids)
        idx.add(self.centroids)
        idx.nprobe = NESTED_NPROBE
        return idx

    def _flat_index(self) -> Any:
        if self._flat is None:
            self._flat = _faiss().IndexFlatL2(self.reduced_dim)
            self._flat.add(self.centroids)
        return self._flat


def _faiss() -> Any:
    """The faiss module, or None where it is not installed (numpy does the same search, slower)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


# -- files -----------------------------------------------------------------------------------------------------------




def load_coarse(codebook: str | os.PathLike, meta: dict[str, Any] | None = None) -> CoarseQuantizer | None:
    """The coarse quantizer attached to a codebook (None when its JSON lists none); ``meta``: the codebook's JSON
    already read (``quantizer.meta``). Never unpickles.

    Raises:
        CodebookError: the listed file is missing, damaged, replaced (checksum) or misshapen.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load

    if meta is None:
        try:
            meta = json.loads(codebook_paths(codebook)[1].read_text())
        except (OSError, ValueError) as e:
            raise CodebookError(f"{codebook_paths(codebook)[1]}: unreadable codebook JSON ({e})") from None
    entry = meta.get("coarse") if isinstance(meta, dict) else None
    if entry is None:
        return None
    path = coarse_path(codebook)
    fix = ("restore it beside the codebook (for an index's own copy: `yolo-vq index ... --codebook PATH` with the "
           "codebook the index was made with puts it back), or fit a new codebook with `yolo-vq fit`")
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise CodebookError(f"{codebook_paths(codebook)[1]}: its 'coarse' entry is damaged: {fix}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CodebookError(f"{path}: the coarse quantizer listed in the codebook's JSON is unreadable "
                            f"({type(e).__name__}): {fix}") from None
    if bytes_sha256(data) != entry["sha256"]:
        raise CodebookError(f"{path}: checksum does not match the codebook's JSON; the file is damaged or was "
                            f"replaced: {fix}")
    try:
        t = load(data)
        return CoarseQuantizer(t["mean"], t["proj"], t["centroids"], sha256=entry["sha256"],
                               stats=entry.get("stats") if isinstance(entry.get("stats"), dict) else None)
    except (SafetensorError, KeyError, ValueError) as e:
        raise CodebookError(f"{path}: not a coarse quantizer file ({type(e).__name__}: {e}): {fix}") from None
