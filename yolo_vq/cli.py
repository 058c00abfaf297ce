"""``yolo-vq``: train codebooks, index videos, search stored detections, export the edge graph, run it without torch
(``edge``), ingest its records, run the offline demo.

The CLI only parses arguments and calls library functions. Every user error (a :class:`~yolo_vq.errors.YoloVQError`,
a missing file, a bad option value) ends as one ``error:`` line on stderr and exit 2; Ctrl-C as one line saying what
was kept, exit 130; anything else is a bug, reported in one line with exit 70 (``YOLO_VQ_DEBUG=1`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from yolo_vq_edge.cli import Interrupted, Parser, add_edge, call, int_at_least, positive

__all__ = ["main"]

DESCRIPTION = ("yolo-vq: a searchable, compressed visual memory for Ultralytics YOLO. Train a codebook (fit), index "
               "videos (index), search stored detections (search), export one ONNX graph for edge devices (export), "
               "run it without torch (edge), add its records to an index (ingest), or run the offline demo (demo).")


def _crop(text: str) -> tuple[float, float, float, float]:
    """``"x1,y1,x2,y2"`` -> four floats with x1 < x2 and y1 < y2 (argparse type)."""
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not all(map(math.isfinite, box)) or box[0] >= box[2] or box[1] >= box[3]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a box x1,y1,x2,y2 in pixels with x1 < x2 and y1 < y2, "
                                         f"e.g. --crop 10,20,110,220")
    return box  # type: ignore[return-value]


def _track(text: str) -> tuple[int, int]:
    """``"SOURCE:TRACK"`` (or ``"TRACK"``, in source 1) -> (source_id, track_id) (argparse type)."""
    src, sep, tid = text.partition(":")
    if not sep:
        src, tid = "1", src
    if not (src.strip().isdigit() and tid.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected SOURCE_ID:TRACK_ID (or TRACK_ID in source 1) as "
                                         f"non-negative integers, e.g. --track 1:7 (ids as `search --json` prints)")
    return int(src), int(tid)


def _port(text: str) -> int:
    port = int_at_least(text, 0, "a TCP port in 0..65535 (0: any free one)")
    if port > 65535:  # type: ignore[operator]
        raise argparse.ArgumentTypeError(f"{text!r}: expected a TCP port in 0..65535 (0: any free one)")
    return port  # type: ignore[return-value]


def _lists(text: str) -> int | str:
    """``--lists``: a count of lists, ``auto`` (what the sample supports) or 0 (none)."""
    return int_at_least(text, 0, "a number of lists (e.g. 1024), auto, or 0 for none", "auto")


def _nprobe(text: str) -> int | str:
    """``--nprobe``: lists a query scans, or ``all`` (exactly the flat scan)."""
    return int_at_least(text, 1, "a positive number of lists a query scans, or all (every list: the same results "
                                  "as the flat scan)", "all")


def _classes(model: Any, wanted: list[str] | None) -> list[int] | None:
    """``--classes`` as names or ids -> ids of ``model``'s classes; an unknown one lists the known."""
    from .classes import class_ids

    def unknown(w: str | int, names: dict[int, str]) -> str:
        known = ", ".join(f"{k} {v}" for k, v in list(names.items())[:20])
        return (f"--classes {w!r}: not a class of this model (it has {known}{' ...' if len(names) > 20 else ''}): "
                "pass names or ids")

    return class_ids(getattr(model, "names", None) or {}, wanted, unknown) if wanted else None


def _model(name: str | None):
    from .model import load_model

    return load_model(name)  # a bad --model is one ModelError line, before anything else is done


def _predict_args(a, model: Any = None) -> dict[str, Any]:
    out = {"imgsz": a.imgsz, "conf": a.conf}
    if getattr(a, "classes", None):
        out["classes"] = _classes(model, a.classes)
    if getattr(a, "device", None):
        out["device"] = a.device
    return out


def cmd_fit(a) -> None:
    from .fit import fit_codebook

    model = _model(a.model)
    pq, n = fit_codebook(model, a.sources, a.out, recipe=a.recipe, code_bytes=a.bytes,
                         codebook_size=a.codebook_size, rotation=None if a.rotation == "none" else a.rotation,
                         stride=a.stride, max_frames=a.max_frames, lists=a.lists, coarse_dim=a.coarse_dim,
                         head=a.head or ("auto" if a.track else "none"), **_predict_args(a, model))
    coarse = pq_lists(a.out)
    print(f"codebook: {n} detections sampled, {pq.stats.get('n_train')} used, {pq.code_size} B per detection "
          f"({pq.codebook_size} centroids per sub-space), "
          f"distortion {pq.stats.get('distortion', float('nan')):.4f}"
          f"{f', {coarse} search lists' if coarse else ''} -> {Path(a.out)}.safetensors/.json")


def pq_lists(codebook: str | Path) -> int | None:
    """The list count of the coarse quantizer a saved codebook lists in its JSON (None: none)."""
    from .quant.io import codebook_paths

    entry = json.loads(codebook_paths(codebook)[1].read_text()).get("coarse")
    return entry.get("lists") if isinstance(entry, dict) else None


def cmd_upgrade(a) -> None:
    from .index.upkeep import upgrade

    print(upgrade(a.index, lists=a.lists, reduced_dim=a.coarse_dim).line())


def cmd_info(a) -> None:
    from .index.memory import Memory

    with Memory(a.index) as mem:
        info = mem.info()
    if a.json:
        print(json.dumps(info, indent=1))
        return
    for key, value in info.items():
        print(f"{key:>26}: {value}")


def cmd_index(a) -> None:
    from .index.indexer import Indexer
    from .video import open_source

    if a.thumbs is not None and a.thumbs < 1:
        raise ValueError(f"--thumbs must be >= 1 (keep every N-th detection of each track), got {a.thumbs}: "
                         "--thumbs alone keeps every detection's")
    for s in a.sources:  # a file that is no video is refused before the index is made or touched
        if not (str(s).isdigit() or "://" in str(s)):  # streams are opened once, when indexed
            open_source(s).close()
    model = _model(a.model)
    index = a.index
    predict = _predict_args(a, model)
    fit = None
    if a.codebook is None and not Indexer.has_codebook(index):  # a damaged index is refused here, before fitting
        print(f"no codebook given: fitting one on the first {a.fit_frames} frames of {a.sources[0]} (say --codebook "
              f"to use a trained one)")
        fit = {"code_bytes": a.bytes, "max_frames": a.fit_frames, "codebook_size": a.codebook_size,
               "progress": not a.quiet, **predict}
    ix = None
    try:
        with Indexer(model, index, codebook=a.codebook, recipe=a.recipe, track=a.track, batch=a.batch,
                     thumb_every=a.thumbs, keep_vectors=True if a.keep_vectors else None,
                     fit_on=a.sources[:1] if fit else None, fit_args=fit, **predict) as ix:
            for s in a.sources:
                print(ix.index_source(s, stride=a.stride, progress=not a.quiet).line())
            print(f"index {index}: {ix.store.count()} detections in {len(ix.store.sources())} sources")
    except KeyboardInterrupt:
        if ix is None or ix.last_stored is None:
            raise Interrupted(f"interrupted before any frame was stored in {index}: nothing changed") from None
        uri, frame = ix.last_stored
        raise Interrupted(f"interrupted: {ix.stored_detections} detections stored by this run, {Path(uri).name} up to "
                           f"frame {frame}; re-run the same command to resume after it (stored frames are skipped)"
                           ) from None


def cmd_search(a) -> None:
    from .index.memory import Memory
    from .index.query import Query, format_rows, result_rows

    with Memory(a.index, engine=a.engine, nprobe=a.nprobe) as mem:
        if a.detection is not None:
            query = Query.detection(mem, a.detection)
        elif a.track is not None:
            query = Query.track(mem, *a.track)
        else:
            import cv2

            image = cv2.imread(a.image)
            if image is None:
                raise ValueError(f"cannot read query image {a.image!r}: expected a JPEG/PNG file")
            query = Query.image(mem, _model(a.model), image, box=a.crop, imgsz=a.imgsz)
        filters = {"classes": a.cls, "source": a.source, "time_from": a.time_from, "time_to": a.time_to,
                   "min_conf": a.min_conf}
        results = mem.search(query.vectors[:1], a.k, exclude=query.exclude, rerank=a.rerank,
                             per_track=a.per_track, **filters)[0]
        if not len(results):
            print(f"no results: {mem.why_empty(exclude=query.exclude, **filters)}", file=sys.stderr)
        rows = result_rows(mem, results)
        print(json.dumps(rows, indent=1) if a.json else format_rows(rows))
        if a.sheet:
            from .viz import write_image

            write_image(a.sheet, mem.contact_sheet(results, query.picture, prefer=a.sheet_from))
            print(f"contact sheet: {a.sheet}")


def cmd_serve(a) -> None:
    try:
        import uvicorn

        from .serve.app import create_app
    except ImportError as e:
        raise ImportError(f"{e.name or e}; `yolo-vq serve` needs the serve extra: pip install 'yolo-vq[serve]'"
                          ) from None
    app = create_app(a.index, model=a.model, imgsz=a.imgsz, max_upload=a.max_upload_mb * 1024 * 1024)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {a.host}: anyone who can reach this machine can search {a.index} and see its "
              f"pictures (there is no login); use --host 127.0.0.1 unless that is what you want", file=sys.stderr)
    import socket

    family = socket.getaddrinfo(a.host, a.port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((a.host, a.port))  # here, not in uvicorn: a port in use is one error line, port 0 gets printed
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {a.host}:{a.port}: {e.strerror}; pick another --port") from None
    host, port = sock.getsockname()[:2]
    ix = app.state.index
    print(f"serving {a.index} ({ix.call(len, ix.memory)} detections) at "
          f"http://{'[' + host + ']' if ':' in host else host}:{port}/ (API: /docs; Ctrl-C stops)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def cmd_demo(a) -> None:
    from .demo import run_demo

    run_demo(a.out)


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
    from .edge.export import export

    size = _size(a.imgsz, "--imgsz")
    imgsz = size[0] if size[0] == size[1] else size
    path, check = export(_model(a.model), a.codebook, a.out, imgsz=imgsz,
                         source_size=_size(a.source_size, "--source-size") if a.source_size else None,
                         conf=a.conf, iou=a.iou, max_det=a.max_det, dynamic=a.batch is None, batch=a.batch or 1,
                         opset=a.opset, half=a.half, embeddings=a.embeddings, nms=True if a.nms else None)
    print(check.line())
    print(f"exported: {path} ({path.stat().st_size / 1e6:.1f} MB)")


def cmd_ingest(a) -> None:
    from .edge.ingest import ingest

    for path in a.files:
        print(f"{path}: " + ingest(path, a.index, codebook=a.codebook).line())


def _detect_args(s: argparse.ArgumentParser, conf: float = 0.25) -> None:
    s.add_argument("--model", default=None,
                   help="YOLO weights (.pt, loaded with pickle: trusted files only) or architecture (.yaml); "
                        "default: the offline yolo11n-pose.pt")
    s.add_argument("--imgsz", type=positive, default=640, help="inference size in pixels (default 640)")
    s.add_argument("--conf", type=float, default=conf, help=f"detection confidence threshold (default {conf})")
    s.add_argument("--device", default=None, help="torch device, e.g. cpu or 0 (default: Ultralytics' choice)")


def _classes_arg(s: argparse.ArgumentParser) -> None:
    s.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                   help="only these classes, by name or id (e.g. person 2)")


def _add_fit(sub: Any) -> None:
    from .config import DEFAULT_RECIPE

    f = sub.add_parser("fit", help="train a codebook on sampled detections")
    f.add_argument("sources", nargs="+", help="videos, image folders or streams to sample detections from")
    f.add_argument("--out", required=True, help="codebook path stem (writes .safetensors + .json)")
    f.add_argument("--recipe", default=DEFAULT_RECIPE,
                   help=f"embedding recipe preset or .yaml (default {DEFAULT_RECIPE})")
    f.add_argument("--bytes", type=positive, default=32, help="bytes per detection (PQ sub-spaces; default 32)")
    f.add_argument("--codebook-size", type=positive, default=256,
                   help="centroids per sub-space, at most 256 (default 256; lowered with a warning when the video "
                        "has too few detections)")
    f.add_argument("--rotation", default="auto", choices=["auto", "random", "none"],
                   help="auto: rotate within the recipe's parts (see docs/benchmarks.md); random: all dims; none")
    f.add_argument("--stride", type=positive, default=1, help="use every N-th frame (default 1)")
    f.add_argument("--max-frames", type=positive, default=None, help="read at most this many frames per source")
    f.add_argument("--track", action="store_true",
                   help="track the sources and learn an identity head from their tracks (same person, same track; "
                        "two people in one frame, two identities): with --head auto unless told otherwise")
    f.add_argument("--head", default=None, choices=["none", "auto", "whiten", "tracks", "mlp"],
                   help="identity head before the codebook: auto (with --track: chosen by same-track mAP on the "
                        "last third of the frames), whiten (label-free), tracks (linear, learned from tracks), mlp "
                        "(a hidden layer trained on top of the tracks head), none (default without --track)")
    _lists_args(f)
    _classes_arg(f)
    _detect_args(f)
    f.set_defaults(fn=cmd_fit)


def _lists_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lists", type=_lists, default="auto", metavar="N|auto|0",
                   help="search lists (partitioned search) trained with it: a count, auto (4 sqrt(n) as the sample "
                        "supports, the default) or 0 for none")
    p.add_argument("--coarse-dim", type=positive, default=64,
                   help="dimensions the lists partition (PCA of the embedding; default 64)")


def _add_upgrade(sub: Any) -> None:
    u = sub.add_parser("upgrade", help="give an index search lists (partitioned search), or bring them up to date")
    u.add_argument("--index", required=True, help="the index directory")
    _lists_args(u)
    u.set_defaults(fn=cmd_upgrade)


def _add_info(sub: Any) -> None:
    i = sub.add_parser("info", help="what an index holds and how it is searched")
    i.add_argument("--index", required=True, help="the index directory (opened read-only)")
    i.add_argument("--json", action="store_true", help="print it as JSON")
    i.set_defaults(fn=cmd_info)


def _add_index(sub: Any) -> None:
    from .config import DEFAULT_RECIPE

    i = sub.add_parser("index", help="index videos, image folders or streams into an index directory")
    i.add_argument("sources", nargs="+", help="video files, image folders, webcam indices or stream URLs")
    i.add_argument("--index", required=True, help="the index directory (created if missing)")
    i.add_argument("--codebook", default=None,
                   help="trained codebook (a new index keeps a copy); default: the index's own, or fit one")
    i.add_argument("--fit-frames", type=positive, default=250,
                   help="frames of the first source to fit on when no codebook exists (default 250)")
    i.add_argument("--bytes", type=positive, default=32, help="bytes per detection of a fitted codebook (default 32)")
    i.add_argument("--codebook-size", type=positive, default=256,
                   help="centroids per sub-space of a fitted codebook (default 256; lowered if the data is short)")
    i.add_argument("--recipe", default=DEFAULT_RECIPE, help="embedding recipe; must be the codebook's")
    i.add_argument("--track", action="store_true", help="run the tracker and store track ids")
    i.add_argument("--stride", type=positive, default=1, help="index every N-th frame (default 1)")
    i.add_argument("--batch", type=positive, default=8, help="frames per inference call (default 8)")
    _classes_arg(i)
    i.add_argument("--thumbs", type=int, nargs="?", const=1, default=None, metavar="N",
                   help="store a small JPEG crop of every N-th detection of each track (always the first; every "
                        "untracked one); --thumbs alone: of every detection")
    i.add_argument("--keep-vectors", action="store_true",
                   help="also keep each detection's embedding as float16 (2 B per dim) so search can --rerank; an "
                        "index that keeps them goes on keeping them")
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    _detect_args(i)
    i.set_defaults(fn=cmd_index)


def _add_search(sub: Any) -> None:
    from .index import ENGINES, PREFER

    s = sub.add_parser("search", help="search stored detections by visual similarity")
    s.add_argument("--index", required=True, help="the index directory (opened read-only)")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", help="query image: its first detection (or --crop) is the query")
    q.add_argument("--detection", type=int,
                   help="a stored detection id (not itself a result); the query is its kept vector, else its track's "
                        "decoded codes within 15 frames, else its own codes")
    q.add_argument("--track", type=_track, metavar="SOURCE:TRACK",
                   help="a stored track: SOURCE_ID:TRACK_ID (or TRACK_ID in source 1); its mean vector is the query "
                        "and its own detections are not results")
    s.add_argument("--crop", type=_crop, metavar="X1,Y1,X2,Y2", help="region of --image to search with, in pixels")
    s.add_argument("--class", dest="cls", nargs="+", default=None, metavar="CLASS",
                   help="only results of these classes, by name or id")
    s.add_argument("--source", default=None, help="only results of this source: its id or part of its path")
    s.add_argument("--time-from", type=float, default=None, help="only results at or after this time (s)")
    s.add_argument("--time-to", type=float, default=None, help="only results at or before this time (s)")
    s.add_argument("--min-conf", type=float, default=None, help="only results of at least this confidence")
    s.add_argument("-k", type=int, default=10, help="number of results (default 10; at most what is stored)")
    s.add_argument("--rerank", type=int, default=None, metavar="K",
                   help="re-rank the K best by ADC with exact cosine on the kept float16 vectors (index "
                        "--keep-vectors)")
    s.add_argument("--per-track", type=positive, default=None, metavar="N",
                   help="results by appearance: at most N hits per track, each with the track's time span")
    s.add_argument("--engine", default=ENGINES[0], choices=ENGINES,
                   help="code scan engine (default auto: FAISS when installed)")
    s.add_argument("--nprobe", type=_nprobe, default=None, metavar="N|all",
                   help="lists a query scans in an index searched by lists (default: calibrated to recall@10 >= "
                        "0.95 against the flat scan); all: the flat scan's results; no effect on a flat index")
    s.add_argument("--json", action="store_true", help="print results as JSON")
    s.add_argument("--sheet", default=None, help="write a contact sheet picture (.jpg/.png)")
    s.add_argument("--sheet-from", default=PREFER[0], choices=PREFER,
                   help="pictures from the source video where it is still readable (else stored thumbnails), "
                        "or from stored thumbnails only")
    _detect_args(s)
    s.set_defaults(fn=cmd_search)


def _add_export(sub: Any) -> None:
    from .edge._format import DEFAULT_OPSET

    e = sub.add_parser("export", help="export detector + embedding + codebook as one ONNX graph for edge devices")
    e.add_argument("--model", default=None, help="YOLO weights (.pt) or .yaml; default: the offline yolo11n-pose")
    e.add_argument("--codebook", required=True, help="the codebook the server's index uses")
    e.add_argument("--out", required=True, help="the .onnx file to write")
    e.add_argument("--imgsz", default="640", help="input size: 640 (square) or WIDTHxHEIGHT")
    e.add_argument("--source-size", default=None,
                   help="camera frame size WIDTHxHEIGHT: input shaped as predict letterboxes it (same codes as the "
                        "server)")
    e.add_argument("--conf", type=float, default=0.25, help="confidence threshold in the graph (default 0.25)")
    e.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold in the graph (default 0.7)")
    e.add_argument("--max-det", type=positive, default=300, help="most detections per frame (default 300)")
    e.add_argument("--opset", type=positive, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    e.add_argument("--batch", type=positive, default=None, help="fixed batch size (default: dynamic)")
    e.add_argument("--half", action="store_true", help="fp16 weights (needs a CUDA export)")
    e.add_argument("--embeddings", action="store_true", help="also output the float embeddings")
    e.add_argument("--nms", action="store_true", help="end-to-end models: NMS on the one-to-many head instead")
    e.set_defaults(fn=cmd_export)


def _add_ingest(sub: Any) -> None:
    n = sub.add_parser("ingest", help="add edge detections (.jsonl/.parquet) to an index")
    n.add_argument("files", nargs="+", help="records files written by `yolo-vq edge`")
    n.add_argument("--index", required=True, help="the index directory")
    n.add_argument("--codebook", default=None, help="for a new index: the codebook the graph was exported with")
    n.set_defaults(fn=cmd_ingest)


def _add_demo(sub: Any) -> None:
    d = sub.add_parser("demo", help="offline end-to-end demo on bikes.mp4 (needs the demo extra)")
    d.add_argument("--out", default="yolo_vq_demo", help="output folder (default yolo_vq_demo)")
    d.set_defaults(fn=cmd_demo)


def _add_serve(sub: Any) -> None:
    v = sub.add_parser("serve", help="a search page in the browser over an index (needs the serve extra)")
    v.add_argument("--index", required=True, help="the index directory (opened read-only)")
    v.add_argument("--model", default=None, help="YOLO model of image queries: the one the index was built with "
                                                 "(default: the offline yolo11n-pose.pt)")
    v.add_argument("--imgsz", type=positive, default=640, help="inference size of image queries (default 640)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0: any free one)")
    v.add_argument("--max-upload-mb", type=positive, default=10, help="largest query image in MB (default 10)")
    v.set_defaults(fn=cmd_serve)


def _parser() -> argparse.ArgumentParser:
    """The ``yolo-vq`` parser: one ``_add_<command>`` per sub-command."""
    p = Parser(prog="yolo-vq", description=DESCRIPTION)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=Parser)
    for add in (_add_fit, _add_index, _add_search, _add_upgrade, _add_info, _add_export, add_edge, _add_ingest,
                _add_serve, _add_demo):
        add(sub)
    return p

def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if getattr(a, "k", 1) <= 0:
        print(f"error: -k must be a positive number of results, got {a.k}", file=sys.stderr)
        return 2
    return call(a.fn, a)


if __name__ == "__main__":
    sys.exit(main())
