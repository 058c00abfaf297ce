"""Codebook files: safetensors + JSON round trip, mismatch checks, corrupt files, fingerprints."""

import hashlib
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.quant._data import DEVICE
from tests.quant._data import low_rank as _low_rank
from yolo_vq.quant import (
    CodebookError,
    ProductQuantizer,
    ResidualQuantizer,
    VectorQuantizer,
    codebook_paths,
    fingerprint_module,
    load_codebook,
    save_codebook,
)

D = 32


def low_rank(n: int, d: int = D, *, rank: int = 6, seed: int = 0) -> torch.Tensor:
    return _low_rank(n, d, rank=rank, seed=seed)


EMBEDDING = {"layers": [16, 19, 22], "mode": "roi", "pool": "avg", "dim": D}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return low_rank(1000)


QUANTIZERS = {
    "pq": lambda: ProductQuantizer(dim=D, m=4, iters=3),
    "opq_pca": lambda: ProductQuantizer(dim=D, m=4, iters=3, pca_dim=16, opq=True, opq_iters=2),
    "blocks": lambda: ProductQuantizer(
        dim=D, m=4, iters=3, rotation="random", rotation_blocks=[(16, 32), (0, 8)], seed=2
    ),
    "rq": lambda: ResidualQuantizer(dim=D, levels=2, iters=3, beam_size=2),
    "vq": lambda: VectorQuantizer(dim=D, codebook_size=300, iters=3),
}


@pytest.fixture(scope="module")
def fitted(x):
    return {name: make().fit(x) for name, make in QUANTIZERS.items()}


@pytest.fixture
def saved(fitted, tmp_path):
    save_codebook(fitted["pq"], tmp_path / "cb", embedding=EMBEDDING, model_fingerprint="abc123")
    return tmp_path / "cb"


@pytest.mark.parametrize("name", list(QUANTIZERS))
@pytest.mark.parametrize("given", ["cb", "cb.safetensors", "cb.json"])
def test_round_trip_is_bit_exact(fitted, x, tmp_path, name, given, monkeypatch):
    q = fitted[name]
    st, js = save_codebook(q, tmp_path / given, embedding=EMBEDDING, model_fingerprint="abc123")
    assert (st.name, js.name) == ("cb.safetensors", "cb.json") and st.is_file() and js.is_file()

    def no_pickle(*args, **kwargs):
        raise AssertionError("load_codebook must not unpickle")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = load_codebook(tmp_path / given, expect_dim=D, expect_fingerprint="abc123", device=DEVICE)
    assert type(loaded) is type(q) and loaded.config() == q.config()
    for key, buf in q.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], buf), key
    codes = q.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), q.decode(codes))
    assert loaded.stats == json.loads(json.dumps(q.stats))
    meta = loaded.meta
    assert meta["format_version"] == 1 and meta["embedding"] == EMBEDDING and meta["model_fingerprint"] == "abc123"
    assert meta["quantizer"]["type"] == type(q).__name__ and meta["code_size"] == q.code_size
    assert meta["created_utc"].endswith("+00:00") and isinstance(meta["yolo_vq_version"], str)


# ``quantizer.params`` as the files of yolo_vq before issue 11 hold them (``config()`` of that version, through JSON:
# tuples became lists). Files already written must keep loading, and new files must keep writing the same params.
PREVIOUS_PARAMS = {
    "pq": {"dim": 32, "m": 4, "codebook_size": 256, "center": False, "pca_dim": None, "rotation": None,
           "rotation_blocks": None, "opq": False, "opq_iters": 10, "opq_kmeans_iters": 4, "iters": 3, "tol": 1e-4,
           "init": "auto", "max_train": 256000, "seed": 0},
    "opq_pca": {"dim": 32, "m": 4, "codebook_size": 256, "center": True, "pca_dim": 16, "rotation": None,
                "rotation_blocks": None, "opq": True, "opq_iters": 2, "opq_kmeans_iters": 4, "iters": 3, "tol": 1e-4,
                "init": "auto", "max_train": 256000, "seed": 0},
    "blocks": {"dim": 32, "m": 4, "codebook_size": 256, "center": False, "pca_dim": None, "rotation": "random",
               "rotation_blocks": [[0, 8], [16, 32]], "opq": False, "opq_iters": 10, "opq_kmeans_iters": 4, "iters": 3,
               "tol": 1e-4, "init": "auto", "max_train": 256000, "seed": 2},
    "rq": {"dim": 32, "levels": 2, "codebook_size": 256, "beam_size": 2, "iters": 3, "tol": 1e-4, "init": "auto",
           "max_train": 256000, "seed": 0},
    "vq": {"dim": 32, "codebook_size": 300, "iters": 3, "tol": 1e-4, "init": "auto", "max_train": 256000, "seed": 0},
}


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_files_of_the_previous_version_load_and_encode_identically(fitted, x, tmp_path, name):
    q = fitted[name]
    save_codebook(q, tmp_path / "new")
    assert json.loads(codebook_paths(tmp_path / "new")[1].read_text())["quantizer"] == {
        "type": type(q).__name__,
        "params": PREVIOUS_PARAMS[name],
    }
    # a pair as the previous version wrote it, made by hand: buffers + the JSON fields load_codebook reads
    st, js = codebook_paths(tmp_path / "old")
    save_file({k: v.detach().cpu().contiguous() for k, v in q.state_dict().items()}, str(st))
    js.write_text(json.dumps({
        "format_version": 1,
        "quantizer": {"type": type(q).__name__, "params": PREVIOUS_PARAMS[name]},
        "dim": D,
        "code_size": q.code_size,
        "embedding": None,
        "model_fingerprint": None,
        "stats": {},
        "created_utc": "2024-01-01T00:00:00+00:00",
        "yolo_vq_version": "0.1.0",
        "tensors": {"file": st.name, "sha256": hashlib.sha256(st.read_bytes()).hexdigest()},
    }))
    old = load_codebook(tmp_path / "old", device=DEVICE)
    assert type(old) is type(q) and old.config() == q.config()
    codes = q.encode(x)
    assert torch.equal(old.encode(x), codes) and old.encode(x).dtype == codes.dtype
    assert torch.equal(old.decode(codes), q.decode(codes))
    assert torch.equal(old.distance_tables(x[:5]), q.distance_tables(x[:5]))


def test_dim_mismatch_names_the_owner_and_the_fix(saved):
    with pytest.raises(CodebookError, match=r"expect_dim=448.*abc123.*layers=\[16, 19, 22\].*Fix: train") as e:
        load_codebook(saved, expect_dim=448)
    assert isinstance(e.value, ValueError)


def test_fingerprint_mismatch_raises_or_warns(saved):
    with pytest.raises(CodebookError, match=r"model fingerprint 'abc123', got 'zzz'"):
        load_codebook(saved, expect_fingerprint="zzz")
    with pytest.warns(UserWarning, match="does not fit"):
        q = load_codebook(saved, expect_fingerprint="zzz", expect_dim=448, allow_mismatch=True)
    assert q.dim == D


def _rewrite_json(path, **changes):
    js = codebook_paths(path)[1]
    meta = json.loads(js.read_text())
    meta.update(changes)
    js.write_text(json.dumps(meta))


def _drop_tensor(path):
    st, js = codebook_paths(path)
    tensors = load_file(str(st))
    tensors.pop("codebooks")
    save_file(tensors, str(st))
    meta = json.loads(js.read_text())
    meta["tensors"]["sha256"] = None  # a hand-made file without checksum
    js.write_text(json.dumps(meta))


CORRUPTIONS = {
    "bad json": (lambda p: codebook_paths(p)[1].write_text("{not json"), "not valid codebook JSON"),
    "json not an object": (lambda p: codebook_paths(p)[1].write_text("[1, 2]"), "expected a JSON object"),
    "missing sidecar": (lambda p: codebook_paths(p)[1].unlink(), "metadata file missing"),
    "missing tensors file": (lambda p: codebook_paths(p)[0].unlink(), "tensor file missing"),
    "unknown format": (lambda p: _rewrite_json(p, format_version=99), "format_version 99 is not supported"),
    "unknown type": (lambda p: _rewrite_json(p, quantizer={"type": "Nope", "params": {}}), "unknown quantizer type"),
    "bad params": (
        lambda p: _rewrite_json(p, quantizer={"type": "ProductQuantizer", "params": {"dim": 32, "m": 5}}),
        "bad ProductQuantizer parameters",
    ),
    "truncated safetensors": (
        lambda p: codebook_paths(p)[0].write_bytes(codebook_paths(p)[0].read_bytes()[:100]),
        "checksum does not match",
    ),
    "truncated, no checksum": (
        lambda p: (
            codebook_paths(p)[0].write_bytes(codebook_paths(p)[0].read_bytes()[:100]),
            _rewrite_json(p, tensors={}),
        ),
        "unreadable safetensors file",
    ),
    "missing tensor": (_drop_tensor, "tensors do not match the ProductQuantizer"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_files_raise_one_line_codebook_error(saved, case):
    corrupt, match = CORRUPTIONS[case]
    corrupt(saved)
    with pytest.raises(CodebookError, match=match) as e:
        load_codebook(saved)
    msg = str(e.value)
    assert "\n" not in msg and "cb." in msg  # one line, names the file
    assert e.value.__cause__ is None  # no raw safetensors/json traceback chained


def test_save_rejects_untrained_and_unserialisable(tmp_path, fitted):
    with pytest.raises(ValueError, match="not trained"):
        save_codebook(ProductQuantizer(dim=D, m=4), tmp_path / "cb")
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_codebook(fitted["pq"], tmp_path / "cb", embedding={"layers": {1, 2}})


def test_fingerprint_is_deterministic_and_sensitive():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    fp = fingerprint_module(net)
    assert fp == fingerprint_module(net) and len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint_module(net.state_dict()) == fp  # a state dict names the same tensors
    assert fingerprint_module(dict(reversed(list(net.state_dict().items())))) == fingerprint_module(
        net.state_dict()
    )  # sorted by name
    with torch.no_grad():
        net[1].running_mean[0] += 1e-3  # a buffer change is seen
    assert fingerprint_module(net) != fp
    assert fingerprint_module(torch.zeros(2), length=8) != fingerprint_module(torch.zeros(3), length=8)
    with pytest.raises(TypeError, match="nn.Module, Tensor or dict"):
        fingerprint_module("model.pt")
