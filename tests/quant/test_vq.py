"""Plain k-means vector quantizer."""

import pytest
import torch

from tests.quant._data import DEVICE
from tests.quant._data import low_rank as _low_rank
from yolo_vq.quant import VectorQuantizer

D = 16


def low_rank(n: int, d: int = D, *, rank: int = 4, seed: int = 0) -> torch.Tensor:
    return _low_rank(n, d, rank=rank, seed=seed)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return low_rank(3000)


@pytest.mark.parametrize(("k", "dtype", "size"), [(64, torch.uint8, 1), (256, torch.uint8, 1), (600, torch.uint16, 2)])
def test_codes_equal_brute_force_and_dtype(x, k, dtype, size):
    vq = VectorQuantizer(dim=D, codebook_size=k, iters=8).fit(x)
    codes = vq.encode(x)
    assert codes.shape == (3000, 1) and codes.dtype == dtype and vq.code_size == size
    assert torch.equal(codes[:, 0].long(), torch.cdist(x, vq.codebook).argmin(1))
    assert torch.equal(vq.decode(codes), vq.codebook[codes[:, 0].long()])


def test_distortion_falls_with_codebook_size(x):
    errs = [VectorQuantizer(dim=D, codebook_size=k, iters=8).fit(x).stats["distortion"] for k in (16, 64, 256)]
    assert errs[0] > errs[1] > errs[2], errs


def test_adc_tables_equal_distance_to_decoded(x):
    vq = VectorQuantizer(dim=D, codebook_size=128, iters=5).fit(x)
    q, codes = low_rank(5, seed=4), vq.encode(x[:400])
    tables = vq.distance_tables(q)
    assert tables.shape == (5, 1, 128) and tables.dtype == torch.float32
    ref = torch.cdist(q, vq.decode(codes)).pow(2)
    torch.testing.assert_close(tables[:, 0, codes[:, 0].long()], ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(vq.adc(q, codes), ref, rtol=1e-4, atol=1e-3)


def test_fit_is_deterministic_and_streams(x):
    a = VectorQuantizer(dim=D, codebook_size=32, seed=3).fit(x)
    b = VectorQuantizer(dim=D, codebook_size=32, seed=3).fit(iter(x.split(100)))
    assert torch.equal(a.codebook, b.codebook)


def test_duplicated_points_leave_no_empty_or_nan_centroid():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, D, generator=g).repeat(30, 1).to(DEVICE)
    vq = VectorQuantizer(dim=D, codebook_size=40, init="random").fit(x)
    assert vq.stats["kmeans_reseeded"] > 0 and torch.isfinite(vq.codebook).all()
    assert torch.bincount(vq.encode(x)[:, 0].long(), minlength=40).min() > 0
    assert vq.stats["distortion"] < 1e-8


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"codebook_size": 65537}, ValueError, r"codebook_size must be an int in \[1, 65536\]"),
        ({"codebook_size": 0}, ValueError, "codebook_size"),
        ({"codebook_size": 8, "seed": 1.5}, TypeError, "seed must be an int"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        VectorQuantizer(dim=D, **kwargs)


def test_fit_needs_at_least_k_vectors():
    with pytest.raises(ValueError, match="at least codebook_size=512 vectors, got 100"):
        VectorQuantizer(dim=D, codebook_size=512).fit(low_rank(100))


def test_decode_rejects_out_of_range_codes(x):
    vq = VectorQuantizer(dim=D, codebook_size=300, iters=2).fit(x)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 300\)"):
        vq.decode(torch.tensor([[300]], device=DEVICE))
    with pytest.raises(TypeError, match="integer"):
        vq.decode(torch.tensor([[1.0]], device=DEVICE))
