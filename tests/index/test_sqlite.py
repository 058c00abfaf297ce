"""The SQLite store only: resume after kill -9, WAL readers during writes, schema versions, the exact messages that
name ``index.db``, one read transaction per snapshot (the interface's cases are in ``test_store.py``)."""

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
from contextlib import closing

import numpy as np
import pytest

from tests.index.test_store import frame
from yolo_vq.index.registry import open_store
from yolo_vq.index.sqlite import DB_NAME, SQLiteStore
from yolo_vq.index.store import SourceInfo, StoreError


def test_missing_index_names_the_database(tmp_path):
    with pytest.raises(StoreError, match=r"no index at .* \(index.db missing\): create one with `yolo-vq index"):
        open_store(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_other_schema_version_is_refused_untouched(tmp_path):
    with open_store(tmp_path / "idx", create=True) as s:
        s.add_frames(s.add_source(SourceInfo("a", "fp")).id, [frame(0)])
        s.set_meta("schema_version", 999)
    db = tmp_path / "idx" / DB_NAME
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    with pytest.raises(StoreError, match="schema version 999, this yolo_vq reads version 1: index into a new"):
        open_store(tmp_path / "idx")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    sqlite3.connect(foreign / DB_NAME).execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="schema version None"):
        open_store(foreign)


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from tests.index.test_store import frame
    from yolo_vq.index.registry import open_store
    from yolo_vq.index.store import SourceInfo
    s = open_store({idx!r}, create=True)
    src = s.add_source(SourceInfo("clip", "fp"))
    done = set(s.frames_done(src.id).tolist())
    todo = [i for i in range(200) if i not in done]
    for k in range(0, len(todo), 5):  # batches of 5 frames, one transaction each
        s.add_frames(src.id, [frame(i) for i in todo[k:k + 5]])
        print(k, flush=True)
        time.sleep({pause})
""")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_resume_after_kill_has_no_duplicates(tmp_path):
    idx = str(tmp_path / "idx")
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=ROOT, idx=idx, pause=0.02)],
                            stdout=subprocess.PIPE, text=True)
    for _ in range(6):  # let it commit a few batches, then kill it mid-run
        proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open_store(idx, readonly=True) as s:
        partial = len(s.frames_done(1))
    assert 0 < partial < 200
    subprocess.run([sys.executable, "-c", WRITER.format(root=ROOT, idx=idx, pause=0)], check=True,
                   stdout=subprocess.DEVNULL)
    with open_store(idx) as s, closing(sqlite3.connect(os.path.join(idx, DB_NAME))) as db:
        assert s.frames_done(1).tolist() == list(range(200))
        assert s.count() == 200 * 3
        pairs = db.execute("SELECT COUNT(*), COUNT(DISTINCT frame || ':' || track_id) FROM detections").fetchone()
        assert pairs[0] == pairs[1]  # no duplicated detection
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_readers_search_while_one_process_writes(tmp_path):
    idx = tmp_path / "idx"
    open_store(idx, create=True).close()
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=ROOT, idx=str(idx), pause=0.005)],
                            stdout=subprocess.DEVNULL)
    counts, errors = [], []

    def read():
        try:
            with open_store(idx, readonly=True, timeout=1.0) as r:
                while proc.poll() is None:
                    ids, codes = r.codes()
                    assert len(ids) == len(codes) and len(ids) % 3 == 0  # whole frames only: committed batches
                    counts.append(len(ids))
                    time.sleep(0.01)
        except Exception as e:  # noqa: BLE001 - reported below
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
    SQLiteStore(tmp_path / "idx", create=True).close()
    with SQLiteStore(tmp_path / "idx") as w, SQLiteStore(tmp_path / "idx", readonly=True) as r:
        src = w.add_source(SourceInfo("clip", "fp"))
        written = []

        def commit_before(sql: str) -> None:  # before every reader statement but a call's first, commit a frame
            calls.append(sql)
            if len(calls) > 1:
                w.add_frames(src.id, [frame(len(written))])
                written.append(len(written))

        r._db.set_trace_callback(commit_before)  # SQLite-specific: a hook between the reader's statements
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


def test_exists_for_what_sqlite_leaves_behind(tmp_path):
    from yolo_vq.index.registry import store_exists

    d = tmp_path / "idx"
    d.mkdir()
    assert not store_exists(d) and not store_exists(f"sqlite:{d}")
    (d / DB_NAME).write_bytes(b"")  # a creation killed before its first write: nothing stored
    assert not store_exists(d)
    with open_store(d, create=True):  # and making the store there loses nothing
        pass
    assert store_exists(d) and store_exists(str(d)) and store_exists(f"sqlite:{d}")
    (d / DB_NAME).unlink()
    (d / "codebook.json").write_text("{}")  # an index's codebook without its database: opening refuses it
    assert store_exists(d)
    with pytest.raises(StoreError, match="holds an index codebook but no index.db"):
        open_store(d)


def test_a_revision_2_store_loses_its_class_index_when_opened_for_writing(tmp_path):
    """Revision 3 keeps no index on class_id (nothing queries it); an older store is upgraded by a writer, in one
    write, and read as it is by a searcher."""
    def indexes(d):
        with closing(sqlite3.connect(d / DB_NAME)) as db:
            return sorted(r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index' AND "
                                                   "name LIKE 'detections_%'"))

    d = tmp_path / "idx"
    with open_store(d, create=True) as s:
        s.add_frames(s.add_source(SourceInfo("a", "fp")).id, [frame(i) for i in range(3)])
    assert indexes(d) == ["detections_source_frame", "detections_track"]
    with closing(sqlite3.connect(d / DB_NAME)) as db:  # what revision 2 wrote
        db.execute("CREATE INDEX detections_class ON detections (class_id)")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_revision'")
        db.commit()
    with open_store(d, readonly=True) as s:
        assert s.get_meta("schema_revision") == 2 and s.count() == 9
    assert "detections_class" in indexes(d)
    with open_store(d) as s:
        assert s.get_meta("schema_revision") == 3 and s.count() == 9
    assert indexes(d) == ["detections_source_frame", "detections_track"]
