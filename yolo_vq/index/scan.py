"""Asymmetric-distance (ADC) scan over stored codes: the search engine behind the store.

A :class:`CodeScan` holds ``(ids, codes)`` rows as :meth:`yolo_vq.index.store.Store.codes` gives them and answers k-NN
queries with the exact ADC distance of the quantizer it was built for,
``||query - decode(codes)||^2 == sum_j distance_tables(query)[j, codes[j]]`` (see :mod:`yolo_vq.quant.base`),
on one of two engines:

- ``"faiss"``: a ``faiss.IndexPQ`` holding OUR trained centroids and OUR codes as they are (no re-training, no
  re-encoding). Queries are mapped to the quantized space, ``y = (q - mean) @ transform``, and the query energy
  that PCA drops, ``||q - mean||^2 - ||y||^2``, is added back, so distances equal the quantizer's own.
  ProductQuantizer with ``codebook_size=256`` (8-bit codes) only.
- ``"numpy"``: the quantizer's own distance tables and a chunked gather-sum over the code matrix. Any quantizer
  whose tables hold whole distances (``needs_norms == False``: ProductQuantizer, VectorQuantizer).

Both return the same ranking; distances agree to float32 rounding (~1e-6 relative).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..quant.base import Quantizer
from ..quant.pq import ProductQuantizer
from . import ENGINES

__all__ = ["ENGINES", "CodeScan", "ListScanner"]

_CHUNK_ROWS = 16384  # code rows per gather in the numpy engine (fits the tables and the chunk in cache) ...
_CHUNK_CELLS = 1 << 20  # ... and at most this many (query, row) distances per chunk, so memory stays bounded


class _Rows:
    """A growable row buffer (capacity doubles), so repeated appends cost O(new rows) amortised."""

    def __init__(self, dtype: np.dtype, width: tuple[int, ...] = ()) -> None:
        self._buf = np.empty((0, *width), dtype)
        self.n = 0

    def append(self, rows: np.ndarray) -> None:
        end = self.n + len(rows)
        if end > len(self._buf):
            grown = np.empty((max(end, 2 * len(self._buf), 1024), *self._buf.shape[1:]), self._buf.dtype)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n : end] = rows
        self.n = end

    @property
    def view(self) -> np.ndarray:
        return self._buf[: self.n]


class _NumpyEngine:
    """Distance tables from the quantizer, then ``sum_j tables[:, j, codes[:, j]]`` over chunks of rows."""

    name = "numpy"

    def __init__(self, quantizer: Quantizer) -> None:
        self.quantizer = quantizer
        self.codes = _Rows(np.dtype(_code_dtype(quantizer)), (quantizer.code_len,))

    def add(self, codes: np.ndarray) -> None:
        self.codes.append(codes)

    def search(self, queries: np.ndarray, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        codes = self.codes.view
        if rows is None:
            return self._scan(queries, k, len(codes), lambda s, e: (np.arange(s, e), codes[s:e]))
        return self._scan(queries, k, len(rows), lambda s, e: (rows[s:e], codes[rows[s:e]]))

    def search_codes(self, queries: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest of ``codes`` (n, code_len) rows (not the added ones): distances and row positions."""
        return self._scan(queries, k, len(codes), lambda s, e: (np.arange(s, e), codes[s:e]))

    def _scan(self, queries: np.ndarray, k: int, n: int, chunk: Any) -> tuple[np.ndarray, np.ndarray]:
        q = self.quantizer
        with torch.no_grad():
            tables = q.distance_tables(torch.from_numpy(queries).to(q.device)).cpu().numpy()  # (q, L, K)
        best_d = np.empty((len(queries), 0), np.float32)
        best_p = np.empty((len(queries), 0), np.int64)
        step = min(_CHUNK_ROWS, max(256, _CHUNK_CELLS // len(queries)))
        for s in range(0, n, step):
            pos, c = chunk(s, min(s + step, n))
            d = np.zeros((len(queries), len(c)), np.float32)
            for j in range(c.shape[1]):
                d += np.take(tables[:, j], c[:, j], axis=1)
            best_d = np.concatenate([best_d, d], axis=1)
            best_p = np.concatenate([best_p, np.broadcast_to(pos, d.shape)], axis=1)
            if best_d.shape[1] > k:  # keep the k best so far: memory stays O(q * (k + chunk))
                keep = np.argpartition(best_d, k - 1, axis=1)[:, :k]
                best_d = np.take_along_axis(best_d, keep, 1)
                best_p = np.take_along_axis(best_p, keep, 1)
        order = np.lexsort((best_p, best_d), axis=-1)  # ascending distance, ties by insertion order
        best_d, best_p = np.take_along_axis(best_d, order, 1), np.take_along_axis(best_p, order, 1)
        if best_d.shape[1] < k:  # fewer rows than k: pad as FAISS does
            pad = k - best_d.shape[1]
            best_d = np.pad(best_d, ((0, 0), (0, pad)), constant_values=np.inf)
            best_p = np.pad(best_p, ((0, 0), (0, pad)), constant_values=-1)
        return best_d, best_p


class _FaissEngine:
    """``faiss.IndexPQ(D', m, 8)`` loaded with the quantizer's centroids; rows are added as raw codes.

    ``IndexPQ`` refuses ID selectors (faiss 1.15: "selector not supported"), so a filtered search gathers the
    allowed rows' codes and runs faiss' PQ ADC kernel (``ProductQuantizer.search``) on them only: it scans
    ``len(allowed)`` codes instead of testing all N against a selector.
    """

    name = "faiss"

    def __init__(self, quantizer: ProductQuantizer, faiss: Any) -> None:
        self.faiss = faiss
        # Snapshot of the codebook: the index must not change under the codes already added. The query projection
        # y = (x - mean) @ transform runs in FAISS too (a LinearTransform): a torch matmul in the hot path would wake
        # torch's OpenMP pool, whose spinning threads then compete with FAISS' own for the same cores.
        mean = quantizer.mean.detach().cpu().double().numpy()
        t = quantizer.transform.detach().cpu().double().numpy()  # (D, D')
        d_in, d_out = t.shape
        self.drops_energy = d_out < d_in  # PCA kept D' < D dims
        self.mean = mean
        self.project = None
        if not np.array_equal(t, np.eye(d_in, d_out)) or mean.any():
            self.project = faiss.LinearTransform(d_in, d_out, True)  # y = A x + b
            faiss.copy_array_to_vector(np.ascontiguousarray(t.T, np.float32).ravel(), self.project.A)
            faiss.copy_array_to_vector((-(mean @ t)).astype(np.float32), self.project.b)
            self.project.is_trained = True
        self.index = faiss.IndexPQ(d_out, quantizer.m, 8)  # L2, search_type ST_PQ
        cb = np.ascontiguousarray(quantizer.codebooks.detach().cpu().float().numpy())  # (m, 256, dsub)
        faiss.copy_array_to_vector(cb.ravel(), self.index.pq.centroids)
        self.index.is_trained = True

    def add(self, codes: np.ndarray) -> None:
        self.index.add_sa_codes(np.ascontiguousarray(codes))

    def search(self, queries: np.ndarray, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        index = self.index
        x = np.ascontiguousarray(queries, np.float32)
        yn = x if self.project is None else self.project.apply(x)
        if rows is None:
            dist, pos = index.search(yn, k)
        else:
            all_codes = self.faiss.rev_swig_ptr(index.codes.data(), index.ntotal * index.code_size)  # a view, no copy
            dist, pos = self._adc(yn, all_codes.reshape(index.ntotal, index.code_size)[rows], k)
            pos = np.where(pos >= 0, rows[np.maximum(pos, 0)], -1)
        return self._whole(x, yn, dist), pos

    def search_codes(self, queries: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest of ``codes`` (n, code_size) uint8 rows (not the added ones) to each query: distances and
        row positions in ``codes`` (-1 past the end)."""
        x = np.ascontiguousarray(queries, np.float32)
        yn = x if self.project is None else self.project.apply(x)
        dist, pos = self._adc(yn, codes, k)
        return self._whole(x, yn, dist), pos

    def _adc(self, yn: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS' PQ ADC kernel (``ProductQuantizer.search``) over a code matrix: a heap of ``k`` per query."""
        faiss = self.faiss
        sub = np.ascontiguousarray(codes, np.uint8)
        dist = np.empty((len(yn), k), np.float32)
        pos = np.empty((len(yn), k), np.int64)
        heap = faiss.float_maxheap_array_t()
        heap.nh, heap.k, heap.ids, heap.val = len(yn), k, faiss.swig_ptr(pos), faiss.swig_ptr(dist)
        # one query has nothing to split across threads: an OpenMP team only adds its start and barrier (measured
        # 0.49 -> 0.15 ms over 2,000 codes, 1.8 -> 0.40 ms over 20,000 on 2 cores)
        threads = faiss.omp_get_max_threads()
        if len(yn) == 1 and threads > 1:
            faiss.omp_set_num_threads(1)
        try:
            self.index.pq.search(faiss.swig_ptr(yn), len(yn), faiss.swig_ptr(sub), len(sub), heap, True)
        finally:
            if len(yn) == 1 and threads > 1:
                faiss.omp_set_num_threads(threads)
        return dist, pos

    def list_scanner(self) -> ListScanner:
        return ListScanner(self)

    def _whole(self, x: np.ndarray, yn: np.ndarray, dist: np.ndarray) -> np.ndarray:
        if self.drops_energy:  # as ProductQuantizer.distance_tables: the energy PCA leaves out is part of ||q - x||
            outside = ((x - self.mean) ** 2).sum(1) - (yn.astype(np.float64) ** 2).sum(1)
            dist += np.maximum(outside, 0).astype(np.float32)[:, None]
        return dist


class ListScanner:
    """One query at a time over blocks of stored rows (those a filter kept, gathered from the probed lists; unfiltered
    searches go through :class:`~yolo_vq.index.mapped.MappedIVF`): FAISS' inverted-list scanner of ``IndexIVFPQ`` (``by_residual = False``; the kernel
    ``search_preassigned`` runs on each probed list) on our PQ centroids.

    :meth:`start` computes the query's distance table once; :meth:`scan` runs the kernel over ``n`` rows at raw
    addresses (codes ``n * code_size`` bytes, ids ``n`` int64), keeping the ``k`` best of every block so far in one
    heap; :meth:`result` returns them sorted by (distance, id), as :meth:`CodeScan.search_codes` would over the same
    rows (distances equal up to the summation order of float32 table entries). Not thread-safe: one per thread.
    """

    def __init__(self, engine: _FaissEngine) -> None:
        faiss = engine.faiss
        pq = engine.index.pq
        self.engine, self.code_size = engine, pq.code_size
        self._coarse = faiss.IndexFlatL2(pq.d)  # never searched: the scanner only needs an IVF index around it
        self._ivf = faiss.IndexIVFPQ(self._coarse, pq.d, 1, pq.M, pq.nbits)
        self._ivf.by_residual = False
        self._ivf.pq = pq
        self._ivf.is_trained = True
        self._scanner = self._ivf.get_InvertedListScanner(False, None, None)
        self._u8, self._i64, self._ptr = faiss.cast_integer_to_uint8_ptr, faiss.cast_integer_to_idx_t_ptr, faiss.swig_ptr
        self._x = self._y = None

    def start(self, query: np.ndarray, k: int) -> None:
        """Begin a search for ``query`` (D,) float32 keeping the ``k`` best."""
        self._x = np.ascontiguousarray(query, np.float32).reshape(1, -1)
        e = self.engine
        self._y = self._x if e.project is None else e.project.apply(self._x)
        self._d = np.full(k, np.inf, np.float32)
        self._i = np.full(k, -1, np.int64)
        self._pd, self._pi = self._ptr(self._d), self._ptr(self._i)
        self._scanner.set_query(self._ptr(self._y))
        self._scanner.set_list(0, 0.0)

    def scan(self, n: int, codes_at: int, ids_at: int) -> None:
        """Scan ``n`` rows whose codes start at address ``codes_at`` and ids at ``ids_at`` (``ndarray.ctypes.data``
        plus a byte offset; the arrays must stay alive during the call)."""
        if n > 0:
            self._scanner.scan_codes(n, self._u8(codes_at), self._i64(ids_at), self._pd, self._pi, len(self._d))

    def scan_arrays(self, codes: np.ndarray, ids: np.ndarray) -> None:
        """Scan rows given as arrays: ``codes`` (n, code_size) uint8, ``ids`` (n,) int64."""
        codes, ids = np.ascontiguousarray(codes, np.uint8), np.ascontiguousarray(ids, np.int64)
        self.scan(len(ids), codes.ctypes.data, ids.ctypes.data)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(dist, ids)``, each ``(1, k)``, ascending by (distance, id), padded with ``inf`` / ``-1``."""
        order = np.lexsort((np.where(self._i >= 0, self._i, np.iinfo(np.int64).max), self._d))
        d, i = self._d[order][None], self._i[order][None]
        return self.engine._whole(self._x, self._y, np.where(i >= 0, d, np.inf).astype(np.float32)), i


class CodeScan:
    """k-NN search over stored codes by asymmetric distance (ADC), optionally restricted to a set of ids.

    Args:
        quantizer: a trained quantizer whose tables hold whole distances (``needs_norms == False``):
            :class:`~yolo_vq.quant.ProductQuantizer` or :class:`~yolo_vq.quant.VectorQuantizer`.
        engine: ``"faiss"`` (ProductQuantizer with ``codebook_size=256`` only; needs ``faiss-cpu``), ``"numpy"``
            (any supported quantizer) or ``"auto"`` (faiss when it is installed and supports the quantizer, else
            numpy). The chosen one is in :attr:`engine`.

    The faiss engine copies the codebook when the index is built: build a new index after re-fitting. The numpy
    engine reads the quantizer's tables at every search.

    Example::

        index = CodeScan(pq)
        index.add(*store.codes())                           # later: index.add(*store.codes(after_id=last_id))
        dist, ids = index.search(queries, 10, allowed=ids_of_class_0)
    """

    def __init__(self, quantizer: Quantizer, *, engine: str = "auto") -> None:
        if not isinstance(quantizer, Quantizer):
            raise TypeError(
                f"quantizer must be a trained yolo_vq.quant quantizer (ProductQuantizer, VectorQuantizer), "
                f"got {type(quantizer).__name__}"
            )
        if quantizer.needs_norms:
            raise ValueError(
                f"search supports PQ/VQ codebooks, whose distance tables hold whole distances; "
                f"{type(quantizer).__name__} codes also need a stored norm per vector: train a ProductQuantizer "
                "(or VectorQuantizer) codebook for the searchable codes"
            )
        if not quantizer.fitted:
            raise ValueError(
                f"{type(quantizer).__name__} is not trained: call .fit(x) or load one with "
                "yolo_vq.quant.load_codebook() before building a CodeScan"
            )
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.quantizer = quantizer
        faiss_ok = isinstance(quantizer, ProductQuantizer) and quantizer.codebook_size == 256
        if engine == "faiss" and not faiss_ok:
            raise ValueError(
                f"engine='faiss' supports ProductQuantizer with codebook_size=256 (8-bit codes), got "
                f"{type(quantizer).__name__} with codebook_size={quantizer.codebook_size}: use engine='numpy' "
                "(or 'auto')"
            )
        faiss = _import_faiss(required=engine == "faiss") if engine != "numpy" and faiss_ok else None
        self._engine = _FaissEngine(quantizer, faiss) if faiss is not None else _NumpyEngine(quantizer)
        self._ids = _Rows(np.dtype(np.int64))
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None  # (argsort, sorted ids); None while increasing

    @property
    def engine(self) -> str:
        """``"faiss"`` or ``"numpy"``: the engine in use."""
        return self._engine.name

    @property
    def ids(self) -> np.ndarray:
        """``(N,)`` int64 ids in insertion order (a read-only view)."""
        v = self._ids.view
        v.flags.writeable = False
        return v

    def __len__(self) -> int:
        return self._ids.n

    def __repr__(self) -> str:
        return f"CodeScan({type(self.quantizer).__name__}, engine={self.engine!r}, n={len(self)})"

    # -- adding --------------------------------------------------------------------------------------------------
    def add(self, ids: Any, codes: Any) -> None:
        """Append rows: ``ids`` (N,) non-negative unique integers (int64) and their ``codes``.

        ``codes`` are ``(N, code_len)`` in the quantizer's code dtype (uint8, or uint16 when ``codebook_size >
        256``), numpy or torch, or the store's bytes, ``(N, code_size)`` uint8. Costs O(N) while ids keep
        increasing (as ``Store.codes(after_id=last)`` gives them); once ids came out of order, every add re-sorts
        the id index (O(total log total)). A refused add leaves the index unchanged.
        """
        ids = _ids_array(ids, "ids")
        codes = self._check_codes(codes)
        if len(ids) != len(codes):
            raise ValueError(
                f"ids and codes must have one row each per vector, got {len(ids)} ids and {len(codes)} code rows"
            )
        if len(ids) == 0:
            return
        if ids.min() < 0:
            raise ValueError(f"ids must be >= 0 (-1 marks missing results), got {int(ids.min())}")
        old = self._ids.view
        increasing = self._sorted is None and bool(np.all(ids[1:] > ids[:-1])) and (not len(old) or ids[0] > old[-1])
        index = None
        if not increasing:
            both = np.concatenate([old, ids])
            order = np.argsort(both, kind="stable")
            index = (order, both[order])
            if (dup := index[1][1:][index[1][1:] == index[1][:-1]]).size:
                raise ValueError(
                    f"ids must be unique, got repeated ids {np.unique(dup)[:5].tolist()}: add each row "
                    "once (use Store.codes(after_id=last_id) to fetch only new rows)"
                )
        self._engine.add(codes)
        self._ids.append(ids)
        self._sorted = index

    def _check_codes(self, codes: Any) -> np.ndarray:
        q = self.quantizer
        if isinstance(codes, Tensor):
            codes = codes.detach().cpu().numpy()
        if not isinstance(codes, np.ndarray):
            raise TypeError(f"codes must be a numpy array or torch tensor, got {type(codes).__name__}")
        want = np.dtype(_code_dtype(q))
        if codes.dtype == np.uint8 and want != np.uint8 and codes.ndim == 2 and codes.shape[1] == q.code_size:
            codes = np.ascontiguousarray(codes).view(want)  # the store's bytes, as written by ndarray.tobytes()
        expect = f"(n, {q.code_len}) {want.name} for this {type(q).__name__} (code_size={q.code_size} bytes)"
        if codes.dtype != want:
            raise TypeError(f"codes must be {expect}, got {codes.dtype}: were they encoded with another codebook?")
        if codes.ndim != 2 or codes.shape[1] != q.code_len:
            raise ValueError(
                f"codes must be {expect}, got shape {codes.shape}: were they encoded with another codebook?"
            )
        if q.codebook_size < np.iinfo(want).max + 1 and codes.size and int(codes.max()) >= q.codebook_size:
            raise ValueError(
                f"codes must lie in [0, {q.codebook_size}), got max {int(codes.max())}: were they "
                "encoded with another codebook?"
            )
        return codes

    # -- searching -----------------------------------------------------------------------------------------------
    def search(self, queries: Any, k: int, *, allowed: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest stored rows to each query by ADC distance.

        Args:
            queries: ``(q, dim)`` float, numpy or torch (one query: ``x[None]``).
            k: results per query, >= 1.
            allowed: optional ids to restrict the search to (filters resolved by the caller); ids not in the index
                are ignored.

        Returns:
            ``(distances, ids)``: ``(q, k)`` float32 squared L2 distances ``||query - decode(codes)||^2``,
            ascending, and ``(q, k)`` int64 ids. Rows with fewer than ``k`` candidates are padded with distance
            ``inf`` and id ``-1``.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int (results per query), got {k!r}")
        k = int(k)
        x = _queries(queries, self.quantizer.dim)
        rows = None if allowed is None else self._positions(_ids_array(allowed, "allowed"))
        n = len(self) if rows is None else len(rows)
        dist = np.full((len(x), k), np.inf, np.float32)
        out = np.full((len(x), k), -1, np.int64)
        if n == 0 or len(x) == 0:
            return dist, out
        kk = min(k, n)
        d, pos = self._engine.search(x, kk, None if rows is None or n == len(self) else rows)  # all: no gather
        found = pos >= 0
        dist[:, :kk] = np.where(found, d, np.inf)
        out[:, :kk] = np.where(found, self._ids.view[np.maximum(pos, 0)], -1)
        return dist, out

    def search_codes(self, queries: Any, codes: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest of the given rows (not the added ones): ``codes`` (n, code_size) uint8 (the store's bytes,
        e.g. gathered from the lists a query probes) with their ``ids`` (n,) int64. Same distances, ordering and padding
        as :meth:`search`; the codes are trusted (they come from this index's own files)."""
        x = _queries(queries, self.quantizer.dim)
        dist = np.full((len(x), k), np.inf, np.float32)
        out = np.full((len(x), k), -1, np.int64)
        n = len(ids)
        if n == 0 or len(x) == 0:
            return dist, out
        kk = min(k, n)
        if self._engine.name == "numpy" and codes.dtype == np.uint8 and _code_dtype(self.quantizer) != np.uint8:
            codes = np.ascontiguousarray(codes).view(np.uint16)
        d, pos = self._engine.search_codes(x, codes, kk)
        found = pos >= 0
        dist[:, :kk] = np.where(found, d, np.inf)
        out[:, :kk] = np.where(found, ids[np.maximum(pos, 0)], -1)
        return dist, out

    def list_scanner(self) -> ListScanner | None:
        """A :class:`ListScanner` for scanning stored rows in place (the faiss engine), else None (numpy: gather the
        rows and call :meth:`search_codes`)."""
        return self._engine.list_scanner() if self._engine.name == "faiss" else None

    def _positions(self, allowed: np.ndarray) -> np.ndarray:
        """Sorted unique row positions of the ``allowed`` ids that are in the index."""
        order, sorted_ids = (None, self._ids.view) if self._sorted is None else self._sorted
        at = np.searchsorted(sorted_ids, allowed)
        inside = at < len(sorted_ids)
        at = at[inside][sorted_ids[at[inside]] == allowed[inside]]
        pos = np.sort(at if order is None else order[at])
        return pos[np.r_[True, pos[1:] != pos[:-1]]] if len(pos) else pos  # np.unique: ~20x slower (numpy 2.4)


def _code_dtype(q: Quantizer) -> type:
    return np.uint8 if q.codebook_size <= 256 else np.uint16


def _ids_array(ids: Any, name: str) -> np.ndarray:
    """``ids`` as a 1-D int64 numpy array (from numpy, torch or a sequence of ints)."""
    if isinstance(ids, Tensor):
        ids = ids.detach().cpu().numpy()
    a = np.asarray(ids)
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D array of integer ids, got shape {a.shape} {a.dtype}")
    return a.astype(np.int64, copy=False)


def _queries(x: Any, dim: int) -> np.ndarray:
    """``(q, dim)`` float queries (numpy or torch) as a C-contiguous float32 numpy array on the CPU."""
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy()  # bfloat16 has no numpy dtype
    if not isinstance(x, np.ndarray):
        raise TypeError(f"queries must be a numpy array or torch tensor of shape (q, {dim}), got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"queries must be floating point (q, {dim}), got {x.dtype}: cast them to float32")
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(
            f"queries must be (q, {dim}), got {x.shape}: the index's quantizer was built for dim={dim}; embed the "
            "queries with the same recipe (for one query pass x[None])"
        )
    return np.require(x, np.float32, ["C", "W"])  # writeable: torch.from_numpy warns on read-only arrays


def _import_faiss(*, required: bool) -> Any:
    try:
        import faiss
    except ImportError as e:
        if required:
            raise ImportError("engine='faiss' needs faiss: pip install faiss-cpu (or use engine='numpy')") from e
        return None
    return faiss
