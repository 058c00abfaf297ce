"""The shared retrieval evaluation on tiny synthetic identities."""

from __future__ import annotations

import numpy as np
import pytest

from yolo_vq.metrics import cosine_scores, retrieval_scores, valid_queries


def synthetic(noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(6), 20)
    frames = np.tile(np.arange(20) * 10, 6)
    centres = rng.normal(size=(6, 16))
    x = centres[ids] + noise * rng.normal(size=(len(ids), 16))
    return x / np.linalg.norm(x, axis=1, keepdims=True), ids, frames


def test_perfect_and_random_embeddings():
    x, ids, frames = synthetic(0.01)
    q = valid_queries(ids, frames, gap=30)
    assert len(q) == len(ids)
    s = retrieval_scores(cosine_scores(x, q), q, ids, frames, gap=30)
    assert s.mAP == pytest.approx(1.0) and s.rank1 == 1.0 and s.recall10 == 1.0
    rnd = np.random.default_rng(1).normal(size=x.shape)
    r = retrieval_scores(cosine_scores(rnd / np.linalg.norm(rnd, axis=1, keepdims=True), q), q, ids, frames, gap=30)
    assert r.mAP < 0.4  # chance is ~1/6


def test_gap_excludes_near_duplicates_and_untracked():
    ids = np.array([0, 0, 0, 1, -1])
    frames = np.array([0, 5, 100, 0, 0])
    q = valid_queries(ids, frames, gap=10)
    assert q.tolist() == [0, 1, 2]  # track 1 has no far positive; untracked rows are never queries
