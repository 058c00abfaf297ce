"""Thumbnails: every n-th per track written with the detections, decoded sizes, sheets without the video."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest

from yolo_vq import Detections, Indexer, Memory, assets
from yolo_vq.cli import main
from yolo_vq.index.registry import open_store
from yolo_vq.index.store import Frame, SourceInfo
from yolo_vq.index.thumbs import Thumbnailer, pictures
from yolo_vq.video import fingerprint_file
from yolo_vq.viz import CAPTION_H, MARGIN, TITLE_H, crop, decode_jpeg, placeholder, thumbnail

FIRST, LAST = 28, 88  # bikes.mp4: two tracks (15 and 5 detections) and ~30 untracked detections at conf 0.1


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Frames 28-87 of bikes.mp4 written as an MJPG video; returns (path, frames as decoded from that file)."""
    cap = cv2.VideoCapture(str(assets.bikes_video()))
    cap.set(cv2.CAP_PROP_POS_FRAMES, FIRST)
    frames = [cap.read()[1] for _ in range(LAST - FIRST)]
    cap.release()
    path = tmp_path_factory.mktemp("clip") / "clip.avi"
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, frames[0].shape[1::-1])
    for f in frames:
        out.write(f)
    out.release()
    cap = cv2.VideoCapture(str(path))
    decoded = [cap.read()[1] for _ in frames]
    cap.release()
    return path, decoded


@pytest.fixture(scope="module")
def thumbed(index_model, small_codebook, clip, tmp_path_factory):
    """The clip (a copy, deleted by a test) indexed with tracking and a thumbnail of every 3rd detection."""
    d = tmp_path_factory.mktemp("thumbed")
    video = shutil.copy(clip[0], d / "clip.avi")
    with Indexer(index_model, d / "idx", codebook=small_codebook, track=True, thumb_every=3, conf=0.1) as ix:
        summary = ix.index_source(video, progress=False)
    return d, summary


def stored(index) -> tuple[Detections, list[bytes | None]]:
    with open_store(index, readonly=True) as s:
        ids, _ = s.codes()
        return s.get(ids), s.thumbnails(ids)


def test_every_nth_detection_of_each_track_gets_a_thumbnail(thumbed):
    det, thumbs = stored(thumbed[0] / "idx")
    tracks = set(det.track_id.tolist()) - {-1}
    assert len(tracks) >= 2 and (det.track_id == -1).sum() >= 10  # both kinds are exercised
    for t in tracks:
        rows = np.flatnonzero(det.track_id == t)
        rows = rows[np.argsort(det.data["frame"][rows], kind="stable")]
        kept = [thumbs[r] is not None for r in rows]
        assert kept == [k % 3 == 0 for k in range(len(rows))], (t, kept)
    assert all(thumbs[r] is not None for r in np.flatnonzero(det.track_id == -1))  # untracked: every one


def test_thumbnails_decode_to_the_padded_box_at_most_96_px(thumbed, clip):
    det, thumbs = stored(thumbed[0] / "idx")
    frames = clip[1]
    checked = 0
    for i, blob in enumerate(thumbs):
        if blob is None:
            continue
        img = decode_jpeg(blob)
        frame = frames[int(det.data["frame"][i])]
        (x1, y1, x2, y2), (h, w) = det.xyxy[i].astype(np.float64), frame.shape[:2]
        c0, c1 = max(round(x1 - 0.1 * (x2 - x1)), 0), min(round(x2 + 0.1 * (x2 - x1)), w)
        r0, r1 = max(round(y1 - 0.1 * (y2 - y1)), 0), min(round(y2 + 0.1 * (y2 - y1)), h)
        gain = min(1.0, 96 / max(c1 - c0, r1 - r0))
        assert img.shape == (round((r1 - r0) * gain), round((c1 - c0) * gain), 3), (img.shape, (r1 - r0, c1 - c0))
        want = cv2.resize(frame[r0:r1, c0:c1], img.shape[1::-1], interpolation=cv2.INTER_AREA)
        assert np.abs(img.astype(int) - want).mean() < 6  # the same pixels, up to JPEG loss
        checked += 1
    assert checked >= 15


def test_summary_reports_thumbnail_bytes_per_detection(thumbed):
    det, thumbs = stored(thumbed[0] / "idx")
    summary = thumbed[1]
    assert summary.detections == len(det) and summary.thumb_bytes == sum(len(b) for b in thumbs if b)
    assert f" + {summary.thumb_bytes / len(det):.0f} B thumbnails per detection" in summary.line()


def test_sheet_from_thumbnails_after_the_video_is_deleted(thumbed, clip, capsys):
    d = thumbed[0]
    det, thumbs = stored(d / "idx")
    with Memory(d / "idx") as mem:
        from_video = mem.pictures(det)
        frames = clip[1]
        for i in range(len(det)):  # video still there: crops of its frames
            np.testing.assert_array_equal(from_video[i], crop(frames[int(det.data["frame"][i])], det.xyxy[i]))
    (d / "clip.avi").unlink()
    with Memory(d / "idx") as mem:
        pics = mem.pictures(det)
        assert [p.shape for p in pics] == [p.shape for p in mem.pictures(det, prefer="thumbs")]
    for i, pic in enumerate(pics):
        blob = thumbs[i]
        if blob is None:  # the nearest thumbnail of its own track
            same = np.flatnonzero((det.track_id == det.track_id[i]) & np.array([b is not None for b in thumbs]))
            near = same[np.argmin(np.abs(det.data["frame"][same] - det.data["frame"][i]))]
            blob = thumbs[near]
            assert det.track_id[i] >= 0
        np.testing.assert_array_equal(pic, decode_jpeg(blob))
    qid = int(det.data["id"][np.flatnonzero(det.track_id >= 0)[1]])  # a query without its own thumbnail
    sheet = d / "sheet.png"
    assert main(["search", "--index", str(d / "idx"), "--detection", str(qid), "-k", "9", "--sheet", str(sheet)]) == 0
    assert "contact sheet:" in capsys.readouterr().out
    img = cv2.imread(str(sheet))
    assert img.shape == (TITLE_H + 2 * (192 + CAPTION_H + MARGIN) + MARGIN, 5 * (96 + MARGIN) + MARGIN, 3)
    grey = (img[TITLE_H + MARGIN:TITLE_H + MARGIN + 192, MARGIN:MARGIN + 96] == 114).all(axis=2).mean()
    assert grey < 0.9  # the query tile shows its track's thumbnail, not a placeholder


def test_a_replaced_video_is_not_cut_and_no_picture_is_a_placeholder(tmp_path, clip):
    video = tmp_path / "clip.avi"
    shutil.copy(clip[0], video)
    image = clip[1][5]
    det = Detections(np.array([[100, 50, 160, 200], [300, 60, 340, 150]], np.float32), track_id=[4, -1],
                     codes=np.zeros((2, 8), np.uint8))
    with open_store(tmp_path / "idx", create=True) as s:
        src = s.add_source(SourceInfo(str(video), fingerprint_file(video)))
        s.add_frames(src.id, [Frame(5, 0.2, det, Thumbnailer(2)(image, det)), Frame(6, 0.24, det, [None, None])])
        stored_det = s.get(s.codes()[0])
        assert [p.shape for p in pictures(s, stored_det)] == [(192, 96, 3)] * 4  # crops of the video
        other = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, image.shape[1::-1])
        for f in clip[1][:10]:  # same name, another (readable) video: never cut from it
            other.write(cv2.flip(f, 1))
        other.release()
        assert cv2.VideoCapture(str(video)).read()[0]
        pics = pictures(s, stored_det)
    assert pics[0].shape[:2] == thumbnail(image, det.xyxy[0]).shape[:2] and pics[2].shape == pics[0].shape
    np.testing.assert_array_equal(pics[2], pics[0])  # frame 6 has no thumbnail of track 4: frame 5's stands in
    np.testing.assert_array_equal(pics[3], placeholder(text="no picture: source unreadable, no thumbnail"))
    assert pics[1].shape[:2] == thumbnail(image, det.xyxy[1]).shape[:2]


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: Thumbnailer(0), ValueError, "thumbs must be an int >= 1"),
        (lambda: thumbnail(np.zeros((8, 8, 3), np.uint8), [0, 0, 4, 4], longest=0), ValueError, "longest must be"),
        (lambda: pictures(None, Detections(np.zeros((1, 4)))), ValueError, r"data\['id'\]"),
    ],
)
def test_bad_thumbnail_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_cli_index_thumbs_and_sheet_from_thumbs(small_codebook, clip, tmp_path, capsys):
    idx = tmp_path / "idx"
    assert main(["index", str(clip[0]), "--index", str(idx), "--codebook", str(small_codebook), "--thumbs", "--conf",
                 "0.1", "--quiet"]) == 0
    assert "B thumbnails per detection" in capsys.readouterr().out
    det, thumbs = stored(idx)
    assert len(det) >= 20 and all(b is not None for b in thumbs)  # --thumbs alone: every detection
    qid = int(det.data["id"][3])
    sheet = tmp_path / "sheet.png"
    assert main(["search", "--index", str(idx), "--detection", str(qid), "-k", "4", "--sheet", str(sheet),
                 "--sheet-from", "thumbs"]) == 0
    with Memory(idx) as mem:
        res = mem.search(mem.vectors_of([qid]), 4, exclude=[qid])[0]
        want = mem.contact_sheet(res, mem.store.get([qid]), prefer="thumbs")
    np.testing.assert_array_equal(cv2.imread(str(sheet)), want)
