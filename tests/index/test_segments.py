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

LISTS = 8


class Coarse:
    """What the structure needs of a coarse quantizer: a list count and a checksum."""

    lists, sha256 = LISTS, "c0ffee"


def assign(codes: np.ndarray) -> np.ndarray:
    return (codes[:, 0] % LISTS).astype(np.int32)


def add(store, first: int, frames: int, *, with_lists: bool = True, n: int = 5) -> None:
    src = store.add_source(SourceInfo("v.mp4", "fp")).id
    out = []
    for i in range(first, first + frames):
        rng = np.random.default_rng(i)
        codes = rng.integers(0, 256, (n, 8), dtype=np.uint8)
        data = {LIST_ID: assign(codes)} if with_lists else {}
        det = Detections(np.tile([0, 0, 10, 10], (n, 1)).astype(np.float32), confidence=rng.uniform(size=n),
                         class_id=np.arange(n) % 3, track_id=np.arange(n), codes=codes, data=data)
        out.append(Frame(i, i / 10, det))
    store.add_frames(src, out)


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


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign", "restored_db", "manifest"])
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
