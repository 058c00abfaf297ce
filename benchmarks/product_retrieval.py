"""Retrieval quality through the whole product: ``yolo-vq fit`` + ``yolo-vq index --track`` + ``Memory.search``.

Same protocol as ``benchmarks/retrieval.py`` (ByteTrack ids as identities, +-G frames excluded), but every query
goes through the public search path with codes and all: the query vector is decoded from its stored codes and the
gallery is scanned by ADC over stored codes. The codebook is fitted on the first half of the frames only.

    python benchmarks/product_retrieval.py            # vtest.avi, yolo11n-pose.pt, imgsz 1280, 32-byte PQ
    python benchmarks/product_retrieval.py --rerank 50 100 500   # also keep float16 vectors, re-rank shortlists

With ``--rerank``, the index keeps float16 vectors and the queries are the stored float16 vectors (what
``yolo-vq search --detection`` uses on such an index). Each query's ranking is then: the ADC top-K as
``Memory.search(..., rerank=K)`` returns them (exact cosine order), followed by the rest in ADC order.
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
    from yolo_vq.video import open_source

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--imgsz", type=int, default=1280)
    ap.add_argument("--bytes", type=int, default=32)
    ap.add_argument("--gap", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rotation", default="auto", choices=["auto", "random", "none"],
                    help="fit_codebook's rotation (auto: within recipe parts, the default)")
    ap.add_argument("--rerank", type=int, nargs="+", default=None, metavar="K",
                    help="shortlist sizes to re-rank exactly with kept float16 vectors (indexes with --keep-vectors)")
    ap.add_argument("--video", type=Path, default=None, help="a video or image folder (default: vtest.avi)")
    ap.add_argument("--head", default="none", choices=["none", "auto", "whiten", "tracks", "mlp"],
                    help="fit's identity head, learned from the first half's tracks (default none)")
    args = ap.parse_args()
    video = args.video or assets.vtest_video()
    out = args.out or Path(tempfile.mkdtemp(prefix="yolo_vq_product_"))
    model = YOLO(str(assets.pose_weights()))
    t0 = time.perf_counter()
    if not (out / "cb.json").is_file():
        src = open_source(video)
        half = (src.frame_count or 794) // 2  # the codebook sees the first half of the frames only
        src.close()
        fit_codebook(model, [video], out / "cb", code_bytes=args.bytes, max_frames=half, imgsz=args.imgsz,
                     rotation=None if args.rotation == "none" else args.rotation, head=args.head)
    with Indexer(model, out / "idx", codebook=out / "cb", track=True, imgsz=args.imgsz,
                 keep_vectors=bool(args.rerank)) as ix:
        print(ix.index_source(video).line())
    print(f"fit + index: {time.perf_counter() - t0:.0f} s")
    with Memory(out / "idx", mode="flat") as mem:  # mem.scan below: every code in RAM
        params = mem.codebook.meta.get("quantizer", {}).get("params", {})
        head = mem.codebook.head
        print(f"codebook: {mem.codebook.code_size} B, rotation {params.get('rotation')}, head "
              f"{'none' if head is None else f'{head.kind} ({head.dim_in} -> {head.dim} dims)'}")
        ids, _ = mem.store.codes()
        det = mem.store.get(ids)
        track, frame = det.track_id, det.data["frame"]
        q = valid_queries(track, frame, args.gap)
        print(f"{len(ids)} stored detections, {len(q)} queries, G={args.gap}")

        def adc(vecs: np.ndarray) -> np.ndarray:
            dist, order = mem.scan.search(vecs, len(ids))  # the ADC scan Memory.search runs
            full = np.full((len(vecs), len(ids)), -np.inf, np.float32)
            np.put_along_axis(full, np.searchsorted(ids, order), -dist, axis=1)
            return full

        def report(name: str, scores: np.ndarray, seconds: float | None = None) -> None:
            m = retrieval_scores(scores, q, track, frame, args.gap)
            took = "" if seconds is None else f" ({seconds / len(q) * 1e3:.2f} ms per query)"
            print(f"{name}: mAP {m.mAP:.3f}, Rank-1 {m.rank1:.3f}, R@10 {m.recall10:.3f}{took}")

        dec_all = mem.vectors_of(ids, stored=False)
        decoded = adc(dec_all[q])
        report("codes, query decoded from its codes, ADC", decoded)
        src = open_source(video)
        half = (src.frame_count or 794) // 2
        src.close()
        late = frame >= half  # held-out time: queries and gallery from the frames the codebook never saw
        q2 = valid_queries(np.where(late, track, -1), frame, args.gap)

        def held_out(name: str, scores: np.ndarray) -> None:
            m = retrieval_scores(np.where(late[None, :], scores[np.searchsorted(q, q2)], -np.inf), q2,
                                 np.where(late, track, -1), frame, args.gap)
            print(f"held-out time (frames >= {half} only, {len(q2)} queries): {name}: mAP {m.mAP:.3f}, "
                  f"Rank-1 {m.rank1:.3f}, R@10 {m.recall10:.3f}")

        held_out("codes, query decoded, ADC", decoded)
        # what `search --detection` queries with on an index without kept vectors (Memory.detection_vector): the
        # mean of its track's decoded codes within W frames (W <= G: only frames the protocol keeps out of the
        # gallery anyway)
        for w in sorted({5, 15, args.gap} - {0}):
            agg = np.zeros((len(q), dec_all.shape[1]), np.float32)
            for row, i in enumerate(q):
                agg[row] = dec_all[(track == track[i]) & (np.abs(frame - frame[i]) <= w)].mean(0)
            agg /= np.maximum(np.linalg.norm(agg, axis=1, keepdims=True), 1e-12)
            name = f"codes, query = its track's decoded codes within {w} frames, ADC"
            scores = adc(agg)
            report(name, scores)
            held_out(name, scores)
        if args.rerank:
            vecs = mem.vectors_of(ids)[q]  # the stored float16 vectors
            base = adc(vecs)
            report("float16 query, ADC", base)
            held_out("float16 query, ADC", base)
            for k in args.rerank:
                t1 = time.perf_counter()
                hits = mem.search(vecs, k, rerank=k)  # the product's re-ranking, query by query
                took = time.perf_counter() - t1
                scores = base.copy()
                for row, h in enumerate(hits):  # the shortlist first, in exact order; then the rest by ADC
                    scores[row, np.searchsorted(ids, h.data["id"])] = 10.0 + h.data["score"]
                report(f"float16 query, ADC top-{k} re-ranked by exact cosine", scores, took)
            exact, _ = mem.store.vectors(ids)
            exact /= np.linalg.norm(exact, axis=1, keepdims=True)
            report("float16 query, exact cosine over all (the ceiling)", vecs @ exact.T /
                   np.linalg.norm(vecs, axis=1, keepdims=True))


if __name__ == "__main__":
    main()
