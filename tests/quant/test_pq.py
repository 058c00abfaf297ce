"""Product quantizer: codes, distortion, OPQ, ADC tables, streaming fit, determinism, ONNX export."""

import itertools

import numpy as np
import pytest
import torch

from tests.quant._data import DEVICE
from tests.quant._data import low_rank as _low_rank
from yolo_vq.quant import ProductQuantizer

D = 64


def low_rank(n: int, d: int = D, *, rank: int = 8, seed: int = 0) -> torch.Tensor:
    return _low_rank(n, d, rank=rank, seed=seed)


def rotated_anisotropic(n: int, d: int = D, seed: int = 0) -> torch.Tensor:
    """Gaussian with a decaying spectrum, randomly rotated: energy and correlation spread over all sub-spaces."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(1, -1, d)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return ((torch.randn(n, d, generator=g) * scale) @ q).to(DEVICE)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return low_rank(3000)


VARIANTS = {
    "plain": {},
    "center": {"center": True},
    "opq": {"opq": True, "opq_iters": 3},
    "pca32": {"pca_dim": 32},
    "pca_rotation": {"pca_dim": D},
    "pca32_opq": {"pca_dim": 32, "opq": True, "opq_iters": 2},
    "random_rotation": {"rotation": "random"},
    "random_opq": {"rotation": "random", "opq": True, "opq_iters": 2},
    "partial_rotation": {"rotation": "random", "rotation_blocks": [(24, 40), (40, 64)]},
}


@pytest.fixture(scope="module")
def fitted(x) -> dict[str, ProductQuantizer]:
    return {name: ProductQuantizer(dim=D, m=8, iters=10, **kw).fit(x) for name, kw in VARIANTS.items()}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_codes_equal_brute_force_nearest_centroids(fitted, x, name):
    pq = fitted[name]
    codes = pq.encode(x[:500])
    assert codes.shape == (500, 8) and codes.dtype == torch.uint8 and pq.code_size == 8
    y = ((x[:500] - pq.mean) @ pq.transform).view(500, 8, -1)  # the quantized space
    for j in range(8):
        ref = torch.cdist(y[:, j], pq.codebooks[j]).argmin(1)
        assert torch.equal(codes[:, j].long(), ref), f"sub-space {j}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_adc_tables_equal_distance_to_decoded(fitted, x, name):
    pq = fitted[name]
    q, base = low_rank(7, seed=9), x[:300]
    codes = pq.encode(base)
    tables = pq.distance_tables(q)
    assert tables.shape == (7, 8, 256) and tables.dtype == torch.float32
    adc = tables[:, torch.arange(8), codes.long()].sum(-1)  # (q, n)
    ref = torch.cdist(q, pq.decode(codes)).pow(2)
    torch.testing.assert_close(adc, ref, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(pq.adc(q, codes), ref, rtol=1e-4, atol=1e-2)
    assert not pq.needs_norms and torch.equal(pq.norms(codes), torch.zeros(300, device=DEVICE))


def test_distortion_falls_as_code_size_grows(x):
    mse = [ProductQuantizer(dim=D, m=m, iters=10).fit(x).stats["distortion"] for m in (4, 8, 16, 32)]
    assert all(a > b for a, b in itertools.pairwise(mse)), mse


def test_decode_encode_error_matches_stats(fitted, x):
    pq = fitted["plain"]
    err = float((x - pq.decode(pq.encode(x))).pow(2).sum(1).mean())
    assert abs(err - pq.stats["distortion"]) <= 1e-4 * err
    assert pq.stats["n_train"] == pq.stats["n_seen"] == 3000 and 0 < pq.stats["relative_distortion"] < 1


def test_opq_beats_pq_on_correlated_dims():
    x = rotated_anisotropic(4000)
    pq = ProductQuantizer(dim=D, m=8, iters=10).fit(x)
    opq = ProductQuantizer(dim=D, m=8, iters=10, opq=True, opq_iters=5).fit(x)
    assert opq.stats["distortion"] < 0.9 * pq.stats["distortion"], (opq.stats, pq.stats)
    t = opq.transform
    torch.testing.assert_close(t.T @ t, torch.eye(D, device=DEVICE), atol=1e-4, rtol=0)  # orthogonal


def test_random_rotation_spreads_variance_over_subspaces():
    """All variance in one sub-space's dims: plain PQ spends 7 of 8 codebooks on nothing, a rotation spreads it."""
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(3000, D)
    x[:, :8] = torch.randn(3000, 8, generator=g) @ torch.randn(8, 8, generator=g)
    x = x.to(DEVICE)
    plain = ProductQuantizer(dim=D, m=8, iters=10).fit(x)
    rot = ProductQuantizer(dim=D, m=8, iters=10, rotation="random").fit(x)
    assert rot.stats["distortion"] < 0.8 * plain.stats["distortion"], (rot.stats, plain.stats)  # measured 0.64
    t = rot.transform
    torch.testing.assert_close(t.T @ t, torch.eye(D, device=DEVICE), atol=1e-4, rtol=0)
    again = ProductQuantizer(dim=D, m=8, iters=10, rotation="random").fit(x)
    torch.testing.assert_close(again.transform, t, atol=0, rtol=0)  # seeded


def test_pca_keeps_energy_and_reduces_dims(fitted):
    pq = fitted["pca32"]
    assert pq.transform.shape == (D, 32) and pq.codebooks.shape == (8, 256, 4)
    assert pq.stats["pca_energy_kept"] > 0.99  # rank-8 data


def test_fit_is_deterministic_and_seeded(x):
    a = ProductQuantizer(dim=D, m=8, iters=5, opq=True, opq_iters=2, seed=1).fit(x)
    b = ProductQuantizer(dim=D, m=8, iters=5, opq=True, opq_iters=2, seed=1).fit(x)
    c = ProductQuantizer(dim=D, m=8, iters=5, opq=True, opq_iters=2, seed=2).fit(x)
    for name, buf in a.state_dict().items():
        assert torch.equal(buf, b.state_dict()[name]), name
    assert not torch.equal(a.codebooks, c.codebooks)


def test_fit_from_stream_equals_fit_from_array(x):
    a = ProductQuantizer(dim=D, m=8, iters=5).fit(x)
    b = ProductQuantizer(dim=D, m=8, iters=5).fit(b.cpu().numpy() for b in x.split(500))
    assert torch.equal(a.codebooks.cpu(), b.codebooks.cpu())


def test_fit_subsamples_to_max_train(x):
    pq = ProductQuantizer(dim=D, m=8, iters=3, max_train=1000).fit(iter(x.split(256)))
    assert pq.stats["n_train"] == 1000 and pq.stats["n_seen"] == 3000


def test_state_dict_round_trip_and_buffers(fitted, x):
    pq = fitted["pca32_opq"]
    assert set(dict(pq.named_buffers())) == {"mean", "transform", "codebooks"}
    fresh = ProductQuantizer(**pq.config())
    fresh.load_state_dict(pq.state_dict())
    fresh.to(DEVICE)
    assert torch.equal(fresh.encode(x[:100]), pq.encode(x[:100]))


def test_numpy_input_and_decode_dtype(fitted, x):
    pq = fitted["plain"]
    codes = pq.encode(x[:10].cpu().numpy())
    assert torch.equal(codes, pq.encode(x[:10]))
    out = pq.decode(codes.cpu().numpy())
    assert out.dtype == torch.float32 and out.shape == (10, D)
    assert pq.encode(x[:0]).shape == (0, 8)


def test_autocast_and_input_dtypes_do_not_change_codes(fitted, x):
    pq = fitted["opq"]
    ref = pq.encode(x[:200])
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert torch.equal(pq.encode(x[:200]), ref)  # distances stay float32 under autocast
        assert pq.distance_tables(x[:2]).dtype == torch.float32
    assert torch.equal(pq.encode(x[:200].double()), ref)
    assert (pq.encode(x[:200].half()) == ref).float().mean() > 0.9  # float16 input loses precision, not codes


def test_codebook_size_above_256_gives_uint16(x):
    pq = ProductQuantizer(dim=D, m=4, codebook_size=300, iters=3).fit(x)
    codes = pq.encode(x[:50])
    assert codes.dtype == torch.uint16 and pq.code_size == 8
    torch.testing.assert_close(pq.decode(codes), pq.decode(codes.to(torch.int64)))


def test_partial_rotation_leaves_other_dims_on_their_axes(fitted, tmp_path):
    from yolo_vq.quant import load_codebook, save_codebook

    pq = fitted["partial_rotation"]
    t = pq.transform
    torch.testing.assert_close(t[:24, :24], torch.eye(24, device=t.device), atol=0, rtol=0)
    assert t[:24, 24:].abs().max() == 0 and t[24:, :24].abs().max() == 0
    torch.testing.assert_close(t.T @ t, torch.eye(D, device=t.device), atol=1e-4, rtol=0)
    assert t[24:40, 40:].abs().max() == 0 and t[40:, 24:40].abs().max() == 0  # two blocks, not one
    for a, b in [(24, 40), (40, 64)]:  # each block is really rotated
        assert (t[a:b, a:b] - torch.eye(b - a, device=t.device)).abs().max() > 0.1
    save_codebook(pq, tmp_path / "cb")
    back = load_codebook(tmp_path / "cb", device=t.device)
    assert back.rotation_blocks == [(24, 40), (40, 64)]
    torch.testing.assert_close(back.transform, t, atol=0, rtol=0)


@pytest.mark.parametrize("blocks", [[(24, 40), (40, 64)], [(0, 8), (8, 16), (16, 24), (32, 64)], [(0, 64)]])
def test_block_rotation_is_applied_block_by_block_as_the_dense_transform(blocks):
    """Encoding applies a block-diagonal rotation block by block (equal blocks batched, gaps passed through): the
    same projection as the dense ``(x - mean) @ transform``, hence the same codes."""
    x = low_rank(3000)
    pq = ProductQuantizer(dim=D, m=8, codebook_size=16, rotation="random", rotation_blocks=blocks, center=True,
                          iters=4).to(DEVICE).fit(x)
    dense = (x - pq.mean) @ pq.transform
    torch.testing.assert_close(pq._project(x), dense, atol=1e-5, rtol=1e-5)
    from yolo_vq.quant.kmeans import assign

    want, _ = assign(pq._split(dense), pq.codebooks, with_distance=False)
    assert (pq.encode(x).long() == want.transpose(0, 1)).float().mean() >= 0.999


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 60, "m": 8}, r"D=60 \(dim\) is not divisible by m=8: choose m dividing D"),
        ({"dim": 64, "m": 8, "pca_dim": 20}, r"D=20 \(pca_dim\) is not divisible by m=8.*set pca_dim"),
        ({"dim": 64, "m": 8, "pca_dim": 80}, "pca_dim must be"),
        ({"dim": 64, "m": 0}, "m must be"),
        ({"dim": 64, "m": 8, "codebook_size": 70000}, "codebook_size"),
        ({"dim": 64, "m": 8, "init": "best"}, "init must be"),
        ({"dim": 64, "m": 8, "rotation": "haar"}, "rotation must be None or 'random'"),
        ({"dim": 64, "m": 8, "rotation_blocks": [(0, 8)]}, "needs rotation='random'"),
        ({"dim": 64, "m": 8, "rotation": "random", "rotation_blocks": [(8, 80)]}, r"0 <= start < stop <= 64"),
        ({"dim": 64, "m": 8, "rotation": "random", "rotation_blocks": [(0, 9), (8, 16)]}, "disjoint"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProductQuantizer(**kwargs)


def test_encode_rejects_bad_input(fitted):
    pq = fitted["plain"]
    with pytest.raises(ValueError, match=r"must be \(n, 64\), got \(3, 32\).*dim=64"):
        pq.encode(torch.zeros(3, 32, device=DEVICE))
    with pytest.raises(TypeError, match="floating point"):
        pq.encode(torch.zeros(3, 64, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"codes must be \(n, 8\)"):
        pq.decode(torch.zeros(3, 4, dtype=torch.uint8, device=DEVICE))
    with pytest.raises(RuntimeError, match="not trained"):
        ProductQuantizer(dim=64, m=8).encode(torch.zeros(3, 64))
    with pytest.raises(ValueError, match="at least codebook_size=256"):
        ProductQuantizer(dim=64, m=8).fit(torch.zeros(100, 64))


class _Encode(torch.nn.Module):
    def __init__(self, pq: ProductQuantizer) -> None:
        super().__init__()
        self.pq = pq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pq.encode(x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # dynamo=False is the legacy exporter, on purpose
@pytest.mark.parametrize("name", ["plain", "pca32_opq"])
def test_encode_exports_to_onnx_and_matches_onnxruntime(fitted, x, name, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pq = fitted[name].cpu()
    path = tmp_path / "pq_encode.onnx"
    torch.onnx.export(
        _Encode(pq).eval(),
        (x[:4].cpu(),),
        str(path),
        dynamo=False,
        opset_version=18,
        input_names=["x"],
        output_names=["codes"],
        dynamic_axes={"x": {0: "n"}, "codes": {0: "n"}},
    )
    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = x[:257].cpu()  # another batch size than at export time
    (got,) = sess.run(None, {"x": batch.numpy()})
    assert got.dtype == np.uint8 and got.shape == (257, 8)
    np.testing.assert_array_equal(got, pq.encode(batch).numpy())
    fitted[name].to(DEVICE)
