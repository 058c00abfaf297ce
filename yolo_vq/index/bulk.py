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
from contextlib import suppress
from typing import Any

import numpy as np

from ..detections import LIST_ID
from .store import Frame
from .upkeep import ListKeeper, faiss_on_one_thread

__all__ = ["BULK_SYNC_EVERY", "BulkWriter"]

# detections between two syncs of a bulk load: each writes one segment, not merged until the load ends (a 10M load: 10
# segments to search meanwhile; held in memory until synced: ~110 bytes a detection, twice while a sync runs)
BULK_SYNC_EVERY = 1 << 20


class BulkWriter:
    """Store batches of frames of one store, their coarse lists assigned one batch ahead in a worker thread.

    Args:
        store: the writable store.
        codebook: its loaded codebook (no coarse quantizer: stored without lists, searched flat).
        every: detections stored between syncs of the lists (:class:`ListKeeper`: in the background, a sync beside
            the next batches' storing and assignment; segments appended, merged once by the sync :meth:`close` ends
            with).

    ``with BulkWriter(store, codebook) as w: w.add(source_id, frames, vectors=x)``; leaving the block stores the
    last batch and syncs the lists (an exception inside it stores nothing more).
    """

    def __init__(self, store: Any, codebook: Any, *, every: int = BULK_SYNC_EVERY) -> None:
        self.store = store
        self.keeper = ListKeeper(store, codebook, every=every, background=True, defer_merges=True)
        self.stored = 0  # detections inserted so far (frames already stored are skipped)
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="yolo_vq-lists",
                                                                   initializer=faiss_on_one_thread)
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
        """Block until the work handed to the writer so far is done but storing the queued batch: its lists assigned,
        the background sync finished (a caller timing the writer counts all its work; raises that sync's error)."""
        if self._pending is not None and self._pending[2] is not None:
            self._pending[2].result()
        self.keeper.wait()

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
        except BaseException:
            with suppress(Exception):  # the first error is the one to see
                self.keeper.close()
            raise
        finally:
            self._pool.shutdown()
            self._pool = None
        self.keeper.close()
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
            with suppress(Exception):  # the caller's exception is the one to see
                self.keeper.close()
