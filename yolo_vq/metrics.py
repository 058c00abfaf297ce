"""Retrieval evaluation shared by tests and benchmarks: same-identity search over detections of a video.

Protocol (``benchmarks/retrieval.py``): identities are tracker ids; for each query detection every other tracked
detection is ranked, except the query's own track within +-``gap`` frames (near-duplicates a tracker already links).
Positives are the remaining detections of the same track.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["RetrievalScores", "bootstrap_map", "cosine_scores", "retrieval_scores", "valid_queries"]


@dataclass(frozen=True)
class RetrievalScores:
    """Mean over queries: average precision, and the rank-1 and rank-10 hit rates (CMC: a positive ranked first /
    among the first 10)."""

    mAP: float
    rank1: float
    recall10: float
    queries: int
    ap: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # per-query average precision

    def row(self) -> str:
        return f"{self.mAP:6.3f} {self.rank1:6.3f} {self.recall10:7.3f}"


def valid_queries(track: np.ndarray, frame: np.ndarray, gap: int) -> np.ndarray:
    """Indices of tracked detections (id >= 0) with at least one positive outside +-``gap`` frames."""
    track, frame = np.asarray(track), np.asarray(frame)
    ok = []
    for i in np.flatnonzero(track >= 0):
        same = track == track[i]
        if np.any(same & (np.abs(frame - frame[i]) > gap)):
            ok.append(i)
    return np.asarray(ok, dtype=np.int64)


def cosine_scores(x: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(q, N) similarities of query rows to all rows of ``x`` (rows assumed L2-normalised: inner product)."""
    x = np.asarray(x, dtype=np.float32)
    return x[queries] @ x.T


def retrieval_scores(
    scores: np.ndarray, queries: np.ndarray, track: np.ndarray, frame: np.ndarray, gap: int
) -> RetrievalScores:
    """Score a (q, N) similarity matrix (higher = more similar) of ``queries`` against all N detections.

    Untracked detections (id < 0) are left out of the gallery: their identity is unknown.
    """
    track, frame = np.asarray(track), np.asarray(frame)
    aps, r1, r10 = [], [], []
    for s, qi in zip(np.asarray(scores), queries):
        same = track == track[qi]
        near = same & (np.abs(frame - frame[qi]) <= gap)
        keep = (track >= 0) & ~near
        pos = same[keep]
        order = np.argsort(-s[keep], kind="stable")
        hits = pos[order]
        ranks = np.flatnonzero(hits) + 1  # 1-based ranks of the positives
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        r1.append(float(hits[0]))
        r10.append(float(hits[:10].any()))
    return RetrievalScores(float(np.mean(aps)), float(np.mean(r1)), float(np.mean(r10)), len(queries), np.asarray(aps))


def bootstrap_map(
    ap: np.ndarray, query_track: np.ndarray, n: int = 1000, seed: int = 0, baseline: np.ndarray | None = None
) -> tuple[float, float]:
    """95% interval of mAP (or of ``mAP - mAP(baseline)``, paired, when ``baseline`` per-query APs are given),
    resampling whole tracks: queries of one person are not independent."""
    diff = np.asarray(ap) - (0 if baseline is None else np.asarray(baseline))
    tracks = np.unique(query_track)
    sums = np.array([diff[query_track == t].sum() for t in tracks])
    counts = np.array([(query_track == t).sum() for t in tracks])
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(tracks), size=(n, len(tracks)))
    stats = sums[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)
