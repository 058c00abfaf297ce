"""Search filters as one predicate over per-row columns, applied the same way to every place rows live.

A :class:`RowFilter` is resolved once per search (class names -> ids, source names -> ids, bounds checked) and then
tests column arrays: the in-memory columns of a flat scan, the tail of stored detections not yet in the on-disk lists,
and the columns of the lists a partitioned search gathers. One predicate, so a filtered partitioned search and a
filtered flat scan agree row for row.

Columns (numpy, one entry per row): ``class_id``, ``source_id``, ``time`` (float, seconds), ``confidence``, ``track_id``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RowFilter"]


@dataclass(frozen=True)
class RowFilter:
    """Resolved filters; ``None`` fields do not filter.

    Attributes:
        classes: class ids to keep.
        sources: source ids to keep.
        time_from, time_to: inclusive bounds on ``time`` (seconds from the start of each source).
        min_conf: lowest confidence kept.
        track: ``(source_id, track_id)``: only the detections of that stored track.
    """

    classes: tuple[int, ...] | None = None
    sources: tuple[int, ...] | None = None
    time_from: float | None = None
    time_to: float | None = None
    min_conf: float | None = None
    track: tuple[int, int] | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns :meth:`mask` reads."""
        out = []
        if self.classes is not None:
            out.append("class_id")
        if self.sources is not None or self.track is not None:
            out.append("source_id")
        if self.time_from is not None or self.time_to is not None:
            out.append("time")
        if self.min_conf is not None:
            out.append("confidence")
        if self.track is not None:
            out.append("track_id")
        return tuple(out)

    def parts(self, cols: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
        """Each filter's own ``(n,)`` bool mask over ``cols``, named ``"classes"``, ``"source"``, ``"time"``,
        ``"min_conf"``, ``"track"`` (those set, in that order): :meth:`mask` is their AND, and a search that finds
        nothing names the first that leaves no row (``Memory.why_empty``)."""
        out = []
        if self.classes is not None:
            out.append(("classes", np.isin(cols["class_id"], np.asarray(self.classes, np.int64))))
        if self.sources is not None:
            out.append(("source", np.isin(cols["source_id"], np.asarray(self.sources, np.int64))))
        if self.time_from is not None or self.time_to is not None:
            t = cols["time"]
            m = t >= self.time_from if self.time_from is not None else np.ones(len(t), bool)
            if self.time_to is not None:
                m &= t <= self.time_to
            out.append(("time", m))
        if self.min_conf is not None:
            out.append(("min_conf", cols["confidence"] >= self.min_conf))
        if self.track is not None:
            out.append(("track", (cols["source_id"] == self.track[0]) & (cols["track_id"] == self.track[1])))
        return out

    def mask(self, cols: dict[str, np.ndarray]) -> np.ndarray:
        """``(n,)`` bool: the rows of ``cols`` (arrays of n rows holding at least :attr:`columns`) that pass."""
        n = len(next(iter(cols.values()))) if cols else 0
        keep = np.ones(n, bool)
        for _, m in self.parts(cols):
            keep &= m
        return keep
