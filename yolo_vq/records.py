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
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import RecordError

__all__ = ["SUFFIXES", "RecordError", "RecordWriter", "read_records"]

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


def read_records(path: str | Path) -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
    """Open a records file: its header, and an iterator over its source and frame records (codes as ``bytes``)."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such file; pass the .jsonl or .parquet written by `yolo-vq edge`")
    _check_suffix(path)
    return _read_parquet(path) if path.suffix == ".parquet" else _read_jsonl(path)


def _not_ours(path: Path) -> RecordError:
    return RecordError(f"{path}: not a yolo_vq edge file (it must start with the header written by `yolo-vq edge`)")


def _read_jsonl(path: Path) -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
    f = open(path)  # noqa: SIM115 - closed by the iterator, or here on error
    try:
        header = json.loads(f.readline() or "null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("type") != "header" or "codebook_fingerprint" not in header:
        f.close()
        raise _not_ours(path)

    def records() -> Iterator[dict[str, Any]]:
        with f:
            for n, line in enumerate(f, start=2):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if rec.get("type") == "frame":
                        rec["codes"] = [bytes.fromhex(c) for c in rec["codes"]]
                except (json.JSONDecodeError, ValueError, TypeError, KeyError, AttributeError):
                    raise RecordError(f"{path}:{n}: not a valid record (a truncated file?); the records before line "
                                      f"{n} were read") from None
                yield rec

    return header, records()


def _read_parquet(path: Path) -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
    _, pq = _pyarrow()
    try:
        pf = pq.ParquetFile(str(path))
        meta = json.loads((pf.schema_arrow.metadata or {}).get(_PARQUET_KEY, b"null"))
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for files it cannot parse
        raise RecordError(f"{path}: not a readable Parquet file ({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(meta, dict) or "codebook_fingerprint" not in (meta.get("header") or {}):
        raise _not_ours(path)

    def records() -> Iterator[dict[str, Any]]:
        yield from meta.get("sources", [])
        for batch in pf.iter_batches():
            for row in batch.to_pylist():
                yield {"type": "frame", **row}

    return meta["header"], records()
