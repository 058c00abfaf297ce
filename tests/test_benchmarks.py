"""Benchmarks must not rot: each script runs at a tiny size here (seconds), and the scale builder resumes after a kill
without a duplicate or a gap, and refuses to fill the disk."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "YOLO_OFFLINE": "1"}
CHUNK = 1 << 16


def bench(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_search_scale_smoke_measures_every_arm(tmp_path):
    out = bench("search_scale.py", "--smoke", "--cache", tmp_path, "--queries", "30")
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())["150k"]
    assert res["rows"] == 150_000 and res["lists"] >= 64 and 1 <= res["nprobe"] < res["lists"]
    assert res["calibrated_recall"] >= 0.95
    assert res["recall"] >= 0.85 and res["by_detection_recall"] >= 0.85 and res["filtered_recall"] >= 0.85
    assert res["bare_faiss_ivf_recall"] == pytest.approx(res["recall"], abs=0.02)  # the same lists and codes
    assert res["flat_recall"] == 1.0  # the flat mode and every list scanned agree
    for key in ("p50_p99_ms", "filtered_p50_p99_ms", "by_detection_p50_p99_ms", "flat_p50_p99_ms", "all_lists_p50_p99_ms"):
        assert 0 < res[key][0] <= res[key][1], key
    assert res["add_rate_per_s"] > 0 and res["cli_search_s_median"] > 0
    assert 92 <= res["lists_bytes_per_detection"] < 94  # 8-byte codes + id (8) + columns (22) + row (54), + offsets


def rows_of(db: Path) -> tuple[int, int, int, int]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
        return c.execute("SELECT COUNT(*), COUNT(DISTINCT id), MIN(id), MAX(id) FROM detections").fetchone()


def test_the_scale_builder_resumes_after_kill_9_without_duplicates_or_gaps(tmp_path):
    args = [sys.executable, str(ROOT / "benchmarks" / "search_scale.py"), "--smoke", "--cache", str(tmp_path),
            "--rows", "250k", "--build-only"]
    db = tmp_path / "250k" / "index.db"
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill -9 once a first chunk is committed
        try:
            if db.is_file() and rows_of(db)[0] >= CHUNK:
                break
        except sqlite3.OperationalError:  # the schema is not there yet
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n, distinct, lo, hi = rows_of(db)
    assert n % CHUNK == 0 and n < 250_000 and n == distinct and (lo, hi) == ((1, n) if n else (None, None))
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert rows_of(db) == (250_000, 250_000, 1, 250_000)
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:  # every frame once per source
        assert c.execute("SELECT COUNT(*) FROM (SELECT source_id, frame FROM frames GROUP BY 1, 2 HAVING COUNT(*) > 1)"
                         ).fetchone()[0] == 0
    manifest = json.loads((db.parent / "ivf" / "manifest.json").read_text())
    assert manifest["high_water"] == 250_000 and sum(s["rows"] for s in manifest["segments"]) == 250_000


def test_the_scale_builder_refuses_to_fill_the_disk(tmp_path):
    out = bench("search_scale.py", "--smoke", "--cache", tmp_path, "--build-only", "--free-bytes", (15 << 30) + 1_000_000)
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()[-1]
    assert err.startswith("error: building 150k would leave") and "below the 15 GB to keep" in err, err
    assert "needs ~" in out.stdout  # what it needs is printed before anything is written
    assert not (tmp_path / "150k").exists()


def test_search_latency_smoke(tmp_path):
    out = bench("search_latency.py", "--n", 5000, "--reps", 5, "--index", tmp_path / "idx")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "built 5,000 rows" in out.stdout and "yolo_vq Memory.search" in out.stdout and "ratio p50" in out.stdout


def test_the_scale_plot_runs_on_a_results_file(tmp_path):
    row = {"rows": 0, "recall": 0.97, "nprobe": 32, "lists": 4096, "p50_p99_ms": [3.1, 4.0],
           "filtered_p50_p99_ms": [4.2, 5.0], "all_lists_p50_p99_ms": [21.0, 23.0], "bare_faiss_ivf_p50_p99_ms": [2.9, 3.5]}
    results = {label: {**row, "rows": n} for label, n in (("1M", 10**6), ("10M", 10**7))}
    (tmp_path / "r.json").write_text(json.dumps(results))
    out = bench("plot_search_scale.py", "--results", tmp_path / "r.json", "--out", tmp_path / "p.png")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "p.png").stat().st_size > 10_000


# -- every other script at a tiny size: 120 frames of bikes.mp4 as an image folder, the cache in a temporary folder ---
@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    import cv2

    from yolo_vq import assets

    d = tmp_path_factory.mktemp("clip")
    cap = cv2.VideoCapture(str(assets.bikes_video()))
    for i in range(120):
        cv2.imwrite(str(d / f"{i:03d}.jpg"), cap.read()[1])
    cap.release()
    return d


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_cache")


def small(name: str, cache: Path, *args) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)],
                         env={**ENV, "YOLO_VQ_CACHE": str(cache)}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_retrieval_and_codebooks_smoke(clip, cache):
    out = small("retrieval.py", cache, "--video", clip, "--imgsz", 640, "--queries", 50, "--recipes", "s4-8stripes-colour-center")
    assert "mAP" in out.stdout
    assert len(list(cache.glob("retrieval_*.npz"))) == 1  # the pass, cached for --reuse
    # codebooks.py on a pass of its own form, synthetic: 40 tracks over 60 frames (the clip holds too few)
    import numpy as np

    from yolo_vq.config import DEFAULT_RECIPE

    g = np.random.default_rng(0)
    frame, track = np.repeat(np.arange(60), 40), np.tile(np.arange(40), 60)
    x = (g.normal(size=(40, 1088)) * 3)[track] + g.normal(size=(2400, 1088))  # the default recipe's dim
    np.savez(cache / "synthetic.npz", **{DEFAULT_RECIPE: x.astype(np.float32), "frame": frame, "track": track})
    out = small("codebooks.py", cache, "--embeddings", cache / "synthetic.npz", "--bytes", 8, "--seeds", 1,
                "--iters", 2, "--gap", 5)
    assert "recall@10" in out.stdout


def test_embed_overhead_and_index_throughput_smoke(clip, cache):
    assert "ratio" in small("embed_overhead.py", cache, "--frames", 16, "--rounds", 1).stdout
    assert "ratio ours/plain" in small("index_throughput.py", cache, "--video", clip, "--rounds", 1).stdout


def test_product_retrieval_smoke(clip, cache, tmp_path):
    out = small("product_retrieval.py", cache, "--video", clip, "--imgsz", 640, "--bytes", 8, "--out", tmp_path)
    assert "stored detections" in out.stdout


def test_onnx_latency_smoke(cache):
    assert "ours" in small("onnx_latency.py", cache, "--reps", 1).stdout.lower()


def test_edge_throughput_smoke():
    out = bench("edge_throughput.py", "--reps", "1", "--stride", "25", "--no-venv")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ratio ours / Ultralytics ONNX predict" in out.stdout and "full environment" in out.stdout


def test_identity_head_smoke(tmp_path):
    """The head benchmark on a pass of synthetic identities (the real one reads vtest.avi's retrieval pass)."""
    from tests.features.test_head import identities

    x, track, frame = identities(0, n_ids=12, per=30)
    np.savez(tmp_path / "pass.npz", **{"s4-8stripes-colour-center": x.astype(np.float32), "track": track,
                                       "frame": frame})
    out = bench("identity_head.py", "--data", tmp_path / "pass.npz", "--split", int(np.median(frame)), "--gap", 3)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("| head: tracks |") == 2 and "held-out time" in out.stdout
