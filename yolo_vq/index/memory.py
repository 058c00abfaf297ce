"""An index directory opened for search: the store (read-only), its codebook and the code scan engine."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..detections import Detections
from .store import StoreError, open_store

__all__ = ["Memory"]


def _check_range(time_from: float | None, time_to: float | None) -> None:
    if time_from is not None and time_to is not None and float(time_from) > float(time_to):
        raise ValueError(f"time_from ({time_from}) is after time_to ({time_to}): pass time_from <= time_to "
                         f"(seconds from the start of each source)")


class Memory:
    """Search stored detections by visual similarity.

    The code matrix is loaded once and refreshed incrementally (:meth:`refresh`) as another process indexes.
    Scores are cosine similarities estimated from the ADC distance (embeddings are L2-normalised:
    ``cos = 1 - d / 2``); results come as :class:`Detections` with ``data`` = id, source_id, frame, time, score.

    Args:
        index: the index directory.
        engine: the scan engine, ``"auto"`` (FAISS when installed), ``"faiss"`` or ``"numpy"``.
    """

    def __init__(self, index: str | Path, *, engine: str = "auto"):
        from ..quant import load_codebook
        from .scan import CodeScan

        self.index = Path(index)
        self.store = open_store(self.index, readonly=True)
        try:
            own = self.store.codebook_path()  # verified against index.db's record: CodebookError says how to recover
            if own is None:
                raise StoreError(f"{self.index} has no codebook and no detections yet: index a video into it first")
            self.codebook = load_codebook(own)
            fp = self.store.get_meta("model_fingerprint")
            if self.codebook.meta.get("model_fingerprint") != fp:
                raise StoreError(f"{self.index}: its codebook belongs to model "
                                 f"{self.codebook.meta.get('model_fingerprint')}, the index to {fp}: the index is "
                                 f"inconsistent, re-index it")
            self.names: dict[int, str] = {int(k): v for k, v in (self.store.get_meta("names") or {}).items()}
            self.scan = CodeScan(self.codebook, engine=engine)
            self._cols: dict[str, np.ndarray] = {}  # filterable columns, rows aligned with the scan's ids
            self._last = 0
            self.refresh()
        except BaseException:
            self.store.close()
            raise

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def refresh(self) -> int:
        """Add detections stored since the last refresh to the scan and the filter columns; returns how many."""
        with self.store.snapshot():  # codes and columns of the same rows, while another process indexes
            ids, codes = self.store.codes(after_id=self._last)
            cols = self.store.columns(after_id=self._last) if len(ids) else {}
        if len(ids):
            assert np.array_equal(cols["id"], ids), "codes and columns of one snapshot list the same rows"
            self.scan.add(ids, codes)
            self._cols = {k: np.concatenate([self._cols[k], v]) for k, v in cols.items()} if self._cols else cols
            self._last = int(ids[-1])
        return len(ids)

    # -- queries ---------------------------------------------------------------------------------------------------
    def class_ids(self, names: Sequence[str | int]) -> list[int]:
        """Class names (or ids) -> ids; an unknown name is an error listing the known ones."""
        by_name = {v: k for k, v in self.names.items()}
        out = []
        for n in names:
            if isinstance(n, int) or str(n).isdigit():
                out.append(int(n))
            elif n in by_name:
                out.append(by_name[n])
            else:
                known = ", ".join(sorted(by_name)[:20])
                raise ValueError(f"unknown class {n!r}: this index knows {known}{' ...' if len(by_name) > 20 else ''}")
        return out

    def filter_ids(
        self, *, classes: Sequence[str | int] | None = None, source: int | str | None = None,
        time_from: float | None = None, time_to: float | None = None, min_conf: float | None = None,
    ) -> np.ndarray | None:
        """Ids passing the filters (None when there are none to apply), from in-memory columns (no SQL per query).

        Raises:
            ValueError: an unknown class, ``time_from > time_to``, a non-finite bound.
        """
        _check_range(time_from, time_to)
        for name, v in (("time_from", time_from), ("time_to", time_to), ("min_conf", min_conf)):
            if v is not None and not np.isfinite(float(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not self._cols:
            return None if not (classes or source is not None or time_from is not None or time_to is not None
                                or min_conf is not None) else np.zeros(0, np.int64)
        c, keep = self._cols, None

        def both(m):
            return m if keep is None else keep & m

        if classes:
            keep = both(np.logical_or.reduce([c["class_id"] == k for k in self.class_ids(classes)]))
        if source is not None:
            keep = both(np.isin(c["source_id"], self.source_ids(source)))
        if time_from is not None:
            keep = both(c["time"] >= float(time_from))
        if time_to is not None:
            keep = both(c["time"] <= float(time_to))
        if min_conf is not None:
            keep = both(c["confidence"] >= float(min_conf))
        return None if keep is None else c["id"][keep]

    def source_ids(self, source: int | str) -> list[int]:
        """Ids of the sources a ``source`` filter names: an id, or a part of their path/URL."""
        if isinstance(source, int) or str(source).isdigit():
            return [int(source)]
        return [s.id for s in self.store.sources() if str(source) in s.uri]

    def why_empty(self, *, exclude: Sequence[int] = (), classes: Sequence[str | int] | None = None,
                  source: int | str | None = None, time_from: float | None = None, time_to: float | None = None,
                  min_conf: float | None = None) -> str:
        """Why a search with these filters finds nothing: the first filter that leaves no detection, with what the
        index holds instead (e.g. ``time 60-120 s leaves none: stored times span 0.0-9.96 s``)."""
        c = self._cols
        if not c or not len(c["id"]):
            return f"{self.index} holds no detections yet"
        keep = ~np.isin(c["id"], np.asarray(exclude, np.int64))
        if not keep.any():
            return "the index holds no detection besides the query's own"
        steps = []
        if classes:
            ids = self.class_ids(classes)
            have = sorted({self.names.get(int(k), str(int(k))) for k in np.unique(c["class_id"][keep])})
            steps.append((np.isin(c["class_id"], ids), f"class {', '.join(map(str, classes))}",
                          f"stored classes: {', '.join(have[:20])}"))
        if source is not None:
            listed = ", ".join(f"{s.id} {Path(s.uri).name}" for s in self.store.sources()[:10])
            steps.append((np.isin(c["source_id"], self.source_ids(source)), f"source {source!r}",
                          f"sources: {listed}"))
        if time_from is not None or time_to is not None:
            t = c["time"]
            m = (t >= (-np.inf if time_from is None else float(time_from))) & \
                (t <= (np.inf if time_to is None else float(time_to)))
            lo, hi = float(t[keep].min()), float(t[keep].max())
            steps.append((m, f"time {'' if time_from is None else time_from}-{'' if time_to is None else time_to} s",
                          f"stored times span {lo:.2f}-{hi:.2f} s"))
        if min_conf is not None:
            steps.append((c["confidence"] >= float(min_conf), f"min confidence {min_conf}",
                          f"the highest stored confidence is {float(c['confidence'][keep].max()):.3f}"))
        for m, what, context in steps:
            if not (keep & m).any():
                together = " together with the filters before it" if m.any() else ""
                return f"the filter {what} leaves no detection{together} ({context})"
            keep &= m
        return "no detection matches the filters"

    def vectors_of(self, ids: Sequence[int], *, stored: bool = True) -> np.ndarray:
        """Embeddings of stored detections, (n, D) float32: the kept float16 vectors where the index keeps them
        (``stored``), else decoded from the codes (approximate)."""
        if not (stored and self.store.vector_dim is not None):
            return self.codebook.decode(self.store.get(ids).codes).numpy()
        out, present = self.store.vectors(ids)
        if not present.all():
            missing = np.flatnonzero(~present)
            out[missing] = self.codebook.decode(self.store.get(np.asarray(ids)[missing]).codes).numpy()
        return out

    def track_vector(self, source_id: int, track_id: int) -> np.ndarray:
        """(1, D) mean decoded embedding of a stored track, L2-normalised."""
        ids = self.store.track_ids(source_id, track_id)
        if not len(ids):
            raise ValueError(f"no detections of track {track_id} in source {source_id} of {self.index}")
        v = self.vectors_of(ids).mean(0, keepdims=True)
        return v / max(float(np.linalg.norm(v)), 1e-12)

    # -- pictures --------------------------------------------------------------------------------------------------
    def pictures(self, detections: Detections, *, prefer: str = "video",
                 size: tuple[int, int] = (96, 192)) -> list[np.ndarray]:
        """One (h, w, 3) uint8 BGR picture per stored detection: cut from the source video while it is readable and
        unchanged, else its stored thumbnail (or the nearest one of its track), else a placeholder; ``prefer=
        "thumbs"`` uses thumbnails even where the video is there. See :func:`yolo_vq.index.thumbs.pictures`."""
        from .thumbs import pictures

        return pictures(self.store, detections, prefer=prefer, size=size)

    def contact_sheet(self, results: Detections, query: np.ndarray | Detections | None = None, *,
                      prefer: str = "video", columns: int = 5) -> np.ndarray:
        """A (H, W, 3) uint8 BGR contact sheet of search ``results`` (from :meth:`search`), best first.

        Args:
            results: stored detections with ``data['score']``.
            query: the query's picture, (h, w, 3) uint8 BGR (e.g. ``viz.crop(image, box)``), or one stored
                detection (its picture is found as the results' are), or None (the sheet says "query: not shown").
            prefer: where pictures come from, ``"video"`` or ``"thumbs"`` (see :meth:`pictures`).
            columns: tiles per row.

        Write it with :func:`yolo_vq.viz.write_image`.
        """
        from ..viz import Tile, contact_sheet, placeholder

        tiles = [Tile(img, f"t={t:.1f}s f={f} #{k}", float(s)) for img, t, f, k, s in zip(
            self.pictures(results, prefer=prefer), results.data["time"].tolist(), results.data["frame"].tolist(),
            results.track_id.tolist(), results.data["score"].tolist())]
        if isinstance(query, Detections):
            query = self.pictures(query[:1], prefer=prefer)[0]
        q = Tile(placeholder(text="query: not shown") if query is None else query, "query")
        return contact_sheet(q, tiles, columns=columns, title=f"top {len(tiles)} of {self.store.count()}")

    def search(self, vectors: np.ndarray, k: int = 10, *, exclude: Sequence[int] = (), rerank: int | None = None,
               **filters) -> list[Detections]:
        """Top-``k`` stored detections per query vector (q, D), best first, with ``data['score']``.

        Scores are cosine similarities estimated by ADC over the codes; with ``rerank=K`` (K >= k) the ADC
        shortlist of the K best is re-ranked by exact cosine similarity to the kept float16 vectors (the index
        must keep vectors: ``Indexer(keep_vectors=True)``), and scores are those exact cosines. Filters: see
        :meth:`filter_ids`. ``exclude``: stored ids that are the query itself, never results (unfiltered, the scan
        asks for ``k + len(exclude)`` and drops them). ``k`` larger than what is stored returns what is stored.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if rerank is not None:
            if isinstance(rerank, bool) or not isinstance(rerank, int | np.integer) or rerank < k:
                raise ValueError(f"rerank must be an int >= k ({k}), the shortlist size to re-rank exactly, got "
                                 f"{rerank!r}: e.g. rerank={max(10 * k, 100)}")
            if self.store.vector_dim is None:
                raise StoreError(f"{self.index} keeps no float vectors to re-rank with: index it with --keep-vectors "
                                 "(Indexer(keep_vectors=True)), or search without rerank")
        allowed = self.filter_ids(**filters)
        stored = self._cols.get("id", np.zeros(0, np.int64))
        exclude = np.unique(np.asarray(exclude, dtype=np.int64))
        queries = np.asarray(vectors, dtype=np.float32).reshape(-1, self.codebook.dim)
        if allowed is not None:  # filtered: the excluded ids are simply not allowed
            allowed = np.setdiff1d(allowed, exclude) if len(exclude) else allowed
            pool, extra = len(allowed), 0
        else:  # unfiltered: ask for as many more as are excluded, and drop them (no allowed list of every other id)
            extra = int(np.isin(exclude, stored).sum())
            pool = len(stored) - extra
        # k (and the shortlist) never beyond what is stored: no allocation grows with a huge k
        want = min(int(rerank or k), pool)
        if want > 0:
            dist, ids = self.scan.search(queries, want + extra, allowed=allowed)
        else:
            dist, ids = np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        out = []
        for q, d, i in zip(queries, dist, ids):
            keep = (i >= 0) & ~np.isin(i, exclude) if extra else i >= 0
            keep &= np.cumsum(keep) <= want
            if rerank is None:
                out.append(self.store.get(i[keep]).with_data(score=(1.0 - d[keep] / 2.0).astype(np.float32)))
                continue
            cand = i[keep]
            v = self.vectors_of(cand)  # rows stored before vectors were kept: decoded from their codes
            cos = (v @ q) / np.maximum(np.linalg.norm(v, axis=1) * np.linalg.norm(q), 1e-12)
            top = np.argsort(-cos, kind="stable")[:k]  # ties keep the ADC order
            out.append(self.store.get(cand[top]).with_data(score=cos[top].astype(np.float32)))
        return out
