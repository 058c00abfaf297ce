"""A resumed ``index --track`` continues its tracks: kill -9 at random moments, resume, compare with one run that
was never interrupted."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import closing
from pathlib import Path

import cv2
import numpy as np
import pytest

from yolo_vq import assets

ENV = {**os.environ, "YOLO_OFFLINE": "1"}
COMMIT = 64  # frames per commit of the indexer: the kills land between commits, the resume points on them


def index_cmd(source: Path, idx: Path, codebook: Path) -> list[str]:
    return [sys.executable, "-m", "yolo_vq.cli", "index", str(source), "--index", str(idx), "--codebook",
            str(codebook), "--track", "--quiet", "--conf", "0.2"]


def frames_done(idx: Path) -> int:
    try:
        with closing(sqlite3.connect(f"file:{idx / 'index.db'}?mode=ro", uri=True)) as c:
            return c.execute("SELECT COUNT(*) FROM frames").fetchone()[0]
    except sqlite3.Error:
        return 0


def rows(idx: Path) -> dict[int, list[tuple]]:
    """frame -> its detections as (x1, y1, x2, y2, class, track), by x1."""
    out = defaultdict(list)
    with closing(sqlite3.connect(f"file:{idx / 'index.db'}?mode=ro", uri=True)) as c:
        for f, *r in c.execute("SELECT frame, x1, y1, x2, y2, class_id, track_id FROM detections ORDER BY frame, x1"):
            out[f].append(tuple(r))
    return out


def killed_twice_then_resumed(source: Path, idx: Path, codebook: Path, rng: random.Random) -> tuple[list[int], str]:
    """Two runs killed (SIGKILL) at random moments past a commit, then one to the end; returns the resume points
    (frames stored when each later run started) and the last run's summary line."""
    resumes = []
    for _ in range(2):
        target = frames_done(idx) + rng.randint(1, 2 * COMMIT)
        proc = subprocess.Popen(index_cmd(source, idx, codebook), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while proc.poll() is None and frames_done(idx) < target and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 1.5))  # a random moment between commits
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumes.append(frames_done(idx))
    out = subprocess.run(index_cmd(source, idx, codebook), env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return resumes, out.stdout


def compare(full: dict, resumed: dict, first_resume: int) -> None:
    """The same frames and detections (boxes within 1 px, same classes); the same tracks: one id of the resumed index
    per id of the uninterrupted one, and the same id for every track that began before the first resume point."""
    assert sorted(full) == sorted(resumed)
    relabel: dict[int, int] = {}
    for f in sorted(full):
        a, b = full[f], resumed[f]
        assert len(a) == len(b), f"frame {f}: {len(a)} detections uninterrupted, {len(b)} resumed"
        for x, y in zip(a, b):
            assert np.abs(np.subtract(x[:4], y[:4])).max() <= 1.0 and x[4] == y[4], (f, x, y)
            if x[5] >= 0:
                assert relabel.setdefault(x[5], y[5]) == y[5], f"frame {f}: track {x[5]} split ({relabel[x[5]]}, {y[5]})"
    assert len(set(relabel.values())) == len(relabel), "two tracks merged"
    early = {x[5] for f in full if f < first_resume for x in full[f] if x[5] >= 0}
    assert early and all(relabel[t] == t for t in early if t in relabel)


@pytest.fixture(scope="module")
def bikes_folder(tmp_path_factory) -> Path:
    """The first 160 frames of bikes.mp4 as a JPEG folder."""
    d = tmp_path_factory.mktemp("bikes_folder")
    cap = cv2.VideoCapture(str(assets.bikes_video()))
    for i in range(160):
        ok, img = cap.read()
        assert ok
        cv2.imwrite(str(d / f"{i:04d}.jpg"), img)
    cap.release()
    return d


@pytest.mark.parametrize("source", ["bikes.mp4", "folder"])
def test_kill_9_twice_then_resume_gives_the_uninterrupted_tracks(source, bikes_folder, small_codebook, tmp_path):
    src = assets.bikes_video() if source == "bikes.mp4" else bikes_folder
    out = subprocess.run(index_cmd(src, tmp_path / "full", small_codebook), env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    full = rows(tmp_path / "full")
    for seed in range(2):  # rounds with other random moments
        idx = tmp_path / f"resumed{seed}"
        resumes, line = killed_twice_then_resumed(src, idx, small_codebook, random.Random(seed))
        last = resumes[-1]
        if last:
            assert f"resumed at frame {last}, replayed {min(30, last)} frames" in line, line
        compare(full, rows(idx), min([r for r in resumes if r] or [10**9]))


def test_indexer_add_replays_the_frames_fed_again_before_the_resume_point(index_model, small_codebook, tmp_path):
    from yolo_vq import Indexer

    cap = cv2.VideoCapture(str(assets.bikes_video()))
    frames = [cap.read()[1] for _ in range(120)]
    cap.release()

    def run(idx: Path, parts: list[range]) -> None:
        for part in parts:  # each part: a new process in real life (a new Indexer, a new tracker)
            with Indexer(index_model, idx, codebook=small_codebook, track=True, conf=0.2) as ix:
                ix.add([frames[i] for i in part], source="cam0", frame_index=part.start)

    run(tmp_path / "full", [range(120)])
    run(tmp_path / "resumed", [range(70), range(120)])  # the user's loop starts the video again after a crash
    compare(rows(tmp_path / "full"), rows(tmp_path / "resumed"), 70)
