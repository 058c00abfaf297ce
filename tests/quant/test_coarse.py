"""The coarse quantizer (IVF lists): training, assignment, probing, its file beside a codebook."""

from __future__ import annotations

import json

import numpy as np
import pytest

from yolo_vq.errors import CodebookError
from yolo_vq.quant import CoarseQuantizer, ProductQuantizer, load_codebook, save_coarse, save_codebook
from yolo_vq.quant.coarse import NESTED_ABOVE, coarse_path, supported_lists
from yolo_vq.quant.io import codebook_checksum


def blobs(n=4000, d=48, centres=20, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)) * 4
    return (c[rng.integers(0, centres, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_supported_lists():
    assert supported_lists(10_000, 64) == 64
    assert supported_lists(100, 64) == 100 // 16  # what the data supports
    assert supported_lists(1, "auto") == 1
    assert supported_lists(1_000_000, "auto") == 4096  # 4 sqrt(N) as a power of two
    with pytest.raises(ValueError, match="lists must be a positive int"):
        supported_lists(100, 0)


def test_fit_assign_probe_are_nearest_centroids():
    x = blobs()
    cq = CoarseQuantizer.fit(x, 32, reduced_dim=8)
    assert (cq.dim, cq.reduced_dim, cq.lists) == (48, 8, 32)
    z = cq.reduce(x)
    d = ((z[:, None, :] - cq.centroids[None]) ** 2).sum(-1)
    lists = cq.assign(x)
    assert lists.dtype == np.int32 and lists.min() >= 0 and lists.max() < 32
    np.testing.assert_array_equal(d[np.arange(len(x)), lists], d.min(1))  # the nearest (ties aside)
    p = cq.probe(x[:5], 4)
    assert p.shape == (5, 4)
    for row, dd in zip(p, d[:5]):
        np.testing.assert_allclose(dd[row], np.sort(dd)[:4], rtol=1e-5)
    assert cq.probe(x[:1], 1000).shape == (1, 32)  # nprobe beyond the list count: all lists
    assert len(np.unique(lists)) == 32  # k-means re-seeds empty lists
    with pytest.raises(ValueError, match=r"\(n, 48\)"):
        cq.assign(x[:, :10])


def test_nested_assignment_agrees_with_exact_search():
    """Above NESTED_ABOVE lists a vector's list is searched among the centroids of a few groups of centroids: it
    finds the exact nearest for nearly all vectors drawn like the data the centroids were fitted to (clustered, as
    embeddings are; the benchmark's real embeddings: 99.20%)."""
    rng = np.random.default_rng(1)
    d = 16
    centers = rng.normal(size=(64, d)) * 3

    def draw(n):
        return centers[rng.integers(0, 64, n)] + rng.normal(size=(n, d))

    cq = CoarseQuantizer(np.zeros(d), np.eye(d), draw(NESTED_ABOVE + 500))
    x = draw(2000)
    exact = ((x[:, None, :] - cq.centroids[None]) ** 2).sum(-1).argmin(1)
    assert (cq.assign(x) == exact).mean() > 0.97


def test_saved_beside_a_codebook_keeps_its_checksum(tmp_path):
    x = blobs()
    pq = ProductQuantizer(dim=48, m=8, codebook_size=16).fit(x)
    save_codebook(pq, tmp_path / "cb")
    sha = codebook_checksum(tmp_path / "cb")
    assert load_codebook(tmp_path / "cb").coarse is None
    cq = CoarseQuantizer.fit(x, 16, reduced_dim=8)
    save_coarse(cq, tmp_path / "cb")
    assert codebook_checksum(tmp_path / "cb") == sha  # indexes and exported graphs still know this codebook
    loaded = load_codebook(tmp_path / "cb").coarse
    np.testing.assert_array_equal(loaded.centroids, cq.centroids)
    np.testing.assert_array_equal(loaded.assign(x), cq.assign(x))
    assert json.loads((tmp_path / "cb.json").read_text())["coarse"]["lists"] == 16
    with pytest.raises(CodebookError, match="dim=10"):
        save_coarse(CoarseQuantizer(np.zeros(10), np.eye(10, 4), np.zeros((3, 4))), tmp_path / "cb")

    f = coarse_path(tmp_path / "cb")
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(CodebookError, match="checksum does not match"):
        load_codebook(tmp_path / "cb")
    f.unlink()
    with pytest.raises(CodebookError, match="unreadable"):
        load_codebook(tmp_path / "cb")


def test_without_faiss_numpy_assigns_and_probes_the_same(monkeypatch):
    from yolo_vq.quant import coarse as coarse_module

    x = blobs()
    cq = CoarseQuantizer.fit(x, 32, reduced_dim=8)
    lists, probed, every = cq.assign(x), cq.probe(x[:50], 5), cq.probe(x[:3], 100)
    monkeypatch.setattr(coarse_module, "_faiss", lambda: None)
    np.testing.assert_array_equal(cq.assign(x), lists)
    np.testing.assert_array_equal(cq.probe(x[:50], 5), probed)
    np.testing.assert_array_equal(cq.probe(x[:3], 100), every)
