"""What does indexing cost? frames/s of the indexing job (``yolo-vq index``) vs plain ``model.predict``.

Same model, same frames, same batch size, same process and thread count: the plain arm decodes the clip with
OpenCV and calls ``model.predict`` on batches; ours runs :class:`yolo_vq.Indexer` (decode, predict, embeddings,
codebook encoding, SQLite writes) into a fresh index each round. Arms alternate; medians reported.

    python benchmarks/index_throughput.py                 # bikes.mp4, yolo11n-pose.pt, imgsz 640, batch 8
    python benchmarks/index_throughput.py --track         # both arms tracking (model.track)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch


def main() -> None:
    from ultralytics import YOLO

    from yolo_vq import Indexer, assets
    from yolo_vq.fit import fit_codebook
    from yolo_vq.video import open_source

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--video", type=Path, default=None, help="a video or an image folder (default: bikes.mp4)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--track", action="store_true")
    args = ap.parse_args()
    video = str(args.video or assets.bikes_video())
    model = YOLO(args.model or str(assets.pose_weights()))
    kw = {"imgsz": args.imgsz, "verbose": False}
    tmp = Path(tempfile.mkdtemp(prefix="yolo_vq_bench_"))
    fit_codebook(model, [video], tmp / "cb", codebook_size=64, conf=0.1, progress=False, imgsz=args.imgsz)
    threads = torch.get_num_threads()

    def plain() -> tuple[float, int]:
        src = open_source(video)
        t0, n, dets, chunk = time.perf_counter(), 0, 0, []
        call = (lambda x: model.track(x, persist=True, **kw)) if args.track else (lambda x: model.predict(x, **kw))
        for _, _, img in src.frames():
            chunk.append(img)
            if len(chunk) == args.batch:
                dets += sum(len(r.boxes) for r in call(chunk))
                n, chunk = n + len(chunk), []
        if chunk:
            dets += sum(len(r.boxes) for r in call(chunk))
            n += len(chunk)
        src.close()
        return n / (time.perf_counter() - t0), dets

    def ours(r: int) -> tuple[float, int]:
        with Indexer(model, tmp / f"idx{r}", codebook=tmp / "cb", batch=args.batch, track=args.track, **kw) as ix:
            s = ix.index_source(video, progress=False)
        return s.frames / s.seconds, s.detections

    a, b = [], []
    for r in range(args.rounds):
        fps, n_plain = plain()
        a.append(fps)
        fps, n_ours = ours(r)
        b.append(fps)
    p, o = statistics.median(a), statistics.median(b)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads {threads}")
    print(f"video {Path(video).name}, imgsz {args.imgsz}, batch {args.batch}, track {args.track}, detections "
          f"plain {n_plain} / stored {n_ours}, {args.rounds} rounds (median)")
    print(f"plain model.{'track' if args.track else 'predict'}: {p:7.2f} frames/s  {[round(x, 2) for x in a]}")
    print(f"yolo-vq index       : {o:7.2f} frames/s  {[round(x, 2) for x in b]}")
    print(f"ratio ours/plain    : {o / p:.3f}   (target >= 0.90)")


if __name__ == "__main__":
    main()
