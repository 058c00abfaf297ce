"""The SQLite store: idempotent batches, resume after a kill, readers during writes, foreign schemas refused."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from yolo_vq import Detections
from yolo_vq.index.store import DB_NAME, Frame, Store, StoreError


def frame(i: int, n: int = 3, code_size: int = 8) -> Frame:
    rng = np.random.default_rng(i)
    xy = rng.uniform(0, 500, (n, 2))
    det = Detections(np.concatenate([xy, xy + 40], 1), confidence=rng.uniform(size=n), class_id=np.arange(n) % 2,
                     track_id=np.arange(n) + 10 * i, codes=rng.integers(0, 256, (n, code_size), dtype=np.uint8))
    return Frame(i, i / 25.0, det)


def test_round_trip_and_idempotent_batches(tmp_path):
    with Store(tmp_path / "idx", create=True) as s:
        src = s.add_source("clip.mp4", "abc123", fps=25.0, frame_count=10, width=640, height=272)
        assert s.add_source("clip-renamed.mp4", "abc123").id == src.id  # same content: same source
        assert s.add_frames(src.id, [frame(i) for i in range(4)] + [frame(4, n=0)]) == 12
        assert s.add_frames(src.id, [frame(i) for i in range(2, 6)]) == 3  # frames 2-4 already stored
        assert s.count() == 15
        assert s.frames_done(src.id).tolist() == [0, 1, 2, 3, 4, 5]
        ids, codes = s.codes()
        assert codes.shape == (15, 8) and codes.dtype == np.uint8 and ids.tolist() == sorted(ids.tolist())
        np.testing.assert_array_equal(codes[:3], frame(0).detections.codes)
        got = s.get(ids[[4, 0]])
        np.testing.assert_array_equal(got.codes, codes[[4, 0]])
        assert got.data["frame"].tolist() == [1, 0] and got.data["source_id"].tolist() == [src.id] * 2
        np.testing.assert_allclose(got.xyxy[1], frame(0).detections.xyxy[0], rtol=1e-6)
        assert s.codes(after_id=int(ids[-4]))[0].tolist() == ids[-3:].tolist()  # incremental refresh
        s.set_meta("codebook_fingerprint", "f00d")
    with Store(tmp_path / "idx", readonly=True) as r:
        assert r.count() == 15 and r.get_meta("codebook_fingerprint") == "f00d" and r.get_meta("code_size") == 8
        with pytest.raises(StoreError, match="read-only"):
            r.add_frames(src.id, [frame(9)])


def test_missing_index_and_bad_codes_say_what_to_do(tmp_path):
    with pytest.raises(StoreError, match=r"no index at .* \(index.db missing\): create one with `yolo-vq index"):
        Store(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    with Store(tmp_path / "idx", create=True) as s:
        src = s.add_source("a", "fp")
        s.add_frames(src.id, [frame(0)])
        with pytest.raises(StoreError, match="codes of 16 bytes, this index stores 8-byte codes"):
            s.add_frames(src.id, [frame(1), frame(2, code_size=16)])
        assert s.count() == 3 and s.frames_done(src.id).tolist() == [0]  # the failed batch left nothing behind
        with pytest.raises(KeyError, match="no detections with ids"):
            s.get([999])


def test_other_schema_version_is_refused_untouched(tmp_path):
    with Store(tmp_path / "idx", create=True) as s:
        s.add_frames(s.add_source("a", "fp").id, [frame(0)])
        s.set_meta("schema_version", 999)
    db = tmp_path / "idx" / DB_NAME
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    with pytest.raises(StoreError, match="schema version 999, this yolo_vq reads version 1: index into a new"):
        Store(tmp_path / "idx")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    sqlite3.connect(foreign / DB_NAME).execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="schema version None"):
        Store(foreign)


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from tests.index.test_store import frame
    from yolo_vq.index.store import Store
    s = Store({idx!r}, create=True)
    src = s.add_source("clip", "fp")
    done = set(s.frames_done(src.id).tolist())
    todo = [i for i in range(200) if i not in done]
    for k in range(0, len(todo), 5):  # batches of 5 frames, one transaction each
        s.add_frames(src.id, [frame(i) for i in todo[k:k + 5]])
        print(k, flush=True)
        time.sleep({pause})
""")


def test_resume_after_kill_has_no_duplicates(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    idx = str(tmp_path / "idx")
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=root, idx=idx, pause=0.02)],
                            stdout=subprocess.PIPE, text=True)
    for _ in range(6):  # let it commit a few batches, then kill it mid-run
        proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Store(idx, readonly=True) as s:
        partial = len(s.frames_done(1))
    assert 0 < partial < 200
    subprocess.run([sys.executable, "-c", WRITER.format(root=root, idx=idx, pause=0)], check=True,
                   stdout=subprocess.DEVNULL)
    with Store(idx) as s:
        assert s.frames_done(1).tolist() == list(range(200))
        assert s.count() == 200 * 3
        pairs = s._db.execute("SELECT COUNT(*), COUNT(DISTINCT frame || ':' || track_id) FROM detections").fetchone()
        assert pairs[0] == pairs[1]  # no duplicated detection
        assert s._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_readers_search_while_one_process_writes(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    idx = tmp_path / "idx"
    Store(idx, create=True).close()
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=root, idx=str(idx), pause=0.005)],
                            stdout=subprocess.DEVNULL)
    counts, errors = [], []

    def read():
        try:
            with Store(idx, readonly=True, timeout=1.0) as r:
                while proc.poll() is None:
                    ids, codes = r.codes()
                    assert len(ids) == len(codes) and len(ids) % 3 == 0  # whole frames only: committed batches
                    counts.append(len(ids))
                    time.sleep(0.01)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    proc.wait(timeout=120)
    for t in threads:
        t.join()
    assert not errors, errors
    assert proc.returncode == 0 and len(set(counts)) > 2  # readers saw the store grow


def test_reads_are_one_snapshot_when_the_writer_commits_between_statements(tmp_path):
    """The mechanism behind a once-flaky reader, made deterministic: the writer's first batch (which also sets the
    ``code_size`` meta) committed between the reader's statements must never mix two states of the store."""
    Store(tmp_path / "idx", create=True).close()
    with Store(tmp_path / "idx") as w, Store(tmp_path / "idx", readonly=True) as r:
        src = w.add_source("clip", "fp")
        written = []

        def commit_before(sql: str) -> None:  # before every reader statement but a call's first, commit a frame
            calls.append(sql)
            if len(calls) > 1:
                w.add_frames(src.id, [frame(len(written))])
                written.append(len(written))

        r._db.set_trace_callback(commit_before)
        for _ in range(4):
            calls: list[str] = []
            ids, codes = r.codes()
            assert len(calls) > 1  # the writer did commit in the middle of the call
            assert codes.shape == (len(ids), 8 if len(ids) else codes.shape[1]) and len(ids) % 3 == 0
            expect = [frame(i).detections.codes for i in range(len(ids) // 3)]
            if expect:
                np.testing.assert_array_equal(codes, np.concatenate(expect))
        r._db.set_trace_callback(None)
        assert r.count() == 3 * len(written) > len(ids)  # later commits are visible once the snapshot ends
