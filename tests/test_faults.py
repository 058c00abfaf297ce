"""Faults end in one line, exit != 0, and the index as it was: damaged databases, read-only folders, a full disk,
Ctrl-C, huge k, bad option values. The real CLI, in-process or as a subprocess where the fault needs one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import closing
from pathlib import Path

import cv2
import pytest

from yolo_vq import assets
from yolo_vq.cli import _parser, main
from yolo_vq.demo import longest_track
from yolo_vq.index.registry import open_store

ENV = {**os.environ, "YOLO_OFFLINE": "1"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "yolo_vq.cli", *args]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def idx(small_index, tmp_path):
    shutil.copytree(small_index, tmp_path / "idx")
    return tmp_path / "idx"


@pytest.fixture(scope="module")
def records(index_model, small_codebook, tmp_path_factory):
    """A valid edge records file for ``small_codebook`` (one source, one frame): what `ingest` is fed."""
    from yolo_vq import Embedder
    from yolo_vq.quant import codebook_checksum

    emb = Embedder(index_model)
    header = {"type": "header", "edge_format": 1, "yolo_vq_export": 1, "imgsz": [288, 640],
              "codebook_fingerprint": codebook_checksum(small_codebook), "code_size": 8, "code_dtype": "uint8",
              "names": {str(k): v for k, v in index_model.names.items()}, "model_fingerprint": emb.fingerprint,
              "embedding": emb.describe()}
    src = {"type": "source", "source": 0, "uri": "cam0.mp4", "fingerprint": "fp-cam0", "fps": 25.0,
           "frame_count": 10, "width": 640, "height": 272}
    frm = {"type": "frame", "source": 0, "frame": 0, "time": 0.0, "xyxy": [[10, 10, 50, 90]], "confidence": [0.9],
           "class_id": [0], "codes": [bytes(range(8)).hex()]}
    path = tmp_path_factory.mktemp("records") / "cam0.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (header, src, frm)))
    return path


def _garbage(db: Path) -> None:
    db.write_bytes(os.urandom(db.stat().st_size))


def _header(db: Path) -> None:
    data = bytearray(db.read_bytes())
    data[:100] = b"\x00" * 100
    db.write_bytes(bytes(data))


def _truncated(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])


def _empty(db: Path) -> None:
    db.write_bytes(b"")


def _schema(db: Path) -> None:
    with sqlite3.connect(db) as c:  # a partly damaged schema: one table gone
        c.execute("DROP TABLE frames")
    c.close()


DAMAGE = {"garbage": (_garbage, "damaged or not a yolo_vq index"), "header": (_header, "damaged or not a yolo_vq"),
          "truncated": (_truncated, "damaged or not a yolo_vq index"),
          "empty": (_empty, "is empty (0 bytes) beside its codebook"), "schema": (_schema, "lacks columns")}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("command", ["search", "index", "index --codebook", "ingest"])
def test_a_damaged_database_is_one_line_and_left_as_it_is(idx, damage, command, frames_folder, small_codebook,
                                                          records, capsys):
    db = idx / "index.db"
    hurt, expect = DAMAGE[damage]
    hurt(db)
    before = sha(db)
    argv = {"search": ["search", "--index", str(idx), "--detection", "1"],
            "index": ["index", str(frames_folder), "--index", str(idx), "--quiet"],
            "index --codebook": ["index", str(frames_folder), "--index", str(idx), "--codebook", str(small_codebook),
                                 "--quiet"],
            "ingest": ["ingest", str(records), "--index", str(idx)]}[command]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(db) in line and expect in line, line
    assert "fitting" not in line
    assert sha(db) == before  # never re-created or repaired over


def test_a_file_as_the_index_is_refused_before_fitting(tmp_path, frames_folder, capsys):
    (tmp_path / "idx").write_text("not a folder")
    assert main(["index", str(frames_folder), "--index", str(tmp_path / "idx"), "--quiet"]) == 2
    out = capsys.readouterr()
    assert "is a file, not an index directory" in one_error_line(out.err) and "fitting" not in out.out
    assert (tmp_path / "idx").read_text() == "not a folder"


def test_a_lost_database_beside_its_codebook_is_not_recreated(idx, frames_folder, small_codebook, capsys):
    (idx / "index.db").unlink()
    assert main(["index", str(frames_folder), "--index", str(idx), "--codebook", str(small_codebook), "--quiet"]) == 2
    assert "holds an index codebook but no index.db" in one_error_line(capsys.readouterr().err)
    assert not (idx / "index.db").exists()


def _read_only(cmd: list[str], folder: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``cmd`` where ``folder`` cannot be written: chmod a-w for a normal user; for root, which ignores file
    modes (PITFALLS 13), a read-only bind mount of it in a private mount namespace."""
    if os.geteuid() != 0:
        return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    mount = f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" && exec "$0" "$@"'
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", mount, *cmd], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("leftovers", [False, True], ids=["index.db only", "with -wal and -shm"])
def test_search_works_on_a_read_only_index_and_index_refuses_it(small_index, frames_folder, leftovers,
                                                                 tmp_path):
    with open_store(small_index, readonly=True) as s:
        qid = int(s.codes()[0][5])
    want = subprocess.run(cli("search", "--index", str(small_index), "--detection", str(qid), "--json"), env=ENV,
                          capture_output=True, text=True)
    assert want.returncode == 0, want.stderr
    home = tmp_path
    # as a backup or a read-only mount holds it: the database alone (SQLite cannot create its -shm file), or with
    # the empty -wal and the -shm a reader left behind
    shutil.copytree(small_index, home / "idx", ignore=None if leftovers else shutil.ignore_patterns("*-wal", "*-shm"))
    shutil.copytree(frames_folder, home / "frames")
    if leftovers:
        for suffix in ("-wal", "-shm"):
            (home / "idx" / f"index.db{suffix}").touch()
    for p in (home / "idx").iterdir():
        os.chmod(p, 0o444)
    os.chmod(home / "idx", 0o555)
    before = {p.name: sha(p) for p in (home / "idx").iterdir()}
    try:
        got = _read_only(cli("search", "--index", "idx", "--detection", str(qid), "--json"), home / "idx", home)
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout) == json.loads(want.stdout)
        refused = _read_only(cli("index", "frames", "--index", "idx", "--quiet"), home / "idx", home)
        assert refused.returncode == 2
        assert "is read-only" in one_error_line(refused.stderr)
        assert {p.name: sha(p) for p in (home / "idx").iterdir()} == before
    finally:
        os.chmod(home / "idx", 0o755)


_DISK_FULL = textwrap.dedent("""
    # inside a private mount namespace, on a small tmpfs: source A fits, source B fills the disk
    import json, os, subprocess, sys
    from pathlib import Path
    disk, a, b, codebook = map(Path, sys.argv[1:5])
    def index(src):
        cmd = [sys.executable, "-m", "yolo_vq.cli", "index", str(src), "--index", str(disk / "idx"), "--codebook",
               str(codebook), "--conf", "0.1", "--thumbs", "--quiet"]
        return subprocess.run(cmd, capture_output=True, text=True)
    small = disk / "small"  # a disk too small for the codebook a new index copies (4.8 MB here)
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    cmd = [sys.executable, "-m", "yolo_vq.cli", "index", str(a), "--index", str(small / "idx"), "--codebook",
           str(codebook), "--quiet"]
    tiny = subprocess.run(cmd, capture_output=True, text=True)
    tiny_files = sorted(p.name for p in (small / "idx").iterdir())
    subprocess.run(["umount", str(small)], check=True)
    first = index(a)
    st = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\\0" * max(0, st.f_bavail * st.f_frsize - 24_000))  # ~24 kB left: less than B needs
    full = index(b)
    import sqlite3
    from yolo_vq.index.registry import open_store
    with open_store(disk / "idx", readonly=True) as s:
        kept = {x.uri: s.frames_done(x.id).tolist() for x in s.sources()}, s.count()
        for mode in ("mode=ro", "immutable=1"):  # as the store reads it: immutable when the full disk has no -shm
            db = sqlite3.connect(f"file:{disk / 'idx' / 'index.db'}?{mode}", uri=True)
            try:
                integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
                break
            except sqlite3.OperationalError:
                pass
            finally:
                db.close()
    filler.unlink()
    again = index(b)
    with open_store(disk / "idx", readonly=True) as s:
        after = {x.uri: s.frames_done(x.id).tolist() for x in s.sources()}, s.count()
    print(json.dumps({"tiny": [tiny.returncode, tiny.stderr, tiny_files], "first": [first.returncode, first.stderr], "full": [full.returncode, full.stderr],
                      "kept": kept, "integrity": integrity, "again": [again.returncode, again.stderr],
                      "after": after}))
""")


def test_disk_full_mid_index_is_one_line_keeps_the_data_and_a_rerun_resumes(frames_folder, small_codebook, tmp_path):
    flipped = tmp_path / "flipped"  # a second source: other content, same size
    flipped.mkdir()
    for p in sorted(frames_folder.iterdir()):
        cv2.imwrite(str(flipped / p.name), cv2.flip(cv2.imread(str(p)), 1))
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "disk_full.py"
    script.write_text(_DISK_FULL)
    unshare = ["unshare", "-m", "--propagation", "private"] if os.geteuid() == 0 else ["unshare", "-rm"]
    out = subprocess.run([*unshare, "sh", "-c", f'mount -t tmpfs -o size=8m tmpfs "{disk}" && exec "$0" "$@"',
                          sys.executable, str(script), str(disk), str(frames_folder), str(flipped), str(small_codebook)],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    rc, err, files = r["tiny"]  # a new index on a disk too small for its codebook: one line, no half file
    assert rc == 2 and "cannot copy the codebook into the index (No space left on device)" in one_error_line(err)
    assert not [f for f in files if f.endswith(".tmp")], files
    assert r["first"][0] == 0, r["first"]
    assert r["full"][0] == 2
    line = one_error_line(r["full"][1])
    assert "the disk is full" in line and "re-run the same command to resume" in line, line
    (frames_a, count_a), (frames_b, count_b) = r["kept"], r["after"]
    a_uri = next(u for u in frames_b if u.endswith(frames_folder.name))
    b_uri = next(u for u in frames_b if u.endswith("flipped"))
    assert frames_a[a_uri] == list(range(12)) and r["integrity"] == "ok"
    assert frames_a.get(b_uri, []) == list(range(len(frames_a.get(b_uri, []))))  # what was kept is whole
    assert r["again"][0] == 0, r["again"]
    assert frames_b[a_uri] == frames_b[b_uri] == list(range(12)) and count_b > count_a


def test_ctrl_c_keeps_the_frames_says_how_to_resume_and_the_rerun_completes(small_codebook, tmp_path):
    cmd = cli("index", str(assets.bikes_video()), "--index", str(tmp_path / "i"), "--codebook", str(small_codebook),
              "--conf", "0.1", "--batch", "4", "--quiet")
    # Ctrl-C's default action even where this test runs as a background job (which inherits SIGINT ignored)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait for a first commit (64 frames), then Ctrl-C
        try:
            with open_store(tmp_path / "i", readonly=True) as s:
                if len(s.frames_done(1)) >= 64:
                    break
        except Exception:  # noqa: BLE001 - not created yet
            pass
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "re-run the same command to resume" in last, last
    with open_store(tmp_path / "i", readonly=True) as s:
        done = s.frames_done(1).tolist()
    assert 64 <= len(done) < 250 and done == list(range(len(done)))
    assert f"up to frame {done[-1]}" in last
    assert subprocess.run(cmd, env=ENV, capture_output=True).returncode == 0
    with open_store(tmp_path / "i", readonly=True) as s, \
            closing(sqlite3.connect(f"file:{tmp_path / 'i' / 'index.db'}?mode=ro", uri=True)) as db:
        assert s.frames_done(1).tolist() == list(range(250))
        assert s.count() == db.execute("SELECT SUM(detections) FROM frames").fetchone()[0]


def test_a_huge_k_returns_what_is_stored(small_index, capsys):
    with open_store(small_index, readonly=True) as s:
        n, qid = s.count(), int(s.codes()[0][0])
    # before: 10^9 took 30 s and 13 GB, 10^10 crashed with a MemoryError
    assert main(["search", "--index", str(small_index), "--detection", str(qid), "-k", str(10**10), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == n - 1 and qid not in {r["id"] for r in rows}


def test_search_by_track_leaves_the_track_out(idx, frames_folder, index_model, tmp_path, capsys):
    from yolo_vq import Indexer

    with open_store(idx, readonly=True) as s:
        track, size, _ = longest_track(s)
        alone = s.count() == size
    assert main(["search", "--index", str(idx), "--track", f"1:{track}", "--json"]) == 0
    out = capsys.readouterr()
    if alone:  # the clip's one tracked rider: nothing else to find, and the search says so
        assert json.loads(out.out) == [] and "no detection besides the query's own" in out.err
    flipped = tmp_path / "flipped"  # the same rider mirrored, as a second source: the only other detections
    flipped.mkdir()
    for p in sorted(frames_folder.iterdir()):
        cv2.imwrite(str(flipped / p.name), cv2.flip(cv2.imread(str(p)), 1))
    with Indexer(index_model, idx, conf=0.1, track=True) as ix:
        ix.index_source(flipped, progress=False)
    assert main(["search", "--index", str(idx), "--track", f"1:{track}", "-k", "1000", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    with open_store(idx, readonly=True) as s:
        assert rows and len(rows) == s.count() - size
    assert all(not (r["source"].endswith(frames_folder.name) and r["track"] == track) for r in rows)


@pytest.mark.parametrize("flags,says", [
    (["--time-from", "60", "--time-to", "120"], "the filter time 60.0-120.0 s leaves no detection (stored times span "
                                                "1.00-11.00 s)"),
    (["--class", "person", "--min-conf", "0.999"], "the filter min confidence 0.999 leaves no detection"),
    (["--source", "nosuchcamera"], "the filter source 'nosuchcamera' leaves no detection"),
])
def test_an_empty_result_says_which_filter_emptied_it(small_index, flags, says, capsys):
    assert main(["search", "--index", str(small_index), "--detection", "1", "--json", *flags]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == []
    assert f"no results: {says}" in out.err, out.err


def test_time_from_after_time_to_is_an_error(small_index, capsys):
    assert main(["search", "--index", str(small_index), "--detection", "1", "--time-from", "9", "--time-to", "1"]) == 2
    assert "time_from (9.0) is after time_to (1.0)" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv,says", [
    (["search", "--index", "x", "--image", "a.jpg", "--crop", "1,2,x"], "argument --crop: '1,2,x': expected a box "
                                                                        "x1,y1,x2,y2"),
    (["search", "--index", "x", "--image", "a.jpg", "--crop", "5,5,1,1"], "with x1 < x2 and y1 < y2"),
    (["search", "--index", "x", "--track", "a:b"], "argument --track: 'a:b': expected SOURCE_ID:TRACK_ID"),
    (["index", "v.mp4", "--index", "x", "--batch", "0"], "argument --batch: '0': expected a positive integer"),
    (["search", "--index", "x", "--detection", "one"], "argument --detection: invalid int value: 'one'"),
])
def test_option_values_are_parsed_with_the_expected_form(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert says in line and "--help" in line, line


def test_classes_by_name_or_id_in_index_and_search(small_codebook, frames_folder, tmp_path, capsys):
    assert main(["index", str(frames_folder), "--index", str(tmp_path / "i"), "--codebook", str(small_codebook),
                 "--classes", "person", "--conf", "0.1", "--quiet"]) == 0
    with open_store(tmp_path / "i", readonly=True) as s:
        assert s.count() > 0
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "i"), "--detection", "1", "--class", "0", "--json"]) == 0
    assert all(r["class"] == "person" for r in json.loads(capsys.readouterr().out))
    before = sha(tmp_path / "i" / "index.db")
    assert main(["index", str(frames_folder), "--index", str(tmp_path / "i"), "--classes", "unicorn", "--quiet"]) == 2
    assert "--classes 'unicorn': not a class of this model (it has 0 person)" in one_error_line(
        capsys.readouterr().err)
    assert sha(tmp_path / "i" / "index.db") == before


def test_every_option_has_help_and_the_top_help_no_markup(capsys):
    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"yolo-vq {name} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and ":class:" not in out and "yolo-vq" in out


def test_new_files_keep_the_umask_mode(small_index):
    modes = {p.name: p.stat().st_mode & 0o777 for p in small_index.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes  # the codebook's .safetensors was 0600 beside 0644 files


def test_demo_output_is_ignored_by_git():
    root = Path(__file__).resolve().parents[1]
    assert "yolo_vq_demo/" in (root / ".gitignore").read_text().split()


def test_a_missing_optional_package_is_one_line(monkeypatch, capsys):
    import importlib

    from yolo_vq import cli as cli_module

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` raises ImportError, as if not installed
    monkeypatch.setattr(cli_module, "cmd_ingest", lambda a: importlib.import_module("pyarrow"))
    assert main(["ingest", "x.parquet", "--index", "idx"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "a package this command needs is missing" in line and "pyarrow" in line, line
