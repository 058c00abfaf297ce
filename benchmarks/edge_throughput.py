"""Frames/s of `yolo-vq edge` (decode + graph + records) vs Ultralytics' own ONNX inference of the same detector on
the same frames, and the installed size of each environment.

Ours: the graph `yolo-vq export` writes (detector + NMS + embedding + codes) run by ``yolo_vq_edge.run`` over
bikes.mp4, writing JSON-lines records. Theirs: ``YOLO("model.onnx").predict(video, stream=True)`` on a graph from
Ultralytics' exporter (same weights, the same 288x640 input, their NMS in Python afterwards), which needs torch and
Ultralytics on the device. Both use onnxruntime's default threads on the CPU (Ultralytics sets no session options;
ours gets none either). Each timed run is a process of its own (a warm-up pass over the clip, then the timed pass):
ours in a fresh venv with the device install only (``pip install ./edge``: no torch in the process), theirs in
this environment; the arms alternate, ``--reps`` runs each, medians reported. Also: the device's `yolo-vq edge`
command with its process start, and the installed size of the device venv and of this (full) one, from ``du``.

    python benchmarks/edge_throughput.py              # bikes.mp4, 250 frames, 3 reps
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def edge_venv(where: Path) -> Path:
    """A fresh venv with the device install only (the README's line), from this checkout."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    subprocess.run([str(where / "bin" / "pip"), "install", "-q", str(ROOT / "edge")], check=True,
                   stderr=subprocess.DEVNULL)
    return where


OURS = """
import time
from yolo_vq_edge import EdgeModel, run
m = EdgeModel({model!r})
run(m, {video!r}, {out!r}, stride={stride}, progress=False)
t0 = time.perf_counter()
n = run(m, {video!r}, {out!r}, stride={stride}, progress=False)["frames"]
print(time.perf_counter() - t0, n)
"""
THEIRS = """
import time
from ultralytics import YOLO
m = YOLO({model!r}, task="pose")
kw = dict(stream=True, imgsz={imgsz!r}, vid_stride={stride}, verbose=False)
sum(1 for _ in m.predict({video!r}, **kw))
t0 = time.perf_counter()
n = sum(1 for _ in m.predict({video!r}, **kw))
print(time.perf_counter() - t0, n)
"""


def main() -> None:
    import onnxruntime as ort
    from ultralytics import YOLO
    from yolo_vq_edge import EdgeModel

    from yolo_vq import assets
    from yolo_vq.edge.export import export
    from yolo_vq.fit import fit_codebook

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="timed runs per arm (default 3)")
    ap.add_argument("--stride", type=int, default=1, help="every N-th frame of bikes.mp4 (default 1: all 250)")
    ap.add_argument("--no-venv", action="store_true", help="skip the device venv (its timing and size)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="edge_throughput_"))
    video = assets.bikes_video()
    weights = tmp / "yolo11n-pose.pt"  # Ultralytics writes its export next to the weights: a copy, not the package
    shutil.copyfile(assets.pose_weights(), weights)
    model = YOLO(str(weights))
    cb = tmp / "codebook"
    fit_codebook(model, [video], cb, code_bytes=32, codebook_size=256, max_frames=100, progress=False)
    ours, _ = export(model, cb, tmp / "model_vq.onnx", source_size=(272, 640))
    meta = EdgeModel(ours).meta
    imgsz = tuple(meta["imgsz"])  # (288, 640): bikes.mp4's 640x272 letterboxed as predict does
    # simplify=False: onnxslim is not installed here (and Ultralytics would try to pip-install it)
    theirs = Path(YOLO(str(weights)).export(format="onnx", imgsz=imgsz, opset=18, simplify=False, verbose=False))

    # each run in a process of its own (warm-up run, then the timed one), so neither arm shares a process with the
    # other's libraries: ours as a device runs it (the device venv's python, no torch), theirs with torch + Ultralytics
    venv = None if args.no_venv else edge_venv(tmp / "device")
    ours_python = str(venv / "bin" / "python") if venv else sys.executable
    ours_code = OURS.format(model=str(ours), video=str(video), out=str(tmp / "ours.jsonl"), stride=args.stride)
    theirs_code = THEIRS.format(model=str(theirs), video=str(video), imgsz=imgsz, stride=args.stride)

    def once(python: str, code: str) -> tuple[float, int]:
        out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.split()
        return float(out[-2]), int(out[-1])

    rates: dict[str, list[float]] = {"ours": [], "theirs": []}
    frames = set()
    for r in range(args.reps):
        arms = [("ours", ours_python, ours_code), ("theirs", sys.executable, theirs_code)]
        for name, python, code in arms if r % 2 == 0 else arms[::-1]:
            s, n = once(python, code)
            rates[name].append(n / s)
            frames.add(n)
    assert len(frames) == 1, f"the arms saw different frame counts: {frames}"
    fps = {k: statistics.median(v) for k, v in rates.items()}

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__} (default threads); "
          f"bikes.mp4 every {args.stride}. frame ({n} frames), input {imgsz[0]}x{imgsz[1]}, {args.reps} reps per arm\n")
    print("| arm | frames/s (median) | all runs |")
    print("|---|---|---|")
    print(f"| ours: yolo_vq_edge.run (decode + graph + NMS + codes + records){' in the device venv' if venv else ''} "
          f"| {fps['ours']:.1f} | "
          f"{', '.join(f'{v:.1f}' for v in rates['ours'])} |")
    print(f"| Ultralytics: YOLO('model.onnx').predict(stream=True) | {fps['theirs']:.1f} | "
          f"{', '.join(f'{v:.1f}' for v in rates['theirs'])} |")
    print(f"\nratio ours / Ultralytics ONNX predict: **{fps['ours'] / fps['theirs']:.2f}x** (goal >= 1.2x)")

    full_mb = du_mb(Path(sys.prefix))
    if venv is None:
        print(f"\nfull environment (torch, Ultralytics, yolo-vq; what their predict needs): {full_mb:.0f} MB")
        return
    t0 = time.perf_counter()
    cli = subprocess.run([str(venv / "bin" / "yolo-vq"), "edge", str(ours), str(video), "--out", str(tmp / "d.jsonl"),
                          "--stride", str(args.stride), "--quiet"], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    edge_mb = du_mb(venv)
    print(f"\nthe device's command, process start included: `yolo-vq edge` {n / wall:.1f} frames/s ({wall:.2f} s: "
          f"{cli.stdout.strip()})")
    print(f"installed size: device venv {edge_mb:.0f} MB, full venv {full_mb:.0f} MB: **{edge_mb / full_mb:.1%}** "
          f"(goal < 10%)")

if __name__ == "__main__":
    main()
