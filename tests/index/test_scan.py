"""CodeScan: ADC search on the faiss and numpy engines against brute force (``quantizer.adc``), filters,
incremental adds, padding and input errors."""

import sys

import numpy as np
import pytest
import torch

from tests.quant._data import low_rank
from yolo_vq.index import scan as search
from yolo_vq.index.scan import CodeScan
from yolo_vq.quant import ProductQuantizer, ResidualQuantizer, VectorQuantizer

D, N, NQ, K = 64, 3000, 16, 10
ENGINES = ["faiss", "numpy"]
PQS = {
    "plain": {"m": 8},
    "pca": {"m": 8, "center": True, "pca_dim": 32},
    "rotation": {"m": 8, "rotation": "random"},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, np.ndarray]:
    """``N`` base vectors and ``NQ`` held-out queries from one low-rank distribution."""
    x = low_rank(N + NQ, D, seed=0)
    return x[:N], x[N:].cpu().numpy()


@pytest.fixture(scope="module", params=list(PQS))
def pq(request, data) -> ProductQuantizer:
    return ProductQuantizer(dim=D, iters=10, **PQS[request.param]).fit(data[0])


@pytest.fixture(scope="module")
def vq(data) -> VectorQuantizer:
    return VectorQuantizer(dim=D, codebook_size=64, iters=10).fit(data[0])


def ids_for(n: int) -> np.ndarray:
    """Ids that are not positions: row i has id 1000 + 3 i."""
    return 1000 + 3 * np.arange(n, dtype=np.int64)


def row_of(ids: np.ndarray) -> np.ndarray:
    return (ids - 1000) // 3


def check_against_brute(dist: np.ndarray, ids: np.ndarray, brute: np.ndarray, k: int) -> None:
    """``dist`` are the k smallest brute-force distances, ascending, and each id's own brute distance is its
    reported one: the ids are the brute-force top-k (up to ties)."""
    assert dist.dtype == np.float32 and ids.dtype == np.int64 and dist.shape == ids.shape == (len(brute), k)
    np.testing.assert_allclose(dist, np.sort(brute, axis=1)[:, :k], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(brute, row_of(ids), 1), dist, rtol=1e-4, atol=1e-4)


def build(quantizer, engine: str, data) -> tuple[CodeScan, torch.Tensor]:
    codes = quantizer.encode(data[0])
    index = CodeScan(quantizer, engine=engine)
    index.add(ids_for(N), codes)
    return index, codes


@pytest.mark.parametrize("engine", ENGINES)
def test_search_equals_brute_force_adc(pq, data, engine):
    index, codes = build(pq, engine, data)
    assert index.engine == engine and len(index) == N
    dist, ids = index.search(data[1], K)
    check_against_brute(dist, ids, pq.adc(data[1], codes).cpu().numpy(), K)
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_numpy_engine_merges_chunks(pq, data, monkeypatch):
    """Many small chunks (the running top-k merge) give the one-chunk result, with and without a filter."""
    index, _ = build(pq, "numpy", data)
    allowed = ids_for(N)[::3]
    expected = [index.search(data[1], K), index.search(data[1], K, allowed=allowed)]
    monkeypatch.setattr(search, "_CHUNK_ROWS", 300)
    for (d1, i1), (d2, i2) in zip(expected, [index.search(data[1], K), index.search(data[1], K, allowed=allowed)]):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(d1, d2)


def test_vq_on_numpy_engine(vq, data):
    index, codes = build(vq, "auto", data)
    assert index.engine == "numpy"  # faiss engine is PQ-256 only
    dist, ids = index.search(torch.from_numpy(data[1]), K)  # torch queries too
    check_against_brute(dist, ids, vq.adc(data[1], codes).cpu().numpy(), K)
    half = torch.from_numpy(data[1]).half()
    np.testing.assert_array_equal(index.search(half, K)[1], index.search(half.float(), K)[1])


def test_uint16_codes_as_store_bytes(data):
    """K > 256: codes are uint16; the store hands them back as (n, code_size) uint8 bytes."""
    vq = VectorQuantizer(dim=D, codebook_size=300, iters=5).fit(data[0])
    codes = vq.encode(data[0]).cpu().numpy()
    assert codes.dtype == np.uint16
    as_codes, as_bytes = CodeScan(vq), CodeScan(vq)
    as_codes.add(ids_for(N), codes)
    as_bytes.add(ids_for(N), codes.view(np.uint8))
    for a, b in zip(as_codes.search(data[1], K), as_bytes.search(data[1], K)):
        np.testing.assert_array_equal(a, b)
    check_against_brute(*as_codes.search(data[1], K), vq.adc(data[1], codes).cpu().numpy(), K)


def test_engines_agree(pq, data):
    (df, idf), (dn, idn) = (build(pq, e, data)[0].search(data[1], K) for e in ENGINES)
    np.testing.assert_array_equal(idf, idn)
    np.testing.assert_allclose(df, dn, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_decoded_code_finds_itself(pq, data, engine):
    index, codes = build(pq, engine, data)
    rows = np.arange(0, N, 150)
    dist, ids = index.search(pq.decode(codes[rows]).cpu().numpy(), 3)
    np.testing.assert_allclose(dist[:, 0], 0, atol=1e-3)
    # the first hit is the row itself, or another row with the very same code
    np.testing.assert_array_equal(codes[row_of(ids[:, 0])].cpu(), codes[rows].cpu())


@pytest.mark.parametrize("engine", ENGINES)
def test_allowed_restricts_to_those_ids(pq, data, engine):
    index, codes = build(pq, engine, data)
    rows = np.sort(np.random.default_rng(0).choice(N, N // 10, replace=False))
    allowed = np.concatenate([ids_for(N)[rows], ids_for(N)[rows[:5]], [5, 999_999]])  # repeats and unknown ids
    dist, ids = index.search(data[1], K, allowed=allowed)
    assert np.isin(ids, ids_for(N)[rows]).all()
    brute = np.full((NQ, N), np.inf, np.float32)
    brute[:, rows] = pq.adc(data[1], codes[rows]).cpu().numpy()
    check_against_brute(dist, ids, brute, K)
    # a filter that keeps everything is the unfiltered search
    for a, b in zip(index.search(data[1], K, allowed=ids_for(N)), index.search(data[1], K)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("order", ["increasing", "shuffled"])
def test_incremental_add_equals_one_add(pq, data, engine, order):
    whole, codes = build(pq, engine, data)
    parts = CodeScan(pq, engine=engine)
    cuts = [slice(0, 700), slice(700, 701), slice(701, 701), slice(701, 2000), slice(2000, N)]
    for s in cuts if order == "increasing" else cuts[::-1]:
        parts.add(ids_for(N)[s], codes[s])
    assert len(parts) == N
    allowed = ids_for(N)[::7]
    for kw in ({}, {"allowed": allowed}):
        (d1, i1), (d2, i2) = whole.search(data[1], K, **kw), parts.search(data[1], K, **kw)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(d1, d2, rtol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_fewer_than_k_candidates_pad(pq, data, engine):
    index = CodeScan(pq, engine=engine)
    d, i = index.search(data[1], 3)  # empty index
    assert np.isinf(d).all() and (i == -1).all() and d.shape == (NQ, 3)
    codes = pq.encode(data[0][:5])
    index.add(ids_for(5), codes)
    d, i = index.search(data[1], K)
    assert np.isfinite(d[:, :5]).all() and np.isinf(d[:, 5:]).all() and (i[:, 5:] == -1).all()
    assert (np.sort(i[:, :5], axis=1) == ids_for(5)).all()
    d, i = index.search(data[1], K, allowed=ids_for(5)[[1, 3]])
    assert set(i[:, :2].ravel()) == {1003, 1009} and (i[:, 2:] == -1).all() and np.isinf(d[:, 2:]).all()
    for unknown in ([123_456], ids_for(5) + 1, ids_for(5) - 1):  # none of these ids is in the index
        d, i = index.search(data[1], K, allowed=unknown)
        assert (i == -1).all() and np.isinf(d).all()


def test_auto_picks_faiss_for_pq(pq):
    assert CodeScan(pq).engine == "faiss"


@pytest.fixture(scope="module")
def index(data) -> CodeScan:
    pq = ProductQuantizer(dim=D, m=8, iters=2).fit(data[0])
    index = CodeScan(pq, engine="numpy")
    index.add(ids_for(10), pq.encode(data[0][:10]))
    return index


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda ix, q: ix.search(q, 0), ValueError, r"k must be a positive int.*got 0"),
        (lambda ix, q: ix.search(q, -3), ValueError, r"k must be a positive int.*got -3"),
        (lambda ix, q: ix.search(q, 2.0), ValueError, r"k must be a positive int.*got 2.0"),
        (lambda ix, q: ix.search(q[:, :32], 5), ValueError, r"queries must be \(q, 64\), got \(16, 32\)"),
        (lambda ix, q: ix.search(q[0], 5), ValueError, r"queries must be \(q, 64\), got \(64,\).*x\[None\]"),
        (lambda ix, q: ix.search(q.astype(np.int32), 5), TypeError, r"queries must be floating point.*float32"),
        (lambda ix, q: ix.search(q.tolist(), 5), TypeError, r"queries must be a numpy array or torch tensor"),
        (lambda ix, q: ix.search(q, 5, allowed=[[1]]), ValueError, r"allowed must be a 1-D array of integer ids"),
        (
            lambda ix, q: ix.add([1], np.zeros((1, 4), np.uint8)),
            ValueError,
            r"codes must be \(n, 8\) uint8 for this ProductQuantizer \(code_size=8 bytes\), got shape \(1, 4\)",
        ),
        (
            lambda ix, q: ix.add([1], np.zeros((1, 8), np.int64)),
            TypeError,
            r"codes must be \(n, 8\) uint8 .* got int64",
        ),
        (lambda ix, q: ix.add([1, 2], np.zeros((1, 8), np.uint8)), ValueError, r"got 2 ids and 1 code rows"),
        (lambda ix, q: ix.add([-1], np.zeros((1, 8), np.uint8)), ValueError, r"ids must be >= 0.*got -1"),
        (lambda ix, q: ix.add([1003], np.zeros((1, 8), np.uint8)), ValueError, r"ids must be unique.*\[1003\]"),
        (lambda ix, q: ix.add([1.5], np.zeros((1, 8), np.uint8)), ValueError, r"ids must be a 1-D array of integer"),
    ],
)
def test_bad_inputs(index, data, call, error, match):
    with pytest.raises(error, match=match):
        call(index, data[1])
    assert len(index) == 10  # a refused add leaves the index as it was


def test_bad_quantizer_or_engine(pq, vq, data, monkeypatch):
    rq = ResidualQuantizer(dim=D, levels=2, codebook_size=16, iters=2).fit(data[0])
    with pytest.raises(ValueError, match=r"search supports PQ/VQ codebooks.*ResidualQuantizer.*ProductQuantizer"):
        CodeScan(rq)
    with pytest.raises(ValueError, match=r"not trained: call .fit\(x\)"):
        CodeScan(ProductQuantizer(dim=D, m=8))
    with pytest.raises(TypeError, match=r"quantizer must be a trained yolo_vq.quant quantizer"):
        CodeScan(np.zeros((4, D)))
    with pytest.raises(ValueError, match=r"engine must be one of \('auto', 'faiss', 'numpy'\), got 'annoy'"):
        CodeScan(pq, engine="annoy")
    with pytest.raises(ValueError, match=r"engine='faiss' supports ProductQuantizer with codebook_size=256.*numpy"):
        CodeScan(vq, engine="faiss")
    small = VectorQuantizer(dim=D, codebook_size=100, iters=1).fit(data[0])
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 100\), got max 200"):
        CodeScan(small).add([1], np.full((1, 1), 200, np.uint8))
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss-cpu were not installed
    with pytest.raises(ImportError, match=r"pip install faiss-cpu"):
        CodeScan(pq, engine="faiss")
    assert CodeScan(pq).engine == "numpy"  # auto falls back
