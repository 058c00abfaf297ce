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
    for key in ("p50_p99_ms", "filtered_p50_p99_ms", "by_detection_p50_p99_ms", "flat_p50_p99_ms"):
        assert 0 < res[key][0] <= res[key][1], key
    assert res["add_rate_per_s"] > 0 and res["cli_search_s_median"] > 0
    assert 38 <= res["lists_bytes_per_detection"] < 40  # 8-byte codes + id (8) + columns (22), plus offsets


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
