"""FAISS' IVF-PQ search over the segments as they lie on disk: one kernel call per query for every probed list of
every segment.

Each segment is described to FAISS as a read-only ``OnDiskInvertedLists`` over the segment's own memory map (the
one numpy made when the segment was opened: one map per file, so a page the search touches is mapped once) whose
list ``l`` starts at ``codes_at + offsets[l] * code_size``: our layout is not FAISS' (ids are not next to the codes),
so the lists are described, not rewritten, and searched with ``store_pairs`` (FAISS reports ``(list << 32) |
position in the list`` instead of reading ids). The segments' lists are stacked (``VStackInvertedLists``: list ``l``
of segment ``s`` is list ``s * lists + l``), so one ``search_preassigned`` of an ``IndexIVFPQ`` (``by_residual =
False``, our PQ centroids) scans the ``nprobe`` lists of every segment, as FAISS' own IVF engine does over lists it
holds in RAM. Nothing is copied.

A result's row is read where it lies: its codes from the map (the kernel has just read them), its 54-byte
:data:`~yolo_vq.index.segments.RECORD` with ``pread`` (a page touched through a map is mapped whole large folio at a
time, ~200 KB a random touch on this machine's kernel: ten results a query would map gigabytes over a day of
queries; read, it stays in the page cache only).
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

import numpy as np

from .segments import RECORD, ListsProblem, Segment

__all__ = ["MappedIVF", "Rows"]

_POSITION = (1 << 32) - 1  # the low 32 bits of a store_pairs label: the position in the list


class Rows:
    """Result rows read from the segments: ``records`` (n,) :data:`RECORD` and ``codes`` (n, code_size) uint8."""

    __slots__ = ("codes", "records")

    def __init__(self, records: np.ndarray, codes: np.ndarray) -> None:
        self.records, self.codes = records, codes

    def take(self, order: np.ndarray) -> Rows:
        """These rows in the order ``order`` ((n,) int, positions)."""
        return Rows(self.records[order], self.codes[order])


class MappedIVF:
    """The probed lists of every segment of ``segments``, scanned in one FAISS call per query.

    Args:
        engine: the FAISS engine of the index's :class:`~yolo_vq.index.scan.CodeScan` (its PQ centroids, its query
            projection and the energy PCA drops).
        segments: the opened segments (FAISS reads their maps; records are read from the same files, checked by
            device and inode, so a file a writer replaced meanwhile is refused, not read).
        lists: lists per segment.

    At least one segment (FAISS stacks no fewer lists; :class:`~yolo_vq.index.ivf.ListSearch` answers lists without
    segments itself).

    Raises:
        ListsProblem: a segment file changed or vanished since it was opened (open the lists again).
    """

    def __init__(self, engine: Any, segments: list[Segment], lists: int) -> None:
        faiss = engine.faiss
        pq = engine.index.pq
        self.engine, self.lists, self.segments = engine, lists, segments
        self._fds: list[int] = []
        self._ils: list[Any] = []
        for seg in segments:  # first the files (may raise), then the lists on their maps
            self._fds.append(self._open_file(seg))
        for seg in segments:
            self._ils.append(self._lists_of(faiss, seg, pq.code_size))
        vec = faiss.InvertedListsPtrVector()
        for il in self._ils:
            vec.push_back(il)
        self._stack = faiss.VStackInvertedLists(len(self._ils), vec.data())
        self._coarse = faiss.IndexFlatL2(pq.d)  # never searched: the probe is ours (CoarseQuantizer.probe)
        self._ivf = faiss.IndexIVFPQ(self._coarse, pq.d, len(segments) * lists, pq.M, pq.nbits)
        self._ivf.by_residual = False
        self._ivf.pq = pq
        self._ivf.is_trained = True
        self._ivf.replace_invlists(self._stack, False)  # not owned: self._stack and self._ils outlive every search
        self._ivf.ntotal = sum(s.rows for s in segments)
        self._base = np.arange(len(segments), dtype=np.int64)[:, None] * lists  # (segments, 1) first list of each
        self._one_segment = len(segments) == 1
        # per stacked list: its rows, and its first row's position in its segment (Python ints, for rows())
        self._sizes = np.concatenate([np.diff(s.offsets) for s in segments])
        self._first_row = np.concatenate([s.offsets[:-1] for s in segments]).tolist()
        self._codes_at = [int(s.codes_at) for s in segments]
        self._records_at = [int(s.records_at) for s in segments]
        self._code_size = pq.code_size
        self._maps = [memoryview(s.mapped) for s in segments]
        self._ptr = faiss._swigfaiss.swig_ptr  # past the Python wrappers: one query is ~0.1 ms, each call counts
        self._kernel = faiss._swigfaiss.IndexIVF_search_preassigned
        self._nprobe = 0  # the IVF's nprobe (a SWIG attribute: set only when it changes, ~10 us a set)
        # nprobe and the keys it reads are set and used together: two threads must not interleave them (the kernel
        # would read past a shorter query's keys)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        # the lists point into numpy's maps: detach them before FAISS' destructor would munmap what it did not map
        for il in getattr(self, "_ils", ()):
            il.ptr = None
        for fd in getattr(self, "_fds", ()):
            try:
                os.close(fd)
            except OSError:
                pass

    @staticmethod
    def _open_file(seg: Segment) -> int:
        fd = os.open(seg.path, os.O_RDONLY)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != seg.file_id:
            os.close(fd)
            raise ListsProblem(f"{seg.path.name} was replaced since it was opened")
        return fd

    @staticmethod
    def _lists_of(faiss: Any, seg: Segment, code_size: int) -> Any:
        """``seg``'s lists as a read-only ``OnDiskInvertedLists`` on its map: list ``l`` is ``offsets[l + 1] -
        offsets[l]`` codes at byte ``codes_at + offsets[l] * code_size``. Made by its Python constructor (one made by
        FAISS' reader, ``read_InvertedLists``, corrupts the heap when Python frees it: faiss-cpu 1.15.1), its list
        table written in place (``OnDiskOneList`` is three size_t: size, capacity, offset) and ``ptr`` set to the map
        (never mapped by FAISS itself: ``__del__`` detaches it)."""
        sizes = np.diff(seg.offsets).astype(np.uint64)
        table = np.ascontiguousarray(np.stack([sizes, sizes, seg.codes_at + seg.offsets[:-1].astype(np.uint64)
                                               * np.uint64(code_size)], 1), np.uint64)
        il = faiss.OnDiskInvertedLists()
        il.nlist, il.code_size, il.read_only = len(sizes), code_size, True
        il.lists.resize(len(sizes))
        if len(sizes):
            ctypes.memmove(int(il.lists.data().this), table.ctypes.data, table.nbytes)
        il.totsize = len(seg.mapped)
        il.ptr = faiss.swig_ptr(seg.mapped)
        return il

    def rows(self, labels: np.ndarray) -> Rows:
        """The rows of the kernel's ``labels`` ((n,) ``stacked list << 32 | position in the list``, all >= 0), in
        order: records read with ``pread``, codes sliced from the map (the kernel has just read them). A few rows:
        Python's byte slices and integers beat numpy's per-call cost here (~17 us for 10 rows, 5 of them the
        ``pread`` calls; per-list offsets as numpy arrays, indexed per row or vectorised: ~24 us)."""
        cs, size, lists, fds = self._code_size, RECORD.itemsize, self.lists, self._fds
        maps, first, codes_at, records_at = self._maps, self._first_row, self._codes_at, self._records_at
        codes, records = [], []
        for label in labels.tolist():
            stacked, j = label >> 32, label & _POSITION
            s, row = stacked // lists, first[stacked] + j  # its segment, and its row there
            at = codes_at[s] + row * cs
            codes.append(maps[s][at : at + cs])
            records.append(os.pread(fds[s], size, records_at[s] + row * size))
        return Rows(np.frombuffer(b"".join(records), RECORD), np.frombuffer(b"".join(codes), np.uint8).reshape(-1, cs))

    def search(self, query: np.ndarray, lists: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int | None]:
        """The ``k`` best rows of ``lists`` (a query's probed lists, (p,) int64) in every segment for ``query`` (D,)
        float32 C-contiguous: ``(dist, labels)``, each ``(k,)`` ascending by distance, ``labels`` = ``stacked list
        (segment * lists + list) << 32 | position in the list`` (what :meth:`rows` reads), padded with ``inf`` / -1;
        and how many rows the lists hold where that is fewer than ``k`` (else None: counting them is left out of the
        common case)."""
        e = self.engine
        x = query.reshape(1, -1)
        y = x if e.project is None else e.project.apply(x)
        # (1, segments * p) int64, C-contiguous: one segment's are the lists themselves
        keys = (lists.reshape(1, -1) if self._one_segment and lists.dtype == np.int64 and lists.flags.c_contiguous
                else (self._base + lists).reshape(1, -1))
        d = np.empty(k, np.float32)
        label = np.empty(k, np.int64)
        ptr = self._ptr
        with self._lock:
            if keys.shape[1] != self._nprobe:
                self._ivf.nprobe = self._nprobe = keys.shape[1]
                self._dq = np.zeros(keys.shape, np.float32)  # the probed lists' distances: unused by a non-residual PQ
            self._kernel(self._ivf, 1, ptr(y), k, ptr(keys), ptr(self._dq), ptr(d), ptr(label), True)
        seen = None
        if label[-1] < 0:  # fewer than k rows in the probed lists (-1 past the rows found)
            d[label < 0] = np.inf
            seen = int(self._sizes[keys].sum())
        if e.drops_energy:
            d = e._whole(x, y, d[None])[0]
        return d, label, seen
