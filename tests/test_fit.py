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
