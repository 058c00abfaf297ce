"""The on-disk inverted lists (``<index>/ivf``): built from the store, extended, merged, checked, rebuilt."""

from __future__ import annotations

import json
import os
import sqlite3

import numpy as np
import pytest

from yolo_vq import Detections
from yolo_vq.detections import LIST_ID
from yolo_vq.index import segments
from yolo_vq.index.registry import open_store
from yolo_vq.index.segments import ListsProblem, open_lists, rebuild, sync
from yolo_vq.index.sqlite import SCHEMA_REVISION
from yolo_vq.index.store import Frame, SourceInfo
from yolo_vq.index.upkeep import held_rows

LISTS = 8


class Coarse:
    """What the structure needs of a coarse quantizer: a list count and a checksum."""

    lists, sha256 = LISTS, "c0ffee"


def assign(codes: np.ndarray) -> np.ndarray:
    return (codes[:, 0] % LISTS).astype(np.int32)


def add(store, first: int, frames: int, *, with_lists: bool = True, n: int = 5, source: str = "v.mp4",
        codes: bool = True) -> tuple[int, list[Frame], np.ndarray]:
    """Store ``frames`` frames of ``n`` seeded detections; returns what ``ListKeeper.stored`` takes."""
    src = store.add_source(SourceInfo(source, source)).id
    out = []
    for i in range(first, first + frames):
        rng = np.random.default_rng(i)
        c = rng.integers(0, 256, (n, 8), dtype=np.uint8)
        data = {LIST_ID: assign(c)} if with_lists else {}
        det = Detections(np.tile([0, 0, 10, 10], (n, 1)).astype(np.float32), confidence=rng.uniform(size=n),
                         class_id=np.arange(n) % 3, track_id=np.arange(n) + i, codes=c if codes else None, data=data)
        out.append(Frame(i, i / 10, det))
    return src, out, store.add_frames(src, out)


def contents(lists) -> dict[int, tuple]:
    """id -> (list, codes, class) over all segments, checking each id appears once and lists are sorted by id."""
    out = {}
    for s in lists.segments:
        for lst in range(lists.lists):
            a, b = s.offsets[lst], s.offsets[lst + 1]
            assert np.all(np.diff(s.ids[a:b]) > 0)
            for j in range(a, b):
                assert int(s.ids[j]) not in out
                out[int(s.ids[j])] = (lst, s.codes[j].tobytes(), int(s.columns["class_id"][j]))
    return out


def expected(store) -> dict[int, tuple]:
    r = store.rows()
    return {int(i): (int(assign(c[None])[0]), c.tobytes(), int(k)) for i, c, k in zip(r["id"], r["codes"],
                                                                                      r["class_id"])}


def test_sync_covers_every_stored_detection_once_and_grows(tmp_path):
    with open_store(tmp_path / "idx", create=True) as st:
        add(st, 0, 10)
        lists, added, problem = sync(st, Coarse(), assign)
        assert (added, problem, lists.high_water) == (50, None, st.max_id())
        assert contents(lists) == expected(st)
        first = 10
        for k in range(6):  # incremental syncs, merged as they grow
            add(st, first, 10 + 7 * k)
            first += 10 + 7 * k
            lists, added, _ = sync(st, Coarse(), assign)
            assert added == 5 * (10 + 7 * k)
            assert contents(lists) == expected(st)
        assert len(lists.segments) <= 3  # geometric merging
        files = sorted(p.name for p in (tmp_path / "idx" / "ivf").iterdir())
        assert files == sorted([*(s.path.name for s in lists.segments), "manifest.json", "lock"])
        assert sync(st, Coarse(), assign)[1] == 0
        assert open_lists(st, Coarse()).rows == st.count()


def test_held_rows_are_the_rows_read_back_and_a_sync_writes_them_without_reading_them(tmp_path):
    """A writer's own batches are written from memory (held_rows); another writer's rows in between, rows without
    codes, a half-synced held batch and a batch with skipped frames are read from the store: the lists equal a
    sync from the store alone."""
    with open_store(tmp_path / "idx", create=True) as st, open_store(tmp_path / "idx") as other:
        read = []
        rows = st.rows
        st.rows = lambda **kw: read.append(len((r := rows(**kw))["id"])) or r
        held = [held_rows(*add(st, 0, 6))]
        lists, added, _ = sync(st, Coarse(), assign, held=held)
        assert (added, sum(read)) == (30, 0)  # nothing read back
        assert contents(lists) == expected(st)
        for k in range(2):
            held.append(held_rows(*add(st, 10 + 20 * k, 4, with_lists=bool(k))))  # k = 0: lists to assign
            add(other, 100 + 20 * k, 3, source="w.mp4")  # another writer's rows: not held
            add(other, 110 + 20 * k, 2, source="w.mp4", codes=False)  # not listed at all
            held.append(held_rows(*add(st, 20 + 20 * k, 3, n=4)))
        src, frames, ids = add(st, 19, 3)  # frames 20-21 were stored already: fewer ids than detections
        assert held_rows(src, frames, ids) is None and held_rows(*add(st, 90, 2, codes=False)) is None
        for r in held[1:]:  # exactly what the store reads back, dtypes included
            back = rows(after_id=int(r["id"][0]) - 1, limit=len(r["id"]))
            assert r.keys() == back.keys() and all(r[f].dtype == back[f].dtype for f in r)
            assert all(np.array_equal(r[f], back[f]) for f in r), r["id"]
        read.clear()
        lists, added, _ = sync(st, Coarse(), assign, held=held, batch=7)  # held runs cut across batches
        assert sum(read) == 2 * 15 + 5  # read back: the other writer's rows, and frame 19's
        assert contents(lists) == expected(st) and added == st.count() - 30 - 30  # 30 detections without codes
        assert lists.high_water == st.rows()["id"][-1] < st.max_id()  # the last rows have no codes


def test_rows_stored_without_a_list_are_assigned_from_their_codes(tmp_path):
    with open_store(tmp_path / "idx", create=True) as st:
        add(st, 0, 4, with_lists=False)
        assert (st.rows()["list_id"] == -1).all()
        lists, _, _ = sync(st, Coarse(), assign)
        assert contents(lists) == expected(st)


def test_an_index_made_before_lists_gains_the_column(tmp_path):
    with open_store(tmp_path / "idx", create=True) as st:
        add(st, 0, 2)
        assert st.get_meta("schema_revision") == SCHEMA_REVISION == 3
    db = sqlite3.connect(tmp_path / "idx" / "index.db")  # as a yolo_vq before lists wrote it: revision 1
    db.execute("ALTER TABLE detections DROP COLUMN list_id")
    db.execute("DELETE FROM meta WHERE key = 'schema_revision'")
    db.commit()
    db.close()
    with open_store(tmp_path / "idx", readonly=True) as st:
        assert (st.rows()["list_id"] == -1).all()  # read-only: no column, no list
        assert st.get_meta("schema_revision") is None  # and nothing changed
    with open_store(tmp_path / "idx") as st:  # opened for writing: upgraded in one write, the revision recorded
        assert st.get_meta("schema_revision") == SCHEMA_REVISION and st.get_meta("schema_version") == 1
        add(st, 2, 2)
        lid = st.rows()["list_id"]
        assert (lid[:10] == -1).all() and (lid[10:] >= 0).all()


def test_a_writer_killed_before_the_manifest_leaves_the_old_structure(tmp_path, monkeypatch):
    with open_store(tmp_path / "idx", create=True) as st:
        add(st, 0, 5)
        sync(st, Coarse(), assign)
        add(st, 5, 5)
        real = os.replace

        def crash(a, b):
            if str(b).endswith("manifest.json"):
                raise KeyboardInterrupt("killed")
            real(a, b)

        monkeypatch.setattr(segments.os, "replace", crash)
        with pytest.raises(KeyboardInterrupt):
            sync(st, Coarse(), assign)
        monkeypatch.setattr(segments.os, "replace", real)
        old = open_lists(st, Coarse())
        assert old.high_water == 25 and old.rows == 25  # the rows after it are the tail, searched flat
        lists, added, problem = sync(st, Coarse(), assign)
        assert (added, problem) == (25, None)
        assert contents(lists) == expected(st)
        assert not [p for p in (tmp_path / "idx" / "ivf").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign", "restored_db", "manifest", "layout"])
def test_a_damaged_or_foreign_structure_is_named_and_rebuilt(tmp_path, damage):
    with open_store(tmp_path / "idx", create=True) as st:
        add(st, 0, 6)
        lists, _, _ = sync(st, Coarse(), assign)
        seg = lists.segments[0].path
        m = tmp_path / "idx" / "ivf" / "manifest.json"
        if damage == "truncate":
            seg.write_bytes(seg.read_bytes()[:-100])
        elif damage == "garbage":
            seg.write_bytes(os.urandom(seg.stat().st_size))
        elif damage == "foreign":
            st.set_meta("index_uuid", "another")
        elif damage == "layout":  # a segment header naming other arrays (another layout of the same format number)
            raw = seg.read_bytes()
            size = int.from_bytes(raw[8:16], "little")
            head = json.loads(raw[16:size].decode())
            del head["arrays"]["id"]
            seg.write_bytes(raw[:16] + json.dumps(head).encode().ljust(size - 16) + raw[size:])
        elif damage == "restored_db":
            meta = json.loads(m.read_text())
            meta["high_water"] = 10_000
            m.write_text(json.dumps(meta))
        else:
            m.write_text("{")
        with pytest.raises(ListsProblem) as e:
            open_lists(st, Coarse())
        assert str(e.value)
        lists, added, problem = sync(st, Coarse(), assign)
        assert added == 30 and problem == str(e.value)
        assert contents(lists) == expected(st)
        assert rebuild(st, Coarse(), assign)[1] == 30


def test_the_merge_plan_is_the_pairwise_rule_done_in_one_pass():
    def pairwise(rows):  # the rule as first written: merge the newest two while the newest holds >= 1/4 of the other
        rows, writes = list(rows), 0
        while len(rows) >= 2 and 4 * rows[-1] >= rows[-2]:
            rows[-2:] = [rows[-2] + rows[-1]]
            writes += rows[-1]
        return rows, writes

    rng = np.random.default_rng(0)
    for _ in range(200):
        rows = sorted(rng.integers(1, 1000, rng.integers(0, 8)).tolist(), reverse=True) + rng.integers(
            1, 300, rng.integers(0, 4)).tolist()
        n = segments._merge_plan(rows)
        once = rows[:len(rows) - n] + [sum(rows[len(rows) - n:])] if n else rows
        want, writes = pairwise(rows)
        assert once == want and (sum(rows[len(rows) - n:]) if n else 0) <= writes
    assert [segments._merge_plan(r) for r in ([], [7], [1000, 5], [1000, 10, 10, 10], [100, 30, 10, 10])] == [0, 0, 0, 3, 4]


def test_syncs_without_merging_append_and_the_next_merging_sync_merges_them_in_one_pass(tmp_path, monkeypatch):
    with open_store(tmp_path / "idx", create=True) as st:
        first = 0
        for k in range(5):
            add(st, first, 8)
            first += 8
            lists, added, _ = sync(st, Coarse(), assign, merge=False)
            assert added == 40 and len(lists.segments) == k + 1  # appended, never merged
        assert contents(lists) == expected(st)
        merges = []
        real = segments._merge
        monkeypatch.setattr(segments, "_merge", lambda *a: merges.append(len(a[2])) or real(*a))
        lists, added, _ = sync(st, Coarse(), assign)  # nothing new: only the merge the no-merge syncs left
        assert added == 0 and len(lists.segments) == 1 and merges == [5]
        assert contents(lists) == expected(st) and lists.high_water == st.max_id()
        assert sorted(p.name for p in lists.folder.iterdir()) == sorted(["lock", "manifest.json",
                                                                         lists.segments[0].path.name])
