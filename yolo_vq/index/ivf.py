"""Partitioned (IVF) search over the on-disk lists: probe the nearest lists, gather their rows, scan them by ADC.

A query is projected by the coarse quantizer and compared with every list centroid (:meth:`CoarseQuantizer.probe`);
the rows of its ``nprobe`` nearest lists are scanned by ADC over our PQ codes. With FAISS (the default engine) the
probed lists of every segment are scanned where they lie, in one call of FAISS' own IVF-PQ search
(:class:`~yolo_vq.index.mapped.MappedIVF`: ``IndexIVFPQ.search_preassigned``, ``by_residual = False``, on our
centroids, over the segment files mapped as FAISS inverted lists), and a result's row (box, frame, class, ...) is read
from its segment (:meth:`ListSearch.detections`), not looked up in ``index.db``; with numpy the rows are gathered and
scanned with the quantizer's tables (:meth:`CodeScan.search_codes`). Distances are those of the flat scan (up to
float32 summation order); only the set of rows scanned differs, and with ``nprobe >= lists`` it is every row (same
results as the flat scan).

A filter (:class:`~yolo_vq.index.filters.RowFilter`) is tested on the gathered columns before the scan (FAISS' list
kernel, :class:`~yolo_vq.index.scan.ListScanner`, or numpy, over the matching rows only), so a filtered
search returns exactly what a filtered flat scan over the same lists would. A filter that keeps a fraction ``f`` of
the probed rows widens the probe to ``nprobe / f`` lists (at most :data:`MAX_WIDEN` times): the nearest matching rows
lie as far out as the nearest ``1 / f`` times as many rows, and only matching rows are scanned, so the work stays
that of an unfiltered search. When a filter leaves fewer than ``k`` rows, the search widens further (``nprobe``
doubles, up to every list) until it has ``k`` or has seen everything: a selective filter never returns fewer
results than exist.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..detections import Detections
from .filters import RowFilter
from .mapped import MappedIVF, Rows
from .segments import Lists

__all__ = ["CALIBRATION_TARGET", "ListSearch", "calibrate", "decode_codes", "default_nprobe", "lists_of_codes",
           "merge_topk"]

CALIBRATION_TARGET = 0.95  # recall@10 against the flat scan that the default nprobe is calibrated to
CALIBRATION_ROWS = 1 << 20  # above this many rows, nprobe is calibrated within a sample of this many (see calibrate)

_BATCH_ALL = 64  # queries scanned together when every list is probed (one pass over the codes per batch)
MAX_WIDEN = 32  # a filtered search probes at most this many times the lists of an unfiltered one (then: >= k rows)


def decode_codes(codebook: Any, codes: np.ndarray) -> np.ndarray:
    """Stored codes (the store's bytes, (n, code_size) uint8) -> decoded vectors (n, D) float32."""
    import torch

    codes = np.array(codes, copy=True, order="C")  # writable and contiguous: torch shares it
    if codebook.codebook_size > 256:
        codes = codes.view(np.uint16)
    with torch.no_grad():
        return codebook.decode(torch.from_numpy(codes)).numpy()


def lists_of_codes(codebook: Any, codes: np.ndarray, *, chunk: int = 1 << 16) -> np.ndarray:
    """The coarse list of each stored code row (the store's bytes, (n, code_size) uint8), from the decoded vector:
    how rows stored without a list (older indexes, ingested edge records, a coarse quantizer added later) get one.
    ``(n,)`` int32; decodes ``chunk`` rows at a time (a decoded row is D float32)."""
    out = np.empty(len(codes), np.int32)
    for s in range(0, len(codes), chunk):
        out[s : s + chunk] = codebook.coarse.assign(decode_codes(codebook, codes[s : s + chunk]))
    return out


def default_nprobe(lists: int) -> int:
    """The lists a query probes by default: 1/64 of them, at least 16 (never more than there are).

    Measured in ``benchmarks/search_scale.py`` (docs/benchmarks.md): recall@10 vs the flat scan >= 0.95 on the
    replicated vtest/bikes embeddings from 1M to 100M detections."""
    return int(min(lists, max(16, lists // 64)))


class ListSearch:
    """k-NN over ``lists`` (an opened :class:`~yolo_vq.index.segments.Lists`) for the queries of a :class:`CodeScan`.

    Args:
        lists: the memory-mapped segments.
        coarse: the codebook's :class:`~yolo_vq.quant.coarse.CoarseQuantizer` the lists were built with.
        scan: a :class:`~yolo_vq.index.scan.CodeScan` of the same codebook (its engine scans the gathered codes).
    """

    def __init__(self, lists: Lists, coarse: Any, scan: Any) -> None:
        self.lists, self.coarse, self.scan = lists, coarse, scan
        self._rows = lists.rows  # segments never change
        self._scanner = scan.list_scanner()  # FAISS' IVF-PQ list kernel (filtered rows); None: numpy engine
        # unfiltered: every probed list of every segment in one FAISS call, on the files as they lie
        self._mapped = None
        if (self._scanner is not None and lists.segments  # FAISS stacks at least one segment's lists
                and hasattr(self._scanner.engine.faiss, "OnDiskInvertedLists") and hasattr(os, "pread")):  # POSIX
            self._mapped = MappedIVF(self._scanner.engine, lists.segments, lists.lists)

    @property
    def rows(self) -> int:
        return self._rows

    def search(self, queries: np.ndarray, k: int, *, nprobe: int, where: RowFilter | None = None,
               keep: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Rows | None]]:
        """``(dist, ids, slot, rows)``: ``dist``, ``ids`` ``(q, k)`` ascending distance, padded with ``inf`` / ``-1``;
        ``rows[i]``: query ``i``'s result rows as the segments hold them (:class:`Rows`, read once while searching),
        ``slot[i, j]`` the row of result ``j`` there; -1 (and ``rows[i]`` None) where the search did not read them
        (filtered and every-list searches: read them from the store). :meth:`detections` makes the results.

        ``queries`` (q, D) float32; ``nprobe`` >= 1 (``>= lists``: every row). ``keep``: per segment, (rows,) bool,
        the rows to search (a calibration's sample; the probed lists are not widened for it)."""
        nq = len(queries)
        if keep is not None and nprobe >= self.lists.lists:
            raise ValueError("a search of every list over a sample: scan the sample's codes (calibrate does)")
        if not nq or not self.lists.segments or nprobe >= self.lists.lists:
            slot = np.full((nq, k), -1, np.int64)
            if not nq or not self.lists.segments:
                return np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64), slot, [None] * nq
            return *self._all(queries, k, where), slot, [None] * nq
        queries = np.ascontiguousarray(queries, np.float32)
        probed = self.coarse.probe(queries, nprobe)
        if nq == 1:  # the common case, without the batch's arrays
            d, ids, slot, rows = self._one(queries[0], probed[0], k, nprobe, where, keep)
            return d[None], ids[None], slot[None], [rows]
        dist, ids, slot = np.empty((nq, k), np.float32), np.empty((nq, k), np.int64), np.empty((nq, k), np.int64)
        rows = []
        for i, q in enumerate(queries):
            dist[i], ids[i], slot[i], r = self._one(q, probed[i], k, nprobe, where, keep)
            rows.append(r)
        return dist, ids, slot, rows

    def nearest_rows(self, q: np.ndarray, lists: np.ndarray, k: int, p: int) -> tuple[np.ndarray, Rows]:
        """An unfiltered search of one query ``q`` (D,) float32 C-contiguous whose ``p`` nearest lists are ``lists``,
        through the segments' kernel (``self.mapped`` not None): ``(dist, rows)``, ``dist`` (k,) ascending (``inf``
        past the rows found, where the lists hold fewer than ``k`` even after probing more) and the :class:`Rows`
        found, in that order (ties by id, as the flat scan orders them)."""
        n_lists = self.lists.lists
        d, labels, seen = self._mapped.search(q, lists, k)
        while seen is not None and seen < k and p < n_lists:  # fewer rows than asked for: probe more
            p = min(n_lists, 2 * p)
            d, labels, seen = self._mapped.search(q, self.coarse.probe(q[None], p)[0], k)
        n = k if labels[-1] >= 0 else int((labels >= 0).sum())  # the rows found come first
        rows = self._mapped.rows(labels[:n])
        dl = d[:n].tolist()
        if len(set(dl)) < n:  # ties (d ascends: equal values are neighbours) ordered by id, as flat scans
            order = np.lexsort((rows.records["id"], d[:n]))
            d[:n], rows = d[:n][order], rows.take(order)
        return d, rows

    @property
    def mapped(self) -> MappedIVF | None:
        """The segments' one-call kernel (None: FAISS missing or too old, no segments, no ``pread``)."""
        return self._mapped

    def _one(self, q: np.ndarray, lists: np.ndarray, k: int, p: int, where: RowFilter | None,
             keep: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, Rows | None]:
        """:meth:`search` of one query ``q`` (D,) whose ``p`` nearest lists are ``lists``: ``(dist, ids, slot)``,
        (k,) each, and its rows."""
        n_lists = self.lists.lists
        if where is None and keep is None and self._mapped is not None:
            d, rows = self.nearest_rows(q, lists, k, p)
            n = len(rows.records)
            slot = np.arange(k)
            ids = rows.records["id"] if n == k else np.r_[rows.records["id"], np.full(k - n, -1, np.int64)]
            if n < k:
                slot[n:] = -1
            return d, np.ascontiguousarray(ids), slot, rows
        codes, row_ids, kept, seen = self._gather(lists, where, keep)
        if where is not None and seen and kept < seen:
            # A filter keeps a fraction of the rows: the nearest matching rows lie as far out as the nearest
            # 1/fraction times as many rows, so probe that many times more lists (the filter column is read
            # for all of them, codes only for the matching rows: the ADC work stays that of an unfiltered search)
            want = min(n_lists, int(np.ceil(p * min(seen / max(kept, 1), MAX_WIDEN))))
            if want > p:
                p, lists = want, self.coarse.probe(q[None], want)[0]
                codes, row_ids, kept, seen = self._gather(lists, where, keep)
        while kept < k and p < n_lists:  # still fewer matching rows than asked for: probe more
            p = min(n_lists, 2 * p)
            codes, row_ids, kept, seen = self._gather(self.coarse.probe(q[None], p)[0], where, keep)
        if self._scanner is None:
            d, ids = self.scan.search_codes(q[None], codes, row_ids, k)
        else:
            self._scanner.start(q, k)
            self._scanner.scan_arrays(codes, row_ids)
            d, ids = self._scanner.result()
        return d[0], ids[0], np.full(k, -1, np.int64), None

    def detections(self, rows: Rows, slot: np.ndarray | None, **data: np.ndarray) -> Detections:
        """Results from their rows (``rows`` and ``slot`` of :meth:`search`, ``slot`` (n,) all >= 0, or None: every
        row of ``rows`` in order) as :meth:`Store.get` returns them: ``data`` = id, source_id, frame, time, and the
        given ``data`` ((n,) arrays)."""
        if slot is None:
            rec, codes = rows.records, rows.codes
        else:
            rec, codes = rows.records[slot], rows.codes[slot]
        c = np.ascontiguousarray
        return Detections.of_arrays(
            c(rec["xyxy"]), confidence=c(rec["confidence"]), class_id=rec["class_id"].astype(np.int64),
            track_id=rec["track_id"].astype(np.int64), codes=codes,
            data={"id": c(rec["id"]), "source_id": rec["source_id"].astype(np.int64), "frame": c(rec["frame"]),
                  "time": c(rec["time"]), **data})

    def _gather(self, lists: np.ndarray, where: RowFilter | None, keep: list[np.ndarray] | None = None,
                ) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Codes and ids of the rows of ``lists`` in every segment that pass ``where`` (filter columns are read first,
        so only the passing rows' codes are copied out of the memory maps) and ``keep`` (per segment, (rows,) bool),
        how many pass, how many the lists hold."""
        lists = np.sort(lists)  # ascending offsets: the maps are read front to back
        parts_c, parts_i, seen = [], [], 0
        for si, seg in enumerate(self.lists.segments):
            starts, ends = seg.offsets[lists], seg.offsets[lists + 1]
            lens = ends - starts
            total = int(lens.sum())
            if not total:
                continue
            seen += total
            # the rows of every probed list as one index array: each list's start, then consecutive positions
            idx = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(total)
            if where is not None:
                idx = idx[where.mask({c: seg.columns[c][idx] for c in where.columns})]
            if keep is not None:
                idx = idx[keep[si][idx]]
            parts_c.append(seg.codes[idx])
            parts_i.append(seg.ids[idx])
        if not parts_i:
            return np.zeros((0, self.scan.quantizer.code_size), np.uint8), np.zeros(0, np.int64), 0, 0
        codes = parts_c[0] if len(parts_c) == 1 else np.concatenate(parts_c)
        row_ids = parts_i[0] if len(parts_i) == 1 else np.concatenate(parts_i)
        return codes, row_ids, len(row_ids), seen

    def _all(self, queries: np.ndarray, k: int, where: RowFilter | None) -> tuple[np.ndarray, np.ndarray]:
        """Every row: each segment scanned whole (no gather when unfiltered), best ``k`` over the segments."""
        best_d = np.full((len(queries), 0), np.inf, np.float32)
        best_i = np.full((len(queries), 0), -1, np.int64)
        for seg in self.lists.segments:
            codes, row_ids = seg.codes, seg.ids
            if where is not None:
                keep = where.mask({c: seg.columns[c] for c in where.columns})
                codes, row_ids = codes[keep], row_ids[keep]
            for s in range(0, len(queries), _BATCH_ALL):
                d, i = self.scan.search_codes(queries[s : s + _BATCH_ALL], codes, row_ids, k)
                if s == 0:
                    seg_d, seg_i = d, i
                else:
                    seg_d, seg_i = np.concatenate([seg_d, d]), np.concatenate([seg_i, i])
            best_d, best_i = merge_topk(best_d, best_i, seg_d, seg_i, k)
        if best_d.shape[1] < k:
            pad = k - best_d.shape[1]
            best_d = np.pad(best_d, ((0, 0), (0, pad)), constant_values=np.inf)
            best_i = np.pad(best_i, ((0, 0), (0, pad)), constant_values=-1)
        return best_d, best_i


def calibrate(search: ListSearch, decode: Any, *, k: int = 10, target: float = CALIBRATION_TARGET, queries: int = 256,
              sample: int = CALIBRATION_ROWS, seed: int = 0) -> dict[str, Any]:
    """The smallest ``nprobe`` (1, 2, 4, ... lists) whose top-``k`` reaches recall ``target`` against the exact flat
    scan, measured with ``queries`` stored detections (a seeded sample, each searched by its decoded codes, itself
    left out). ``decode(codes)`` -> (n, D) float32.

    Above ``sample`` rows, the recall is measured within a seeded sample of ``sample`` rows (queries drawn from it,
    the ``nprobe`` lists probed as the full search probes them, only the sample's rows scanned; the exact answer: the
    flat scan of the sample's codes): the work stays that of ``sample`` rows however large the index grows, and the
    estimate errs on the safe side (in a sparser set a query's nearest rows lie farther out, in more lists: recall at
    a given ``nprobe`` is lower than over every row; ``benchmarks/search_scale.py`` measures the full recall at the
    ``nprobe`` chosen).

    Returns ``{"nprobe", "recall", "k", "target", "queries", "rows", "sample_rows", "lists", "curve"}`` (curve:
    nprobe -> recall, as measured)."""
    rows, n_lists, segs = search.rows, search.lists.lists, search.lists.segments
    out = {"nprobe": 1, "recall": 1.0, "k": k, "target": target, "queries": 0, "rows": rows,
           "sample_rows": min(rows, sample), "lists": n_lists, "curve": {}}
    if rows <= k:
        return out
    rng = np.random.default_rng(seed)
    keep = None
    if rows > sample:  # the sample: per segment, which of its rows are in
        chosen = np.sort(rng.choice(rows, sample, replace=False))
        keep, start = [], 0
        for seg in segs:
            m = np.zeros(seg.rows, bool)
            m[chosen[(chosen >= start) & (chosen < start + seg.rows)] - start] = True
            keep.append(m)
            start += seg.rows
        pool = chosen
    else:
        pool = np.arange(rows)
    pick = np.sort(rng.choice(pool, min(queries, len(pool)), replace=False))
    codes, own, start = [], [], 0
    for seg in segs:
        at = pick[(pick >= start) & (pick < start + seg.rows)] - start
        codes.append(np.asarray(seg.codes[at]))
        own.append(np.asarray(seg.ids[at]))
        start += seg.rows
    q, own = np.asarray(decode(np.concatenate(codes)), np.float32), np.concatenate(own)

    def top(ids: np.ndarray) -> list[set[int]]:
        return [set([i for i in row.tolist() if i != o and i >= 0][:k]) for row, o in zip(ids, own)]

    if keep is None:
        truth = top(search.search(q, k + 1, nprobe=n_lists)[1])
    else:  # the flat scan of the sample's codes, a segment at a time
        best_d = np.full((len(q), 0), np.inf, np.float32)
        best_i = np.full((len(q), 0), -1, np.int64)
        for seg, m in zip(segs, keep):
            c, i = seg.codes[m], seg.ids[m]
            found = [search.scan.search_codes(q[s : s + _BATCH_ALL], c, i, k + 1) for s in range(0, len(q), _BATCH_ALL)]
            best_d, best_i = merge_topk(best_d, best_i, np.concatenate([f[0] for f in found]),
                                        np.concatenate([f[1] for f in found]), k + 1)
        truth = top(best_i)
    p = 1
    while True:
        got = truth if p >= n_lists else top(search.search(q, k + 1, nprobe=p, keep=keep)[1])
        recall = float(np.mean([len(g & t) / max(len(t), 1) for g, t in zip(got, truth)]))
        out["curve"][str(min(p, n_lists))] = round(recall, 4)
        if recall >= target or p >= n_lists:
            out.update(nprobe=min(p, n_lists), recall=round(recall, 4), queries=len(q))
            return out
        p *= 2


def merge_topk(d1: np.ndarray, i1: np.ndarray, d2: np.ndarray, i2: np.ndarray, k: int,
               *carried: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
    """The ``k`` best of two ``(q, *)`` result sets by (distance, id); missing entries (-1) last. Each of ``carried``
    (a pair of arrays shaped as ``i1`` and ``i2``) is merged in the same order and returned after ``(d, i)``."""
    d, i = np.concatenate([d1, d2], axis=1), np.concatenate([i1, i2], axis=1)
    d = np.where(i >= 0, d, np.inf)
    order = np.lexsort((np.where(i >= 0, i, np.iinfo(np.int64).max), d), axis=-1)[:, :k]
    return tuple(np.take_along_axis(a, order, 1) for a in (d, i, *(np.concatenate(c, axis=1) for c in carried)))
