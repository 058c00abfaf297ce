"""An index's codes belong to one codebook, always: never a new one for an index that has one, one winner when two
processes create the same index, and a missing or damaged copy is an error that says how to recover."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from yolo_vq import Embedder, Indexer, Memory
from yolo_vq.cli import main
from yolo_vq.errors import CodebookError
from yolo_vq.index.registry import open_store
from yolo_vq.quant import ProductQuantizer, codebook_checksum


def digest(index) -> dict[str, str]:
    """sha256 of every file of an index directory (what a refused command must leave as it was)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(index.iterdir()) if p.is_file()
            and not p.name.endswith(("-wal", "-shm"))}


@pytest.fixture(scope="module")
def other_codebook(index_model, tmp_path_factory):
    """A second codebook of the same model and recipe (other seed): valid for the model, not for the index."""
    emb = Embedder(index_model)
    x = np.random.default_rng(1).normal(size=(512, emb.dim)).astype(np.float32)
    pq = ProductQuantizer(dim=emb.dim, m=8, codebook_size=16, seed=1).fit(x / np.linalg.norm(x, axis=1, keepdims=True))
    path = tmp_path_factory.mktemp("other_codebook") / "cb"
    emb.save_codebook(pq, path)
    return path


@pytest.fixture
def built(small_index):
    return small_index


@pytest.fixture
def folder(frames_folder):
    return frames_folder


@pytest.fixture
def idx(built, tmp_path):
    shutil.copytree(built, tmp_path / "idx")
    return tmp_path / "idx"


def top_self_score(index) -> float:
    with Memory(index, engine="numpy") as mem:
        ids, _ = mem.store.codes()
        res = mem.search(mem.vectors_of([int(ids[3])]), 1)[0]
        assert res.data["id"][0] == ids[3]
        return float(res.data["score"][0])


def test_the_binding_is_recorded_in_the_database(built, small_codebook):
    with open_store(built, readonly=True) as s:
        assert s.get_meta("codebook_sha256") == codebook_checksum(small_codebook)
        assert s.codebook_path() == built / "codebook"


@pytest.mark.parametrize("lost", ["codebook.json", "codebook.safetensors"])
def test_index_never_fits_a_new_codebook_over_a_missing_own_one(idx, folder, lost, capsys):
    # Before: `index` said "no codebook given: fitting one", replaced the index's codebook and exited 0, so every
    # stored code decoded against the wrong codebook.
    (idx / lost).unlink()
    before = digest(idx)
    rc = main(["index", str(folder), "--index", str(idx), "--codebook-size", "16", "--bytes", "8", "--conf", "0.1",
               "--quiet"])
    out = capsys.readouterr()
    assert rc == 2, out
    assert "fitting" not in out.out
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert f"{lost} is missing" in err and "records its checksum" in err and "re-index" in err
    assert digest(idx) == before


def test_a_damaged_own_codebook_is_refused_by_index_search_and_the_api(idx, index_model, folder, capsys):
    st = idx / "codebook.safetensors"
    data = bytearray(st.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the tensors
    st.write_bytes(bytes(data))
    before = digest(idx)
    with pytest.raises(CodebookError, match="codebook.safetensors is damaged"):
        Indexer(index_model, idx)
    with pytest.raises(CodebookError, match="restore codebook.safetensors and codebook.json with that checksum"):
        Memory(idx)
    assert main(["search", "--index", str(idx), "--detection", "1"]) == 2
    assert "codebook.safetensors is damaged" in capsys.readouterr().err
    assert digest(idx) == before


def test_a_replaced_own_codebook_is_refused(idx, other_codebook):
    for suffix in (".safetensors", ".json"):  # a valid codebook, but not the one the codes were made with
        shutil.copyfile(f"{other_codebook}{suffix}", idx / f"codebook{suffix}")
    with pytest.raises(CodebookError, match="codebook.json describes codebook .*, not the index's"):
        Memory(idx)


def test_passing_the_original_codebook_restores_a_lost_copy(idx, index_model, small_codebook, built):
    (idx / "codebook.json").unlink()
    with Indexer(index_model, idx, codebook=small_codebook):
        pass
    assert digest(idx)["codebook.json"] == digest(built)["codebook.json"]
    assert top_self_score(idx) == pytest.approx(top_self_score(built))


def test_another_codebook_is_refused_naming_both(idx, index_model, small_codebook, other_codebook):
    before = digest(idx)
    with pytest.raises(CodebookError) as e:
        Indexer(index_model, idx, codebook=other_codebook)
    msg = str(e.value)
    assert codebook_checksum(small_codebook)[:16] in msg and codebook_checksum(other_codebook)[:16] in msg
    assert str(other_codebook) in msg and "omit --codebook" in msg
    assert digest(idx) == before


def test_the_no_codebook_race_loser_is_told_what_happened(idx, index_model, folder, monkeypatch):
    # The interleaving of two `yolo-vq index` runs without --codebook on one new directory: this run looked before
    # the other bound its codebook (has_codebook False), fitted its own, and binds second.
    monkeypatch.setattr(Indexer, "has_codebook", staticmethod(lambda index: False))
    before = digest(idx)
    with pytest.raises(CodebookError, match="while this run fitted a codebook .* another process created it with "
                                            "codebook .* re-run the same command"):
        Indexer(index_model, idx, fit_on=[folder], fit_args={"codebook_size": 16, "code_bytes": 8, "conf": 0.1,
                                                              "progress": False})
    assert digest(idx) == before


_RACER = textwrap.dedent("""
    import os, sys, time
    os.environ["YOLO_OFFLINE"] = "1"
    from pathlib import Path
    from ultralytics import YOLO
    import cv2
    from yolo_vq import Indexer
    from yolo_vq.errors import YoloVQError
    weights, idx, codebook, frames, barrier, me = sys.argv[1:]
    model = YOLO(weights)
    images = [cv2.imread(str(p)) for p in sorted(Path(frames).iterdir())[:2]]
    Path(barrier, me).touch()
    while len(list(Path(barrier).iterdir())) < 2:  # both processes ready: create the index at the same moment
        time.sleep(0.001)
    try:
        with Indexer(model, idx, codebook=codebook, conf=0.1) as ix:
            ix.add(images, source=me)
    except YoloVQError as e:
        print(e)
        sys.exit(2)
""")


def test_two_processes_creating_one_index_with_different_codebooks(small_codebook, other_codebook, folder, tmp_path,
                                                                   pose_model_path):
    # Before: both exited 0, and the second's detections were stored with codes of a codebook the index does not
    # hold. Now the binding is decided in the transaction that creates the schema: one wins, the other is refused.
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    for round_ in range(3):
        idx, barrier = tmp_path / f"idx{round_}", tmp_path / f"barrier{round_}"
        barrier.mkdir()
        procs = [subprocess.Popen([sys.executable, str(script), pose_model_path, str(idx), str(cb), str(folder),
                                   str(barrier), name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for cb, name in ((small_codebook, "a"), (other_codebook, "b"))]
        outs = [(p.wait(timeout=300), *p.communicate()) for p in procs]
        rcs = [rc for rc, _, _ in outs]
        assert sorted(rcs) == [0, 2], outs
        win = rcs.index(0)
        _, lose_out, lose_err = outs[1 - win]
        assert "Traceback" not in lose_err, lose_err
        winner, won, lost = ("a", small_codebook, other_codebook) if win == 0 else ("b", other_codebook, small_codebook)
        assert codebook_checksum(won)[:16] in lose_out and codebook_checksum(lost)[:16] in lose_out
        with open_store(idx, readonly=True) as s:
            assert s.get_meta("codebook_sha256") == codebook_checksum(idx / "codebook") == codebook_checksum(won)
            assert [x.uri for x in s.sources()] == [winner]  # the loser stored nothing, not even its source
        meta = json.loads((idx / "codebook.json").read_text())
        assert meta["tensors"]["sha256"] == codebook_checksum(won)
