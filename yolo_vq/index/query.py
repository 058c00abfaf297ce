"""What a search starts from: a stored detection, a stored track, or an image (a region of it, or its first
detection), turned into query vectors for :meth:`Memory.search`, the stored ids to leave out of the results, and
the query's picture for a contact sheet. ``yolo-vq search`` and (later) the web page build their queries here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..detections import FRAME, ID, SCORE, SOURCE_ID, TIME, Detections

if TYPE_CHECKING:
    from .memory import Memory

__all__ = ["Query", "format_rows", "result_rows"]


@dataclass(frozen=True)
class Query:
    """Query vectors with what the search must leave out and what to show as the query.

    Attributes:
        vectors: (q, D) float32 query embeddings (the index's recipe).
        exclude: stored detection ids that are the query itself (not results).
        picture: the query's picture: a (h, w, 3) uint8 BGR crop, or the stored detection to picture, or None.
    """

    vectors: np.ndarray
    exclude: tuple[int, ...] = ()
    picture: np.ndarray | Detections | None = None

    @classmethod
    def detection(cls, memory: Memory, detection_id: int) -> Query:
        """A stored detection: its kept float16 vector, else its track's decoded codes around it, else its own
        (:meth:`Memory.detection_vector`); it is not one of its results."""
        return cls(memory.detection_vector(int(detection_id)), (int(detection_id),),
                   memory.store.get([int(detection_id)]))

    @classmethod
    def track(cls, memory: Memory, source_id: int, track_id: int) -> Query:
        """A stored track: the L2-normalised mean of its vectors; its own detections are not results."""
        vectors = memory.track_vector(source_id, track_id)  # ValueError for an unknown track
        ids = memory.store.track_ids(source_id, track_id)
        return cls(vectors, tuple(int(i) for i in ids), memory.store.get(ids[:1]))

    @classmethod
    def image(cls, memory: Memory, model: Any, image: np.ndarray, *, box: Any = None, imgsz: int = 640) -> Query:
        """A BGR ``image`` (h, w, 3) uint8: the region ``box`` (x1, y1, x2, y2 pixels), else its first detection by
        ``model``, which must be the model the index was built with.

        Raises:
            ValueError: another model than the index's, a box outside the image, no detection in the image.
        """
        from ..features.embedder import Embedder
        from ..viz import crop

        meta = memory.store.get_meta("embedding") or {}
        emb = Embedder(model, meta.get("config"), codebook=memory.codebook)  # its identity head, if any
        if emb.fingerprint != memory.store.get_meta("model_fingerprint"):
            raise ValueError(f"the query model is not the model this index was built with ({meta.get('model')}): "
                             f"pass that model (--model)")
        h, w = image.shape[:2]
        if box is not None:
            boxes = np.asarray(box, dtype=np.float32).reshape(1, 4)
            x1, y1, x2, y2 = boxes[0].tolist()
            if x1 >= w or y1 >= h or x2 <= 0 or y2 <= 0:
                raise ValueError(f"the box {','.join(f'{v:g}' for v in (x1, y1, x2, y2))} lies outside the {w}x{h} "
                                 f"query image: pass x1,y1,x2,y2 inside it")
        else:
            with emb:
                r = model.predict(image, verbose=False, imgsz=imgsz)[0]
            boxes = r.boxes.xyxy.cpu().numpy()
            if len(boxes) == 0:
                raise ValueError("no detections in the query image: pass a box (--crop x1,y1,x2,y2) to search with a "
                                 "region")
        return cls(emb.embed_boxes(image, boxes[:1], imgsz=imgsz), (), crop(image, boxes[0]))


def result_rows(memory: Memory, results: Detections) -> list[dict[str, Any]]:
    """Search results as JSON-ready rows, best first: id, score, source (its path or URL), time, frame, class (name),
    track, confidence, box (x1, y1, x2, y2 in original pixels), and for results by appearance (``per_track``) the
    track's ``track_start`` / ``track_end`` (s): what ``yolo-vq search --json`` prints."""
    sources = {s.id: s.uri for s in memory.store.sources()}
    rows = []
    for i in range(len(results)):
        cls = int(results.class_id[i])
        rows.append({
            "id": int(results.data[ID][i]), "score": round(float(results.data[SCORE][i]), 4),
            "source": sources[int(results.data[SOURCE_ID][i])], "time": round(float(results.data[TIME][i]), 3),
            "frame": int(results.data[FRAME][i]), "class": memory.names.get(cls, str(cls)),
            "track": int(results.track_id[i]), "confidence": round(float(results.confidence[i]), 3),
            "box": [round(float(v), 1) for v in results.xyxy[i]],
        })
        if "track_start" in results.data:  # results by appearance: the track's time span
            rows[-1].update(track_start=round(float(results.data["track_start"][i]), 3),
                            track_end=round(float(results.data["track_end"][i]), 3))
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """:func:`result_rows` as the text table ``yolo-vq search`` prints (rank, score, time, frame, class, track,
    confidence, box, source file name)."""
    from pathlib import Path

    lines = [f"{'rank':>4} {'score':>6} {'time':>8} {'frame':>6} {'class':>10} {'track':>5} {'conf':>5}  box  source"]
    for n, r in enumerate(rows, 1):
        span = f"  (track {r['track_start']:.2f}-{r['track_end']:.2f} s)" if "track_start" in r else ""
        lines.append(f"{n:>4} {r['score']:6.3f} {r['time']:8.2f} {r['frame']:6d} {r['class']:>10} {r['track']:5d} "
                     f"{r['confidence']:5.2f}  {r['box']}  {Path(r['source']).name}{span}")
    return "\n".join(lines)
