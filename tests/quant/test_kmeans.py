"""k-means, nearest-centroid assignment and the streaming training sampler."""

import numpy as np
import pytest
import torch

from tests.quant._data import DEVICE, low_rank
from yolo_vq.quant import assign, kmeans, sample_training


@pytest.mark.parametrize("b", [None, 3])
@pytest.mark.parametrize("k", [16, 256, 300])
def test_assign_equals_brute_force(b, k):
    x = low_rank(1000, 12)
    c = low_rank(k, 12, seed=1)
    if b is not None:
        x, c = x.expand(b, -1, -1) + torch.arange(b, device=DEVICE).view(b, 1, 1), c.expand(b, -1, -1).contiguous()
    idx, dist = assign(x, c, chunk_size=97)  # odd chunk size: the tail chunk is exercised
    ref = torch.cdist(x, c).pow(2)
    assert torch.equal(idx, ref.argmin(-1))
    torch.testing.assert_close(dist, ref.min(-1).values, rtol=1e-4, atol=1e-3)


def test_kmeans_distortion_never_rises_and_matches_assignment():
    x = low_rank(3000, 16)
    res = kmeans(x, 64, iters=15, tol=0, seed=0)
    assert res.centroids.shape == (64, 16) and res.centroids.dtype == torch.float32
    assert res.iterations == 15 and len(res.history) == 16  # 15 assign + update steps, then a last assignment
    h = torch.tensor(res.history)
    assert bool((h[1:] <= h[:-1] * (1 + 1e-5)).all()), res.history  # Lloyd's monotonicity
    idx, dist = assign(x, res.centroids)  # the result describes the returned centroids
    assert torch.equal(idx, res.assignments)
    torch.testing.assert_close(res.distances, dist)
    assert abs(float(dist.mean()) - res.distortion) <= 1e-5 * res.distortion


def test_kmeans_equals_textbook_lloyd():
    # the fast path (score GEMM, index search only for rows that moved, running cluster sums) must not change
    # what Lloyd's algorithm computes
    x = low_rank(2000, 8).view(2000, 2, 4).transpose(0, 1).contiguous()
    c = x[:, :24].clone()
    res = kmeans(x, 24, iters=12, tol=0, init=c)
    for _ in range(12):
        a = torch.cdist(x, c).argmin(-1)
        c = torch.stack([torch.stack([x[j, a[j] == i].mean(0) for i in range(24)]) for j in range(2)])
    torch.testing.assert_close(res.centroids, c, rtol=1e-5, atol=1e-5)
    assert torch.equal(res.assignments, torch.cdist(x, c).argmin(-1))


def test_kmeans_batched_distortion_is_sum_over_subproblems():
    x = low_rank(2000, 32).view(2000, 4, 8).transpose(0, 1).contiguous()
    res = kmeans(x, 32, iters=5, seed=0)
    assert res.centroids.shape == (4, 32, 8) and res.assignments.shape == (4, 2000)
    _, dist = assign(x, res.centroids)
    per = [float(dist[j].mean()) for j in range(4)]
    assert abs(sum(per) - float(dist.mean(1).sum())) < 1e-3


@pytest.mark.parametrize("init", ["kmeans++", "random", "auto"])
def test_kmeans_is_deterministic_given_seed(init):
    x = low_rank(2000, 16)
    a, b = kmeans(x, 32, init=init, seed=3), kmeans(x, 32, init=init, seed=3)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.assignments, b.assignments)
    assert not torch.equal(a.centroids, kmeans(x, 32, init=init, seed=4).centroids)


def test_kmeans_accepts_numpy_and_warm_start():
    x = low_rank(1000, 8)
    res = kmeans(x.cpu().numpy(), 16, iters=5, seed=0)
    assert isinstance(res.centroids, torch.Tensor) and res.centroids.device.type == "cpu"
    warm = kmeans(x, 16, iters=3, init=res.centroids, seed=0)
    assert warm.history[0] <= res.history[-1] * (1 + 1e-5)


def test_empty_clusters_are_reseeded_on_duplicated_points():
    # 20 distinct points, 50 copies each: a random init of 20 rows almost surely picks some twice -> empty clusters.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, generator=g).repeat(50, 1).to(DEVICE)
    res = kmeans(x, 20, iters=20, init="random", seed=0)
    assert res.reseeded > 0
    idx, dist = assign(x, res.centroids)
    assert torch.bincount(idx, minlength=20).min() > 0  # no empty cluster left
    assert float(dist.max()) < 1e-8  # every distinct point got its own centroid


def test_many_empty_clusters_are_reseeded_in_bulk():
    # 300 distinct points, 4 copies each: a random init leaves ~110 clusters empty, more than are filled one by one
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 5, generator=g).repeat(4, 1).to(DEVICE)
    res = kmeans(x, 300, iters=30, init="random", seed=0)
    assert res.reseeded > 64
    assert torch.bincount(res.assignments, minlength=300).min() > 0 and res.distortion < 1e-8


def test_more_clusters_than_distinct_points_gives_finite_centroids():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(5, 4, generator=g)
    x = pts.repeat(100, 1).to(DEVICE)
    for init in ("kmeans++", "random"):
        res = kmeans(x, 12, iters=5, init=init, seed=0)
        assert torch.isfinite(res.centroids).all()
        assert res.reseeded > 0 and res.distortion < 1e-8
        # every centroid is one of the data points (re-seeded clusters copy a row)
        assert float(torch.cdist(res.centroids, pts.to(DEVICE)).min(1).values.max()) < 1e-5


@pytest.mark.parametrize(
    ("x", "k", "kwargs", "exc", "match"),
    [
        (torch.randn(10, 4), 20, {}, ValueError, "at least k=20"),
        (torch.randn(10, 4), 2, {"init": "kmeans+"}, ValueError, "init must be"),
        (torch.ones(10, 4, dtype=torch.int64), 2, {}, TypeError, "floating point"),
        (torch.randn(10), 2, {}, ValueError, r"\(n, d\)"),
        (torch.randn(10, 4), 2, {"init": torch.randn(3, 4)}, ValueError, "init tensor"),
        ([[1.0, 2.0]], 1, {}, TypeError, "numpy array or torch tensor"),
    ],
)
def test_kmeans_rejects_bad_input(x, k, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kmeans(x, k, **kwargs)


def test_sample_training_stream_equals_array_when_everything_fits():
    x = low_rank(1000, 8)
    full, seen = sample_training(x, dim=8, max_train=5000, seed=0)
    streamed, seen2 = sample_training(iter(x.split(77)), dim=8, max_train=5000, seed=0)
    assert seen == seen2 == 1000 and torch.equal(full, x) and torch.equal(streamed, x)


def test_sample_training_reservoir_is_uniform_subset_and_seeded():
    x = torch.arange(20_000, dtype=torch.float32, device=DEVICE).unsqueeze(1)  # row value = row index
    batches = lambda: (b.cpu().numpy() for b in x.split(333))  # a numpy stream, as from a video loop
    a, seen = sample_training(batches(), dim=1, max_train=1000, seed=5)
    b, _ = sample_training(batches(), dim=1, max_train=1000, seed=5)
    c, _ = sample_training(batches(), dim=1, max_train=1000, seed=6)
    assert seen == 20_000 and a.shape == (1000, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    v = a.squeeze(1)
    assert v.unique().numel() == 1000 and bool((v[1:] > v[:-1]).all())  # distinct rows, in arrival order
    # uniform over the stream: each quarter holds ~250 of the 1000 samples
    quarters = torch.bincount((v // 5000).long(), minlength=4)
    assert int(quarters.min()) > 180, quarters


@pytest.mark.parametrize(
    ("data", "exc", "match"),
    [
        ([], ValueError, "no training vectors"),
        ([np.zeros((3, 5), np.float32)], ValueError, r"must be \(n, 8\)"),
        (5, TypeError, "iterable"),
    ],
)
def test_sample_training_rejects_bad_streams(data, exc, match):
    with pytest.raises(exc, match=match):
        sample_training(data, dim=8, max_train=10, seed=0)
