"""``fit_codebook`` trains the codebook size the detections support (bikes.mp4 is short: 140 detections in its 250
frames at conf 0.25, imgsz 640), says so, and refuses with the counts when even the smallest size does not fit."""

from __future__ import annotations

import json
import warnings

import pytest

from yolo_vq import assets
from yolo_vq.fit import _supported_size, fit_codebook


@pytest.fixture(scope="module")
def model(pose_model_path):
    from ultralytics import YOLO

    return YOLO(pose_model_path)


@pytest.mark.parametrize(("n", "requested", "floor", "size"), [
    (300, 256, 16, 256),  # enough: as asked
    (256, 256, 16, 256),  # PQ needs n >= K, no more
    (255, 256, 16, 128),  # the largest power of two that fits
    (140, 256, 16, 128),
    (25, 256, 16, 16),
    (15, 256, 16, None),  # below the floor
    (0, 256, 16, None),
    (11, 256, 8, 8),
    (100, 100, 16, 100),  # a size that fits is kept even if it is not a power of two
    (50, 100, 16, 32),
    (10, 8, 16, 8),  # asked for less than the floor: the floor is what was asked
    (5, 8, 16, None),
])
def test_supported_size(n, requested, floor, size):
    assert _supported_size(n, requested, floor) == size


def test_default_size_on_a_short_clip_warns_and_is_recorded(model, tmp_path):
    """60 frames of bikes.mp4 hold 25 detections: too few for 256 centroids, enough for 16."""
    with pytest.warns(UserWarning, match=r"found 25 detections .* too few for --codebook-size 256") as w:
        pq, seen = fit_codebook(model, [assets.bikes_video()], tmp_path / "cb", max_frames=60, progress=False)
    msg = str(w[0].message)
    assert "trained 16 centroids per sub-space (still 32 B per detection)" in msg
    assert "lower --stride or --conf" in msg and "\n" not in msg
    assert seen == 25 and pq.codebook_size == 16 and pq.code_size == 32
    meta = json.loads((tmp_path / "cb.json").read_text())
    assert meta["quantizer"]["params"]["codebook_size"] == 16 and meta["code_size"] == 32
    assert meta["stats"]["codebook_size_requested"] == 256 and meta["stats"]["codebook_size_reason"] == msg
    assert meta["stats"]["n_seen"] == 25 and meta["stats"]["n_train"] == 25


def test_min_codebook_size_lowers_the_floor(model, tmp_path):
    """40 frames hold 11 detections: below the default floor of 16, a codebook of 8 when the floor is 8."""
    with pytest.warns(UserWarning, match="found 11 detections"):
        pq, seen = fit_codebook(model, [assets.bikes_video()], tmp_path / "cb", max_frames=40, min_codebook_size=8,
                                progress=False)
    assert (seen, pq.codebook_size, pq.stats["codebook_size_requested"]) == (11, 8, 256)


@pytest.mark.parametrize(("max_frames", "conf", "words"), [
    (1, 0.9, ["found 0 detections", "--conf 0.9", "at most 1 frames", "none at all"]),
    (40, 0.25, ["found 11 detections", "16 at the least", "--codebook-size 8", "--stride", "--fit-frames"]),
])
def test_too_few_detections_raise_with_the_counts(model, tmp_path, max_frames, conf, words):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused outright, not warned about first
        with pytest.raises(ValueError) as e:
            fit_codebook(model, [assets.bikes_video()], tmp_path / "cb", max_frames=max_frames, conf=conf,
                         progress=False)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert not (tmp_path / "cb.json").exists()


def test_fit_with_a_head_learns_it_from_tracks_and_the_codebook_carries_it(model, tmp_path, monkeypatch):
    """fit --head auto on tracked detections of seeded synthetic identities (the tracker's output replaced): a head
    from tracks (linear or its MLP) wins the held-out measurement, the codebook is trained on its outputs and saved with it, and the
    embedder then hands out the head's vectors."""
    import numpy as np

    from tests.features.test_head import identities
    from yolo_vq import Embedder
    from yolo_vq.quant import load_codebook

    dim = Embedder(model).recipe_dim
    x, track, frame = identities(0, n_ids=40, per=25, dim=dim)
    monkeypatch.setattr("yolo_vq.fit.tracked_embeddings", lambda *a, **k: (x.astype(np.float32), track, frame))
    lines: list[str] = []
    pq, seen = fit_codebook(model, ["tracked.mp4"], tmp_path / "cb", code_bytes=8, codebook_size=16, lists=0,
                            head="auto", log=lines.append)
    kind = pq.head.kind if pq.head is not None else None
    assert seen == len(x) and kind in ("tracks", "mlp") and pq.dim == pq.head.dim  # a head learned from tracks
    assert pq.dim % 8 == 0 and pq.input_dim == dim
    chose = next(line for line in lines if line.startswith(f"head: {kind}"))
    assert all(f"{k} 0." in chose for k in ("none", "whiten", "tracks", "mlp"))  # the figures it chose by
    q = load_codebook(tmp_path / "cb")
    assert q.head.kind == kind and q.meta["head"]["stats"]["chosen"]["kind"] == kind
    assert q.head.hidden == (pq.head.hidden if kind == "mlp" else 0)
    assert Embedder(model, codebook=tmp_path / "cb").dim == q.dim
    with pytest.raises(ValueError, match="head must be one of"):
        fit_codebook(model, ["tracked.mp4"], tmp_path / "x", head="lda")


def test_an_index_of_a_headed_codebook_searches_in_the_heads_space(model, tmp_path, monkeypatch, frames_folder, bus):
    """index (kept vectors), search by detection with exact re-ranking, and by an image region, through a codebook
    whose head maps the recipe's 1088 dims to fewer: every vector on the way is in the head's space."""
    import contextlib
    import io

    import cv2
    import numpy as np

    from tests.features.test_head import identities
    from yolo_vq import Embedder, Indexer, Memory
    from yolo_vq.cli import main

    x, track, frame = identities(0, n_ids=40, per=25, dim=Embedder(model).recipe_dim)
    monkeypatch.setattr("yolo_vq.fit.tracked_embeddings", lambda *a, **k: (x.astype(np.float32), track, frame))
    pq, _ = fit_codebook(model, ["tracked.mp4"], tmp_path / "cb", code_bytes=8, codebook_size=16, lists=0,
                         head="tracks", log=lambda line: None)
    with Indexer(model, tmp_path / "idx", codebook=tmp_path / "cb", conf=0.1, keep_vectors=True) as ix:
        ix.index_source(frames_folder, progress=False)
    with Memory(tmp_path / "idx") as m:
        assert m.store.vector_dim == pq.dim < 1088
        hits = m.search(m.vectors_of([1]), k=3, rerank=10)[0]
        assert int(hits.data["id"][0]) == 1 and hits.data["score"][0] == pytest.approx(1, abs=1e-3)
    cv2.imwrite(str(tmp_path / "bus.jpg"), bus)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["search", "--index", str(tmp_path / "idx"), "--image", str(tmp_path / "bus.jpg"), "--crop",
                     "50,400,250,900", "--model", str(assets.pose_weights()), "-k", "3", "--json"]) == 0
    assert len(json.loads(out.getvalue())) == 3


def test_fit_track_on_a_clip_without_returning_people_says_so_and_uses_no_head(model, tmp_path, capsys):
    from yolo_vq.cli import main

    assert main(["fit", str(assets.bikes_video()), "--track", "--out", str(tmp_path / "cb"), "--stride", "2",
                 "--codebook-size", "16", "--model", str(assets.pose_weights())]) == 0
    out = capsys.readouterr().out
    assert "head: none (" in out and "too few tracks come back" in out
    assert json.loads((tmp_path / "cb.json").read_text()).get("head") is None


def test_a_recipe_whose_dims_do_not_split_into_the_bytes_is_projected_and_says_so(model, tmp_path, bus):
    """The colour preset (432 dims) at 32 bytes: PQ needs D divisible by its sub-spaces, so the codebook projects
    onto the top 416 principal axes first and says so; it then encodes the recipe's vectors to 32 bytes."""
    from yolo_vq import Embedder

    with pytest.warns(UserWarning, match=r"432 dims, not a multiple of 32 bytes: .* top 416 principal axes"):
        pq, _ = fit_codebook(model, [assets.bikes_video()], tmp_path / "cb", recipe="colour", code_bytes=32,
                             lists=0, stride=2, progress=False)
    assert (pq.dim, pq.dim_out, pq.code_size) == (432, 416, 32) and 0.9 < pq.stats["pca_energy_kept"] <= 1 + 1e-6
    with Embedder(model, "colour", codebook=tmp_path / "cb"):
        r = model.predict(bus, verbose=False)[0]
    assert r.vq_codes.shape == (len(r.boxes), 32)


@pytest.mark.parametrize("cfg", ["yolo26n.yaml", "yolo11n.yaml"])
def test_architecture_only_models_fit_with_a_head_index_search_and_export_end_to_end(cfg, tmp_path):
    """fit --head auto on an architecture-only model (random weights: quality is meaningless) runs end to end and
    picks something by measurement, says what; the codebook then indexes, searches and exports with parity."""
    from tests.edge.test_export import scrambled
    from yolo_vq import Indexer, Memory
    from yolo_vq.edge.export import export

    model = scrambled(cfg)  # random, with a few confident anchors per image (fresh YAML models score all alike)
    lines: list[str] = []
    pq, seen = fit_codebook(model, [assets.bikes_video()], tmp_path / "cb", code_bytes=8, codebook_size=16,
                            head="auto", log=lines.append, conf=0.05, imgsz=320, max_frames=40, progress=False)
    chose = [line for line in lines if line.startswith("head: ") and " tracks (" not in line]
    assert chose and seen > 0, lines  # a choice, said with its reason
    kind = "none" if pq.head is None else pq.head.kind
    assert chose[0].startswith(f"head: {kind}")
    with Indexer(model, tmp_path / "idx", codebook=tmp_path / "cb", conf=0.05, imgsz=320, track=True) as ix:
        ix.index_source(assets.bikes_video(), stride=25, progress=False)
    with Memory(tmp_path / "idx") as mem:
        assert len(mem) > 5
        hits = mem.search(mem.detection_vector(1), 5, exclude=[1])[0]
        assert len(hits) == 5 and 1 not in hits.data["id"].tolist()
    _, check = export(model, tmp_path / "cb", tmp_path / "m.onnx", conf=0.05, imgsz=320)
    assert check.code_bytes_equal == 1.0, check


def test_fit_track_trains_on_untracked_detections_when_the_tracker_keeps_too_few(model, tmp_path, capsys):
    """The tracker drops boxes below its own score thresholds: with no head chosen and too few tracked detections
    for the codebook, fit trains it on every detection (as without --track) and says so."""
    from yolo_vq.cli import main

    assert main(["fit", str(assets.bikes_video()), "--track", "--out", str(tmp_path / "cb"), "--stride", "2",
                 "--conf", "0.02", "--codebook-size", "256", "--model", str(assets.pose_weights())]) == 0
    out = capsys.readouterr().out
    tracked = int(out.split("head: the tracker kept ")[1].split()[0])
    meta = json.loads((tmp_path / "cb.json").read_text())
    assert meta.get("head") is None and meta["stats"]["n_seen"] > tracked
