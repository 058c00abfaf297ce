"""Identity heads: a linear map of the recipe's embedding, fitted on the user's own vectors, after which the same
person (or object) lies nearer to itself than to others.

``y = normalize(P (x - mean))``, ``P`` of shape (d, D), ``d <= D``; rows of ``x`` are the recipe's L2-normalised
embeddings. Two ways to fit ``P``, both closed form (seconds on a CPU for tens of thousands of vectors):

- :func:`fit_whitening` (label-free): PCA-whitening of the vectors themselves, eigenvalues shrunk towards their mean
  (``shrink``) so that low-variance noise directions are not blown up. Whitening learned on the target collection is
  a known large gain for hand-built descriptors (Jégou & Chum 2012).
- :func:`fit_from_tracks`: learned whitening from tracks (Radenović et al. 2016, "Lw", with the supervision free in
  video): detections of one track are one identity (positive pairs), detections of two tracks seen in the same
  frame are surely two (negative pairs). ``P = U^T C_S^{-1/2}``: whiten the within-identity scatter ``C_S``, then
  keep the ``d`` directions along which different identities differ most (top eigenvectors of the negative pairs'
  scatter in that space).

The head is a :class:`torch.nn.Module` (two buffers, a MatMul and a normalisation) so that the embedder, the
exported ONNX graph and the server apply exactly the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["HEADS", "Head", "Pairs", "choose_head", "fit_from_tracks", "fit_whitening", "track_pairs"]

HEADS = ("none", "whiten", "tracks")  # what `fit --head` offers besides auto (choose by measurement)


class Head(nn.Module):
    """``y = normalize((x - mean) @ proj)``: (n, D) float32 -> (n, d) float32, rows L2-normalised.

    Buffers: ``mean`` (D,), ``proj`` (D, d). ``kind`` names how it was fitted (``"whiten"``, ``"tracks"``).
    """

    def __init__(self, mean: np.ndarray | Tensor, proj: np.ndarray | Tensor, kind: str):
        super().__init__()
        mean, proj = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(proj, dtype=torch.float32)
        if mean.ndim != 1 or proj.ndim != 2 or proj.shape[0] != mean.shape[0] or not 1 <= proj.shape[1] <= mean.shape[0]:
            raise ValueError(f"a head needs mean (D,) and proj (D, d) with 1 <= d <= D, got {tuple(mean.shape)} and "
                             f"{tuple(proj.shape)}")
        self.register_buffer("mean", mean.contiguous())
        self.register_buffer("proj", proj.contiguous())
        self.kind = kind
        self.stats: dict = {}  # how it was chosen and fitted (saved in the codebook's JSON)

    @property
    def dim_in(self) -> int:
        return self.proj.shape[0]

    @property
    def dim(self) -> int:
        return self.proj.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        y = (x - self.mean) @ self.proj
        return y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def project(self, x: np.ndarray) -> np.ndarray:
        """(n, D) array -> (n, d) float32."""
        with torch.no_grad():
            return self(torch.as_tensor(np.asarray(x, dtype=np.float32))).numpy()


def _inv_sqrt(c: np.ndarray, shrink: float) -> np.ndarray:
    """``(C + shrink * mean_eig * I)^(-1/2)`` of a symmetric PSD matrix (float64)."""
    evals, evecs = np.linalg.eigh(c)
    evals = np.clip(evals, 0, None) + shrink * max(float(evals.mean()), 1e-12)
    return (evecs / np.sqrt(evals)) @ evecs.T


def fit_whitening(x: np.ndarray, dim: int | None = None, *, shrink: float = 0.1) -> Head:
    """PCA-whitening of ``x`` (n, D): the top ``dim`` principal directions (default all), each scaled by
    ``1 / sqrt(eigenvalue + shrink * mean eigenvalue)``."""
    x = np.asarray(x, dtype=np.float64)
    dim = x.shape[1] if dim is None else dim
    _check(x, dim)
    mean = x.mean(0)
    evals, evecs = np.linalg.eigh(np.cov(x - mean, rowvar=False))
    order = np.argsort(evals)[::-1][:dim]
    scale = 1 / np.sqrt(np.clip(evals[order], 0, None) + shrink * max(float(evals.mean()), 1e-12))
    return Head(mean, evecs[:, order] * scale, "whiten")


@dataclass(frozen=True)
class Pairs:
    """Index pairs into the fitting vectors: ``pos`` (p, 2) same track, ``neg`` (q, 2) two tracks of one frame."""

    pos: np.ndarray
    neg: np.ndarray


def track_pairs(track: np.ndarray, frame: np.ndarray, *, gap: int = 0, most: int = 200_000, seed: int = 0) -> Pairs:
    """Pairs from tracks: positives are two detections of one track more than ``gap`` frames apart (``gap=0``: any
    two), negatives two detections of different tracks in the same frame; at most ``most`` of each, drawn with a
    fixed seed. Untracked detections (track < 0) take no part."""
    track, frame = np.asarray(track), np.asarray(frame)
    rng = np.random.default_rng(seed)
    pos, neg = [], []
    for t in np.unique(track[track >= 0]):
        idx = np.flatnonzero(track == t)
        if len(idx) < 2:
            continue
        a, b = np.triu_indices(len(idx), 1)
        keep = np.abs(frame[idx[a]] - frame[idx[b]]) > gap
        pos.append(np.stack([idx[a[keep]], idx[b[keep]]], 1))
    tracked = np.flatnonzero(track >= 0)
    for f in np.unique(frame[tracked]):
        idx = tracked[frame[tracked] == f]
        if len(idx) < 2:
            continue
        a, b = np.triu_indices(len(idx), 1)
        keep = track[idx[a]] != track[idx[b]]
        neg.append(np.stack([idx[a[keep]], idx[b[keep]]], 1))

    def sample(parts: list[np.ndarray]) -> np.ndarray:
        p = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
        return p[np.sort(rng.choice(len(p), most, replace=False))] if len(p) > most else p

    return Pairs(sample(pos), sample(neg))


def fit_from_tracks(x: np.ndarray, pairs: Pairs, dim: int | None = None, *, shrink: float = 0.1) -> Head:
    """Learned whitening from track pairs: ``P = U^T C_S^(-1/2)`` with ``C_S`` the positive pairs' difference scatter
    (shrunk like :func:`fit_whitening`) and ``U`` the top ``dim`` eigenvectors of the negative pairs' scatter after
    that whitening (default ``dim``: all).

    Raises:
        ValueError: fewer than 10 positive or negative pairs (too few tracks to learn from).
    """
    x = np.asarray(x, dtype=np.float64)
    dim = x.shape[1] if dim is None else dim
    _check(x, dim)
    if len(pairs.pos) < 10 or len(pairs.neg) < 10:
        raise ValueError(f"{len(pairs.pos)} same-track and {len(pairs.neg)} same-frame pairs: too few to learn from "
                         f"(at least 10 of each): track a longer video, or fit the label-free whitening instead")
    dp = x[pairs.pos[:, 0]] - x[pairs.pos[:, 1]]
    w = _inv_sqrt(dp.T @ dp / len(dp), shrink)
    dn = (x[pairs.neg[:, 0]] - x[pairs.neg[:, 1]]) @ w
    evals, evecs = np.linalg.eigh(dn.T @ dn / len(dn))
    u = evecs[:, np.argsort(evals)[::-1][:dim]]
    return Head(x.mean(0), w @ u, "tracks")


def _fit(kind: str, x: np.ndarray, track: np.ndarray, frame: np.ndarray, dim: int, shrink: float) -> Head:
    if kind == "whiten":
        return fit_whitening(x, dim, shrink=shrink)
    return fit_from_tracks(x, track_pairs(track, frame), dim, shrink=shrink)


def choose_head(x: np.ndarray, track: np.ndarray, frame: np.ndarray, *, kinds: Sequence[str] = HEADS,
                dims: Sequence[int], shrinks: Sequence[float] = (0.01, 0.1, 1.0), gap: int = 30,
                queries: int = 2000) -> tuple[Head | None, dict]:
    """Choose a head by measurement on the user's own tracks: every candidate (``kinds`` x ``dims`` x ``shrinks``;
    ``"none"``: the raw embedding) is fitted on the first two thirds of the frames and scored (same-track mAP, the
    ``benchmarks/retrieval.py`` protocol with +-``gap`` frames) on the last third; the best is refitted on all.

    Returns ``(head or None, report)``; ``report`` has ``chosen`` (kind, dim, shrink), ``validation_map`` of the
    chosen one, ``candidates`` (each one's validation mAP, or why it could not be fitted), ``queries`` and, where
    nothing could be measured (too few tracks that come back), ``fallback`` with the reason (then no head).
    """
    from ..metrics import cosine_scores, retrieval_scores, valid_queries

    x, track, frame = np.asarray(x, dtype=np.float64), np.asarray(track), np.asarray(frame)
    cut = np.quantile(frame, 2 / 3)
    a, b = frame < cut, frame >= cut
    q = valid_queries(track[b], frame[b], gap)
    if len(q) > queries:
        q = np.sort(np.random.default_rng(0).choice(q, queries, replace=False))
    report: dict = {"kinds": list(kinds), "queries": len(q), "candidates": [], "fit_rows": int(a.sum()),
                    "validation_rows": int(b.sum())}
    if len(q) < 10:
        report.update(chosen={"kind": "none"}, fallback=(
            f"{len(q)} detections in the last third of the frames have a same-track detection more than {gap} "
            f"frames away (10 needed): too few tracks come back to measure a head, so none is used (track a longer "
            f"video with people who reappear)"))
        return None, report

    def score(y: np.ndarray) -> float:
        return retrieval_scores(cosine_scores(y, q), q, track[b], frame[b], gap).mAP

    best = None
    for kind in kinds:
        settings = [(x.shape[1], 0.0)] if kind == "none" else [(d, s) for d in dims for s in shrinks]
        for dim, shrink in settings:
            cand = {"kind": kind, "dim": int(dim), "shrink": shrink}
            try:
                y = x[b] if kind == "none" else _fit(kind, x[a], track[a], frame[a], dim, shrink).project(x[b])
            except ValueError as e:  # too few pairs, a dim above the sample's
                report["candidates"].append(cand | {"error": " ".join(str(e).split())})
                continue
            cand["validation_map"] = round(score(y), 4)
            report["candidates"].append(cand)
            if best is None or cand["validation_map"] > best["validation_map"]:
                best = cand
    report["chosen"], report["validation_map"] = best, best["validation_map"]
    if best["kind"] == "none":
        return None, report
    head = _fit(best["kind"], x, track, frame, best["dim"], best["shrink"])
    head.stats = {k: report[k] for k in ("chosen", "validation_map", "queries", "fit_rows", "validation_rows")}
    return head, report


def _check(x: np.ndarray, dim: int) -> None:
    if x.ndim != 2 or len(x) < 2 or not np.isfinite(x).all():
        raise ValueError(f"expected (n >= 2, D) finite vectors, got shape {x.shape}")
    if not 1 <= dim <= x.shape[1]:
        raise ValueError(f"dim must be in 1..{x.shape[1]} (the embedding's), got {dim}")
