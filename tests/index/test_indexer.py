"""The indexer from a user's own loop: frames or Results in, the same rows as index_source; named sources resume."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from yolo_vq import Indexer, assets
from yolo_vq.index.registry import open_store

FIRST, N = 28, 60  # bikes.mp4 frames 28-87: two tracks and ~30 untracked detections at conf 0.1


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(assets.bikes_video()))
    cap.set(cv2.CAP_PROP_POS_FRAMES, FIRST)
    out = [cap.read()[1] for _ in range(N)]
    cap.release()
    return out


@pytest.fixture(scope="module")
def reference(index_model, small_codebook, frames, tmp_path_factory):
    """The frames as a PNG folder (lossless) indexed by index_source, with tracking and thumbnails."""
    d = tmp_path_factory.mktemp("ref")
    (d / "frames").mkdir()
    for i, f in enumerate(frames):
        cv2.imwrite(str(d / "frames" / f"{i:03d}.png"), f)
    with Indexer(index_model, d / "idx", codebook=small_codebook, track=True, thumb_every=2, conf=0.1) as ix:
        summary = ix.index_source(d / "frames", progress=False)
    assert summary.frames == N and summary.detections == len(rows(d / "idx")) > 20
    return d / "idx"


def rows(index, source_id: int | None = None) -> list[tuple]:
    """Every stored detection as (frame, time, box, class, confidence, track, codes, thumbnail), in id order."""
    with open_store(index, readonly=True) as s:
        ids, _ = s.codes()
        det, thumbs = s.get(ids), s.thumbnails(ids)
    keep = np.ones(len(det), bool) if source_id is None else det.data["source_id"] == source_id
    return [(int(det.data["frame"][i]), float(det.data["time"][i]), det.xyxy[i].tobytes(), int(det.class_id[i]),
             float(det.confidence[i]), int(det.track_id[i]), det.codes[i].tobytes(), thumbs[i])
            for i in np.flatnonzero(keep)]


def test_frames_loop_stores_what_index_source_stores(index_model, small_codebook, frames, reference, tmp_path):
    with Indexer(index_model, tmp_path / "idx", codebook=small_codebook, track=True, thumb_every=2, conf=0.1) as ix:
        for f in frames:  # one frame at a time, as from a camera: batched inside, tracked
            ix.add(f, source="cam0")
    got, want = rows(tmp_path / "idx"), rows(reference)
    assert len({r[5] for r in want} - {-1}) >= 2 and sum(r[7] is None for r in want) > 0  # tracks, skipped thumbs
    assert got == want
    with open_store(tmp_path / "idx", readonly=True) as s:
        assert [(x.uri, x.fps) for x in s.sources()] == [("cam0", None)] and len(s.frames_done(1)) == N


def test_results_loop_stores_what_index_source_stores(index_model, small_codebook, frames, reference, tmp_path):
    with Indexer(index_model, tmp_path / "idx", codebook=small_codebook, thumb_every=2) as ix:
        for t in getattr(index_model.predictor, "trackers", None) or []:
            t.reset()  # the user's own tracker, started afresh as index_source starts its own
        for k in range(0, N, 8):  # the user's loop: their own model.track calls, the indexer's codes attached
            for r in index_model.track(frames[k:k + 8], persist=True, conf=0.1, verbose=False):
                ix.add(r, source="cam1")
    assert rows(tmp_path / "idx") == rows(reference)


def test_a_named_source_resumes_without_duplicates(index_model, small_codebook, frames, tmp_path):
    idx = tmp_path / "idx"
    ix = Indexer(index_model, idx, codebook=small_codebook, track=True, conf=0.1, commit_every=4)  # no `with`
    assert ix.add(np.stack(frames[:30]), source="cam0") == 30
    ix.close()  # commits the frames still held
    with open_store(idx, readonly=True) as s:
        assert s.frames_done(1).tolist() == list(range(30))
        first_tracks = s.max_track_id(1)
    assert first_tracks >= 1
    with Indexer(index_model, idx, track=True, conf=0.1) as ix:
        assert ix.add(frames[25:35], source="cam0", frame_index=25) == 5  # 25-29 were stored: skipped
        assert ix.add(frames[35:], source="cam0") == 25  # numbering continues at 35
        assert ix.add(frames[3], source="cam0", frame_index=3) == 0
        assert ix.add(frames[0], source="other", time=12.5) == 1
    with open_store(idx, readonly=True) as s:
        assert s.frames_done(1).tolist() == list(range(N)) and s.frames_done(2).tolist() == [0]
        det = s.get(s.codes()[0])
    cam0 = det.data["source_id"] == 1
    pairs = list(zip(det.data["frame"][cam0].tolist(), det.xyxy[cam0, 0].tolist()))
    assert len(pairs) == len(set(pairs))  # no detection stored twice
    np.testing.assert_array_equal(det.data["time"][cam0], det.data["frame"][cam0].astype(float))  # no fps: frame
    assert det.data["time"][~cam0].tolist() == [12.5] * int((~cam0).sum())
    later = det.track_id[cam0 & (det.data["frame"] >= 30)]
    assert (later[later >= 0] > first_tracks).all() and (later >= 0).any()  # new tracks after the stored ones


def test_bad_input_says_what_was_expected_and_stores_nothing(index_model, small_codebook, frames, tmp_path):
    frame = frames[5]
    plain = index_model.predict(frame, verbose=False)[0]  # no embedder attached: no codes
    cases = [
        (("video.mp4",), {}, TypeError, r"got str: to index a video file, folder or stream use index_source"),
        ((frame[:, :, 0],), {}, ValueError, r"frame 0 must be \(H, W, 3\) uint8 BGR"),
        ((frame.astype(np.float32),), {}, ValueError, r"got \(272, 640, 3\) float32"),
        (([frame, "x"],), {}, TypeError, "not a mix"),
        ((frame,), {"frame_index": -1}, ValueError, "frame_index must be >= 0"),
        ((frame,), {"frame_index": [1, 2]}, ValueError, r"frame_index must be an int .* or 1 ints"),
        ((frame,), {"time": "noon"}, ValueError, r"time must be one finite number per item \(1 here"),
        (([frame, frame],), {"time": 1.0}, ValueError, r"\(2 here"),
        ((frame,), {"source": ""}, ValueError, "source must be a non-empty name"),
        ((plain,), {}, ValueError, r"results carry no vq_codes: run model.predict/model.track inside `with Indexer"),
    ]
    with Indexer(index_model, tmp_path / "idx", codebook=small_codebook) as ix:
        for args, kwargs, error, match in cases:
            with pytest.raises(error, match=match):
                ix.add(*args, **kwargs)
    with open_store(tmp_path / "idx", readonly=True) as s:
        assert s.count() == 0 and s.sources() == []
