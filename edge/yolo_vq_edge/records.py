"""Edge record files: what ``yolo-vq edge`` writes and ``yolo-vq ingest`` reads, as JSON lines or Parquet.

Both hold the same three kinds of record:

* header: the exported graph's metadata (codebook fingerprint, code size and dtype, class names, recipe, ...);
* source: ``source`` (its number in this file), ``uri``, content ``fingerprint``, ``fps``, ``frame_count``,
  ``width``, ``height``;
* frame: ``source``, ``frame``, ``time`` (s), and the frame's detections as parallel lists ``xyxy`` (original px),
  ``confidence``, ``class_id``, ``codes``. Frames without detections are recorded too (ingest is idempotent per frame).

``.jsonl``: one JSON object per line, header first, each source before its frames, codes as hex strings.
``.parquet`` (needs ``pyarrow``): one row per frame, codes as binary; header and sources in the file's key-value
metadata under ``yolo_vq``. Only numpy and the standard library (and pyarrow for Parquet) are imported.

Reading checks every field as it comes (:func:`read_records`): a bad one is a :class:`BadRecord` of one line,
``<file>:<line>: <field> <what came>: expected <what>`` (Parquet: ``<file>:row <n>:``), never a traceback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._format import HEADER, Key
from .errors import RecordError

__all__ = ["SUFFIXES", "BadRecord", "RecordError", "RecordWriter", "read_records"]

SUFFIXES = (".jsonl", ".parquet")
_PARQUET_KEY = b"yolo_vq"
_ROW_GROUP = 512  # frames per Parquet row group


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise RecordError("Parquet records need pyarrow: `pip install pyarrow`, or write .jsonl") from None
    return pa, pq


def _check_suffix(path: Path) -> None:
    if path.suffix not in SUFFIXES:
        raise RecordError(f"{path}: records go to a .jsonl or .parquet file, got suffix {path.suffix!r}")


class RecordWriter:
    """Write a header, the sources and then frame records to ``path`` (``.jsonl`` or ``.parquet``)."""

    def __init__(self, path: str | Path, header: dict[str, Any], sources: list[dict[str, Any]]):
        self.path = Path(path)
        _check_suffix(self.path)
        self.parquet = self.path.suffix == ".parquet"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rows: list[dict[str, Any]] = []
        if self.parquet:
            pa, pq = _pyarrow()
            self._schema = pa.schema(
                [("source", pa.int32()), ("frame", pa.int64()), ("time", pa.float64()),
                 ("xyxy", pa.list_(pa.list_(pa.float32(), 4))), ("confidence", pa.list_(pa.float32())),
                 ("class_id", pa.list_(pa.int64())), ("codes", pa.list_(pa.binary()))],
                metadata={_PARQUET_KEY: json.dumps({"header": header, "sources": sources}).encode()},
            )
            self._writer = pq.ParquetWriter(str(self.path), self._schema)
        else:
            self._file = open(self.path, "w")  # noqa: SIM115 - closed in close()
            self._file.write(json.dumps(header) + "\n")
            for s in sources:
                self._file.write(json.dumps(s) + "\n")

    def frame(self, rec: dict[str, Any], codes: list[bytes]) -> None:
        """Append one frame record (``codes``: one bytes object per detection)."""
        if self.parquet:
            self._rows.append({k: v for k, v in rec.items() if k != "type"} | {"codes": codes})
            if len(self._rows) >= _ROW_GROUP:
                self._flush()
        else:
            self._file.write(json.dumps(rec | {"codes": [c.hex() for c in codes]}) + "\n")

    def flush(self) -> None:
        """Hand the JSON lines written so far to the OS (the runner calls it after every batch of frames, so a
        killed run loses at most one batch). Parquet files are only readable once closed (their footer)."""
        if not self.parquet:
            self._file.flush()

    def _flush(self) -> None:
        if self._rows:
            pa, _ = _pyarrow()
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
            self._rows = []

    def close(self) -> None:
        if self.parquet:
            self._flush()
            self._writer.close()
        else:
            self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_records(path: str | Path) -> tuple[dict[str, Any], Iterator[tuple[str, dict[str, Any]]]]:
    """Open a records file: its validated header, and an iterator over ``(where, record)`` of its source and frame
    records, each checked as it is read.

    ``where`` is the record's place as error messages print it: ``"file.jsonl:7"`` (line 7; the header is line 1), or
    for Parquet ``"file.parquet:row 7"`` (frame rows counted from 1) and ``"file.parquet:metadata"`` (header and
    sources). Records come back normalised: a source has ``type``, ``source``, ``uri``, ``fingerprint``, ``fps``,
    ``frame_count``, ``width``, ``height``; a frame has ``type``, ``source``, ``frame``, ``time`` (float) and
    ``xyxy``, ``confidence``, ``class_id``, ``codes`` (``bytes`` of the header's ``code_size``) for its n boxes. The
    header's ``names`` has int keys and ``code_dtype`` is filled in (default ``"uint8"``).

    Raises:
        RecordError: no such file, or not an edge file (here); :class:`BadRecord` for a bad header (here) or a bad
            record (from the iterator, when it reaches it; the records before it were yielded).
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such file; pass the .jsonl or .parquet written by `yolo-vq edge`")
    _check_suffix(path)
    return _read_parquet(path) if path.suffix == ".parquet" else _read_jsonl(path)


class BadRecord(RecordError):
    """A :class:`RecordError` at one place of a records file.

    Attributes:
        where: the message's prefix, ``"file.jsonl:7"`` or ``"file.parquet:row 7"``.
        at: the place in words, for a fix: ``"line 7"``, ``"row 7"``, ``"the metadata"``.
        problem: the message without ``where``: ``"frame -1: expected an int >= 0"``.
    """

    def __init__(self, where: str, at: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where, self.at, self.problem = where, at, problem


def _not_ours(path: Path) -> RecordError:
    return RecordError(f"{path}: not a yolo_vq edge file (it must start with the header written by `yolo-vq edge`)")


# -- checks: each returns the normalised value or raises _Bad(field, what came, what was expected) ---------------
_INT_MAX = 2**63 - 1  # SQLite INTEGER
_F32_MAX = 3.4028234663852886e38  # boxes and scores are stored as float32
_CODE_DTYPES = {"uint8": 1, "uint16": 2}


class _Bad(Exception):
    """A bad field, before its place is known (the reader turns it into a :class:`BadRecord`): ``"<field> <what
    came>: expected <what>"``; ``came`` is shown as its repr, or as the text ``shown`` when given."""

    def __init__(self, field: str, came: Any, expected: str, *, shown: str | None = None):
        super().__init__(f"{field} {_show(came) if shown is None else shown}: expected {expected}")


def _show(v: Any, limit: int = 60) -> str:
    """A value as the message shows it: its repr, cut to ``limit`` characters (always one line)."""
    try:
        r = repr(v)
    except ValueError:  # an int beyond Python's digit limit for str()
        r = f"<int of about {int(v.bit_length() * 0.30103)} digits>"
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _field(rec: dict[str, Any], key: str) -> Any:
    if key not in rec:
        raise _Bad(key, None, _EXPECTED[key], shown="missing")
    return rec[key]


def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= _INT_MAX


def _is_finite(v: Any, limit: float = float("inf")) -> bool:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(float(v)) and abs(float(v)) <= limit
    except OverflowError:  # an int too large for a float
        return False


_EXPECTED = {
    "source": "an int >= 0 (the source's number in this file)",
    "uri": "the source's path or URL (a non-empty string)",
    "fingerprint": "the source's content fingerprint (a non-empty string)",
    "frame": "an int >= 0 (the frame's index in its source)",
    "time": "a finite number (seconds)",
    "xyxy": "n boxes of 4 finite numbers ([[x1, y1, x2, y2], ...])",
    "confidence": "one finite number per box",
    "class_id": "one int >= 0 per box",
    "codes": "one code per box",
}


def _check_header(header: dict[str, Any]) -> dict[str, Any]:
    fp = header[Key.CODEBOOK_FINGERPRINT]
    if not isinstance(fp, str) or not fp:
        raise _Bad(f"header {Key.CODEBOOK_FINGERPRINT}", fp, "the codebook's sha256 (a hex string)")
    size = header.get(Key.CODE_SIZE)
    if not _is_int(size, 1):
        raise _Bad(f"header {Key.CODE_SIZE}", size, "a positive int (bytes per code)",
                   shown="missing" if Key.CODE_SIZE not in header else None)
    dtype = header.get(Key.CODE_DTYPE, "uint8")
    if not isinstance(dtype, str) or dtype not in _CODE_DTYPES:
        raise _Bad(f"header {Key.CODE_DTYPE}", dtype, f"one of {sorted(_CODE_DTYPES)}")
    if size % _CODE_DTYPES[dtype]:
        raise _Bad(f"header {Key.CODE_SIZE}", size, f"a multiple of {_CODE_DTYPES[dtype]} bytes (code_dtype {dtype})")
    names = header.get(Key.NAMES)
    if not isinstance(names, dict) or not names:
        raise _Bad(f"header {Key.NAMES}", names, "a dict of class id -> name ({'0': 'person', ...})",
                   shown="missing" if Key.NAMES not in header else None)
    ids = {}
    for k, v in names.items():
        k = k.strip() if isinstance(k, str) else k
        if not (isinstance(k, str) and k.isascii() and k.isdigit() or _is_int(k)) or not isinstance(v, str):
            raise _Bad(f"header {Key.NAMES}", {k: v}, "class ids (ints >= 0) mapped to names (strings)")
        ids[int(k)] = v
    return header | {Key.CODE_DTYPE: dtype, Key.NAMES: ids}


def _check_source(rec: dict[str, Any], declared: dict[int, str], where: str) -> dict[str, Any]:
    k = _field(rec, "source")
    if not _is_int(k):
        raise _Bad("source", k, _EXPECTED["source"])
    if k in declared:
        raise _Bad("source", k, f"a number not declared before (declared at {declared[k]})")
    out = {"type": "source", "source": k}
    for key in ("uri", "fingerprint"):
        v = _field(rec, key)
        if not isinstance(v, str) or not v:
            raise _Bad(key, v, _EXPECTED[key])
        out[key] = v
    fps = rec.get("fps")
    if fps is not None and not (_is_finite(fps) and fps >= 0):
        raise _Bad("fps", fps, "a finite number >= 0, or null")
    out["fps"] = None if fps is None else float(fps)
    for key in ("frame_count", "width", "height"):
        v = rec.get(key)
        if v is not None and not _is_int(v):
            raise _Bad(key, v, "an int >= 0, or null")
        out[key] = v
    declared[k] = where
    return out


def _check_frame(rec: dict[str, Any], declared: dict[int, str], code_size: int, hexed: bool) -> dict[str, Any]:
    k = _field(rec, "source")
    if not _is_int(k):
        raise _Bad("source", k, _EXPECTED["source"])
    if k not in declared:
        raise _Bad("source", k, f"one of the sources declared before its frames ({sorted(declared) or 'none'})")
    frame = _field(rec, "frame")
    if not _is_int(frame):
        raise _Bad("frame", frame, _EXPECTED["frame"])
    t = _field(rec, "time")
    if not _is_finite(t):
        raise _Bad("time", t, _EXPECTED["time"])
    xyxy = _field(rec, "xyxy")
    if not isinstance(xyxy, list):
        raise _Bad("xyxy", xyxy, _EXPECTED["xyxy"])
    for i, box in enumerate(xyxy):
        if not isinstance(box, list) or len(box) != 4 or not all(_is_finite(x, _F32_MAX) for x in box):
            raise _Bad(f"xyxy[{i}]", box, "4 finite numbers (x1, y1, x2, y2)")
    n = len(xyxy)
    lists = {}
    for key, ok, each in (("confidence", lambda x: _is_finite(x, _F32_MAX), "a finite number"),
                          ("class_id", _is_int, "an int >= 0"), ("codes", None, "")):
        v = _field(rec, key)
        if not isinstance(v, list) or len(v) != n:
            raise _Bad(key, v, f"{_EXPECTED[key]}: {n}, as many as xyxy has boxes",
                       shown=f"of {len(v)} value{'s' * (len(v) != 1)}" if isinstance(v, list) else None)
        for i, x in enumerate(v if ok else ()):
            if not ok(x):
                raise _Bad(f"{key}[{i}]", x, each)
        lists[key] = v
    codes = [_check_code(i, c, code_size, hexed) for i, c in enumerate(lists["codes"])]
    return {"type": "frame", "source": k, "frame": frame, "time": float(t), "xyxy": xyxy,
            "confidence": lists["confidence"], "class_id": lists["class_id"], "codes": codes}


def _check_code(i: int, c: Any, code_size: int, hexed: bool) -> bytes:
    if hexed:
        if not isinstance(c, str):
            raise _Bad(f"codes[{i}]", c, f"a hex string of {2 * code_size} digits ({code_size} bytes)")
        try:
            c = bytes.fromhex(c)
        except ValueError:
            raise _Bad(f"codes[{i}]", c, f"a hex string of {2 * code_size} digits ({code_size} bytes)") from None
    elif not isinstance(c, bytes):
        raise _Bad(f"codes[{i}]", c, f"{code_size} bytes (binary)")
    if len(c) != code_size:
        raise _Bad(f"codes[{i}]", c, f"{code_size} bytes (the header's code_size)",
                   shown=f"of {len(c)} byte{'s' * (len(c) != 1)}")
    return c


def _check_record(rec: Any, declared: dict[int, str], code_size: int, where: str, hexed: bool) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise _Bad("record", rec, "a JSON object with a type ('source' or 'frame')")
    kind = rec.get("type")
    if kind == "source":
        return _check_source(rec, declared, where)
    if kind == "frame":
        return _check_frame(rec, declared, code_size, hexed)
    more = " (a second header: two files joined? ingest each on its own)" if kind == HEADER else ""
    raise _Bad("type", kind, f"'source' or 'frame'{more}", shown="missing" if "type" not in rec else None)


def _read_jsonl(path: Path) -> tuple[dict[str, Any], Iterator[tuple[str, dict[str, Any]]]]:
    f = open(path, "rb")  # noqa: SIM115 - closed by the iterator, or here on error
    try:
        header = json.loads(f.readline().decode() or "null")
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, an int of > 4300 digits
        header = None
    if not isinstance(header, dict) or header.get(Key.TYPE) != HEADER or Key.CODEBOOK_FINGERPRINT not in header:
        f.close()
        raise _not_ours(path)
    try:
        header = _check_header(header)
    except _Bad as e:
        f.close()
        raise BadRecord(f"{path}:1", "line 1", str(e)) from None
    size = header[Key.CODE_SIZE]

    def records() -> Iterator[tuple[str, dict[str, Any]]]:
        declared: dict[int, str] = {}
        with f:
            for n, raw in enumerate(f, start=2):
                where = f"{path}:{n}"
                try:
                    line = raw.decode()
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, int of > 4300 digits
                    raise BadRecord(where, f"line {n}", "not a valid record (truncated file?)") from None
                try:
                    rec = _check_record(rec, declared, size, where, hexed=True)
                except _Bad as e:
                    raise BadRecord(where, f"line {n}", str(e)) from None
                yield where, rec

    return header, records()


def _read_parquet(path: Path) -> tuple[dict[str, Any], Iterator[tuple[str, dict[str, Any]]]]:
    _, pq = _pyarrow()
    try:
        pf = pq.ParquetFile(str(path))
        meta = json.loads((pf.schema_arrow.metadata or {}).get(_PARQUET_KEY, b"null"))
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for files it cannot parse
        raise RecordError(f"{path}: not a readable Parquet file ({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("header"), dict) \
            or Key.CODEBOOK_FINGERPRINT not in meta["header"]:
        raise _not_ours(path)
    where, at = f"{path}:metadata", "the metadata"
    try:
        header = _check_header(meta["header"])
    except _Bad as e:
        raise BadRecord(where, at, str(e)) from None
    sources = meta.get("sources", [])
    if not isinstance(sources, list):
        raise BadRecord(where, at, str(_Bad("sources", sources, "a list of source records")))
    size = header[Key.CODE_SIZE]

    def records() -> Iterator[tuple[str, dict[str, Any]]]:
        declared: dict[int, str] = {}
        for i, rec in enumerate(sources):
            at_source = f"{where} sources[{i}]"
            try:
                rec = _check_record(rec, declared, size, at_source, hexed=False)
                if rec["type"] != "source":
                    raise _Bad("type", "frame", "'source' (frames are the file's rows)")
            except _Bad as e:
                raise BadRecord(at_source, f"sources[{i}] of the metadata", str(e)) from None
            yield at_source, rec
        n = 0
        batches = pf.iter_batches()
        while True:
            try:
                batch = next(batches, None)
                rows = [] if batch is None else batch.to_pylist()
            except Exception as e:  # noqa: BLE001 - a damaged row group: ArrowInvalid, OSError, ...
                raise BadRecord(f"{path}:row {n + 1}", f"row {n + 1}",
                                f"not readable ({type(e).__name__}: {str(e)[:120]}) (truncated file?)") from None
            if batch is None:
                return
            for row in rows:
                n += 1
                at_row = f"{path}:row {n}"
                try:
                    rec = _check_frame(row, declared, size, hexed=False)
                except _Bad as e:
                    raise BadRecord(at_row, f"row {n}", str(e)) from None
                yield at_row, rec

    return header, records()
