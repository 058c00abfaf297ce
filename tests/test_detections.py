"""The data carrier: validation, empty, slicing, concatenation, conversion from Ultralytics Results."""

from __future__ import annotations

import numpy as np
import pytest

from yolo_vq import Detections


def make(n=5, d=8, **kw):
    rng = np.random.default_rng(n)
    xy = rng.uniform(0, 100, (n, 2))
    return Detections(np.concatenate([xy, xy + 10], 1), confidence=rng.uniform(size=n), class_id=np.arange(n) % 2,
                      embeddings=rng.normal(size=(n, d)), **kw)


def test_defaults_and_dtypes():
    d = make()
    assert d.xyxy.dtype == np.float32 and d.confidence.dtype == np.float32
    assert d.class_id.dtype == np.int64 and (d.track_id == -1).all()
    assert d.embeddings.dtype == np.float32 and d.dim == 8 and d.codes is None


def test_empty_slice_concat():
    e = Detections.empty(8)
    assert len(e) == 0 and e.embeddings.shape == (0, 8)
    d = make(data={"frame": np.arange(5)})
    assert len(d[1:3]) == 2 and d[4].data["frame"].tolist() == [4]
    assert len(d[d.class_id == 1]) == 2
    both = Detections.concat([d, d[:2]])
    assert len(both) == 7 and both.data["frame"].tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert Detections.concat([d[:0], d]).embeddings.shape == (5, 8)
    assert len(Detections.concat([])) == 0
    w = d.with_data(source=3)
    assert w.data["source"].tolist() == [3] * 5 and "source" not in d.data


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"xyxy": np.zeros((3, 5))}, ValueError, r"xyxy must have shape \(n, 4\), got \(3, 5\)"),
        ({"confidence": np.ones(4)}, ValueError, r"confidence must have shape \(5\), got \(4,\)"),
        ({"embeddings": np.ones((4, 8))}, ValueError, r"embeddings must have shape \(5, n\), got \(4, 8\)"),
        ({"embeddings": np.full((5, 2), np.nan)}, ValueError, "NaN or inf"),
        ({"codes": np.zeros((5, 4), np.int32)}, TypeError, "codes must be uint8 or uint16"),
        ({"data": {"frame": np.arange(3)}}, ValueError, r"data\['frame'\] must have one entry per detection \(5\)"),
        ({"xyxy": np.array([["a"] * 4] * 5)}, TypeError, "xyxy must be numeric"),
    ],
)
def test_validation(kwargs, exc, match):
    base = dict(xyxy=np.zeros((5, 4)), embeddings=np.zeros((5, 8)))
    with pytest.raises(exc, match=match):
        Detections(**(base | kwargs))


def test_concat_mismatch():
    with pytest.raises(ValueError, match="different dims"):
        Detections.concat([make(d=8), make(d=4)])
    with pytest.raises(ValueError, match="with and without codes"):
        Detections.concat([make(codes=np.zeros((5, 2), np.uint8)), make()])


def test_from_ultralytics_tracked(pose_model_path, bikes_frames):
    from ultralytics import YOLO

    model = YOLO(pose_model_path)
    rs = [model.track(f, persist=True, conf=0.1, verbose=False)[0] for f in bikes_frames[:6]]
    r = next(r for r in rs if r.boxes.id is not None)
    d = Detections.from_ultralytics(r, frame=7)
    assert len(d) == len(r.boxes) and (d.track_id >= 0).all() and d.dim == 0
    np.testing.assert_array_equal(d.xyxy, r.boxes.xyxy.numpy())
    assert d.data["frame"].tolist() == [7] * len(d)
