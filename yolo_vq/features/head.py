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

- :func:`fit_mlp`: a small learned correction on top of that linear head's output ``u = P (x - mean)``:
  ``u + W2 relu(W1 u + b1)`` (one hidden layer, ``W2`` starting at zero: it starts as the linear head; ``P`` kept),
  trained with a contrastive loss on the same supervision: each positive pair's partner against the other
  detections of the batch (same-track ones masked out) and a detection of another track seen in the anchor's frame
  (a hard negative). Seconds on 2 CPU cores; :func:`choose_head` keeps it only where it measures better on
  held-out frames (on vtest.avi it does not: docs/benchmarks.md).

The head is a :class:`torch.nn.Module` (buffers, MatMuls, a ReLU and a normalisation) so that the embedder, the
exported ONNX graph and the server apply exactly the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["HEADS", "Head", "Pairs", "choose_head", "fit_from_tracks", "fit_mlp", "fit_whitening", "track_pairs"]

HEADS = ("none", "whiten", "tracks", "mlp")  # what `fit --head` offers besides auto (choose by measurement)


class Head(nn.Module):
    """``u = (x - mean) @ proj``, ``y = normalize(u [+ relu(u @ w1 + b1) @ w2])``: (n, D) float32 -> (n, d) float32,
    rows L2-normalised.

    Buffers: ``mean`` (D,), ``proj`` (D, d), and with ``mlp = (w1, b1, w2)`` the hidden layer's ``w1`` (d, h),
    ``b1`` (h,), ``w2`` (h, d). ``kind`` names how it was fitted (``"whiten"``, ``"tracks"``, ``"mlp"``).
    """

    def __init__(self, mean: np.ndarray | Tensor, proj: np.ndarray | Tensor, kind: str, *,
                 mlp: tuple[np.ndarray | Tensor, np.ndarray | Tensor, np.ndarray | Tensor] | None = None):
        super().__init__()
        mean, proj = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(proj, dtype=torch.float32)
        if mean.ndim != 1 or proj.ndim != 2 or proj.shape[0] != mean.shape[0] or not 1 <= proj.shape[1] <= mean.shape[0]:
            raise ValueError(f"a head needs mean (D,) and proj (D, d) with 1 <= d <= D, got {tuple(mean.shape)} and "
                             f"{tuple(proj.shape)}")
        self.register_buffer("mean", mean.contiguous())
        self.register_buffer("proj", proj.contiguous())
        self.hidden = 0
        if mlp is not None:
            w1, b1, w2 = (torch.as_tensor(t, dtype=torch.float32) for t in mlp)
            d, h = proj.shape[1], (w1.shape[1] if w1.ndim == 2 else -1)
            if w1.shape != (d, h) or b1.shape != (h,) or w2.shape != (h, d) or h < 1:
                raise ValueError(f"a hidden layer on a head's {d} outputs needs w1 ({d}, h), b1 (h,) and w2 (h, {d}), "
                                 f"got {tuple(w1.shape)}, {tuple(b1.shape)} and {tuple(w2.shape)}")
            for name, t in (("w1", w1), ("b1", b1), ("w2", w2)):
                self.register_buffer(name, t.contiguous())
            self.hidden = h
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
        if self.hidden:
            y = y + torch.relu(y @ self.w1 + self.b1) @ self.w2
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


def _hard_negatives(n: int, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``n`` detections, the others seen in its frame on another track, from the negative pairs: CSR
    ``(start (n + 1,), other)``; detection ``i``'s are ``other[start[i]:start[i + 1]]``."""
    both = np.concatenate([neg, neg[:, ::-1]]) if len(neg) else np.zeros((0, 2), np.int64)
    both = both[np.argsort(both[:, 0], kind="stable")]
    return np.searchsorted(both[:, 0], np.arange(n + 1)), both[:, 1]


def fit_mlp(x: np.ndarray, pairs: Pairs, track: np.ndarray, base: Head, *, hidden: int = 64, steps: int = 200,
            batch: int = 256, lr: float = 1e-3, temperature: float = 0.1, seed: int = 0) -> Head:
    """A hidden layer on the outputs of the linear head ``base`` (kept as it is): ``w2`` starts at zero, so training
    starts from ``base`` itself. Loss, per step: ``batch`` positive pairs ``(a, p)`` of ``pairs``; cross-entropy of
    ``a`` finding ``p`` among the batch's partners (those of ``a``'s own track masked out) and one detection of
    another track in ``a``'s frame (a hard negative, where there is one), cosine / ``temperature``. Adam, ``steps``
    steps, seeded (deterministic on one thread). ``x`` (n, D), ``track`` (n,) the track of each row.

    Defaults measured on vtest.avi's first half (validation mAP on its last third of frames, ad-hoc): 200 steps
    0.757, 600 0.749; 128 hidden units 0.747; all below the linear head's 0.815. With an input-space hidden layer
    (``relu(W1 (x - mean))``, 1088 x 256, ``P`` fine-tuned) 0.758 in 80 s: the layer overfits the few tracks.

    Raises:
        ValueError: fewer than 10 positive or negative pairs.
    """
    if len(pairs.pos) < 10 or len(pairs.neg) < 10:
        raise ValueError(f"{len(pairs.pos)} same-track and {len(pairs.neg)} same-frame pairs: too few to learn from "
                         f"(at least 10 of each): track a longer video, or fit the label-free whitening instead")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        u = (torch.as_tensor(np.asarray(x), dtype=torch.float32) - base.mean) @ base.proj  # (n, d), computed once
    tr, d = torch.as_tensor(np.asarray(track)), u.shape[1]
    w1 = (torch.randn(d, hidden, generator=gen) / (float(u.std()) * d**0.5 or 1.0)).requires_grad_()  # ~unit inputs
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = torch.zeros(hidden, d, requires_grad=True)
    opt = torch.optim.Adam([w1, b1, w2], lr=lr)
    start, other = (torch.as_tensor(a) for a in _hard_negatives(len(u), pairs.neg))
    pos = torch.as_tensor(pairs.pos)

    def embed(rows: Tensor) -> Tensor:
        y = u[rows] + torch.relu(u[rows] @ w1 + b1) @ w2
        return y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    loss = torch.zeros(())
    for _ in range(steps):
        pick = pos[torch.randint(len(pos), (min(batch, len(pos)),), generator=gen)]
        a, p = pick[:, 0], pick[:, 1]
        count = start[a + 1] - start[a]
        hard = other[(start[a] + (torch.rand(len(a), generator=gen) * count).long()).clamp_max(len(other) - 1)]
        ya, yp, yh = embed(a), embed(p), embed(hard)
        logits = (ya @ yp.T).masked_fill((tr[a][:, None] == tr[p][None, :]) & ~torch.eye(len(a), dtype=torch.bool),
                                         -2)  # the anchor's own track among the partners: not a negative
        extra = torch.where(count > 0, (ya * yh).sum(1), torch.full((len(a),), -2.0))
        loss = nn.functional.cross_entropy(torch.cat([logits, extra[:, None]], 1) / temperature, torch.arange(len(a)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    head = Head(base.mean, base.proj, "mlp", mlp=(w1.detach(), b1.detach(), w2.detach()))
    head.stats = {"hidden": hidden, "steps": steps, "final_loss": round(float(loss.detach()), 4)}
    return head


def _fit(kind: str, x: np.ndarray, track: np.ndarray, frame: np.ndarray, dim: int, shrink: float) -> Head:
    if kind == "whiten":
        return fit_whitening(x, dim, shrink=shrink)
    pairs = track_pairs(track, frame)
    linear = fit_from_tracks(x, pairs, dim, shrink=shrink)
    return linear if kind == "tracks" else fit_mlp(x, pairs, track, linear)


def choose_head(x: np.ndarray, track: np.ndarray, frame: np.ndarray, *, kinds: Sequence[str] = HEADS,
                dims: Sequence[int], shrinks: Sequence[float] = (0.01, 0.1, 1.0), gap: int = 30,
                queries: int = 2000) -> tuple[Head | None, dict]:
    """Choose a head by measurement on the user's own tracks: every candidate (``kinds`` x ``dims`` x ``shrinks``;
    ``"none"``: the raw embedding; ``"mlp"``: only at the best ``"tracks"`` setting, which is measured for it even
    where ``"tracks"`` is not one of ``kinds``) is fitted on the first two thirds of the frames and scored
    (same-track mAP, the ``benchmarks/retrieval.py`` protocol with +-``gap`` frames) on the last third; the best is
    refitted on all.

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

    # the MLP is trained only at the linear head's best setting (measured here even where "tracks" is not offered)
    run = [k for k in kinds if k != "mlp"]
    if "mlp" in kinds:
        run += ["tracks"] * ("tracks" not in run) + ["mlp"]
    best = linear = None
    for kind in run:
        if kind == "mlp":
            settings = [] if linear is None else [(linear["dim"], linear["shrink"])]
        else:
            settings = [(x.shape[1], 0.0)] if kind == "none" else [(d, s) for d in dims for s in shrinks]
        for dim, shrink in settings:
            cand = {"kind": kind, "dim": int(dim), "shrink": shrink} | ({} if kind in kinds else {"base_only": True})
            try:
                y = x[b] if kind == "none" else _fit(kind, x[a], track[a], frame[a], dim, shrink).project(x[b])
            except ValueError as e:  # too few pairs, a dim above the sample's
                report["candidates"].append(cand | {"error": " ".join(str(e).split())})
                continue
            cand["validation_map"] = round(score(y), 4)
            report["candidates"].append(cand)
            if kind == "tracks" and (linear is None or cand["validation_map"] > linear["validation_map"]):
                linear = cand
            if kind in kinds and (best is None or cand["validation_map"] > best["validation_map"]):
                best = cand
    if best is None:  # every candidate failed to fit (and "none" was not among them)
        errors = "; ".join(f"{c['kind']}: {c['error']}" for c in report["candidates"] if "error" in c)
        report.update(chosen={"kind": "none"}, fallback=f"no head could be fitted ({errors}), so none is used")
        return None, report
    report["chosen"], report["validation_map"] = best, best["validation_map"]
    if best["kind"] == "none":
        return None, report
    head = _fit(best["kind"], x, track, frame, best["dim"], best["shrink"])
    head.stats = {**head.stats, **{k: report[k] for k in ("chosen", "validation_map", "queries", "fit_rows",
                                                          "validation_rows")}}
    return head, report


def _check(x: np.ndarray, dim: int) -> None:
    if x.ndim != 2 or len(x) < 2 or not np.isfinite(x).all():
        raise ValueError(f"expected (n >= 2, D) finite vectors, got shape {x.shape}")
    if not 1 <= dim <= x.shape[1]:
        raise ValueError(f"dim must be in 1..{x.shape[1]} (the embedding's), got {dim}")
