"""The bulk write path: lists assigned one batch ahead in a worker thread, the same store as the plain path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.index.test_ivf import NAMES, PER_FRAME, D, build, data, make_codebook  # noqa: F401 - data is a fixture
from tests.index.test_ivf import frames_of as ivf_frames
from tests.index.test_segments import contents
from yolo_vq.errors import StoreError
from yolo_vq.index.bulk import BulkWriter
from yolo_vq.index.registry import open_store
from yolo_vq.index.segments import open_lists
from yolo_vq.index.store import CodebookBinding, Frame, SourceInfo
from yolo_vq.quant import load_codebook


def frames_of(x: np.ndarray, codebook, first: int, *, code_size: int | None = None) -> list[Frame]:
    """``x`` encoded, as frames without lists (as tests.index.test_ivf.fill makes them); ``code_size``: zero codes
    of that size instead."""
    codes = load_codebook(codebook).encode(torch.from_numpy(x)).numpy().astype(np.uint8)
    if code_size is not None:
        codes = np.zeros((len(x), code_size), np.uint8)
    return ivf_frames(codes, first, np.random.default_rng(len(x) + first))


def new_index(folder, codebook):
    binding = CodebookBinding(codebook, embedding={"dim": D}, model_fingerprint=None, names=NAMES)
    return open_store(folder / "bulk", create=True, codebook=binding)


def test_the_bulk_path_stores_and_lists_what_the_plain_path_does(data, tmp_path):  # noqa: F811
    x = data[0]
    plain = build(tmp_path, x)  # lists assigned in line, stored in one batch, synced
    with new_index(tmp_path, tmp_path / "cb") as st:
        with BulkWriter(st, load_codebook(st.codebook_path()), every=700) as w:  # syncs in between
            src = st.add_source(SourceInfo("v.mp4", "v.mp4")).id
            for a in range(0, len(x), 400):  # batches of 40 frames; each frame number once
                w.add(src, frames_of(x[a:a + 400], tmp_path / "cb", a // PER_FRAME), vectors=x[a:a + 400])
            w.add(src, frames_of(x[:400], tmp_path / "cb", 0), vectors=x[:400])  # stored already: skipped
        assert w.stored == len(x) == w.close()
        with open_store(plain, readonly=True) as ref:
            a, b = st.rows(), ref.rows()
            assert (a["list_id"] >= 0).all() and all(np.array_equal(a[k], b[k]) for k in a if k != "confidence")
            codebook = load_codebook(st.codebook_path())
            assert contents(open_lists(st, codebook.coarse)) == contents(open_lists(ref, codebook.coarse))


def test_bad_batches_are_refused_and_a_failed_store_loses_only_its_own_batch(data, tmp_path):  # noqa: F811
    x = data[0][:400]
    codebook = make_codebook(tmp_path, data[0])
    with new_index(tmp_path, codebook) as st:
        src = st.add_source(SourceInfo("v.mp4", "v.mp4")).id
        w = BulkWriter(st, load_codebook(st.codebook_path()))
        with pytest.raises(ValueError, match="399 vectors for the 400 detections of 40 frames"):
            w.add(src, frames_of(x, codebook, 0), vectors=x[:-1])
        w.add(src, frames_of(x[:200], codebook, 0), vectors=x[:200])
        w.add(src, frames_of(x[200:], codebook, 20, code_size=4), vectors=x[200:])  # stores the first batch
        assert st.count() == 200
        with pytest.raises(StoreError, match="codes of 4 bytes, this index stores 8-byte codes"):  # the second batch fails when it is stored
            w.close()
        assert st.count() == 200 and w.close() == 200
        with pytest.raises(KeyError), BulkWriter(st, load_codebook(st.codebook_path())) as w2:
            w2.add(src, frames_of(x[200:], codebook, 20), vectors=x[200:])
            raise KeyError("the caller fails: the queued batch is dropped")
        assert st.count() == 200


def test_a_bulk_load_syncs_beside_the_writer_appends_segments_and_merges_them_once_at_the_end(data, tmp_path,  # noqa: F811
                                                                                             monkeypatch):
    from yolo_vq.index import segments

    x = data[0]
    codebook = make_codebook(tmp_path, x)
    merges, threads = [], []
    real_merge, real_sync = segments._merge, segments.sync
    monkeypatch.setattr(segments, "_merge", lambda *a: merges.append(len(a[2])) or real_merge(*a))

    def sync(store, *a, **kw):
        import threading

        threads.append((threading.current_thread().name, kw.get("merge")))
        return real_sync(store, *a, **kw)

    monkeypatch.setattr("yolo_vq.index.upkeep.sync", sync)
    with new_index(tmp_path, codebook) as st:
        src = st.add_source(SourceInfo("v.mp4", "v.mp4")).id
        with BulkWriter(st, load_codebook(st.codebook_path()), every=500) as w:
            for a in range(0, len(x), 200):
                w.add(src, frames_of(x[a:a + 200], codebook, a // PER_FRAME), vectors=x[a:a + 200])
            w.ready()  # the syncs so far are done: appended segments, none merged
            appended = len(open_lists(st, load_codebook(st.codebook_path()).coarse).segments)
            assert appended >= 3 and not merges
            assert threads == [("yolo_vq-sync_0", False)] * appended  # one segment each, of 500-700 rows
        assert threads[-1] == ("MainThread", True)  # the last sync, at close, merges them all: in one pass
        lists = open_lists(st, load_codebook(st.codebook_path()).coarse)
        assert len(merges) == 1 and merges[0] >= len(threads) - 1 and len(lists.segments) == 1 and lists.rows == st.count() == len(x)


def test_a_failed_background_sync_is_raised_by_the_next_call_and_loses_nothing(data, tmp_path, monkeypatch):  # noqa: F811
    x = data[0][:1200]
    codebook = make_codebook(tmp_path, data[0])
    real = __import__("yolo_vq.index.upkeep", fromlist=["sync_lists"]).sync_lists

    def full_disk(store, *a, **kw):
        raise StoreError("no space left on device (a test)")

    with new_index(tmp_path, codebook) as st:
        src = st.add_source(SourceInfo("v.mp4", "v.mp4")).id
        w = BulkWriter(st, load_codebook(st.codebook_path()), every=300)
        monkeypatch.setattr("yolo_vq.index.upkeep.sync_lists", full_disk)
        w.add(src, frames_of(x[:400], codebook, 0), vectors=x[:400])
        w.add(src, frames_of(x[400:800], codebook, 40), vectors=x[400:800])  # stores the first: a sync starts
        with pytest.raises(StoreError, match="no space left"):
            w.ready()
        monkeypatch.setattr("yolo_vq.index.upkeep.sync_lists", real)
        w.add(src, frames_of(x[800:], codebook, 80), vectors=x[800:])
        assert w.close() == len(x) == st.count()
        lists = open_lists(st, load_codebook(st.codebook_path()).coarse)
        assert lists.rows == len(x) and lists.high_water == st.max_id()
