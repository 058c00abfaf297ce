"""Edge records -> the store: what ``yolo-vq ingest detections.jsonl|.parquet --index DIR`` does.

The edge file's codebook fingerprint (the sha256 of the codebook tensors baked into the ONNX graph) must be the
index's own; a new index takes its codebook from ``codebook=`` and must match too. Ingesting is idempotent per
(source content, frame), like indexing: a re-run or an overlapping file adds nothing twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .detections import Detections
from .quant.io import codebook_checksum, codebook_paths
from .records import RecordError, read_records
from .store import CODEBOOK_STEM, Frame, Store, StoreError

__all__ = ["IngestSummary", "ingest"]

def _open_index(index: Path, header: dict[str, Any], codebook: str | Path | None) -> Store:
    want = header["codebook_fingerprint"]
    own = index / f"{CODEBOOK_STEM}.json"
    if own.is_file():
        have = codebook_checksum(own)
        if have != want:
            raise StoreError(f"the edge file was encoded with codebook {want[:16]}..., index {index} holds codebook "
                             f"{str(have)[:16]}...: ingest into an index built with the codebook the graph was "
                             f"exported with (or a new directory with --codebook)")
        return Store(index, create=True)
    if codebook is None:
        raise StoreError(f"{index} has no codebook yet: pass the codebook the edge graph was exported with "
                         f"(--codebook), or ingest into an index made by `yolo-vq index`")
    st, js = codebook_paths(codebook)
    if not js.is_file() or not st.is_file():
        raise StoreError(f"codebook {codebook}: {js.name} and {st.name} are both needed")
    if codebook_checksum(js) != want:
        raise StoreError(f"codebook {js} is not the one the edge graph was exported with (fingerprint "
                         f"{str(codebook_checksum(js))[:16]}... vs {want[:16]}...)")
    store = Store(index, create=True)
    store.keep_codebook(codebook, embedding=header.get("embedding"), model_fingerprint=header.get("model_fingerprint"),
                        names=header["names"])
    return store


class IngestSummary(dict):
    """``{"sources", "frames", "skipped_frames", "detections"}`` of one ingest."""

    def line(self) -> str:
        return (f"ingested {self['frames']} frames ({self['skipped_frames']} already stored) from {self['sources']} "
                f"source(s): {self['detections']} detections")


def ingest(path: str | Path, index: str | Path, *, codebook: str | Path | None = None,
           commit_every: int = 256) -> IngestSummary:
    """Add an edge records file (``.jsonl`` or ``.parquet``, see :mod:`yolo_vq.records`) to the index ``index``.

    Raises:
        RecordError: not an edge file, or a malformed record (frames before it are stored; re-running resumes).
        StoreError: codebook mismatch, or a new index without ``codebook``; nothing is written then.
    """
    header, records = read_records(path)
    index = Path(index)
    store = _open_index(index, header, codebook)
    size = int(header["code_size"])
    dtype = np.dtype(header.get("code_dtype", "uint8"))
    width = size // dtype.itemsize
    summary = IngestSummary(sources=0, frames=0, skipped_frames=0, detections=0)
    sources: dict[int, tuple[int, set[int]]] = {}
    pending: list[Frame] = []
    current = None

    def flush() -> None:
        if pending:
            summary["detections"] += store.add_frames(current, pending)
            pending.clear()

    try:
        for rec in records:
            kind = rec.get("type")
            if kind == "source":
                flush()
                s = store.add_source(rec["uri"], rec["fingerprint"], fps=rec.get("fps"),
                                     frame_count=rec.get("frame_count"), width=rec.get("width"),
                                     height=rec.get("height"))
                sources[rec["source"]] = (s.id, set(store.frames_done(s.id).tolist()))
                summary["sources"] += 1
            elif kind == "frame":
                if rec.get("source") not in sources:
                    raise RecordError(f"{path}: frame record for source {rec.get('source')!r} before its source record")
                sid, done = sources[rec["source"]]
                if sid != current:
                    flush()
                    current = sid
                if rec["frame"] in done:
                    summary["skipped_frames"] += 1
                    continue
                pending.append(Frame(rec["frame"], rec["time"], _detections(rec, dtype, width, path)))
                summary["frames"] += 1
                if len(pending) >= commit_every:
                    flush()
            else:
                raise RecordError(f"{path}: unknown record type {kind!r} (expected 'source' or 'frame')")
        flush()
    except (KeyError, TypeError) as e:
        flush()
        raise RecordError(f"{path}: malformed record ({type(e).__name__}: {e}); records before it were stored") from None
    finally:
        store.close()
    return summary


def _detections(rec: dict[str, Any], dtype: np.dtype, width: int, path: Path) -> Detections:
    codes = rec["codes"]
    if any(len(c) != width * dtype.itemsize for c in codes):
        raise RecordError(f"{path}: frame {rec['frame']} has codes of {sorted({len(c) for c in codes})} bytes, the "
                        f"header says {width * dtype.itemsize}")
    arr = np.frombuffer(b"".join(codes), dtype=dtype).reshape(len(codes), width)
    return Detections(np.asarray(rec["xyxy"], np.float32).reshape(-1, 4), rec["confidence"], rec["class_id"],
                      codes=arr)
