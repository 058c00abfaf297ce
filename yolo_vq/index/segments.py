"""The on-disk inverted lists of partitioned search: ``<index>/ivf/``, derived from ``index.db`` and rebuilt from it.

Layout::

    ivf/manifest.json      what is searchable: segments, lists, high_water (the last detection id they cover),
                           index_uuid, codebook + coarse sha256; replaced atomically (temp file, fsync, rename)
    ivf/seg-<n>.ivf        one immutable segment: a JSON header, then column arrays in list order
    ivf/lock               locked by the one process writing (sync, merge, rebuild)

A segment holds the detections ``first_id..last_id`` (those with codes) sorted by coarse list, then by id:
``offsets`` (lists + 1,) int64 (list ``l`` is rows ``offsets[l]:offsets[l + 1]``), then per row ``id`` int64,
``codes`` (code_size,) uint8, ``class_id`` int16, ``source_id`` int32, ``time`` float64, ``confidence`` float32,
``track_id`` int32 (the filters' columns, each one contiguous: a filter reads only its own), then ``row``, one packed
:data:`RECORD` per detection with everything a search result shows (id, source, frame, time, box, class,
confidence, track: a result is one read from the segment, no lookup in ``index.db``): 116 bytes per detection for
32-byte codes. Readers memory-map segments (opening reads headers
only); nothing is ever modified in place, so a reader never sees a half-written segment.

Crash consistency: ``index.db`` is the truth. A segment becomes searchable only when a manifest naming it is renamed
into place, after the segment file is fsync'ed; a process killed at any moment leaves the old manifest (and maybe a
stray file, removed by the next writer). Detections stored after ``high_water`` (the *tail*) are read from
``index.db`` by the search and searched flat until :func:`sync` moves them into a segment. At open,
:func:`open_lists` checks the manifest against the database (same index, codebook and coarse quantizer; high_water
not beyond the database's last id; the first and last covered detections present with the same codes); anything
else is reported as a :class:`ListsProblem` and the caller rebuilds from ``index.db`` (:func:`rebuild`), with a
message, or searches flat.

Growth: each sync writes one segment; then, while the newest segment holds at least a quarter of the rows of the one
before it, the two are merged (list by list, streaming from the memory maps; a cascade of such merges is done in one
pass). Segment sizes thus fall geometrically (at most ``log4(N / sync size)`` + 1 segments) and each row is
rewritten O(log N) times. A bulk load syncs without merging and merges once at its end (``sync(merge=False)``).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError

__all__ = ["DIR_NAME", "Lists", "ListsProblem", "Segment", "open_lists", "rebuild", "set_calibration", "sync",
           "write_segment"]

DIR_NAME = "ivf"
MANIFEST = "manifest.json"
FORMAT = 2  # 1: no result rows (RECORD); refused, rebuilt from index.db by the next writer
_MAGIC = b"YVQIVF01"
_ALIGN = 64
SYNC_BATCH = 1 << 22  # rows read from the store per segment written (bounds a sync's memory: ~4M x 150 B)
COLUMNS: dict[str, str] = {  # per-row columns after the codes, with their on-disk dtype
    "class_id": "<i2", "source_id": "<i4", "time": "<f8", "confidence": "<f4", "track_id": "<i4",
}
# a result's row, packed (54 bytes): what Store.get returns for a detection, but its codes
RECORD = np.dtype([("id", "<i8"), ("source_id", "<i4"), ("frame", "<i8"), ("time", "<f8"), ("xyxy", "<f4", (4,)),
                   ("class_id", "<i2"), ("confidence", "<f4"), ("track_id", "<i4")])


class ListsProblem(Exception):
    """The search structure cannot be used as it is (missing, damaged, foreign or stale): rebuild it."""


@dataclass(frozen=True)
class Segment:
    """One memory-mapped segment: ``offsets`` (lists + 1,), ``ids`` (n,), ``codes`` (n, code_size) and the
    :data:`COLUMNS` arrays and the :data:`RECORD` rows, all read-only views of the file."""

    path: Path
    offsets: np.ndarray
    ids: np.ndarray
    codes: np.ndarray
    columns: dict[str, np.ndarray]
    records: np.ndarray  # (n,) RECORD
    mapped: np.ndarray  # the whole file, (size,) uint8: the map every array above is a view of
    records_at: int  # byte offset of ``records`` in the file
    codes_at: int  # byte offset of ``codes`` in the file (list ``l``'s codes: ``codes_at + offsets[l] * code_size``)
    file_id: tuple[int, int]  # (st_dev, st_ino) of the file mapped: a reopen by name can tell it is the same

    @property
    def rows(self) -> int:
        return len(self.ids)

    def column(self, name: str) -> np.ndarray:
        return (self.ids if name == "id" else self.codes if name == "codes" else self.records if name == "row"
                else self.columns[name])


def _layout(rows: int, lists: int, code_size: int) -> list[tuple[str, str, tuple[int, ...]]]:
    return [("offsets", "<i8", (lists + 1,)), ("id", "<i8", (rows,)), ("codes", "u1", (rows, code_size)),
            *((name, dt, (rows,)) for name, dt in COLUMNS.items()), ("row", "record", (rows,))]


def _dtype(name: str) -> np.dtype:
    return RECORD if name == "record" else np.dtype(name)


def _header(rows: int, lists: int, code_size: int, first_id: int, last_id: int) -> tuple[bytes, dict[str, int]]:
    arrays, at = {}, 0
    spec = _layout(rows, lists, code_size)
    for name, dt, shape in spec:
        arrays[name] = at
        at += int(_dtype(dt).itemsize * np.prod(shape))
        at = -(-at // _ALIGN) * _ALIGN
    head = {"format": FORMAT, "rows": rows, "lists": lists, "code_size": code_size, "first_id": first_id,
            "last_id": last_id, "arrays": {n: [dt, list(sh), arrays[n]] for n, dt, sh in spec}, "bytes": at}
    blob = json.dumps(head, sort_keys=True).encode()
    size = -(-(len(_MAGIC) + 8 + len(blob)) // _ALIGN) * _ALIGN
    return _MAGIC + size.to_bytes(8, "little") + blob.ljust(size - len(_MAGIC) - 8), {"data": size, "bytes": at}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, rows: int, lists: int, code_size: int, first_id: int, last_id: int,
           fill: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Create ``path`` (via a temporary name, fsync'ed) and let ``fill`` write the arrays of its memory map."""
    head, at = _header(rows, lists, code_size, first_id, last_id)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(head)
        f.truncate(at["data"] + at["bytes"])
    mm = np.memmap(tmp, np.uint8, "r+")
    try:
        views = _views(mm, json.loads(head[16:].decode()), at["data"])
        fill(views)
        mm.flush()
    finally:
        del mm
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _views(buf: np.ndarray, head: dict[str, Any], data: int) -> dict[str, np.ndarray]:
    out = {}
    for name, (dt, shape, at) in head["arrays"].items():
        n = int(_dtype(dt).itemsize * np.prod(shape))
        out[name] = buf[data + at : data + at + n].view(_dtype(dt)).reshape(shape)
    return out


def write_segment(path: Path, rows: dict[str, np.ndarray], lists: int) -> Segment:
    """Write the detections ``rows`` (:meth:`Store.rows` arrays, ``list_id`` all in ``[0, lists)``) as one
    segment file sorted by list, then id; returns it opened."""
    lid = rows["list_id"]
    if len(lid) and (lid.min() < 0 or lid.max() >= lists):
        raise ValueError(f"list ids must lie in [0, {lists}), got {int(lid.min())}..{int(lid.max())}")
    for name, dt in COLUMNS.items():
        info = np.iinfo(dt) if np.dtype(dt).kind == "i" else None
        v = rows[name]
        if info is not None and len(v) and (v.min() < info.min or v.max() > info.max):
            raise StoreError(f"{name} values {int(v.min())}..{int(v.max())} do not fit the search structure's {dt}")
    order = np.lexsort((rows["id"], lid))
    n, code_size = len(order), rows["codes"].shape[1]
    ids = rows["id"]

    def fill(v: dict[str, np.ndarray]) -> None:
        v["offsets"][:] = np.r_[0, np.cumsum(np.bincount(lid, minlength=lists))]
        v["id"][:] = ids[order]
        v["codes"][:] = rows["codes"][order]
        for name in COLUMNS:
            v[name][:] = rows[name][order]
        rec = v["row"]
        for name in RECORD.names:
            if name != "xyxy":
                rec[name] = rows[name][order]
        rec["xyxy"] = np.stack([rows[c][order] for c in ("x1", "y1", "x2", "y2")], 1)

    _write(path, n, lists, code_size, int(ids.min()) if n else 0, int(ids.max()) if n else 0, fill)
    return _open_segment(path, lists, code_size)


def _open_segment(path: Path, lists: int, code_size: int) -> Segment:
    try:
        with open(path, "rb") as f:  # one open file: the header read and the map are of the same file
            st = os.fstat(f.fileno())
            magic, hlen = f.read(8), int.from_bytes(f.read(8), "little")
            if magic != _MAGIC or not 16 <= hlen <= min(st.st_size, 1 << 20):
                raise ListsProblem(f"{path.name} is not a search segment")
            head = json.loads(f.read(hlen - 16).decode())
            if head.get("format") != FORMAT or head.get("lists") != lists or head.get("code_size") != code_size:
                raise ListsProblem(f"{path.name} was written for another structure ({head.get('lists')} lists, "
                                   f"{head.get('code_size')}-byte codes)")
            if st.st_size != hlen + head["bytes"]:
                raise ListsProblem(f"{path.name} is truncated ({st.st_size} bytes, its header says "
                                   f"{hlen + head['bytes']})")
            if missing := sorted({"offsets", "id", "codes", "row", *COLUMNS} - set(head["arrays"])):
                raise ListsProblem(f"{path.name} has no {', '.join(missing)} (another layout of the search lists)")
            # plain ndarray views of the map (np.memmap's own __getitem__ costs ~20 us a slice on the search path)
            whole = np.memmap(f, np.uint8, "r").view(np.ndarray)
            v = {k: a.view(np.ndarray) for k, a in _views(whole, head, hlen).items()}
            codes_at, records_at = (hlen + int(head["arrays"][k][2]) for k in ("codes", "row"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ListsProblem(f"{path.name} is unreadable ({type(e).__name__}: {e})") from None
    off = v.pop("offsets")
    if off[0] != 0 or off[-1] != head["rows"] or np.any(np.diff(off) < 0):
        raise ListsProblem(f"{path.name} has damaged list offsets")
    return Segment(path, off, v.pop("id"), v.pop("codes"), v, v.pop("row"), whole, records_at, codes_at,
                   (st.st_dev, st.st_ino))


# -- the manifest ----------------------------------------------------------------------------------------------------
@dataclass
class Lists:
    """An opened search structure: its manifest and memory-mapped segments (newest last)."""

    folder: Path
    manifest: dict[str, Any]
    segments: list[Segment]

    @property
    def high_water(self) -> int:
        return int(self.manifest["high_water"])

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)

    @property
    def lists(self) -> int:
        return int(self.manifest["lists"])

    @property
    def bytes(self) -> int:
        return sum(s.path.stat().st_size for s in self.segments)

    @property
    def calibration(self) -> dict[str, Any] | None:
        """What :func:`set_calibration` recorded (``nprobe``, ``recall``, ``rows``, ...), or None."""
        c = self.manifest.get("calibration")
        return c if isinstance(c, dict) and isinstance(c.get("nprobe"), int) and c["nprobe"] >= 1 else None


def _identity(store: Any, coarse: Any) -> dict[str, Any]:
    return {"index_uuid": store.get_meta("index_uuid"), "codebook_sha256": store.codebook_sha256,
            "coarse_sha256": coarse.sha256, "lists": coarse.lists, "code_size": store.get_meta("code_size")}


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise ListsProblem(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise ListsProblem(f"{path} is unreadable ({type(e).__name__})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("segments"), list):
        raise ListsProblem(f"{path} is not a manifest of this version")
    return m


def open_lists(store: Any, coarse: Any, *, check: bool = True) -> Lists:
    """Open ``<index>/ivf`` for search and check it against ``store`` (see the module docstring).

    Raises:
        ListsProblem: what is wrong with it (the caller rebuilds or searches flat).
    """
    folder = Path(store.directory) / DIR_NAME
    for _ in range(5):  # a merge may delete a segment between reading the manifest and opening it: read again
        m = _read_manifest(folder)
        want = _identity(store, coarse)
        if want["index_uuid"] is None:
            raise ListsProblem("the index has no index_uuid yet (made before partitioned search)")
        for key, value in want.items():
            # the code size is unknown until rows with codes are stored: a manifest of no segments may say 0
            unknown = key == "code_size" and (value is None or (m.get(key) == 0 and not m["segments"]))
            if m.get(key) != value and not unknown:
                raise ListsProblem(f"it belongs to another {key.replace('_', ' ')} ({m.get(key)!r}, the index has "
                                   f"{value!r})")
        try:
            segs = [_open_segment(folder / s["file"], m["lists"], m["code_size"]) for s in m["segments"]]
        except ListsProblem:
            if all((folder / s["file"]).exists() for s in m["segments"]):
                raise
            continue
        break
    else:
        raise ListsProblem("its segments keep changing under the reader")
    for s, listed in zip(segs, m["segments"]):
        if s.rows != listed.get("rows"):
            raise ListsProblem(f"{s.path.name} holds {s.rows} rows, the manifest says {listed.get('rows')}")
    lists = Lists(folder, m, segs)
    if check:
        _check_against(store, lists)
    return lists


def _check_against(store: Any, lists: Lists) -> None:
    """Cheap agreement checks with the database: its last id, and the codes of each segment's first and last rows
    (by position: finding a segment's smallest id would read all its ids, ~8 bytes a detection at every open)."""
    last = store.max_id()
    if lists.high_water > last:
        raise ListsProblem(f"it covers detections up to id {lists.high_water}, the database ends at id {last} "
                           "(the database was restored or replaced)")
    probes = []
    for s in lists.segments:
        if s.rows:
            for at in (0, s.rows - 1):
                probes.append((int(s.ids[at]), s.codes[at]))
    if probes:
        try:
            got = store.get([i for i, _ in probes])
        except KeyError as e:
            raise ListsProblem(f"it lists detections the database does not hold ({e})") from None
        if got.codes is None or any(not np.array_equal(g, c) for g, (_, c) in zip(got.codes, probes)):
            raise ListsProblem("its codes differ from the database's")


def _save_manifest(folder: Path, m: dict[str, Any]) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(m, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    _fsync_dir(folder)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """The one writer of ``folder`` (blocks while another process or thread holds it): an OS file lock on
    ``folder/lock`` (``filelock``: flock on POSIX, LockFileEx on Windows), released when the holder ends, even by
    kill -9."""
    from filelock import FileLock

    folder.mkdir(exist_ok=True)
    with FileLock(folder / "lock", thread_local=False):
        yield


def _cleanup(folder: Path, m: dict[str, Any]) -> None:
    """Remove files no manifest names (left by a killed writer, or merged away)."""
    keep = {s["file"] for s in m["segments"]} | {MANIFEST, "lock"}
    for p in folder.iterdir():
        if p.name not in keep:
            p.unlink(missing_ok=True)


def _fill_lists(rows: dict[str, np.ndarray], assign: Callable[[np.ndarray], np.ndarray]) -> None:
    """Rows stored without a list (older indexes, or before the codebook had a coarse quantizer): assign them now."""
    missing = rows["list_id"] < 0
    if missing.any():
        rows["list_id"] = rows["list_id"].copy()
        rows["list_id"][missing] = assign(rows["codes"][missing])


def _merge(folder: Path, name: str, segs: list[Segment], lists: int, code_size: int) -> Segment:
    """One segment holding the rows of ``segs`` (each list: the segments' slices in order, so ids stay sorted)."""
    n = sum(s.rows for s in segs)

    def fill(v: dict[str, np.ndarray]) -> None:
        lens = [np.diff(s.offsets) for s in segs]
        v["offsets"][:] = np.r_[0, np.cumsum(np.sum(lens, axis=0))]
        before = np.zeros(lists, np.int64)  # per list: rows of the earlier segments, placed first
        for s, n in zip(segs, lens):
            # each row of s goes to: its list's start in the merged segment + the earlier segments' rows of that
            # list + its place within the list (one scatter per column, the source read front to back)
            dest = np.repeat(v["offsets"][:-1] + before - s.offsets[:-1], n) + np.arange(s.rows)
            for col in ("id", "codes", *COLUMNS, "row"):
                v[col][dest] = s.column(col)
            before += n

    first = min((int(s.ids.min()) for s in segs if s.rows), default=0)
    last = max((int(s.ids.max()) for s in segs if s.rows), default=0)
    _write(folder / name, n, lists, code_size, first, last, fill)
    return _open_segment(folder / name, lists, code_size)


def sync(store: Any, coarse: Any, assign: Callable[[np.ndarray], np.ndarray], *, batch: int = SYNC_BATCH,
         progress: Callable[[int], None] | None = None, held: Sequence[dict[str, np.ndarray]] = (),
         merge: bool = True, until: int | None = None) -> tuple[Lists, int, str | None]:
    """Move the detections stored after the structure's high_water into segments (making the structure if there is
    none, or rebuilding it when :func:`open_lists` finds a problem), then merge. Returns ``(lists, rows added,
    problem)``: ``problem`` says why an existing structure was rebuilt (None when it was extended or new).

    ``assign(codes)``: the coarse list of rows stored without one (from their decoded codes). ``held``: the
    :meth:`Store.rows` columns of rows the caller has just committed (each one run of ids, in id order), written
    from memory instead of read back (what is not held, e.g. another writer's rows, is read from the store). Safe
    against a concurrent writer (a file lock) and concurrent readers (immutable segments, atomic manifest).

    ``merge=False``: new segments are only appended (a bulk load's syncs: its segments are merged once, by the sync
    that ends it, instead of the newest rows being rewritten at every sync). ``until``: move no detection past this
    id (a sync beside a writer: what it commits meanwhile is the next sync's, held in memory for it)."""
    folder = Path(store.directory) / DIR_NAME
    if store.get_meta("index_uuid") is None:
        store.set_meta("index_uuid", uuid.uuid4().hex)
    with _locked(folder):
        problem = None
        try:
            m = open_lists(store, coarse).manifest
        except ListsProblem as e:
            problem = None if "manifest.json is missing" in str(e) else str(e)
            m = {"format": FORMAT, **_identity(store, coarse), "high_water": 0, "segments": [], "next": 1}
            m["code_size"] = m["code_size"] or 0
        added = 0
        while True:
            rows = _next_rows(store, m["high_water"], batch, held, until)
            if not len(rows["id"]):
                break
            if not m["code_size"]:
                m["code_size"] = rows["codes"].shape[1]
            _fill_lists(rows, assign)
            name = f"seg-{m['next']:06d}.ivf"
            seg = write_segment(folder / name, rows, m["lists"])
            m["segments"].append({"file": name, "rows": seg.rows})
            m["next"] += 1
            m["high_water"] = int(rows["id"][-1])
            added += seg.rows
            if merge:
                m = _merge_tail(folder, m)
            _save_manifest(folder, m)
            if progress is not None:
                progress(len(rows["id"]))
        if merge and _merge_plan([s["rows"] for s in m["segments"]]):  # left unmerged by syncs with merge=False
            m = _merge_tail(folder, m)
            _save_manifest(folder, m)
        if not (folder / MANIFEST).exists():
            _save_manifest(folder, m)
        _cleanup(folder, m)
        return open_lists(store, coarse, check=False), added, problem


def _next_rows(store: Any, after: int, limit: int, held: Sequence[dict[str, np.ndarray]],
               until: int | None = None) -> dict[str, np.ndarray]:
    """The next (at most ``limit``, at least one where any are stored) rows with ``after < id <= until``: from
    ``held`` where the held runs continue right after ``after`` (a run owns its id range: nothing else was stored
    inside it), else from the store, up to where the next held run starts."""
    runs = sorted((r for r in held if len(r["id"]) and r["id"][-1] > after), key=lambda r: int(r["id"][0]))
    if until is not None:
        runs = [{k: v[:int(np.searchsorted(r["id"], until, side="right"))] for k, v in r.items()} for r in runs
                if r["id"][0] <= until]
    if not runs or runs[0]["id"][0] > after + 1:  # rows before the first held run: from the store
        stop = [int(runs[0]["id"][0])] if runs else []
        stop += [] if until is None else [until + 1]
        rows = store.rows(after_id=after, limit=limit, before_id=min(stop) if stop else None)
        if len(rows["id"]) or not runs:
            return rows
        after = int(runs[0]["id"][0]) - 1  # nothing listed was stored before the first held run
    take: list[dict[str, np.ndarray]] = []
    n = 0
    for r in runs:
        if r["id"][0] > after + 1 or n >= limit:
            break
        r = {k: v[int(np.searchsorted(r["id"], after, side="right")):][:limit - n] for k, v in r.items()}
        take.append(r)
        after, n = int(r["id"][-1]), n + len(r["id"])
    return {k: np.concatenate([r[k] for r in take]) for k in take[0]}


def set_calibration(store: Any, coarse: Any, calibration: dict[str, Any]) -> None:
    """Record ``calibration`` (JSON: the default ``nprobe`` and how it was measured) in the manifest, atomically,
    if the structure is still the one it was measured on (same lists and coarse quantizer)."""
    folder = Path(store.directory) / DIR_NAME
    with _locked(folder):
        m = open_lists(store, coarse, check=False).manifest
        m["calibration"] = calibration
        _save_manifest(folder, m)


def _merge_plan(rows: Sequence[int]) -> int:
    """How many of the newest segments (``rows``: each segment's rows, oldest first) to merge into one: while the
    newest holds at least a quarter of the rows of the one before it, the two would be merged, and so on with the
    merged one; merged in one pass (each row written once, not once per step of the cascade). 0: none."""
    tail, n = rows[-1] if rows else 0, 1
    while n < len(rows) and 4 * tail >= rows[-n - 1]:
        tail += rows[-n - 1]
        n += 1
    return n if n >= 2 else 0


def _merge_tail(folder: Path, m: dict[str, Any]) -> dict[str, Any]:
    segs = m["segments"]
    n = _merge_plan([s["rows"] for s in segs])
    if n:
        parts = [_open_segment(folder / s["file"], m["lists"], m["code_size"]) for s in segs[-n:]]
        name = f"seg-{m['next']:06d}.ivf"
        merged = _merge(folder, name, parts, m["lists"], m["code_size"])
        m["next"] += 1
        segs[-n:] = [{"file": name, "rows": merged.rows}]
    return m


def rebuild(store: Any, coarse: Any, assign: Callable[[np.ndarray], np.ndarray],
            **kwargs: Any) -> tuple[Lists, int, str | None]:
    """Discard the structure and build it again from ``index.db``."""
    folder = Path(store.directory) / DIR_NAME
    with _locked(folder):
        (folder / MANIFEST).unlink(missing_ok=True)
    return sync(store, coarse, assign, **kwargs)
