"""The bulk write path: batches of frames stored while the next batch's search lists are assigned on another core.

Storing a detection (SQLite's insert, mostly in C with the GIL released per row) and assigning its coarse list (a
projection and a FAISS search of the centroids, GIL released) are independent, so :class:`BulkWriter` runs them
side by side: ``add(batch k)`` starts the lists of batch k in a worker thread and stores batch k-1, whose lists were
assigned while batch k-2 was stored. On 2 cores this hides most of the assignment (measured by
``benchmarks/search_scale.py``: its build goes through here). The lists are synced as :class:`ListKeeper` does,
from the batches in hand.

A batch is stored one call later than it is given, and an error of its store (a full disk, a read-only index) is
raised by that later call, or by :meth:`BulkWriter.close`; nothing of the failed batch is stored (one transaction).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..detections import LIST_ID
from .store import Frame
from .upkeep import ListKeeper

__all__ = ["BulkWriter"]


def _one_thread() -> None:
    """The worker's FAISS searches run on its own thread only (OpenMP's setting is per thread: the caller's is
    untouched): a second OpenMP thread would compete with the thread storing the batch before, not help it."""
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(1)


class BulkWriter:
    """Store batches of frames of one store, their coarse lists assigned one batch ahead in a worker thread.

    Args:
        store: the writable store.
        codebook: its loaded codebook (no coarse quantizer: stored without lists, searched flat).
        every: detections stored between syncs of the lists (:class:`ListKeeper`).

    ``with BulkWriter(store, codebook) as w: w.add(source_id, frames, vectors=x)``; leaving the block stores the
    last batch and syncs the lists (an exception inside it stores nothing more).
    """

    def __init__(self, store: Any, codebook: Any, **keeper: Any) -> None:
        self.store = store
        self.keeper = ListKeeper(store, codebook, **keeper)
        self.stored = 0  # detections inserted so far (frames already stored are skipped)
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="yolo_vq-lists",
                                                                   initializer=_one_thread)
        self._pending: tuple[int, list[Frame], Future | None] | None = None

    def add(self, source_id: int, frames: list[Frame], *, vectors: np.ndarray | None = None,
            codes: np.ndarray | None = None) -> None:
        """Queue ``frames`` of ``source_id``: their lists are assigned from ``vectors`` ((n, D) float32, the float
        embeddings of the frames' detections in order), else from ``codes`` (decoded), else not at all (lists the
        frames' detections already carry are kept); then the batch queued before is stored. The worker reads
        ``vectors`` / ``codes`` and the frames are stored later: leave them unchanged until the next call."""
        n = sum(len(f.detections) for f in frames)
        for name, given in (("vectors", vectors), ("codes", codes)):
            if given is not None and len(given) != n:
                raise ValueError(f"{len(given)} {name} for the {n} detections of {len(frames)} frames: pass one row "
                                 f"per detection, in the frames' order")
        job = None
        if self.keeper.active and (vectors is not None or codes is not None):
            job = self._pool.submit(self.keeper.assign, vectors=vectors, codes=codes)
        self._finish()
        self._pending = (source_id, frames, job)

    def ready(self) -> None:
        """Block until the queued batch's lists are assigned (a caller timing the writer counts all its work)."""
        if self._pending is not None and self._pending[2] is not None:
            self._pending[2].result()

    def _finish(self) -> None:
        if self._pending is None:
            return
        source_id, frames, job, self._pending = *self._pending, None
        if job is not None:
            lists = job.result()
            at = 0
            for f in frames:
                f.detections.data[LIST_ID] = lists[at:at + len(f.detections)]
                at += len(f.detections)
        ids = self.store.add_frames(source_id, frames)
        self.stored += len(ids)
        self.keeper.stored(source_id, frames, ids)

    def close(self) -> int:
        """Store the last batch and sync the lists; returns the detections inserted in all. Idempotent."""
        if self._pool is None:
            return self.stored
        try:
            self._finish()
            self.keeper.sync()
        finally:
            self._pool.shutdown()
            self._pool = None
        return self.stored

    def __enter__(self) -> BulkWriter:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None:
            self.close()
        elif self._pool is not None:
            self._pending = None
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
