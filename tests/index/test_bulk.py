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
