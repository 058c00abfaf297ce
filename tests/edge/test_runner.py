"""The edge path end to end: export, run without torch, ingest, search like a locally indexed store."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from yolo_vq import assets
from yolo_vq.edge.export import export
from yolo_vq.edge.ingest import ingest
from yolo_vq.edge.records import RecordError, read_records
from yolo_vq.errors import CodebookError
from yolo_vq.index.registry import open_store

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

STRIDE = 5  # 50 of bikes.mp4's 250 frames

# Runs the CLI with torch, torchvision and ultralytics made unimportable: the edge runner must not need them.
NO_TORCH = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "ultralytics"):
                raise ImportError(f"{name} is blocked on this edge device")
    sys.meta_path.insert(0, Block())
    from yolo_vq.cli import main
    rc = main(sys.argv[1:])
    assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "ultralytics")]
    sys.exit(rc)
""")


def cli_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], check=False, capture_output=True, text=True,
                          timeout=600,
                          env={**os.environ, "YOLO_OFFLINE": "1"})


@pytest.fixture(scope="module")
def edge_run(pose_vq, tmp_path_factory):
    """bikes.mp4 through the exported graph without torch (edge) and through Indexer (server), same settings."""
    from yolo_vq import Indexer

    model, cb = pose_vq
    tmp = tmp_path_factory.mktemp("edge")
    video = assets.bikes_video()
    onnx_path, _ = export(model, cb, tmp / "bikes_vq.onnx", source_size=(272, 640), conf=0.1)
    out = tmp / "detections.jsonl"
    run = cli_without_torch("edge", str(onnx_path), str(video), "--out", str(out), "--stride", str(STRIDE), "--quiet")
    assert run.returncode == 0, run.stderr
    with Indexer(model, tmp / "server", codebook=cb, conf=0.1) as ix:
        ix.index_source(video, stride=STRIDE, progress=False)
    return tmp, out, cb, run.stdout


def test_edge_cli_runs_without_torch_and_writes_records(edge_run):
    _, out, _, stdout = edge_run
    assert "edge: 50 frames" in stdout
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    header, source, frames = lines[0], lines[1], lines[2:]
    assert header["type"] == "header" and header["code_size"] == 32 and header["imgsz"] == [288, 640]
    assert source["type"] == "source" and source["frame_count"] == 250 and (source["width"], source["height"]) == (640, 272)
    assert [f["frame"] for f in frames] == list(range(0, 250, STRIDE))
    dets = [(f, i) for f in frames for i in range(len(f["codes"]))]
    assert len(dets) > 20 and all(len(bytes.fromhex(f["codes"][i])) == 32 for f, i in dets)
    xyxy = np.array([f["xyxy"][i] for f, i in dets])
    assert (xyxy[:, 2] > xyxy[:, 0]).all() and xyxy[:, 2].max() <= 640 and xyxy[:, 3].max() <= 272 and xyxy.min() >= 0


def test_ingested_edge_store_equals_the_server_store(edge_run):
    tmp, out, cb, _ = edge_run
    summary = ingest(out, tmp / "edge_index", codebook=cb)
    assert summary["frames"] == 50 and summary["sources"] == 1
    with open_store(tmp / "server", readonly=True) as a, open_store(tmp / "edge_index", readonly=True) as b:
        assert a.count() == b.count() == summary["detections"]
        assert a.sources()[0].fingerprint == b.sources()[0].fingerprint  # same content, same source identity
        da, db = a.get(np.arange(1, a.count() + 1)), b.get(np.arange(1, b.count() + 1))
        np.testing.assert_allclose(db.xyxy, da.xyxy, atol=0.02)  # 2-decimal rounding in the records
        same = float((da.codes == db.codes).mean())
        print(f"bikes.mp4 every {STRIDE}th frame: {a.count()} detections, {same:.2%} of code bytes equal edge vs server")
        assert same >= 0.99
    again = ingest(out, tmp / "edge_index")
    assert again["frames"] == 0 and again["skipped_frames"] == 50 and again["detections"] == 0  # idempotent


def test_search_on_edge_codes_returns_the_servers_top10(edge_run):
    from yolo_vq import Memory

    tmp, out, cb, _ = edge_run
    if not (tmp / "edge_index").exists():
        ingest(out, tmp / "edge_index", codebook=cb)
    with Memory(tmp / "server") as a, Memory(tmp / "edge_index") as b:
        queries = np.linspace(1, a.store.count(), 5).astype(int)
        for q in queries:
            v = a.vectors_of([int(q)])
            ra, rb = a.search(v, k=10)[0], b.search(v, k=10)[0]
            key = [{(int(f), *np.round(x).astype(int)) for f, x in zip(r.data["frame"], r.xyxy)} for r in (ra, rb)]
            overlap = len(key[0] & key[1])
            print(f"query detection {q}: top-10 overlap edge vs server {overlap}/10")
            assert overlap >= 9


def test_ingest_refuses_another_codebook_and_keeps_the_index(edge_run, tmp_path, bus, zidane):
    from tests.edge.test_export import fit_on, scrambled

    tmp, out, _, _ = edge_run
    with pytest.raises(CodebookError, match="another|not the one"):
        ingest(out, tmp_path / "new", codebook=fit_on(scrambled("yolo11n-pose.yaml"), [bus, zidane],
                                                      tmp_path / "other", conf=0.05))
    server = tmp / "server"
    before = (server / "index.db").read_bytes()
    forged = tmp_path / "forged.jsonl"
    lines = out.read_text().splitlines()
    head = json.loads(lines[0]) | {"codebook_fingerprint": "0" * 64}
    forged.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    with pytest.raises(CodebookError, match="encoded with codebook 0000"):
        ingest(forged, server)
    assert (server / "index.db").read_bytes() == before


def test_edge_and_ingest_bad_input_one_line_errors(edge_run, tmp_path):
    tmp, out, _, _ = edge_run
    junk = tmp_path / "junk.jsonl"
    junk.write_text("hello\n")
    with pytest.raises(RecordError, match="not a yolo_vq edge file"):
        ingest(junk, tmp_path / "idx")
    truncated = tmp_path / "cut.jsonl"
    truncated.write_text(out.read_text()[:-40])
    with pytest.raises(RecordError, match="not a valid record"):
        ingest(truncated, tmp / "server")  # every frame before the cut is stored already: nothing changes
    cases = [
        (["edge", str(tmp / "bikes_vq.onnx"), str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "o.jsonl")],
         "missing.mp4"),
        (["edge", str(tmp_path / "nope.onnx"), str(assets.bikes_video()), "--out", str(tmp_path / "o.jsonl")],
         "no such file"),
        (["edge", str(tmp / "bikes_vq.onnx"), str(assets.bikes_video()), "--out", str(tmp_path / "o.csv")],
         ".jsonl"),
        (["ingest", str(junk), "--index", str(tmp_path / "idx")], "not a yolo_vq edge file"),
        (["ingest", str(out), "--index", str(tmp_path / "fresh")], "no codebook yet"),
    ]
    for args, needle in cases:
        r = cli_without_torch(*args) if args[0] == "edge" else subprocess.run(
            [sys.executable, "-m", "yolo_vq.cli", *args], check=False, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_parquet_records_ingest_like_json_lines(edge_run, tmp_path):
    tmp, out, cb, _ = edge_run
    pq_out = tmp_path / "detections.parquet"
    run = cli_without_torch("edge", str(tmp / "bikes_vq.onnx"), str(assets.bikes_video()), "--out", str(pq_out),
                            "--stride", str(STRIDE), "--quiet")
    assert run.returncode == 0, run.stderr
    a = ingest(out, tmp_path / "from_jsonl", codebook=cb)
    b = ingest(pq_out, tmp_path / "from_parquet", codebook=cb)
    assert a == b and b["frames"] == 50
    with open_store(tmp_path / "from_jsonl", readonly=True) as sa, \
            open_store(tmp_path / "from_parquet", readonly=True) as sb:
        ids = np.arange(1, sa.count() + 1)
        da, db = sa.get(ids), sb.get(ids)
        np.testing.assert_array_equal(da.codes, db.codes)
        np.testing.assert_allclose(da.xyxy, db.xyxy, atol=0.01)
    print(f"records for 50 frames: jsonl {out.stat().st_size} B, parquet {pq_out.stat().st_size} B")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 not really")
    with pytest.raises(RecordError, match="not a readable Parquet file"):
        ingest(junk, tmp_path / "x")


ROOT = Path(__file__).resolve().parents[2]


def readme_device_lines() -> list[str]:
    """The README's device lines (between the <!-- device --> markers): what a user types on the device."""
    block = re.search(r"<!-- device -->\n```bash\n(.*?)```\n<!-- /device -->", (ROOT / "README.md").read_text(),
                      flags=re.DOTALL)
    assert block, "README.md has no device lines between <!-- device --> markers"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_device_lines_install_the_runner_without_torch(edge_run, tmp_path):
    """A fresh venv with the README's device install only: `yolo-vq edge` works, torch and Ultralytics are not
    there, other commands say what to install; the server ingests the records and finds them."""
    from yolo_vq import Memory

    tmp, _, cb, _ = edge_run
    install, run_line = readme_device_lines()
    venv = tmp_path / "device"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
           "YOLO_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    def sh(line: str, cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run(line, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                              check=False)

    done = sh(install, ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    absent = sh(f"{venv / 'bin' / 'python'} -c \"import importlib.util as u; print([m for m in ('torch', "
                f"'torchvision', 'ultralytics', 'yolo_vq') if u.find_spec(m)])\"", tmp_path)
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr
    work = tmp_path / "camera"
    work.mkdir()
    (work / "model_vq.onnx").symlink_to(tmp / "bikes_vq.onnx")
    (work / "video.mp4").symlink_to(assets.bikes_video())
    ran = sh(run_line + " --quiet", work)
    assert ran.returncode == 0 and "edge: 250 frames" in ran.stdout, ran.stdout + ran.stderr
    header, records = read_records(work / "detections.jsonl")
    frames = [r for _, r in records if r["type"] == "frame"]
    assert header["code_size"] == 32 and [f["frame"] for f in frames] == list(range(250))
    assert all(len(c) == 32 for f in frames for c in f["codes"])
    other = sh("yolo-vq index video.mp4 --index idx", work)
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "pip install yolo-vq" in other.stderr
    assert not (work / "idx").exists()
    summary = ingest(work / "detections.jsonl", tmp_path / "server", codebook=cb)  # the parent (server) environment
    assert summary["frames"] == 250 and summary["detections"] == sum(len(f["codes"]) for f in frames)
    with Memory(tmp_path / "server") as m:
        hits = m.search(m.vectors_of([1]), k=5)[0]
        assert int(hits.data["id"][0]) == 1 and len(hits) == 5


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_ctrl_c_keeps_a_complete_records_file(edge_run, tmp_path, suffix):
    tmp, _, _, _ = edge_run
    out = tmp_path / f"d{suffix}"
    video = str(assets.bikes_video())
    proc = subprocess.Popen([sys.executable, "-c", NO_TORCH, "edge", str(tmp / "bikes_vq.onnx"), video, video, video,
                             "--out", str(out), "--batch", "2", "--quiet"], env={**os.environ, "YOLO_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    # JSON lines are on disk after each batch; Parquet only at the end, so give it a few seconds of frames
    while (not out.exists() or (suffix == ".jsonl" and out.read_text().count('"frame"') < 6)) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    if suffix == ".parquet":
        time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    kept = int(re.search(r"interrupted: (\d+) frames, \d+ detections kept in", err).group(1))
    assert "Traceback" not in err and err.count("\n") == 1
    _, records = read_records(out)
    frames = [r for _, r in records if r["type"] == "frame"]
    assert 0 < len(frames) == kept < 750
