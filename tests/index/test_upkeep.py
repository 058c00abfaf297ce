"""Keeping the lists current: the indexer and ingest give every detection its list and sync; `upgrade` gives an
older index lists; the default nprobe is calibrated; the CLI's --nprobe, --lists and `info`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.edge.test_ingest import CODE, line, source, write
from tests.index.test_ivf import LISTS, D, build, data, same  # noqa: F401 - data is a fixture
from yolo_vq import Indexer, Memory
from yolo_vq.cli import main
from yolo_vq.edge.ingest import ingest
from yolo_vq.index.registry import open_store
from yolo_vq.index.segments import open_lists
from yolo_vq.index.upkeep import ListKeeper, upgrade
from yolo_vq.quant import CoarseQuantizer, load_codebook, save_coarse
from yolo_vq.quant.io import codebook_checksum


@pytest.fixture(scope="module")
def listed_codebook(small_codebook, tmp_path_factory):
    """``small_codebook`` with a coarse quantizer of 4 lists attached (its checksum unchanged)."""
    out = tmp_path_factory.mktemp("listed") / "cb"
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(small_codebook.with_suffix(suffix), out.with_suffix(suffix))
    q = load_codebook(out)
    x = np.random.default_rng(1).normal(size=(512, q.dim)).astype(np.float32)
    save_coarse(CoarseQuantizer.fit(x / np.linalg.norm(x, axis=1, keepdims=True), 4, reduced_dim=8), out)
    assert codebook_checksum(out) == codebook_checksum(small_codebook)
    return out


def test_the_indexer_lists_each_detection_by_its_embedding_and_syncs_at_close(index_model, listed_codebook,
                                                                              bikes_frames, tmp_path):
    idx = tmp_path / "idx"
    embeddings = []
    with Indexer(index_model, idx, codebook=listed_codebook, conf=0.1, batch=2, commit_every=2) as ix:
        ix.lists.every = 6  # sync while indexing too, not only at close
        syncs = []
        sync = ix.lists.sync
        ix.lists.sync = lambda: syncs.append(sync())
        for r in index_model.predict(bikes_frames, conf=0.1, verbose=False):
            embeddings.append(r.vq_embeddings)
            ix.add(r, source="cam0")
    emb = np.concatenate(embeddings)
    assert len(syncs) >= 3 and sum(syncs) == len(emb)  # several syncs while indexing, the last at close
    with open_store(idx, readonly=True) as st:
        coarse = load_codebook(st.codebook_path()).coarse
        assert coarse is not None and coarse.lists == 4  # the index's copy keeps the coarse quantizer
        rows = st.rows()
        assert len(rows["id"]) == len(emb) > 12
        np.testing.assert_array_equal(rows["list_id"], coarse.assign(emb))  # from the float embedding
        lists = open_lists(st, coarse)
        assert lists.rows == len(emb) and lists.high_water == st.max_id()
        assert lists.calibration is not None
    with Memory(idx, mode="ivf") as ivf, Memory(idx, mode="flat") as flat:
        assert ivf.info()["tail"] == 0
        same(ivf.search(emb[:8], 10, nprobe="all"), flat.search(emb[:8], 10))


def test_ingested_edge_codes_are_listed_and_found(index_model, listed_codebook, tmp_path):
    from yolo_vq import Embedder

    emb = Embedder(index_model)
    header = {"type": "header", "edge_format": 1, "model": "model_vq.onnx", "yolo_vq_export": 1,
              "imgsz": [288, 640], "codebook_fingerprint": codebook_checksum(listed_codebook), "code_size": CODE,
              "code_dtype": "uint8", "names": {str(k): v for k, v in index_model.names.items()},
              "model_fingerprint": emb.fingerprint, "embedding": emb.describe(), "created_utc": "2025-01-01T00:00:00Z"}
    path = write(tmp_path / "a.jsonl", [header, source(0), *(line(i) for i in range(30))])
    idx = tmp_path / "idx"
    assert ingest(path, idx, codebook=listed_codebook)["detections"] == 60
    with open_store(idx, readonly=True) as st:
        q = load_codebook(st.codebook_path())
        rows = st.rows()
        lists = open_lists(st, q.coarse)
        assert lists.rows == 60
        np.testing.assert_array_equal(rows["list_id"], q.coarse.assign(q.decode(rows["codes"]).numpy()))
        vec = q.decode(st.get([7]).codes.copy()).numpy()
    with Memory(idx, mode="ivf") as mem:
        assert mem.search(vec, 1, nprobe="all")[0].data["id"][0] in set(
            np.flatnonzero(np.all(rows["codes"] == rows["codes"][6], axis=1)) + 1)


def test_upgrade_gives_an_index_without_lists_its_lists(data, tmp_path):  # noqa: F811
    idx = build(tmp_path, data[0], lists=None)
    with Memory(idx) as before:
        assert before.mode == "flat" and "yolo-vq upgrade" in before.info()["why_flat"]
        flat = before.search(data[1], 10)
    summary = upgrade(idx, lists=16, reduced_dim=8)
    assert (summary["lists"], summary["detections"], summary["already"]) == (16, len(data[0]), False)
    with Memory(idx, mode="ivf") as after:
        same(after.search(data[1], 10, nprobe="all"), flat)
        info = after.info()
        assert info["lists"] == 16 and info["in_lists"] == len(data[0]) and info["coarse_sha256"]
        assert info["nprobe_recall_at_10"] >= 0.95 or info["nprobe"] == 16
        assert info["nprobe_calibration_sample"] == info["nprobe_calibrated_at"] == len(data[0])  # small: all rows
    again = upgrade(idx)
    assert again["already"] and "already has 16 lists" in again.line()


def test_the_calibrated_nprobe_reaches_its_recall(data, tmp_path):  # noqa: F811
    idx = build(tmp_path, data[0])  # synced: calibrated on its lists
    with Memory(idx, mode="ivf") as ivf, Memory(idx, mode="flat") as flat:
        cal = ivf.lists.lists.calibration
        assert cal["nprobe"] == ivf.effective_nprobe() < LISTS and cal["recall"] >= 0.95
        assert list(cal["curve"].values()) == sorted(cal["curve"].values())
        stored = ivf.store.get(list(range(1, 3001, 37)))
        q = load_codebook(ivf.store.codebook_path()).decode(stored.codes.copy()).numpy()
        truth = flat.search(q, 10)
        got = ivf.search(q, 10)
        recall = np.mean([len(set(a.data["id"]) & set(b.data["id"])) / 10 for a, b in zip(got, truth)])
        assert recall >= 0.9  # other queries than the calibration sample: close to the target


def test_a_writer_rebuilds_damaged_lists_and_a_search_meanwhile_says_so_and_searches_flat(data, tmp_path):  # noqa: F811
    idx = build(tmp_path, data[0])
    with Memory(idx, mode="flat") as flat:
        truth = flat.search(data[1], 10)
    seg = sorted((idx / "ivf").glob("seg-*.ivf"))[0]
    seg.write_bytes(seg.read_bytes()[:100])
    with pytest.warns(UserWarning, match="search lists cannot be used .*searched flat"), Memory(idx) as mem:
        assert mem.mode == "flat"
        same(mem.search(data[1], 10), truth)
    with pytest.raises(Exception, match="search lists cannot be used"):
        Memory(idx, mode="ivf")
    with open_store(idx) as st:
        keeper = ListKeeper(st, load_codebook(st.codebook_path()))
        assert keeper.sync() == len(data[0]) and "not a search segment" in keeper.problem
    with Memory(idx, mode="ivf") as mem:
        same(mem.search(data[1], 10, nprobe="all"), truth)


@pytest.mark.parametrize("bad", ["0", "-2", "x", "1.5"])
def test_cli_nprobe_errors(data, tmp_path_factory, capsys, bad):  # noqa: F811
    idx = tmp_path_factory.getbasetemp() / "nprobe_idx" / "idx"
    if not idx.exists():
        build(idx.parent, data[0])
    with pytest.raises(SystemExit) as e:
        main(["search", "--index", str(idx), "--detection", "5", "--nprobe", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --nprobe") and "positive number of lists" in err[0]


def test_cli_info_and_nprobe(data, tmp_path, capsys):  # noqa: F811
    idx = build(tmp_path, data[0])
    assert main(["info", "--index", str(idx), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["detections"] == len(data[0]) and info["lists"] == LISTS and info["mode"] == "flat"
    assert "fewer than" in info["why_flat"]  # a small index: flat by measurement, and info says so
    assert main(["search", "--index", str(idx), "--detection", "5", "--nprobe", "3", "--json"]) == 0
    small = json.loads(capsys.readouterr().out)  # accepted, and changes nothing on an index searched flat
    assert main(["search", "--index", str(idx), "--detection", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == small
    assert main(["info", "--index", str(idx)]) == 0
    out = capsys.readouterr().out
    assert "detections: 3000" in out and "why_flat" in out


def test_a_damaged_coarse_file_in_the_index_is_named_and_restored_by_the_original_codebook(data, tmp_path):  # noqa: F811
    from yolo_vq.errors import CodebookError
    from yolo_vq.index.store import CodebookBinding

    idx = build(tmp_path, data[0])
    own = idx / "codebook.coarse.safetensors"
    own.write_bytes(own.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CodebookError, match=r"codebook\.coarse\.safetensors: checksum does not match.*--codebook PATH"):
        Memory(idx)
    with open_store(idx) as st:  # what `yolo-vq index ... --codebook PATH` does first: the copy is put back
        assert st.bind_codebook(CodebookBinding(tmp_path / "cb", {"dim": D}, None, {})) is False
    with Memory(idx, mode="ivf") as mem:
        assert mem.lists is not None and len(mem) == len(data[0])


SYNC_WRITER = """
import sys, numpy as np, torch
sys.path.insert(0, {root!r})
from tests.index.test_ivf import fill
from yolo_vq.index.registry import open_store
from yolo_vq.index.upkeep import ListKeeper
from yolo_vq.quant import load_codebook
x = np.load({vectors!r})
with open_store({idx!r}) as st:
    keeper = ListKeeper(st, load_codebook(st.codebook_path()), every=200)
    for part in range(st.count() // 500, len(x) // 500):  # 500 rows a source, a sync every 200 rows stored
        keeper.stored(*fill(st, x[part * 500:(part + 1) * 500], st.codebook_path(), source=f"cam{{part}}"))
        print(part, flush=True)
    keeper.sync()
"""


def test_kill_9_while_storing_and_syncing_then_rerun_lists_every_detection_once(data, tmp_path):  # noqa: F811
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    idx = build(tmp_path, data[0][:500])
    vectors = tmp_path / "x.npy"
    np.save(vectors, data[0])
    script = SYNC_WRITER.format(root=str(Path(__file__).resolve().parents[2]), vectors=str(vectors), idx=str(idx))
    rng = random.Random(0)
    for _ in range(4):  # killed at random moments: inside a store, a sync, a merge or a manifest write
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()
        time.sleep(rng.uniform(0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with open_store(idx, readonly=True) as st:
        ids = st.codes()[0]
        assert len(ids) == len(data[0]) == len(np.unique(ids))
        lists = open_lists(st, load_codebook(st.codebook_path()).coarse)  # the open-time checks pass
        listed = np.concatenate([s.ids for s in lists.segments])
        assert lists.high_water == st.max_id() and np.array_equal(np.sort(listed), ids)  # each once, none missing
        assert not [p for p in (idx / "ivf").iterdir() if p.name.endswith(".tmp")]
    with Memory(idx, mode="ivf") as ivf, Memory(idx, mode="flat") as flat:
        same(ivf.search(data[1], 10, nprobe="all"), flat.search(data[1], 10))


@pytest.mark.parametrize("bad", ["-1", "x", "1.5"])
def test_cli_lists_errors(capsys, bad):
    with pytest.raises(SystemExit) as e:
        main(["fit", "video.mp4", "--out", "cb", "--lists", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --lists") and "auto, or 0 for none" in err[0]


def test_calibrating_within_a_sample_of_the_rows_errs_on_the_safe_side(data, tmp_path):  # noqa: F811
    # above CALIBRATION_ROWS the recall is measured within a sample: queries and exact answers from the sample, the
    # same lists probed; sparser rows need more lists for the same recall, so the nprobe chosen is never smaller
    from functools import partial

    from yolo_vq.index.ivf import ListSearch, calibrate, decode_codes
    from yolo_vq.index.scan import CodeScan

    idx = build(tmp_path, data[0])
    with Memory(idx, mode="ivf") as ivf:
        cb = ivf.codebook
        search = ListSearch(ivf.lists.lists, cb.coarse, CodeScan(cb))
        full = calibrate(search, partial(decode_codes, cb), target=0.99)
        for sample in (300, 1000):
            part = calibrate(search, partial(decode_codes, cb), target=0.99, sample=sample)
            assert part["sample_rows"] == sample and part["rows"] == len(data[0]) and part["queries"] == 256
            assert part["nprobe"] >= full["nprobe"]
            curve = {int(p): r for p, r in part["curve"].items()}
            assert all(curve[p] <= full["curve"].get(str(p), 1.0) + 0.03 for p in curve)  # lower, noise aside
        assert full["sample_rows"] == len(data[0])
