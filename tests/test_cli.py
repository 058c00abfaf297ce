"""The main job end to end on a real clip: fit, index (with tracking), search, contact sheet, bad input."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing

import cv2
import numpy as np
import pytest

from yolo_vq import assets
from yolo_vq.cli import main
from yolo_vq.index.memory import Memory
from yolo_vq.index.registry import open_store
from yolo_vq.metrics import retrieval_scores, valid_queries


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """bikes.mp4 fitted and indexed with tracking through the CLI, once for the module."""
    d = tmp_path_factory.mktemp("cli")
    video = str(assets.bikes_video())
    assert main(["fit", video, "--out", str(d / "cb"), "--codebook-size", "64", "--conf", "0.1"]) == 0
    assert main(["index", video, "--index", str(d / "idx"), "--codebook", str(d / "cb"), "--track", "--conf", "0.1",
                 "--quiet"]) == 0
    return d


def test_index_is_idempotent_and_complete(built, capsys):
    with open_store(built / "idx", readonly=True) as s:
        n, frames = s.count(), s.frames_done(1)
    assert n > 50 and frames.tolist() == list(range(250))
    assert main(["index", str(assets.bikes_video()), "--index", str(built / "idx"), "--quiet"]) == 0
    assert "0 frames (250 already indexed)" in capsys.readouterr().out
    with open_store(built / "idx", readonly=True) as s:
        assert s.count() == n


def test_search_detection_table_json_and_sheet(built, capsys):
    with Memory(built / "idx") as mem:
        qid = int(mem.store.codes()[0][10])
    sheet = built / "sheet.jpg"
    assert main(["search", "--index", str(built / "idx"), "--detection", str(qid), "-k", "5", "--sheet",
                 str(sheet)]) == 0
    out = capsys.readouterr().out
    assert "rank  score" in out and "bikes.mp4" in out
    img = cv2.imread(str(sheet))
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 300
    assert main(["search", "--index", str(built / "idx"), "--detection", str(qid), "-k", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and all(r["id"] != qid for r in rows)
    assert rows == sorted(rows, key=lambda r: -r["score"])


def test_own_codes_rank_first_and_match_exhaustive_search(built):
    with Memory(built / "idx", engine="numpy") as mem:
        ids, codes = mem.store.codes()
        decoded = mem.codebook.decode(codes).numpy()
        for i in (0, len(ids) // 2, len(ids) - 1):
            res = mem.search(decoded[i : i + 1], 5)[0]
            assert res.data["id"][0] == ids[i]
            exhaustive = ids[np.argsort(((decoded - decoded[i]) ** 2).sum(1), kind="stable")[:5]]
            assert set(res.data["id"].tolist()) == set(exhaustive.tolist())


def test_filters(built):
    with Memory(built / "idx") as mem:
        q = mem.vectors_of([int(mem.store.codes()[0][0])])
        res = mem.search(q, 50, time_from=5.0, time_to=8.0, min_conf=0.3, classes=["person"])[0]
        assert len(res) > 0
        assert (res.data["time"] >= 5.0).all() and (res.data["time"] <= 8.0).all() and (res.confidence >= 0.3).all()
        with pytest.raises(ValueError, match="unknown class 'unicorn': this index knows"):
            mem.search(q, 5, classes=["unicorn"])


def test_same_track_ranks_above_chance(built):
    """Quality through the whole product: codes and all, stored detections of one track find each other."""
    with Memory(built / "idx") as mem:
        ids, codes = mem.store.codes()
        det = mem.store.get(ids)
        track, frame = det.track_id, det.data["frame"]
        q = valid_queries(track, frame, gap=10)
        assert len(q) >= 10
        dist, order = mem.scan.search(mem.vectors_of(ids[q]), len(ids))  # ADC over all stored codes
        col = np.searchsorted(ids, order)  # ids are sorted: id -> column
        full = np.full((len(q), len(ids)), -np.inf, np.float32)
        np.put_along_axis(full, col, -dist, axis=1)
        got = retrieval_scores(full, q, track, frame, gap=10)
        chance = np.mean([((track == track[i]) & (np.abs(frame - frame[i]) > 10)).sum() /
                          ((track >= 0) & ~((track == track[i]) & (np.abs(frame - frame[i]) <= 10))).sum() for i in q])
        print(f"bikes.mp4 through the product: mAP {got.mAP:.3f}, chance {chance:.3f}, {len(q)} queries")
        assert got.mAP > 2 * chance


@pytest.mark.parametrize(
    "argv,match",
    [
        (["index", "missing.mp4", "--index", "{d}/new"], "video 'missing.mp4' does not exist"),
        (["index", "{d}/not_video.mp4", "--index", "{d}/new2", "--codebook", "{d}/cb"], "is not a video OpenCV can"),
        (["search", "--index", "{d}/nothing", "--detection", "1"], "no index at"),
        (["search", "--index", "{d}/idx", "--detection", "1", "-k", "0"], "-k must be a positive number"),
        (["search", "--index", "{d}/idx", "--detection", "1", "--class", "unicorn"], "unknown class 'unicorn'"),
        (["search", "--index", "{d}/idx", "--image", "{d}/black.png"], "no detections in"),
        (["search", "--index", "{d}/idx", "--detection", "999999"], "no detections with ids"),
        (["index", "{v}", "--index", "{d}/idx", "--codebook", "{d}/cb", "--model", "yolo11n-pose.yaml"],
         "does not fit: it was made for model fingerprint"),
        (["index", "{v}", "--index", "{d}/idx", "--thumbs", "0"], "--thumbs must be >= 1"),
    ],
)
def test_bad_input_one_line_error_and_store_intact(built, argv, match, capsys):
    (built / "not_video.mp4").write_text("hello")
    cv2.imwrite(str(built / "black.png"), np.zeros((240, 320, 3), np.uint8))
    with open_store(built / "idx", readonly=True) as s:
        before = s.count()
    args = [a.format(d=built, v=assets.bikes_video()) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and match in err, err
    with open_store(built / "idx", readonly=True) as s:
        assert s.count() == before


def test_foreign_schema_refused(built, capsys, tmp_path):
    import shutil

    shutil.copytree(built / "idx", tmp_path / "old")
    with open_store(tmp_path / "old") as s:
        s.set_meta("schema_version", 0)
    assert main(["search", "--index", str(tmp_path / "old"), "--detection", "1"]) == 2
    assert "schema version 0, this yolo_vq reads version 1" in capsys.readouterr().err


def test_resume_after_killed_index_run(built, tmp_path):
    """Kill `yolo-vq index` mid-video, run it again: every frame once, no duplicated detection."""
    cmd = [sys.executable, "-m", "yolo_vq.cli", "index", str(assets.bikes_video()), "--index", str(tmp_path / "i"),
           "--codebook", str(built / "cb"), "--conf", "0.1", "--batch", "4", "--quiet"]
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp_path / "i" / "index.db"
    for _ in range(600):  # wait until some frames are committed, then kill
        if db.is_file():
            try:
                with open_store(tmp_path / "i", readonly=True) as s:
                    if len(s.frames_done(1)) >= 64:
                        break
            except Exception:
                pass
        proc.poll()
        if proc.returncode is not None:
            break
        __import__("time").sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open_store(tmp_path / "i", readonly=True) as s:
        partial = len(s.frames_done(1))
    assert 0 < partial < 250, partial
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    with open_store(tmp_path / "i", readonly=True) as s, closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
        assert s.frames_done(1).tolist() == list(range(250))
        per_frame = dict(c.execute("SELECT frame, detections FROM frames WHERE source_id = 1").fetchall())
        assert s.count() == sum(per_frame.values())
        dup = c.execute("SELECT COUNT(*) FROM (SELECT frame, x1, y1 FROM detections GROUP BY frame, x1, y1 "
                          "HAVING COUNT(*) > 1)").fetchone()[0]
        assert dup == 0


def test_fit_trains_search_lists_and_the_index_keeps_them_current(built, capsys):
    """`fit` (lists auto) attaches a coarse quantizer; `index` listed every detection at close; --nprobe all there
    gives the flat scan's results."""
    from yolo_vq.index.segments import open_lists
    from yolo_vq.quant import load_codebook

    cb = load_codebook(built / "cb")
    assert cb.coarse is not None and cb.coarse.lists >= 1
    with open_store(built / "idx", readonly=True) as s:
        lists = open_lists(s, load_codebook(s.codebook_path()).coarse)
        assert lists.rows == s.count() and lists.high_water == s.max_id()
    with Memory(built / "idx", mode="ivf") as ivf, Memory(built / "idx", mode="flat") as flat:
        q = flat.vectors_of([int(flat.store.codes()[0][3])])
        assert ivf.search(q, 5, nprobe="all")[0].data["id"].tolist() == flat.search(q, 5)[0].data["id"].tolist()
    video = str(assets.bikes_video())
    assert main(["fit", video, "--out", str(built / "flat_cb"), "--codebook-size", "32", "--lists", "0",
                 "--max-frames", "60", "--conf", "0.1"]) == 0
    assert load_codebook(built / "flat_cb").coarse is None and "search lists" not in capsys.readouterr().out
