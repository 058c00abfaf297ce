"""onnxruntime CPU latency of our exported graph (detector + NMS + embedding + codes) vs Ultralytics' own ONNX export.

Same detector (the real ``yolo11n-pose.pt``), same input size, same onnxruntime settings, runs interleaved image by
image so machine noise hits both arms alike. Ultralytics' graph stops at the raw head output (its NMS runs afterwards
in Python and is not timed here), so the ratio charges our in-graph NMS, pooling and encoding in full.

Also: bytes shipped per detection (codes) vs the float embedding and vs a JPEG crop of the box (quality 90, the
crop at its original size and at a 96 px thumbnail).

    python benchmarks/onnx_latency.py --threads 1    # 2-thread medians are unsteady on a 2-core machine
    python benchmarks/onnx_latency.py --threads 1 --head-dim 32   # a codebook with an identity head (issue 13)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")


def whitened_codebook(model, video: Path, out: Path, dim: int, code_bytes: int = 32, **predict) -> Path:
    """A codebook with an identity head of ``dim`` outputs (label-free whitening of the recipe's vector, fitted on
    ``video``'s detections) and PQ trained on the head's output. What a head costs depends on its shape (one MatMul
    of recipe dims x ``dim``, then L2), not on how it was learned: ``fit --track`` learns one of the same form."""
    import numpy as np
    import torch

    from yolo_vq import Embedder
    from yolo_vq.features.head import fit_whitening
    from yolo_vq.fit import embeddings_of
    from yolo_vq.quant import ProductQuantizer

    x = np.concatenate(list(embeddings_of(model, [video], progress=False, **predict)))
    head = fit_whitening(x, dim)
    size = min(256, 1 << (len(x).bit_length() - 1))
    pq = ProductQuantizer(dim=dim, m=code_bytes, codebook_size=size, rotation="random")
    pq.fit(torch.from_numpy(head.project(x)))
    pq.head = head
    Embedder(model).save_codebook(pq, out)
    return out


def main() -> None:
    import cv2
    import numpy as np
    import onnxruntime as ort
    import torch
    from ultralytics import YOLO

    from yolo_vq import assets
    from yolo_vq.edge.export import export
    from yolo_vq.edge.runner import EdgeModel, letterbox_batch
    from yolo_vq.fit import fit_codebook

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30, help="timed runs per image and arm")
    ap.add_argument("--max-det", type=int, default=300)
    ap.add_argument("--head-dim", type=int, default=0, metavar="N",
                    help="the codebook carries an identity head of N outputs (0: none; fit --track chose 32 on vtest)")
    ap.add_argument("--mem-pattern", choices=["on", "off"], default="on",
                    help="onnxruntime's memory pattern for every arm (default on, onnxruntime's default)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile ours and the raw export on bus.jpg (N runs each) and list where ours spends "
                         "its extra time")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="onnx_latency_"))
    model = YOLO(str(assets.pose_weights()))
    cb = tmp / "codebook"
    if args.head_dim:  # the codebook carries an identity head: its MatMul runs inside the graph before the encode
        whitened_codebook(model, assets.bikes_video(), cb, args.head_dim, conf=0.1)
    else:
        fit_codebook(model, [assets.bikes_video()], cb, code_bytes=32, codebook_size=256, conf=0.1, progress=False)
    ours, check = export(model, cb, tmp / "ours.onnx", imgsz=args.imgsz, max_det=args.max_det)
    weights = tmp / "yolo11n-pose.pt"  # Ultralytics writes its export next to the weights: a copy, not the package
    shutil.copyfile(assets.pose_weights(), weights)
    # simplify=False: onnxslim is not installed here (and Ultralytics would try to pip-install it). Two baselines:
    # the raw head output (NMS left to the caller, untimed) and nms=True (boxes out of the graph, like ours).
    theirs = Path(YOLO(str(weights)).export(format="onnx", imgsz=args.imgsz, opset=18, simplify=False, dynamic=True,
                                            verbose=False))
    raw = theirs.rename(theirs.with_name("ultralytics_raw.onnx"))
    theirs_nms = Path(YOLO(str(weights)).export(format="onnx", imgsz=args.imgsz, opset=18, simplify=False,
                                                dynamic=True, nms=True, conf=0.25, iou=0.7, max_det=args.max_det,
                                                verbose=False))
    nms_path = theirs_nms.rename(theirs_nms.with_name("ultralytics_nms.onnx"))

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.enable_mem_pattern = args.mem_pattern == "on"
    paths = {"ours": ours, "ultralytics": raw, "ultralytics nms=True": nms_path}
    sess = {name: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for name, p in paths.items()}
    edge = EdgeModel(ours)
    cap = cv2.VideoCapture(str(assets.vtest_video()))
    frames = [cv2.imread(str(assets.ultralytics_image(n))) for n in ("bus.jpg", "zidane.jpg")]
    for _ in range(4):  # a few pedestrian frames 150 apart
        for _ in range(150):
            cap.grab()
        frames.append(cap.retrieve()[1])
    x, regions = letterbox_batch(frames, edge.meta)

    def feed(name, i):
        return {"images": x[i : i + 1], **({"regions": regions[i : i + 1]} if name == "ours" else {})}

    for k, s in sess.items():  # warm-up
        s.run(None, feed(k, 0))
    times = {k: [] for k in sess}
    for _ in range(args.reps):
        for i in range(len(x)):
            for k, s in (list(sess.items()) if i % 2 else list(sess.items())[::-1]):
                t0 = time.perf_counter()
                s.run(None, feed(k, i))
                times[k].append(time.perf_counter() - t0)

    dets = edge(frames)
    n = sum(len(d["codes"]) for d in dets)
    jpeg_full, jpeg_thumb = [], []
    for img, d in zip(frames, dets):
        for x1, y1, x2, y2 in d["xyxy"].round().astype(int):
            crop = img[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]
            jpeg_full.append(len(cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 90])[1]))
            s = 96 / max(crop.shape[:2])
            small = cv2.resize(crop, (max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s))))
            jpeg_thumb.append(len(cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 90])[1]))

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}, torch "
          f"{torch.__version__}, {args.threads} intra-op threads; imgsz {args.imgsz} (square), max_det {args.max_det}")
    print(f"{check.line()}\n")
    print("| graph | outputs | median ms / image | p90 ms |")
    print("|---|---|---|---|")
    med = {}
    for k, v in times.items():
        med[k] = statistics.median(v) * 1e3
        outs = [o.name for o in sess[k].get_outputs()]
        print(f"| {k} ({paths[k].name}) | {', '.join(outs)} | {med[k]:.1f} | "
              f"{np.percentile(v, 90) * 1e3:.1f} |")
    print(f"\nratio ours / ultralytics raw: **{med['ours'] / med['ultralytics']:.3f}**; ours / ultralytics nms=True: "
          f"**{med['ours'] / med['ultralytics nms=True']:.3f}** ({len(frames)} images x {args.reps} runs per arm, "
          f"interleaved)")
    dim = edge.meta["embedding"]["dim"]
    print(f"\nbytes per detection ({n} detections on these images): codes {edge.meta['code_size']} B; float32 "
          f"embedding {dim * 4} B ({dim * 4 / edge.meta['code_size']:.0f}x); JPEG crop q90 median "
          f"{statistics.median(jpeg_full):.0f} B, 96 px thumbnail median {statistics.median(jpeg_thumb):.0f} B")
    if args.profile:
        profile(ort, opts, {"ours": ours, "raw": raw}, {"ours": feed("ours", 0), "raw": feed("ultralytics", 0)},
                args.profile, tmp)


def profile(ort, opts, paths, feeds, runs: int, tmp: Path) -> None:
    """onnxruntime's per-node kernel times (mean over ``runs``) of ours and the raw export on one image: the
    detector's nodes (named /model/...), onnxruntime's layout reorders, and ours' other nodes, the costliest listed."""
    import collections
    import json

    per_node, op_of = {}, {}
    for name, path in paths.items():
        opts.enable_profiling, opts.profile_file_prefix = True, str(tmp / f"profile_{name}")
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            s.run(None, feeds[name])
        t = collections.defaultdict(float)
        for e in json.loads(Path(s.end_profiling()).read_text()):
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                t[e["name"][: -len("_kernel_time")]] += e["dur"] / 1e3 / (runs + 1)
                op_of[e["name"][: -len("_kernel_time")]] = e["args"].get("op_name", "?")
        per_node[name] = t
    opts.enable_profiling = False

    def part(n: str) -> str:
        return "detector" if n.startswith("/model") else "reorders" if n.startswith("Reorder") else "rest"

    print(f"\nonnxruntime profile, bus.jpg, mean of {runs + 1} runs (kernel time, ms; profiling adds overhead):")
    print("| graph | nodes | detector | layout reorders | rest | total |\n|---|---|---|---|---|---|")
    for name, t in per_node.items():
        sums = collections.Counter()
        for n, v in t.items():
            sums[part(n)] += v
        print(f"| {name} | {len(t)} | {sums['detector']:.2f} | {sums['reorders']:.2f} | {sums['rest']:.2f} | "
              f"{sum(t.values()):.2f} |")
    rest = {n: v for n, v in per_node["ours"].items() if part(n) == "rest"}
    tiny = [v for v in rest.values() if v < 0.015]
    print(f"ours' own nodes (neither detector nor reorder): {len(rest)}, {len(tiny)} of them under 15 us "
          f"({sum(tiny):.2f} ms); the costliest:")
    for n, v in sorted(rest.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {v:6.3f} ms  {op_of[n]:18s} {n}")


if __name__ == "__main__":
    sys.exit(main())
