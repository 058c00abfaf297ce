"""The edge runner: an exported ``model_vq.onnx`` on video, with numpy, onnxruntime and OpenCV only (no torch).

    from yolo_vq_edge import EdgeModel, run   # also as yolo_vq.edge.runner
    model = EdgeModel("model_vq.onnx")
    dets = model([frame_bgr])[0]          # dict: xyxy (n, 4) original px, confidence, class_id, codes (n, C)
    run("model_vq.onnx", "video.mp4", "detections.jsonl")   # what `yolo-vq edge` does

Frames are letterboxed exactly as Ultralytics' ``predict`` does (``cv2.resize`` INTER_LINEAR, centred, pad 114) to the
graph's fixed input, and boxes are mapped back to original pixels with the inverse of that letterbox and clipped.

Output (``.jsonl``): one JSON object per line. The first is the header (``"type": "header"``: the graph's metadata,
codebook fingerprint and code size included); then, per source, a ``"source"`` record (uri, content fingerprint, fps,
frame count, size) followed by one ``"frame"`` record per processed frame, detections as parallel lists (``xyxy``,
``confidence``, ``class_id``, ``codes`` as hex strings). Frames without detections are recorded too, so ingesting is
idempotent per frame. ``yolo-vq ingest`` reads it into an index.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _letterbox
from ._format import EDGE_FORMAT, Key, read_metadata, records_header
from .errors import EdgeError
from .records import SUFFIXES, RecordWriter
from .video import chunks, open_source

__all__ = ["EDGE_FORMAT", "EdgeError", "EdgeModel", "letterbox_batch", "run"]


def letterbox_batch(images: Sequence[np.ndarray], meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """BGR uint8 frames -> the graph's inputs: ``images`` (B, 3, H, W) float32 RGB in [0, 1] and ``regions`` (B, 4)
    float32, each frame's area ``x0, y0, x1, y1`` inside the input (input pixels), letterboxed as the graph's
    metadata says (:func:`yolo_vq_edge._letterbox.letterbox_batch`)."""
    for i, im in enumerate(images):
        if not isinstance(im, np.ndarray) or im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            raise EdgeError(f"frame {i}: expected a BGR uint8 (h, w, 3) array, got "
                            f"{getattr(im, 'dtype', type(im).__name__)} {getattr(im, 'shape', '')}")
    return _letterbox.letterbox_batch(images, meta[Key.IMGSZ], imgsz=meta.get(Key.LETTERBOX_IMGSZ),
                                      source_size=meta.get(Key.SOURCE_SIZE))


class EdgeModel:
    """An exported detector + codebook graph in onnxruntime.

    Args:
        path: the ``.onnx`` file written by ``yolo-vq export``.
        threads: intra-op threads (None: onnxruntime's default).
        providers: onnxruntime execution providers (default CPU).

    Raises:
        EdgeError: a missing or malformed file, or an ONNX model without yolo_vq outputs.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, providers: Sequence[str] | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise EdgeError(f"{self.path}: no such file; pass the .onnx written by `yolo-vq export`")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=list(providers or
                                                                                  ["CPUExecutionProvider"]))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidProtobuf types
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise EdgeError(f"{self.path} is not a loadable ONNX model ({first}); re-export it with "
                            f"`yolo-vq export`") from None
        try:
            self.meta = read_metadata(self.session, self.path)
            self.outputs = [o.name for o in self.session.get_outputs()]
        except UnicodeDecodeError as e:  # onnxruntime decodes names and metadata of the graph as UTF-8
            raise EdgeError(f"{self.path}: names or metadata in the graph are not UTF-8 text ({e.reason}); re-export "
                            f"it with `yolo-vq export`") from None
        self.batch = self.meta.get(Key.BATCH)  # None: dynamic
        self.names = {int(k): v for k, v in self.meta[Key.NAMES].items()}

    @property
    def input_hw(self) -> tuple[int, int]:
        return tuple(self.meta[Key.IMGSZ])

    def __call__(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Detect and encode BGR frames: per frame ``xyxy`` (n, 4) float32 original px, ``confidence`` (n,),
        ``class_id`` (n,) int64, ``codes`` (n, C) (and ``embeddings`` (n, D) when exported with them)."""
        if not len(images):
            return []
        x, regions = letterbox_batch(images, self.meta)
        hws = [im.shape[:2] for im in images]
        step = self.batch or len(x)
        results = []
        for s in range(0, len(x), step):
            chunk, reg = x[s : s + step], regions[s : s + step]
            n = len(chunk)
            if self.batch and n < self.batch:  # a fixed-batch graph: pad with blank frames, drop their rows
                chunk = np.concatenate([chunk, np.zeros((self.batch - n, *chunk.shape[1:]), np.float32)])
                reg = np.concatenate([reg, np.repeat(reg[:1], self.batch - n, axis=0)])
            out = dict(zip(self.outputs, self.session.run(None, {"images": chunk, "regions": reg})))
            rows = {k: np.shape(v)[:2] for k, v in out.items()}
            if len(set(rows.values())) != 1 or len(rows["valid"]) != 2 or rows["valid"][0] != len(chunk):
                raise EdgeError(f"{self.path}: the graph's outputs disagree in shape ({rows}): it is damaged or was "
                                "not written by `yolo-vq export`; export it again")
            for i in range(n):
                v = out["valid"][i].astype(bool)
                d = {
                    "xyxy": _letterbox.to_original(out["boxes"][i][v], hws[s + i], self.input_hw, clip=True),
                    "confidence": out["scores"][i][v].astype(np.float32),
                    "class_id": out["classes"][i][v].astype(np.int64),
                    "codes": np.ascontiguousarray(out["codes"][i][v]),
                }
                if "embeddings" in out:
                    d["embeddings"] = out["embeddings"][i][v]
                results.append(d)
        return results


def _frame_record(source: int, frame: int, t: float, d: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        "type": "frame", "source": source, "frame": int(frame), "time": round(float(t), 6),
        "xyxy": np.round(d["xyxy"].astype(np.float64), 2).tolist(),
        "confidence": np.round(d["confidence"].astype(np.float64), 5).tolist(),
        "class_id": d["class_id"].tolist(),
    }


def run(model: str | Path | EdgeModel, sources: str | int | Sequence[str | int], out: str | Path, *,
        stride: int = 1, batch: int = 4, progress: bool = True, counts: dict[str, int] | None = None
        ) -> dict[str, int]:
    """Run the edge graph over ``sources`` (video files, image folders, webcam index, stream URL) and write records
    (``.jsonl`` or ``.parquet``, see :mod:`yolo_vq_edge.records`).

    Returns counts: ``{"frames": ..., "detections": ..., "bytes": ...}`` (``bytes``: code bytes written), kept up
    to date in ``counts`` where one is given, so a caller knows what was written when Ctrl-C stops the run (the file
    is then closed as a complete records file with the frames so far; any other error deletes it).
    """
    from tqdm import tqdm

    if stride < 1 or batch < 1:
        raise EdgeError(f"stride and batch must be >= 1, got stride={stride}, batch={batch}")
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise EdgeError(f"{out}: records go to a .jsonl or .parquet file, got suffix {out.suffix!r}")
    m = model if isinstance(model, EdgeModel) else EdgeModel(model)
    srcs = [sources] if isinstance(sources, str | int | Path) else list(sources)
    opened = [open_source(s) for s in srcs]  # fail on a bad source before writing anything
    counts = {} if counts is None else counts
    counts.update(frames=0, detections=0, bytes=0)
    header = records_header(m.meta, m.path)
    described = [{"type": "source", "source": k, **s.described()} for k, s in enumerate(opened)]
    writer = None
    try:
        with RecordWriter(out, header, described) as writer:
            for k, src in enumerate(opened):
                total = None if src.frame_count is None else -(-src.frame_count // stride)
                bar = tqdm(total=total, unit="frame", desc=Path(str(src.uri)).name, disable=not progress)
                for chunk in chunks(src.frames(stride=stride), batch):
                    for (i, t, _), d in zip(chunk, m([img for _, _, img in chunk])):
                        writer.frame(_frame_record(k, i, t, d), [c.tobytes() for c in d["codes"]])
                        counts["detections"] += len(d["codes"])
                        counts["bytes"] += d["codes"].nbytes
                    writer.flush()
                    counts["frames"] += len(chunk)
                    bar.update(len(chunk))
                bar.close()
    except Exception:
        if writer is not None:  # refused part-way: no records file that reads as whole (Ctrl-C keeps the frames)
            out.unlink(missing_ok=True)
        raise
    finally:
        for src in opened:
            src.close()
    return counts


