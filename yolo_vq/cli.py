"""``yolo-vq``: train codebooks, index videos, search stored detections, export the edge graph, run it without torch
(``edge``), ingest its records, run the offline demo.

The CLI only parses arguments and calls library functions; every user error ends as one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _model(name: str | None):
    from ultralytics import YOLO

    from . import assets

    return YOLO(name or str(assets.pose_weights()))


def _predict_args(a) -> dict[str, Any]:
    out = {"imgsz": a.imgsz, "conf": a.conf}
    if getattr(a, "classes", None):
        out["classes"] = a.classes
    if getattr(a, "device", None):
        out["device"] = a.device
    return out


def cmd_fit(a) -> None:
    from .fit import fit_codebook

    pq, n = fit_codebook(_model(a.model), a.sources, a.out, recipe=a.recipe, code_bytes=a.bytes,
                         codebook_size=a.codebook_size, rotation=None if a.rotation == "none" else a.rotation,
                         stride=a.stride, max_frames=a.max_frames, **_predict_args(a))
    print(f"codebook: {n} detections sampled, {pq.stats.get('n_train')} used, {pq.code_size} B per detection, "
          f"distortion {pq.stats.get('distortion', float('nan')):.4f} -> {Path(a.out)}.safetensors/.json")


def cmd_index(a) -> None:
    from .indexer import CODEBOOK_STEM, Indexer

    model = _model(a.model)
    codebook = a.codebook
    index = Path(a.index)
    if a.thumbs is not None and a.thumbs < 1:
        raise ValueError(f"--thumbs must be >= 1 (keep every N-th detection of each track), got {a.thumbs}: "
                         "--thumbs alone keeps every detection's")
    if codebook is None and not (index / f"{CODEBOOK_STEM}.json").is_file():
        from .fit import fit_codebook

        print(f"no codebook given: fitting one on the first {a.fit_frames} frames of {a.sources[0]} (say --codebook "
              f"to use a trained one)")
        index.mkdir(parents=True, exist_ok=True)
        codebook = index / "fitted"
        fit_codebook(model, a.sources[:1], codebook, recipe=a.recipe, code_bytes=a.bytes, max_frames=a.fit_frames,
                     codebook_size=a.codebook_size, **_predict_args(a))
    with Indexer(model, index, codebook=codebook, recipe=a.recipe, track=a.track, batch=a.batch, thumbs=a.thumbs,
                 keep_vectors=True if a.keep_vectors else None, **_predict_args(a)) as ix:
        for s in a.sources:
            print(ix.index_source(s, stride=a.stride, progress=not a.quiet).line())
        print(f"index {index}: {ix.store.count()} detections in {len(ix.store.sources())} sources")


def _query_vectors(a, mem) -> tuple[Any, list[int], Any]:
    """Query vectors (q, D), stored ids to exclude, and the query for the sheet (a BGR crop or stored detection)."""
    import cv2
    import numpy as np

    from .embedder import Embedder

    if a.detection is not None:
        return mem.vectors_of([a.detection]), [a.detection], mem.store.get([a.detection])
    if a.track is not None:
        src, _, tid = a.track.partition(":")
        if not tid:
            src, tid = "1", src
        v = mem.track_vector(int(src), int(tid))
        return v, [], mem.store.get(mem.store.track_ids(int(src), int(tid))[:1])
    image = cv2.imread(a.image) if a.image else None
    if image is None:
        raise ValueError(f"cannot read query image {a.image!r}: expected a JPEG/PNG file")
    model = _model(a.model)
    emb = Embedder(model, mem.store.get_meta("embedding")["config"])
    if emb.fingerprint != mem.store.get_meta("model_fingerprint"):
        raise ValueError(f"--model {a.model or 'yolo11n-pose.pt'} is not the model this index was built with "
                         f"({mem.store.get_meta('embedding')['model']}): pass that model")
    if a.crop:
        box = np.array([float(v) for v in a.crop.split(",")], dtype=np.float32)
        if box.shape != (4,):
            raise ValueError(f"--crop must be x1,y1,x2,y2, got {a.crop!r}")
        boxes = box[None]
    else:
        with emb:
            r = model.predict(image, verbose=False, imgsz=a.imgsz)[0]
        boxes = r.boxes.xyxy.cpu().numpy()
        if len(boxes) == 0:
            raise ValueError(f"no detections in {a.image}: pass --crop x1,y1,x2,y2 to search with a region")
    from .viz import crop

    return emb.embed_boxes(image, boxes, imgsz=a.imgsz), [], crop(image, boxes[0])


def cmd_search(a) -> None:
    from .memory import Memory

    with Memory(a.index, engine=a.engine) as mem:
        vectors, exclude, query_img = _query_vectors(a, mem)
        results = mem.search(vectors[:1], a.k, exclude=exclude, rerank=a.rerank, classes=a.cls, source=a.source,
                             time_from=a.time_from, time_to=a.time_to, min_conf=a.min_conf)[0]
        rows = []
        for i in range(len(results)):
            src = mem.store.source(int(results.data["source_id"][i]))
            rows.append({
                "id": int(results.data["id"][i]), "score": round(float(results.data["score"][i]), 4),
                "source": src.uri, "time": round(float(results.data["time"][i]), 3),
                "frame": int(results.data["frame"][i]), "class": mem.names.get(int(results.class_id[i]),
                                                                            str(int(results.class_id[i]))),
                "track": int(results.track_id[i]), "confidence": round(float(results.confidence[i]), 3),
                "box": [round(float(v), 1) for v in results.xyxy[i]],
            })
        if a.json:
            print(json.dumps(rows, indent=1))
        else:
            print(f"{'rank':>4} {'score':>6} {'time':>8} {'frame':>6} {'class':>10} {'track':>5} {'conf':>5}  box  "
                  f"source")
            for n, r in enumerate(rows, 1):
                print(f"{n:>4} {r['score']:6.3f} {r['time']:8.2f} {r['frame']:6d} {r['class']:>10} {r['track']:5d} "
                      f"{r['confidence']:5.2f}  {r['box']}  {Path(r['source']).name}")
        if a.sheet:
            from .viz import write_image

            write_image(a.sheet, mem.contact_sheet(results, query_img, prefer=a.sheet_from))
            print(f"contact sheet: {a.sheet}")


def cmd_demo(a) -> None:
    """Offline end to end on bikes.mp4 with yolo11n-pose.pt: fit, index with tracking, search, contact sheet."""
    from . import assets
    from .fit import fit_codebook
    from .indexer import Indexer
    from .memory import Memory

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    video = assets.bikes_video()
    model = _model(None)
    print(f"demo: {video.name} with yolo11n-pose.pt -> {out}")
    pq, n = fit_codebook(model, [video], out / "codebook", code_bytes=32, codebook_size=64, conf=0.1)
    print(f"1/3 codebook: {n} detections, {pq.code_size} B per detection -> {out / 'codebook'}.safetensors")
    with Indexer(model, out / "index", codebook=out / "codebook", track=True, conf=0.1) as ix:
        print("2/3 " + ix.index_source(video).line())
    with Memory(out / "index") as mem:
        rows = mem.store.longest_track()
        if rows is None:
            raise ValueError("the demo found no tracked detection to query")
    a2 = argparse.Namespace(index=str(out / "index"), engine="auto", detection=int(rows[2]), track=None, image=None,
                            crop=None, model=None, imgsz=640, k=10, cls=None, source=None, time_from=None,
                            time_to=None, min_conf=None, json=False, sheet=str(out / "results.jpg"),
                            sheet_from="video", rerank=None)
    print(f"3/3 search: the first detection of track {rows[0]} ({rows[1]} detections) as the query")
    cmd_search(a2)


def _size(text: str, what: str) -> tuple[int, int]:
    """``"640"`` -> (640, 640); ``"1920x1080"`` (WIDTHxHEIGHT) -> (1080, 1920) as (h, w)."""
    try:
        parts = [int(v) for v in text.lower().replace(",", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise ValueError(f"{what} {text!r}: expected a positive int or WIDTHxHEIGHT, e.g. 640 or 1920x1080")
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[1], parts[0])


def cmd_export(a) -> None:
    from .export import export

    size = _size(a.imgsz, "--imgsz")
    imgsz = size[0] if size[0] == size[1] else size
    path, check = export(_model(a.model), a.codebook, a.out, imgsz=imgsz,
                         source_size=_size(a.source_size, "--source-size") if a.source_size else None,
                         conf=a.conf, iou=a.iou, max_det=a.max_det, dynamic=a.batch is None, batch=a.batch or 1,
                         opset=a.opset, half=a.half, embeddings=a.embeddings, nms=True if a.nms else None)
    print(check.line())
    print(f"exported: {path} ({path.stat().st_size / 1e6:.1f} MB)")


def cmd_edge(a) -> None:
    from .edge import EdgeModel, run

    model = EdgeModel(a.model, threads=a.threads)
    counts = run(model, a.sources, a.out, stride=a.stride, batch=a.batch, progress=not a.quiet)
    per = counts["bytes"] / counts["detections"] if counts["detections"] else 0
    print(f"edge: {counts['frames']} frames, {counts['detections']} detections, {per:.0f} B of codes per detection "
          f"-> {a.out}")


def cmd_ingest(a) -> None:
    from .ingest import ingest

    for path in a.files:
        print(f"{path}: " + ingest(path, a.index, codebook=a.codebook).line())


def _parser() -> argparse.ArgumentParser:
    from .config import DEFAULT_RECIPE

    p = argparse.ArgumentParser(prog="yolo-vq", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def detect_args(s, conf=0.25):
        s.add_argument("--model", default=None, help="YOLO weights (.pt) or .yaml; default: the offline yolo11n-pose")
        s.add_argument("--imgsz", type=int, default=640)
        s.add_argument("--conf", type=float, default=conf)
        s.add_argument("--device", default=None)

    f = sub.add_parser("fit", help="train a codebook on sampled detections")
    f.add_argument("sources", nargs="+")
    f.add_argument("--out", required=True, help="codebook path stem (writes .safetensors + .json)")
    f.add_argument("--recipe", default=DEFAULT_RECIPE)
    f.add_argument("--bytes", type=int, default=32, help="bytes per detection (PQ sub-spaces)")
    f.add_argument("--codebook-size", type=int, default=256)
    f.add_argument("--rotation", default="auto", choices=["auto", "random", "none"],
                   help="auto: rotate within the recipe's parts (see docs/benchmarks.md); random: all dims; none")
    f.add_argument("--stride", type=int, default=1)
    f.add_argument("--max-frames", type=int, default=None)
    f.add_argument("--classes", type=int, nargs="+", default=None)
    detect_args(f)
    f.set_defaults(fn=cmd_fit)

    i = sub.add_parser("index", help="index videos, image folders or streams into an index directory")
    i.add_argument("sources", nargs="+")
    i.add_argument("--index", required=True)
    i.add_argument("--codebook", default=None, help="trained codebook; default: the index's own, or fit one")
    i.add_argument("--fit-frames", type=int, default=250, help="frames to fit on when no codebook exists")
    i.add_argument("--bytes", type=int, default=32)
    i.add_argument("--codebook-size", type=int, default=256)
    i.add_argument("--recipe", default=DEFAULT_RECIPE)
    i.add_argument("--track", action="store_true", help="run the tracker and store track ids")
    i.add_argument("--stride", type=int, default=1)
    i.add_argument("--batch", type=int, default=8)
    i.add_argument("--classes", type=int, nargs="+", default=None)
    i.add_argument("--thumbs", type=int, nargs="?", const=1, default=None, metavar="N",
                   help="store a small JPEG crop of every N-th detection of each track (always the first; every "
                        "untracked one); --thumbs alone: of every detection")
    i.add_argument("--keep-vectors", action="store_true",
                   help="also keep each detection's embedding as float16 (2 B per dim) so search can --rerank; an "
                        "index that keeps them goes on keeping them")
    i.add_argument("--quiet", action="store_true")
    detect_args(i)
    i.set_defaults(fn=cmd_index)

    s = sub.add_parser("search", help="search stored detections by visual similarity")
    s.add_argument("--index", required=True)
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", help="query image: each detection (first one shown) or --crop")
    q.add_argument("--detection", type=int, help="a stored detection id")
    q.add_argument("--track", help="a stored track: SOURCE_ID:TRACK_ID (or TRACK_ID in source 1)")
    s.add_argument("--crop", help="x1,y1,x2,y2 region of --image to search with")
    s.add_argument("--class", dest="cls", nargs="+", default=None)
    s.add_argument("--source", default=None, help="source id or part of its path")
    s.add_argument("--time-from", type=float, default=None)
    s.add_argument("--time-to", type=float, default=None)
    s.add_argument("--min-conf", type=float, default=None)
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--rerank", type=int, default=None, metavar="K",
                   help="re-rank the K best by ADC with exact cosine on the kept float16 vectors (index --keep-vectors)")
    s.add_argument("--engine", default="auto", choices=["auto", "faiss", "numpy"])
    s.add_argument("--json", action="store_true")
    s.add_argument("--sheet", default=None, help="write a contact sheet picture (.jpg/.png)")
    s.add_argument("--sheet-from", default="video", choices=["video", "thumbs"],
                   help="pictures from the source video where it is still readable (else stored thumbnails), "
                        "or from stored thumbnails only")
    detect_args(s)
    s.set_defaults(fn=cmd_search)

    e = sub.add_parser("export", help="export detector + embedding + codebook as one ONNX graph for edge devices")
    e.add_argument("--model", default=None, help="YOLO weights (.pt) or .yaml; default: the offline yolo11n-pose")
    e.add_argument("--codebook", required=True, help="the codebook the server's index uses")
    e.add_argument("--out", required=True, help="the .onnx file to write")
    e.add_argument("--imgsz", default="640", help="input size: 640 (square) or WIDTHxHEIGHT")
    e.add_argument("--source-size", default=None,
                   help="camera frame size WIDTHxHEIGHT: input shaped as predict letterboxes it (same codes as the "
                        "server)")
    e.add_argument("--conf", type=float, default=0.25)
    e.add_argument("--iou", type=float, default=0.7)
    e.add_argument("--max-det", type=int, default=300)
    e.add_argument("--opset", type=int, default=18)
    e.add_argument("--batch", type=int, default=None, help="fixed batch size (default: dynamic)")
    e.add_argument("--half", action="store_true", help="fp16 weights (needs a CUDA export)")
    e.add_argument("--embeddings", action="store_true", help="also output the float embeddings")
    e.add_argument("--nms", action="store_true", help="end-to-end models: NMS on the one-to-many head instead")
    e.set_defaults(fn=cmd_export)

    g = sub.add_parser("edge", help="run an exported graph on video with onnxruntime only (no torch)")
    g.add_argument("model", help="the .onnx written by `yolo-vq export`")
    g.add_argument("sources", nargs="+")
    g.add_argument("--out", required=True, help="detections.jsonl")
    g.add_argument("--stride", type=int, default=1)
    g.add_argument("--batch", type=int, default=4)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(fn=cmd_edge)

    n = sub.add_parser("ingest", help="add edge detections (.jsonl) to an index")
    n.add_argument("files", nargs="+")
    n.add_argument("--index", required=True)
    n.add_argument("--codebook", default=None, help="for a new index: the codebook the graph was exported with")
    n.set_defaults(fn=cmd_ingest)

    d = sub.add_parser("demo", help="offline end-to-end demo on bikes.mp4 (needs the demo extra)")
    d.add_argument("--out", default="yolo_vq_demo")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if getattr(a, "k", 1) <= 0:
        print(f"error: -k must be a positive number of results, got {a.k}", file=sys.stderr)
        return 2
    try:
        a.fn(a)
    except (ValueError, FileNotFoundError, KeyError) as e:  # CodebookError, StoreError, EdgeError too
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
