"""Retrieval quality through the whole product: ``yolo-vq fit`` + ``yolo-vq index --track`` + ``Memory.search``.

Same protocol as ``benchmarks/retrieval.py`` (ByteTrack ids as identities, +-G frames excluded), but every query
goes through the public search path with codes and all: the query vector is decoded from its stored codes and the
gallery is scanned by ADC over stored codes. The codebook is fitted on the first half of the frames only.

    python benchmarks/product_retrieval.py            # vtest.avi, yolo11n-pose.pt, imgsz 1280, 32-byte PQ
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import numpy as np


def main() -> None:
    from ultralytics import YOLO

    from yolo_vq import Indexer, Memory, assets
    from yolo_vq.fit import fit_codebook
    from yolo_vq.metrics import retrieval_scores, valid_queries

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--imgsz", type=int, default=1280)
    ap.add_argument("--bytes", type=int, default=32)
    ap.add_argument("--gap", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    video = assets.vtest_video()
    out = args.out or Path(tempfile.mkdtemp(prefix="yolo_vq_product_"))
    model = YOLO(str(assets.pose_weights()))
    t0 = time.perf_counter()
    if not (out / "cb.json").is_file():
        fit_codebook(model, [video], out / "cb", code_bytes=args.bytes, max_frames=397, imgsz=args.imgsz)
    with Indexer(model, out / "idx", codebook=out / "cb", track=True, imgsz=args.imgsz) as ix:
        print(ix.index_source(video).line())
    print(f"fit + index: {time.perf_counter() - t0:.0f} s")
    with Memory(out / "idx") as mem:
        ids, _ = mem.store.codes()
        det = mem.store.get(ids)
        track, frame = det.track_id, det.data["frame"]
        q = valid_queries(track, frame, args.gap)
        vecs = mem.vectors_of(ids)
        dist, order = mem.scan.search(vecs[q], len(ids))  # the ADC scan Memory.search runs
        full = np.full((len(q), len(ids)), -np.inf, np.float32)
        np.put_along_axis(full, np.searchsorted(ids, order), -dist, axis=1)
        codes_map = retrieval_scores(full, q, track, frame, args.gap)
    print(f"{len(ids)} stored detections, {len(q)} queries, G={args.gap}: mAP through the product "
          f"{codes_map.mAP:.3f}, Rank-1 {codes_map.rank1:.3f}, R@10 {codes_map.recall10:.3f}")


if __name__ == "__main__":
    main()
