"""Keeping the inverted lists current as detections are stored, and giving an older index its lists.

Writers (the :class:`~yolo_vq.index.indexer.Indexer`, edge ingest) store each detection with its coarse list
(``Detections.data[LIST_ID]``: from the float embedding where there is one, else from the decoded codes) and hand the
stored count to a :class:`ListKeeper`, which moves the stored tail into the on-disk lists (:func:`segments.sync`)
every :data:`SYNC_EVERY` detections and at close. :func:`upgrade` trains a coarse quantizer for an index whose
codebook has none (on its own decoded codes), attaches it to the index's copy of the codebook (its checksum
unchanged) and builds the lists.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .ivf import ListSearch, calibrate, decode_codes, lists_of_codes
from .segments import Lists, rebuild, set_calibration, sync
from .store import Frame, frame_columns

__all__ = ["SYNC_EVERY", "ListKeeper", "UpgradeSummary", "held_rows", "upgrade"]

SYNC_EVERY = 1 << 18  # stored detections between two syncs while indexing (a sync of them: ~16 MB written)
RECALIBRATE_GROWTH = 4  # the default nprobe is measured again once the lists hold this many times the rows it was


def faiss_on_one_thread() -> None:
    """A helper thread's FAISS work runs on that thread only (OpenMP's setting is per thread: the caller's is
    untouched): beside a thread storing detections, a second OpenMP thread would compete with it, not help it."""
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(1)


def sync_lists(store: Any, codebook: Any, **kwargs: Any) -> tuple[Lists, int, str | None]:
    """:func:`segments.sync` with rows stored without a list assigned from their decoded codes, then the default
    nprobe calibrated where the lists are new or have grown :data:`RECALIBRATE_GROWTH`-fold since it was."""
    lists, added, problem = sync(store, codebook.coarse, partial(lists_of_codes, codebook), **kwargs)
    cal = lists.calibration
    if lists.rows and (cal is None or lists.rows >= RECALIBRATE_GROWTH * max(int(cal.get("rows", 0)), 1)):
        lists.manifest["calibration"] = calibration(lists, codebook)
        set_calibration(store, codebook.coarse, lists.manifest["calibration"])
    return lists, added, problem


def calibration(lists: Lists, codebook: Any) -> dict[str, Any]:
    """:func:`ivf.calibrate` on opened ``lists`` of ``codebook``'s codes."""
    from .scan import CodeScan

    return calibrate(ListSearch(lists, codebook.coarse, CodeScan(codebook)), partial(decode_codes, codebook))


class ListKeeper:
    """The lists of one writer's store: ``assign`` lists to new detections, ``stored(n)`` after each commit.

    Does nothing where the codebook has no coarse quantizer (the index is searched flat).

    Args:
        store: the writable store.
        codebook: its loaded codebook (``coarse`` None: no lists).
        every: detections stored between syncs.
        background: run the syncs :meth:`stored` starts in a thread of their own (with a read connection of their
            own to the store), beside the writer's next batches instead of between them; at most one at a time (a
            new one waits for the one before), its error raised by the next :meth:`stored`, :meth:`sync`,
            :meth:`wait` or :meth:`close`. Call :meth:`close` when done.
        defer_merges: the syncs :meth:`stored` starts only append segments; :meth:`sync` merges them (a bulk load:
            each row rewritten once at its end instead of at every sync while its segment is among the newest).
    """

    def __init__(self, store: Any, codebook: Any, *, every: int = SYNC_EVERY, background: bool = False,
                 defer_merges: bool = False) -> None:
        self.store, self.codebook, self.every, self.defer_merges = store, codebook, every, defer_merges
        self.pending = 0
        self.problem: str | None = None  # why the last sync rebuilt the lists (None: extended or new)
        self._held: list[dict[str, np.ndarray]] = []  # the search columns of rows committed since the last sync
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="yolo_vq-sync", initializer=faiss_on_one_thread)
                      if background and self.active else None)
        self._running: Future | None = None  # the background sync in flight
        self._last_id = 0  # the largest id this keeper was told of: a background sync moves none past it
        self._reader: Any = None  # the sync thread's own connection to the store (opened, and closed, there)

    @property
    def active(self) -> bool:
        return self.codebook.coarse is not None

    def assign(self, *, vectors: np.ndarray | None = None, codes: np.ndarray | None = None) -> np.ndarray | None:
        """``(n,)`` int32 lists of new detections from their float ``vectors`` (n, D), else their ``codes``
        (n, code_size) uint8 (decoded first); None where there are no lists."""
        if not self.active:
            return None
        if vectors is not None and len(vectors) and np.shape(vectors)[1] == self.codebook.dim:
            return self.codebook.coarse.assign(vectors)
        if codes is not None:
            return lists_of_codes(self.codebook, codes)
        return None

    def stored(self, source_id: int, frames: Sequence[Frame], ids: np.ndarray) -> None:
        """``frames`` of ``source_id`` were committed, their detections given ``ids`` (what ``Store.add_frames``
        returned): keep their search columns for the next sync, which then writes them without reading them back
        from the store; sync once :attr:`every` have gathered (in the background where the keeper was made so)."""
        self.pending += len(ids)
        if not self.active:
            return
        if len(ids):
            self._last_id = max(self._last_id, int(ids[-1]))
        if rows := held_rows(source_id, frames, ids):
            self._held.append(rows)
        if self.pending >= self.every:
            if self._pool is None and self.defer_merges:
                self.sync(merge=False)
            elif self._pool is None:
                self.sync()
            else:
                self.wait()  # one at a time: the held rows of at most two syncs in memory
                if self.store.get_meta("index_uuid") is None:  # sync's one write to the store: on the writer's own
                    self.store.set_meta("index_uuid", uuid.uuid4().hex)  # connection, not beside its transactions
                held, self._held, self.pending = self._held, [], 0
                self._running = self._pool.submit(self._sync_beside, held, self._last_id)

    def _sync_beside(self, held: list[dict[str, np.ndarray]], until: int) -> int:
        """A sync in the background thread, reading the store through that thread's own connection, of the rows up to
        id ``until`` (those committed meanwhile are held for the next one)."""
        if self._reader is None:
            from .registry import open_store

            self._reader = open_store(self.store.directory, readonly=True)
        _, added, self.problem = sync_lists(self._reader, self.codebook, held=held, merge=not self.defer_merges,
                                            until=until)
        return added

    def wait(self) -> int:
        """Block until the background sync in flight (if any) is done; returns how many detections it moved.

        Raises:
            Exception: that sync's error (e.g. a full disk): its rows stay in ``index.db`` and the next sync moves
                them."""
        running, self._running = self._running, None
        return 0 if running is None else running.result()

    def sync(self, *, merge: bool = True) -> int:
        """Move every committed detection not yet in the lists into them (on the calling thread, after the background
        sync in flight), and merge segments as :func:`segments.sync` does (``merge=False``: append only); returns
        how many moved."""
        if not self.active:
            return 0
        added = self.wait()
        held, self._held, self.pending = self._held, [], 0
        _, more, self.problem = sync_lists(self.store, self.codebook, held=held, merge=merge)
        return added + more

    def close(self) -> None:
        """Wait for the background sync, then end its thread (its store connection closed there). Idempotent; the
        rows not synced yet stay in ``index.db`` (call :meth:`sync` first to move them)."""
        if self._pool is None:
            return
        try:
            self.wait()
        finally:
            if self._reader is not None:
                self._pool.submit(self._reader.close).result()
                self._reader = None
            self._pool.shutdown()
            self._pool = None


def held_rows(source_id: int, frames: Sequence[Frame], ids: np.ndarray) -> dict[str, np.ndarray] | None:
    """The :meth:`Store.rows` columns (``id`` + :data:`ROW_FIELDS`) of committed ``frames`` whose detections got
    ``ids``, as the store would read them back; None where they cannot be told from the batch: some frames were
    skipped as already stored (fewer ids than detections), some detections have no codes (not listed), or the ids
    are not one run (then the sync reads the rows from the store)."""
    c = frame_columns(frames)
    if not len(ids) or len(c["frame"]) != len(ids) or c["codes"] is None or int(ids[-1]) - int(ids[0]) + 1 != len(ids):
        return None
    return {"id": np.asarray(ids, np.int64), "source_id": np.full(len(ids), source_id, np.int64),
            **{k: c[k] for k in ("class_id", "time", "confidence", "track_id", "frame", "list_id", "codes")},
            **{k: c["xyxy"][:, j] for j, k in enumerate(("x1", "y1", "x2", "y2"))}}


class UpgradeSummary(dict):
    """``{"index", "lists", "trained_on", "detections", "seconds", "already"}`` of :func:`upgrade`."""

    def line(self) -> str:
        if self["already"]:
            return (f"{self['index']}: already has {self['lists']} lists; they cover its {self['detections']} "
                    f"detections")
        return (f"{self['index']}: {self['lists']} lists trained on {self['trained_on']} stored detections, "
                f"{self['detections']} detections listed in {self['seconds']:.1f} s")


def upgrade(index: str | Path, *, lists: int | str = "auto", reduced_dim: int = 64, sample: int = 1 << 18,
            seed: int = 0, progress: Callable[[int], None] | None = None) -> UpgradeSummary:
    """Give ``index`` partitioned search: train a coarse quantizer on (a seeded sample of at most ``sample`` of) its
    stored detections' decoded codes, attach it to the index's own codebook and build the lists. An index whose
    codebook already has one only has its lists brought up to date (detections stored with a list keep it: a second
    coarse quantizer would need every list id re-assigned, so there is no re-training in place).

    Raises:
        StoreError: no such index, no detections, read-only.
        ValueError: ``lists`` or ``reduced_dim`` malformed.
    """
    from ..quant import CoarseQuantizer, load_codebook, save_coarse
    from .registry import open_store
    from .store import StoreError

    t0 = time.perf_counter()
    with open_store(index) as st:
        own = st.codebook_path()
        if own is None or st.max_id() == 0:
            raise StoreError(f"{index} holds no detections yet: index a video into it first (lists are trained on "
                             "stored detections)")
        codebook = load_codebook(own)
        already = codebook.coarse is not None
        trained_on = 0
        if not already:
            ids, codes = st.codes()
            rng = np.random.default_rng(seed)
            if len(ids) > sample:
                codes = codes[np.sort(rng.choice(len(ids), sample, replace=False))]
            x = decode_codes(codebook, codes)
            coarse = CoarseQuantizer.fit(x, lists, reduced_dim=reduced_dim, seed=seed)
            trained_on = len(x)
            save_coarse(coarse, own)
            codebook = load_codebook(own)
            rebuild(st, codebook.coarse, partial(lists_of_codes, codebook))
            lst, _, _ = sync_lists(st, codebook, progress=progress)
        else:
            lst, _, _ = sync_lists(st, codebook, progress=progress)
        return UpgradeSummary(index=str(index), lists=codebook.coarse.lists, trained_on=trained_on,
                              detections=lst.rows, seconds=time.perf_counter() - t0, already=already)
