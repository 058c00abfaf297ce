"""Residual quantizer: levels, greedy vs beam encoding, ADC tables + norms, determinism."""

import pytest
import torch

from tests.quant._data import DEVICE
from tests.quant._data import low_rank as _low_rank
from yolo_vq.quant import ResidualQuantizer

D = 32


def low_rank(n: int, d: int = D, *, rank: int = 8, seed: int = 0) -> torch.Tensor:
    return _low_rank(n, d, rank=rank, seed=seed)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return low_rank(2000)


@pytest.fixture(scope="module")
def rq(x) -> ResidualQuantizer:
    return ResidualQuantizer(dim=D, levels=4, iters=10).fit(x)


def mse(q: ResidualQuantizer, x: torch.Tensor, **kw) -> float:
    return float((x - q.decode(q.encode(x, **kw))).pow(2).sum(1).mean())


def test_more_levels_beat_fewer(x):
    errs = [ResidualQuantizer(dim=D, levels=n, iters=10).fit(x).stats["distortion"] for n in (1, 2, 4)]
    assert errs[0] > errs[1] > errs[2], errs


def test_greedy_codes_equal_brute_force_per_level(rq, x):
    codes = rq.encode(x[:300])
    assert codes.shape == (300, 4) and codes.dtype == torch.uint8 and rq.code_size == 4
    r = x[:300]
    for level in range(4):
        ref = torch.cdist(r, rq.codebooks[level]).argmin(1)
        assert torch.equal(codes[:, level].long(), ref), f"level {level}"
        r = r - rq.codebooks[level][ref]


def test_beam_of_one_is_greedy(rq, x):
    assert torch.equal(rq._beam(x[:200], 1), rq._greedy(x[:200]))


@pytest.mark.parametrize("beam", [2, 4, 8])
def test_beam_distortion_not_worse_than_greedy(rq, x, beam):
    held_out = low_rank(500, seed=7)
    assert mse(rq, held_out, beam_size=beam) <= mse(rq, held_out)
    assert mse(rq, x, beam_size=beam) <= mse(rq, x)


def test_wider_beam_helps_on_average(rq):
    held_out = low_rank(500, seed=7)
    assert mse(rq, held_out, beam_size=8) < mse(rq, held_out, beam_size=1)


@pytest.mark.parametrize("beam", [1, 4])
def test_adc_tables_plus_norms_equal_distance_to_decoded(rq, x, beam):
    q = low_rank(6, seed=3)
    codes = rq.encode(x[:200], beam_size=beam)
    tables = rq.distance_tables(q)
    assert tables.shape == (6, 4, 256) and tables.dtype == torch.float32 and rq.needs_norms
    looked_up = tables[:, torch.arange(4), codes.long()].sum(-1)  # (q, n)
    ref = torch.cdist(q, rq.decode(codes)).pow(2)
    scale = float(q.pow(2).sum(1).max())  # ||q||^2 - 2<q,x> + ||x||^2 cancels: compare at the scale of the terms
    torch.testing.assert_close(looked_up + rq.norms(codes), ref, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(rq.adc(q, codes), ref, rtol=0, atol=1e-5 * scale)


def test_fit_is_deterministic(x):
    a = ResidualQuantizer(dim=D, levels=2, iters=5, seed=1).fit(x)
    b = ResidualQuantizer(dim=D, levels=2, iters=5, seed=1).fit(x)
    assert torch.equal(a.codebooks, b.codebooks)
    assert not torch.equal(a.codebooks, ResidualQuantizer(dim=D, levels=2, iters=5, seed=2).fit(x).codebooks)


def test_stats_and_configured_beam(rq, x):
    assert rq.stats["n_train"] == 2000 and len(rq.stats["greedy_distortion_per_level"]) == 4
    beamed = ResidualQuantizer(**{**rq.config(), "beam_size": 4})
    beamed.load_state_dict(rq.state_dict())
    beamed.to(DEVICE)
    assert torch.equal(beamed.encode(x[:100]), rq.encode(x[:100], beam_size=4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"levels": 0}, "levels must be"), ({"levels": 2, "beam_size": 0}, "beam_size must be")],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResidualQuantizer(dim=D, **kwargs)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # dynamo=False is the legacy exporter, on purpose
def test_encode_exports_to_onnx_with_beam(rq, x, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")

    class Encode(torch.nn.Module):
        def __init__(self, q):
            super().__init__()
            self.q = q

        def forward(self, v):
            return self.q.encode(v, beam_size=4)

    q = rq.cpu()
    path = tmp_path / "rq.onnx"
    torch.onnx.export(
        Encode(q),
        (x[:3].cpu(),),
        str(path),
        dynamo=False,
        opset_version=18,
        input_names=["x"],
        dynamic_axes={"x": {0: "n"}},
    )
    onnx.checker.check_model(onnx.load(str(path)))
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x[:50].cpu().numpy()})
    assert (got == q.encode(x[:50].cpu(), beam_size=4).numpy()).all()
    rq.to(DEVICE)
