"""The store interface, against every implementation (``make_store``): idempotent batches, sources, reads by id,
vectors, thumbnails, tracks, snapshots, the codebook binding, read-only stores; and :func:`open_store` itself.

SQLite-only behaviour (WAL readers, resume after kill -9, schema versions, the exact SQLite messages) is in
``test_sqlite.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from yolo_vq import Detections
from yolo_vq.demo import longest_track
from yolo_vq.errors import CodebookError
from yolo_vq.index.registry import open_store
from yolo_vq.index.sqlite import SQLiteStore
from yolo_vq.index.store import VECTOR_DTYPE, CodebookBinding, Frame, Source, SourceInfo, Store, StoreError

# implementation -> the location open_store takes for an index directory (the Lance store adds "lance": f"lance:{d}")
LOCATIONS = {"sqlite": lambda d: d}


def frame(i: int, n: int = 3, code_size: int = 8, *, dim: int = 0) -> Frame:
    rng = np.random.default_rng(i)
    xy = rng.uniform(0, 500, (n, 2))
    det = Detections(np.concatenate([xy, xy + 40], 1), confidence=rng.uniform(size=n), class_id=np.arange(n) % 2,
                     track_id=np.arange(n) + 10 * i, codes=rng.integers(0, 256, (n, code_size), dtype=np.uint8),
                     embeddings=rng.normal(size=(n, dim)).astype(np.float32) if dim else None)
    return Frame(i, i / 25.0, det)


class Maker:
    """``make_store(name="idx", **open_store_kwargs)``: a store of one implementation in ``tmp_path / name``."""

    def __init__(self, kind: str, root: Path):
        self.kind, self.root = kind, root

    def location(self, name: str = "idx"):
        return LOCATIONS[self.kind](self.root / name)

    def __call__(self, name: str = "idx", **kwargs) -> Store:
        return open_store(self.location(name), **kwargs)


@pytest.fixture(params=sorted(LOCATIONS))
def make_store(request, tmp_path) -> Maker:
    return Maker(request.param, tmp_path)


def fake_codebook(folder: Path, seed: int = 0) -> Path:
    """A codebook as far as the binding reads one: tensors whose sha256 its JSON records."""
    folder.mkdir(parents=True, exist_ok=True)
    blob = np.random.default_rng(seed).bytes(256)
    (folder / "cb.safetensors").write_bytes(blob)
    (folder / "cb.json").write_text(json.dumps({"tensors": {"sha256": hashlib.sha256(blob).hexdigest()}}))
    return folder / "cb"


# -- every implementation ----------------------------------------------------------------------------------------
def test_round_trip_and_idempotent_batches(make_store):
    with make_store(create=True) as s:
        assert isinstance(s, Store) and not s.readonly
        src = s.add_source(SourceInfo("clip.mp4", "abc123", fps=25.0, frame_count=10, width=640, height=272))
        assert s.add_source(SourceInfo("clip-renamed.mp4", "abc123")).id == src.id  # same content: same source
        assert s.add_frames(src.id, [frame(i) for i in range(4)] + [frame(4, n=0)]).tolist() == list(range(1, 13))
        assert s.add_frames(src.id, [frame(i) for i in range(2, 6)]).tolist() == [13, 14, 15]  # 2-4 already stored
        assert s.count() == 15
        assert s.frames_done(src.id).tolist() == [0, 1, 2, 3, 4, 5]
        assert s.frames_done(src.id).dtype == np.int64
        ids, codes = s.codes()
        assert codes.shape == (15, 8) and codes.dtype == np.uint8 and ids.tolist() == sorted(ids.tolist())
        assert ids.dtype == np.int64
        np.testing.assert_array_equal(codes[:3], frame(0).detections.codes)
        got = s.get(ids[[4, 0]])
        np.testing.assert_array_equal(got.codes, codes[[4, 0]])
        assert got.data["frame"].tolist() == [1, 0] and got.data["source_id"].tolist() == [src.id] * 2
        np.testing.assert_allclose(got.xyxy[1], frame(0).detections.xyxy[0], rtol=1e-6)
        np.testing.assert_allclose(got.data["time"], [1 / 25.0, 0.0])
        assert got.track_id.tolist() == [11, 0] and got.class_id.tolist() == [1, 0]
        assert s.codes(after_id=int(ids[-4]))[0].tolist() == ids[-3:].tolist()  # incremental refresh
        s.set_meta("codebook_fingerprint", "f00d")
    with make_store(readonly=True) as r:
        assert r.readonly
        assert r.count() == 15 and r.get_meta("codebook_fingerprint") == "f00d" and r.get_meta("code_size") == 8
        assert r.get_meta("never set", "default") == "default"
        with pytest.raises(StoreError, match="read-only"):
            r.add_frames(src.id, [frame(9)])


def test_missing_index_and_bad_codes_say_what_to_do(make_store, tmp_path):
    with pytest.raises(StoreError, match=r"no index at .*: create one with `yolo-vq index"):
        make_store("nothing")
    assert not (tmp_path / "nothing").exists()
    with make_store(create=True) as s:
        src = s.add_source(SourceInfo("a", "fp"))
        s.add_frames(src.id, [frame(0)])
        with pytest.raises(StoreError, match="codes of 16 bytes, this index stores 8-byte codes"):
            s.add_frames(src.id, [frame(1), frame(2, code_size=16)])
        assert s.count() == 3 and s.frames_done(src.id).tolist() == [0]  # the failed batch left nothing behind
        with pytest.raises(KeyError, match="no detections with ids"):
            s.get([999])


def test_sources_by_id_and_fingerprint(make_store):
    with make_store(create=True) as s:
        assert s.sources() == [] and s.find_source("fp-a") is None
        a = s.add_source(SourceInfo("a.mp4", "fp-a", fps=30.0, frame_count=7, width=64, height=48))
        b = s.add_source(SourceInfo("b", "fp-b"))
        assert a == Source("a.mp4", "fp-a", 30.0, 7, 64, 48, id=a.id) and b.fps is None and b.width is None
        assert isinstance(a, SourceInfo) and a.described()["frame_count"] == 7
        assert s.sources() == [a, b] and a.id < b.id
        assert s.source(b.id) == b and s.source(fingerprint="fp-a") == a and s.find_source("fp-b") == b
        assert s.find_source("fp-c") is None
        with pytest.raises(KeyError):
            s.source(b.id + 100)
        with pytest.raises(KeyError):
            s.source(fingerprint="fp-c")
        assert s.frames_done(b.id + 100).tolist() == []


def test_empty_store_reads(make_store):
    with make_store(create=True) as s:
        ids, codes = s.codes()
        assert ids.shape == (0,) and codes.shape == (0, 0) and ids.dtype == np.int64 and codes.dtype == np.uint8
        cols = s.rows()
        assert sorted(cols) == ["class_id", "codes", "confidence", "frame", "id", "list_id", "source_id", "time",
                                "track_id", "x1", "x2", "y1", "y2"]
        assert all(len(v) == 0 for v in cols.values()) and cols["codes"].shape == (0, 0)
        with pytest.raises(ValueError, match=r"unknown row fields \['xyxy'\]: expected some of \['class_id'"):
            s.rows(fields=("xyxy",))
        got = s.get([])
        assert len(got) == 0 and sorted(got.data) == ["frame", "id", "source_id", "time"]
        assert s.count() == 0 and s.thumbnails([]) == [] and longest_track(s) is None
        assert s.vector_dim is None and s.codebook_sha256 is None and s.codebook_path() is None
        with pytest.raises(StoreError, match="keeps no float vectors"):
            s.vectors([1])
        src = s.add_source(SourceInfo("a", "fp"))
        s.add_frames(src.id, [frame(0)])
        assert s.codes(after_id=int(s.codes()[0][-1]))[1].shape == (0, 8)  # nothing newer: the store's code size


def test_rows_are_columns_of_the_codes_rows(make_store):
    with make_store(create=True) as s:
        a, b = s.add_source(SourceInfo("a", "fa")), s.add_source(SourceInfo("b", "fb"))
        s.add_frames(a.id, [frame(0), frame(1)])
        s.add_frames(b.id, [frame(2)])
        ids, _ = s.codes()
        cols = s.rows()
        assert cols["id"].tolist() == ids.tolist()
        assert {k: v.dtype for k, v in cols.items()} == {"id": np.int64, "class_id": np.int64, "source_id": np.int64,
                                                        "time": np.float64, "confidence": np.float32,
                                                        "track_id": np.int64, "list_id": np.int32, "codes": np.uint8,
                                                        "frame": np.int64, **dict.fromkeys(("x1", "y1", "x2", "y2"),
                                                                                           np.float32)}
        assert sorted(s.rows(fields=("time", "time"))) == ["id", "time"]
        assert cols["source_id"].tolist() == [a.id] * 6 + [b.id] * 3
        assert cols["track_id"].tolist() == [0, 1, 2, 10, 11, 12, 20, 21, 22]
        rows = s.rows(after_id=ids[1], limit=4)  # what the partitioned search structure is built from
        assert rows["id"].tolist() == ids[2:6].tolist() and (rows["list_id"] == -1).all()
        assert rows["codes"].tolist() == s.get(ids[2:6]).codes.tolist()
        assert s.max_id() == ids[-1]
        assert cols["class_id"].tolist() == [0, 1, 0] * 3
        np.testing.assert_allclose(cols["time"], np.repeat([0, 1 / 25, 2 / 25], 3))
        np.testing.assert_allclose(cols["confidence"], np.concatenate([frame(i).detections.confidence
                                                                       for i in range(3)]), rtol=1e-6)
        got = s.get(ids)  # the rest of a result's row: what Store.get gives
        assert cols["frame"].tolist() == got.data["frame"].tolist()
        assert np.array_equal(np.stack([cols[c] for c in ("x1", "y1", "x2", "y2")], 1), got.xyxy)
        tail = s.rows(after_id=int(ids[5]), fields=("class_id",))
        assert tail["id"].tolist() == ids[6:].tolist()


def test_vectors_kept_as_float16(make_store):
    with make_store(create=True) as s:
        src = s.add_source(SourceInfo("a", "fp"))
        s.add_frames(src.id, [frame(0)])  # before vectors were kept
        s.add_frames(src.id, [frame(1, dim=16), frame(2, dim=16)], vectors=True)
        assert s.vector_dim == 16 and s.get_meta("vectors")["dim"] == 16
        ids, _ = s.codes()
        out, kept = s.vectors(ids[[8, 0, 3]])
        assert out.shape == (3, 16) and out.dtype == np.float32 and kept.tolist() == [True, False, True]
        want = np.stack([frame(2, dim=16).detections.embeddings[2], frame(1, dim=16).detections.embeddings[0]])
        np.testing.assert_array_equal(out[[0, 2]], want.astype(VECTOR_DTYPE).astype(np.float32))
        assert not out[1].any()
        assert s.vectors([])[0].shape == (0, 16)
        with pytest.raises(StoreError, match="embeddings of dim 8, this index keeps 16"):
            s.add_frames(src.id, [frame(3, dim=8)], vectors=True)
        assert s.frames_done(src.id).tolist() == [0, 1, 2]


def test_thumbnails_and_the_nearest_of_a_track(make_store):
    det = Detections(np.array([[0, 0, 10, 10], [5, 5, 20, 20]], np.float32), track_id=[4, -1],
                     codes=np.zeros((2, 8), np.uint8))
    with make_store(create=True) as s:
        src = s.add_source(SourceInfo("a", "fp"))
        s.add_frames(src.id, [Frame(5, 0.2, det, [b"jpeg-5", b"untracked"]), Frame(6, 0.24, det, [None, None]),
                              Frame(9, 0.36, det, [b"jpeg-9", None]), Frame(12, 0.5, det)])
        ids, _ = s.codes()
        assert s.thumbnails(ids[[4, 0, 1, 3, 7]]) == [b"jpeg-9", b"jpeg-5", b"untracked", None, None]
        assert s.thumbnails([int(ids[-1]) + 100]) == [None]  # an id not stored has none
        assert s.nearest_thumbnail(src.id, 4, 6) == b"jpeg-5"
        assert s.nearest_thumbnail(src.id, 4, 8) == b"jpeg-9"
        assert s.nearest_thumbnail(src.id, 4, 7) == b"jpeg-5"  # a tie: the earlier frame
        assert s.nearest_thumbnail(src.id, 4, 100) == b"jpeg-9"
        assert s.nearest_thumbnail(src.id, -1, 5) is None  # untracked: never another detection's
        assert s.nearest_thumbnail(src.id, 99, 5) is None


def test_tracks(make_store):
    with make_store(create=True) as s:
        a, b = s.add_source(SourceInfo("a", "fa")), s.add_source(SourceInfo("b", "fb"))
        assert s.max_track_id(a.id) == 0
        s.add_frames(a.id, [frame(i) for i in range(3)])  # tracks 0,1,2 / 10,11,12 / 20,21,22
        det = Detections(np.array([[0, 0, 5, 5]] * 4, np.float32), track_id=[7, 7, 7, -1],
                         codes=np.zeros((4, 8), np.uint8))
        s.add_frames(b.id, [Frame(0, 0.0, det)])
        ids, _ = s.codes()
        assert s.max_track_id(a.id) == 22 and s.max_track_id(b.id) == 7
        assert s.track_ids(b.id, 7).tolist() == ids[9:12].tolist() and s.track_ids(b.id, 7).dtype == np.int64
        assert s.track_ids(a.id, 7).tolist() == [] and s.track_ids(a.id, 11).tolist() == [int(ids[4])]
        assert longest_track(s) == (7, 3, int(ids[9]))
        assert s.frame_ids(a.id, 1).tolist() == ids[3:6].tolist() and s.frame_ids(b.id, 0).tolist() == ids[9:].tolist()
        assert s.frame_ids(a.id, 5).tolist() == [] and s.frame_ids(a.id, 1).dtype == np.int64


def test_snapshot_sees_one_state_and_is_reentrant(make_store):
    make_store(create=True).close()
    with make_store() as w, make_store(readonly=True) as r:
        src = w.add_source(SourceInfo("a", "fp"))
        w.add_frames(src.id, [frame(0)])
        with r.snapshot() as snap:
            assert snap is r and r.count() == 3
            w.add_frames(src.id, [frame(1)])  # committed while the reader's snapshot is open
            with r.snapshot():
                assert r.count() == 3 and len(r.codes()[0]) == 3
            assert len(r.rows(fields=())["id"]) == 3
        assert r.count() == 6 and len(r.codes()[0]) == 6  # visible once the snapshot ends


def test_the_codebook_binding(make_store, tmp_path):
    cb, other = fake_codebook(tmp_path / "cbs"), fake_codebook(tmp_path / "other", seed=1)
    binding = CodebookBinding(cb, {"dim": 4}, "model-fp", {0: "person", 1: "bike"})
    with make_store(create=True, codebook=binding) as s:
        sha = json.loads(cb.with_suffix(".json").read_text())["tensors"]["sha256"]
        assert s.codebook_sha256 == sha and s.codebook_path() == s.directory / "codebook"
        assert (s.directory / "codebook.safetensors").read_bytes() == cb.with_suffix(".safetensors").read_bytes()
        assert s.get_meta("names") == {"0": "person", "1": "bike"} and s.get_meta("embedding") == {"dim": 4}
        assert s.get_meta("model_fingerprint") == "model-fp"
        assert s.bind_codebook(binding) is False  # the same one again: nothing to do
        with pytest.raises(CodebookError, match="is another one"):
            s.bind_codebook(CodebookBinding(other, None, None, {}))
    (tmp_path / "idx" / "codebook.json").unlink()
    with make_store(readonly=True) as r, pytest.raises(CodebookError, match="codebook.json is missing"):
        r.codebook_path()
    with make_store(codebook=binding) as s:  # the same codebook puts a lost copy back
        assert s.codebook_path() == s.directory / "codebook"
    with make_store("fresh", create=True) as s:  # bound after creation, once
        assert s.codebook_sha256 is None and s.bind_codebook(binding) is True and s.codebook_sha256 == sha


def test_a_read_only_store_refuses_every_write(make_store, tmp_path):
    with make_store(create=True) as s:
        src = s.add_source(SourceInfo("a", "fp"))
    with make_store(readonly=True) as r:
        for write in (lambda: r.add_source(SourceInfo("b", "fb")), lambda: r.set_meta("k", 1),
                      lambda: r.add_frames(src.id, [frame(0)]),
                      lambda: r.bind_codebook(CodebookBinding(fake_codebook(tmp_path / "cb"), None, None, {}))):
            with pytest.raises(StoreError, match="read-only"):
                write()
    with make_store(readonly=True) as r:
        assert r.sources() == [src] and r.count() == 0 and r.get_meta("k") is None


# -- open_store --------------------------------------------------------------------------------------------------
def test_open_store_picks_the_implementation(tmp_path):
    with open_store(tmp_path / "a", create=True) as s:
        assert type(s) is SQLiteStore and s.directory == tmp_path / "a"
    with open_store(str(tmp_path / "a"), readonly=True) as s:
        assert type(s) is SQLiteStore
    with open_store(f"sqlite:{tmp_path / 'b'}", create=True) as s:
        assert type(s) is SQLiteStore and s.directory == tmp_path / "b"
    with open_store(tmp_path / "c:d", create=True) as s:  # a Path is a directory, colon or not
        assert s.directory == tmp_path / "c:d"


@pytest.mark.parametrize("location,match", [
    ("nosuch:idx", r"unknown store scheme 'nosuch:'; supported: an index directory path \(SQLite\), sqlite:PATH"),
    ("sqlite:", r"no path after 'sqlite:'"),
])
def test_open_store_refuses_an_unknown_scheme(tmp_path, monkeypatch, location, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match=match):
        open_store(location, create=True)
    assert list(tmp_path.iterdir()) == []


def test_the_interface_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        Store()
    assert issubclass(SQLiteStore, Store)


def test_store_exists_says_whether_open_without_create_has_an_index(make_store, tmp_path):
    from yolo_vq.index.registry import store_exists

    loc = make_store.location()
    assert not store_exists(loc)
    with make_store(create=True) as s:
        assert store_exists(loc) and s.stored_bytes() > 0
        before = s.stored_bytes()
        s.add_frames(s.add_source(SourceInfo("a.mp4", "fp")).id, [frame(i, n=50, code_size=32) for i in range(20)])
        assert s.stored_bytes() > before
    (tmp_path / "file").write_text("x")
    assert store_exists(make_store.location("file"))  # open_store refuses it, with its reason
    with pytest.raises(StoreError, match="unknown store scheme"):
        store_exists("nosuch:x")


def test_the_interface_imports_no_implementation():
    import subprocess
    import sys

    code = ("import sys, yolo_vq.index.store, yolo_vq.index.registry; "
            "print(sorted(m for m in sys.modules if 'sqlite' in m or m.endswith('.memory')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_shared_layer_needs_only_the_meta_primitives(tmp_path):
    """What every implementation shares (metadata forms, the codebook binding, the batch checks) runs on a store that
    provides nothing but ``_meta_text``, ``_put_meta_text``, ``_writing`` and ``snapshot``: a second implementation
    does not copy it."""
    from contextlib import contextmanager, nullcontext

    class MetaOnly(Store):
        def __init__(self, directory: Path):
            self.directory, self.path, self.readonly, self.meta = directory, directory / "meta", False, {}
            self.log: list[str] = []

        def _meta_text(self, key):
            return self.meta.get(key)

        def _put_meta_text(self, key, text):
            self.meta[key] = text

        @contextmanager
        def _writing(self, doing):
            before = dict(self.meta)
            try:
                yield
                self.log.append(f"committed {doing}")
            except BaseException:
                self.meta = before  # rolled back whole
                raise

        def snapshot(self):
            return nullcontext(self)

    def unused(*a, **k):
        raise AssertionError("the shared layer called an implementation method it should not need")

    rest = dict.fromkeys(MetaOnly.__abstractmethods__, unused)  # what the shared layer must not need
    Impl = type("Impl", (MetaOnly,), rest)
    (tmp_path / "idx").mkdir()
    s = Impl(tmp_path / "idx")
    cb, other = fake_codebook(tmp_path / "cbs"), fake_codebook(tmp_path / "other", seed=1)
    assert s.codebook_sha256 is None and s.codebook_path() is None and s.vector_dim is None
    assert s.bind_codebook(CodebookBinding(cb, {"dim": 4}, "fp", {0: "person"})) is True
    assert s.log == ["committed binding its codebook"] and s.codebook_path() == tmp_path / "idx" / "codebook"
    assert s.get_meta("names") == {"0": "person"}
    with pytest.raises(CodebookError, match="is another one"):
        s.bind_codebook(CodebookBinding(other, None, None, {}))
    assert len(s.log) == 1 and json.loads(s.meta["codebook_sha256"]) == s.codebook_sha256  # nothing changed
    s.meta["code_size"] = '"eight"'
    with pytest.raises(StoreError, match=r"meta 'code_size' is '\"eight\"', not a positive int; restore it"):
        s.get_meta("code_size")
    s.meta["code_size"] = "8"
    with pytest.raises(StoreError, match="codes of 4 bytes, this index stores 8-byte codes"):
        s._code_size_after(frame(0, code_size=4).detections, 8)
    assert s._vectors_after(frame(0, dim=6).detections, None) == {"dtype": "float16", "dim": 6} and s.vector_dim == 6
