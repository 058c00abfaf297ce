"""Ingest of edge records files that are damaged: what is stored, what the error says, what a re-run does.

Records files are written here directly (``RecordWriter``, or JSON lines by hand to damage one), with the header
``yolo_vq.edge.runner.run`` writes for a graph exported with ``small_codebook``: no ONNX export needed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from yolo_vq.edge.ingest import ingest
from yolo_vq.edge.records import BadRecord, RecordError, RecordWriter, read_records
from yolo_vq.errors import CodebookError
from yolo_vq.index.store import StoreError

CODE = 8  # bytes per code of small_codebook (PQ, m=8, 16 centroids)
ORPHANS = "SELECT COUNT(*) FROM sources s WHERE NOT EXISTS (SELECT 1 FROM frames f WHERE f.source_id = s.id)"
TRACEBACK_WORDS = re.compile(r"KeyError|TypeError|IndexError|AttributeError|OverflowError|Traceback")


@pytest.fixture(scope="module")
def header(index_model, small_codebook):
    """The header `yolo_vq.edge.runner.run` writes for a graph exported from ``index_model`` with ``small_codebook``."""
    from yolo_vq import Embedder
    from yolo_vq.quant.io import codebook_checksum

    emb = Embedder(index_model)
    return {"type": "header", "edge_format": 1, "model": "model_vq.onnx", "yolo_vq_export": 1,
            "imgsz": [288, 640], "codebook_fingerprint": codebook_checksum(small_codebook), "code_size": CODE,
            "code_dtype": "uint8", "names": {str(k): v for k, v in index_model.names.items()},
            "model_fingerprint": emb.fingerprint, "embedding": emb.describe(), "created_utc": "2025-01-01T00:00:00Z"}


def source(k: int = 0, fingerprint: str = "fp-a") -> dict:
    return {"type": "source", "source": k, "uri": f"cam{k}.mp4", "fingerprint": fingerprint, "fps": 25.0,
            "frame_count": 1000, "width": 640, "height": 272}


def frame(i: int, k: int = 0, n: int = 2) -> tuple[dict, list[bytes]]:
    """Frame ``i`` of source ``k`` with ``n`` detections, and their codes."""
    rng = np.random.default_rng(1000 * k + i)
    xy = rng.uniform(0, 300, (n, 2))
    rec = {"type": "frame", "source": k, "frame": i, "time": i / 25,
           "xyxy": np.round(np.hstack([xy, xy + 20]), 2).tolist(),
           "confidence": np.round(rng.uniform(0.1, 1, n), 5).tolist(), "class_id": [0] * n}
    return rec, [bytes(rng.integers(0, 16, CODE, dtype=np.uint8)) for _ in range(n)]


def line(i: int, k: int = 0, **change) -> str:
    """Frame ``i`` as the JSON line the edge writes, with fields changed (``None``: removed)."""
    rec, codes = frame(i, k)
    rec = rec | {"codes": [c.hex() for c in codes]} | change
    return json.dumps({key: v for key, v in rec.items() if v is not None})


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def db(index: Path, sql: str) -> int:
    with sqlite3.connect(index / "index.db") as c:
        return c.execute(sql).fetchone()[0]


def sha(index: Path) -> str:
    return hashlib.sha256((index / "index.db").read_bytes()).hexdigest()


def _ids(table: list) -> list[str]:
    return [", ".join(f"{k}={v!r}"[:32] for k, v in change.items()) for change, _ in table]


def one_line_error(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert isinstance(e.value, RecordError) and "\n" not in msg and not TRACEBACK_WORDS.search(msg), msg
    return msg


# -- every bad field: one line, file:line first, the field, what came, what was expected ---------------------------
# (change to frame 3, written at line 6 after the header, the source and frames 0-2; the message after the prefix)
BAD_FRAMES = [
    ({"frame": -1}, r"frame -1: expected an int >= 0"),
    ({"frame": "3"}, r"frame '3': expected an int >= 0"),
    ({"frame": 3.5}, r"frame 3\.5: expected an int"),
    ({"frame": True}, r"frame True: expected an int"),
    ({"frame": 2**64}, r"frame 18446744073709551616: expected an int"),
    ({"frame": None}, r"frame missing: expected an int"),
    ({"time": math.nan}, r"time nan: expected a finite number"),
    ({"time": math.inf}, r"time inf: expected a finite number"),
    ({"time": "0.12"}, r"time '0\.12': expected a finite number"),
    ({"time": 10**400}, r"time 1000000000.*\.\.\.: expected a finite number"),
    ({"time": None}, r"time missing: expected a finite number"),
    ({"xyxy": [[1, 2, 3], [1, 2, 3, 4]]}, r"xyxy\[0\] \[1, 2, 3\]: expected 4 finite numbers"),
    ({"xyxy": [[1, 2, 3, "4"], [1, 2, 3, 4]]}, r"xyxy\[0\] \[1, 2, 3, '4'\]: expected 4 finite numbers"),
    ({"xyxy": [[1, 2, 3, math.nan], [1, 2, 3, 4]]}, r"xyxy\[0\] \[1, 2, 3, nan\]: expected 4 finite numbers"),
    ({"xyxy": [[1, 2, 3, 4], [1e39, 2, 3, 4]]}, r"xyxy\[1\] \[1e\+39, 2, 3, 4\]: expected 4 finite numbers"),
    ({"xyxy": "1 2 3 4"}, r"xyxy '1 2 3 4': expected n boxes of 4 finite numbers"),
    ({"xyxy": [1, 2, 3, 4]}, r"xyxy\[0\] 1: expected 4 finite numbers"),
    ({"confidence": [0.5]}, r"confidence of 1 value: expected one finite number per box: 2, as many as xyxy"),
    ({"confidence": [0.5, "high"]}, r"confidence\[1\] 'high': expected a finite number"),
    ({"confidence": None}, r"confidence missing: expected one finite number per box"),
    ({"class_id": [0, 0, 0]}, r"class_id of 3 values: expected one int >= 0 per box: 2"),
    ({"class_id": [0, -1]}, r"class_id\[1\] -1: expected an int >= 0"),
    ({"class_id": 0}, r"class_id 0: expected one int >= 0 per box"),
    ({"codes": ["00" * CODE]}, r"codes of 1 value: expected one code per box: 2"),
    ({"codes": ["00" * CODE, "00" * (CODE - 1)]}, rf"codes\[1\] of {CODE - 1} bytes: expected {CODE} bytes"),
    ({"codes": ["00" * CODE, "zz" * CODE]}, rf"codes\[1\] 'zzzz.*': expected a hex string of {2 * CODE} digits"),
    ({"codes": ["00" * CODE, 7]}, r"codes\[1\] 7: expected a hex string"),
    ({"source": 3}, r"source 3: expected one of the sources declared before its frames \(\[0\]\)"),
    ({"source": "0"}, r"source '0': expected an int >= 0"),
    ({"type": "bogus"}, r"type 'bogus': expected 'source' or 'frame'"),
    ({"type": "header"}, r"type 'header': expected 'source' or 'frame' \(a second header"),
    ({"type": None}, r"type missing: expected 'source' or 'frame'"),
]


@pytest.mark.parametrize(("change", "says"), BAD_FRAMES, ids=_ids(BAD_FRAMES))
def test_a_bad_frame_field_names_file_line_field_and_expectation(header, small_codebook, tmp_path, change, says):
    path = write(tmp_path / "d.jsonl", [header, source(), *[line(i) for i in range(3)], line(3, **change), line(4)])
    with pytest.raises(RecordError) as e:
        ingest(path, tmp_path / "idx", codebook=small_codebook)
    msg = one_line_error(e)
    assert re.match(re.escape(f"{path}:6: ") + says, msg), msg
    assert msg.endswith(": the 3 frames before it were stored; fix or cut the file at line 6 and re-run "
                        "(stored frames are skipped)"), msg
    assert db(tmp_path / "idx", "SELECT COUNT(*) FROM frames") == 3
    assert db(tmp_path / "idx", ORPHANS) == 0


@pytest.mark.parametrize(("bad", "says"), [
    ("[1, 2]", r"record \[1, 2\]: expected a JSON object"),
    ("7", r"record 7: expected a JSON object"),
    ('{"type": "frame", "source": 0, "frame": 3', r"not a valid record \(truncated file\?\)"),
    ("\xff\xfe", r"not a valid record \(truncated file\?\)"),
    ('{"type": "frame", "frame": ' + "9" * 5000 + "}", r"not a valid record"),
    ("[" * 100_000, r"not a valid record"),
], ids=["array", "number", "cut-json", "not-utf8", "int-of-5000-digits", "nested-100000-deep"])
def test_a_line_that_is_no_record_names_file_and_line(header, small_codebook, tmp_path, bad, says):
    path = write(tmp_path / "d.jsonl", [header, source(), *[line(i) for i in range(3)], line(3)])
    path.write_bytes(path.read_bytes() + bad.encode("latin-1") + b"\n" + line(4).encode() + b"\n")
    with pytest.raises(RecordError) as e:
        ingest(path, tmp_path / "idx", codebook=small_codebook)
    msg = one_line_error(e)
    assert re.match(re.escape(f"{path}:7: ") + says + ".*" + re.escape(": the 4 frames before it were stored"), msg), msg
    assert db(tmp_path / "idx", "SELECT COUNT(*) FROM frames") == 4


# (source record replacing line 2, before any frame: nothing may be written, not even the index directory)
BAD_SOURCES = [
    ({"uri": None}, r"uri missing: expected the source's path or URL"),
    ({"fingerprint": None}, r"fingerprint missing: expected the source's content fingerprint"),
    ({"uri": 5}, r"uri 5: expected the source's path or URL \(a non-empty string\)"),
    ({"fingerprint": ""}, r"fingerprint '': expected"),
    ({"source": -2}, r"source -2: expected an int >= 0"),
    ({"source": None}, r"source missing: expected an int >= 0"),
    ({"fps": "25"}, r"fps '25': expected a finite number >= 0, or null"),
    ({"width": -640}, r"width -640: expected an int >= 0, or null"),
    ({"frame_count": {"n": 1}}, r"frame_count \{'n': 1\}: expected an int >= 0, or null"),
]


@pytest.mark.parametrize(("change", "says"), BAD_SOURCES, ids=_ids(BAD_SOURCES))
def test_a_bad_source_record_before_any_frame_writes_nothing(header, small_codebook, tmp_path, change, says):
    bad = {key: v for key, v in (source() | change).items() if v is not None}
    path = write(tmp_path / "d.jsonl", [header, bad, *[line(i) for i in range(3)]])
    with pytest.raises(RecordError) as e:
        ingest(path, tmp_path / "idx", codebook=small_codebook)
    msg = one_line_error(e)
    assert re.match(re.escape(f"{path}:2: ") + says, msg), msg
    assert msg.endswith(": no frame came before it, nothing was stored; fix line 2 and re-run"), msg
    assert not (tmp_path / "idx").exists()


def test_a_source_declared_twice_is_refused(header, small_codebook, tmp_path):
    path = write(tmp_path / "d.jsonl", [header, source(), line(0), source(0, "fp-b"), line(1)])
    with pytest.raises(RecordError) as e:
        ingest(path, tmp_path / "idx", codebook=small_codebook)
    assert one_line_error(e).startswith(f"{path}:4: source 0: expected a number not declared before (declared at "
                                        f"{path}:2): the 1 frame before it was stored")


BAD_HEADERS = [
    ({"code_size": 0}, r"header code_size 0: expected a positive int \(bytes per code\)"),
    ({"code_size": "8"}, r"header code_size '8': expected a positive int"),
    ({"code_size": 8.0}, r"header code_size 8\.0: expected a positive int"),
    ({"code_size": None}, r"header code_size missing: expected a positive int"),
    ({"code_dtype": "uint16", "code_size": 7}, r"header code_size 7: expected a multiple of 2 bytes"),
    ({"code_dtype": "float32"}, r"header code_dtype 'float32': expected one of \['uint16', 'uint8'\]"),
    ({"names": ["person"]}, r"header names \['person'\]: expected a dict of class id -> name"),
    ({"names": None}, r"header names missing: expected a dict of class id -> name"),
    ({"names": {"person": 0}}, r"header names \{'person': 0\}: expected class ids \(ints >= 0\) mapped to names"),
    ({"codebook_fingerprint": 5}, r"header codebook_fingerprint 5: expected the codebook's sha256"),
    ({"code_dtype": ["uint8"]}, r"header code_dtype \['uint8'\]: expected one of"),
    ({"names": {"\u00b2": "person"}}, r"header names \{'\u00b2': 'person'\}: expected class ids"),
]


@pytest.mark.parametrize(("change", "says"), BAD_HEADERS, ids=_ids(BAD_HEADERS))
def test_a_bad_header_is_refused_before_the_index_is_touched(header, small_codebook, tmp_path, change, says):
    head = {key: v for key, v in (header | change).items() if v is not None}
    path = write(tmp_path / "d.jsonl", [head, source(), *[line(i) for i in range(3)]])
    with pytest.raises(RecordError) as e:
        ingest(path, tmp_path / "idx", codebook=small_codebook)
    assert re.fullmatch(re.escape(f"{path}:1: ") + says + ".*", one_line_error(e))
    assert not (tmp_path / "idx").exists()


# -- a truncated last line; the re-run ---------------------------------------------------------------------------
def test_truncated_last_line_stores_the_frames_before_it_and_the_rerun_adds_nothing(header, small_codebook,
                                                                                    tmp_path):
    frames = [line(i) for i in range(250)]
    path = write(tmp_path / "detections.jsonl", [header, source(), *frames[:249], frames[249][:57]])
    index = tmp_path / "idx"
    want = (f"{path}:252: not a valid record (truncated file?): the 249 frames before it were stored; fix or cut the "
            f"file at line 252 and re-run (stored frames are skipped)")
    with pytest.raises(RecordError) as e:
        ingest(path, index, codebook=small_codebook)  # 249 < commit_every: all in the batch in flight at the error
    assert one_line_error(e) == want
    assert db(index, "SELECT COUNT(*) FROM frames") == 249
    assert db(index, "SELECT COUNT(*) FROM detections") == 2 * 249
    assert db(index, "SELECT COUNT(*) FROM sources") == 1 and db(index, ORPHANS) == 0

    with pytest.raises(RecordError) as e:
        ingest(path, index)  # the same file again: nothing twice, the same place, the counts as they are now
    assert one_line_error(e) == want.replace("were stored", "were already stored (0 new)")
    assert db(index, "SELECT COUNT(*) FROM frames") == 249 and db(index, "SELECT COUNT(*) FROM detections") == 498
    assert db(index, "SELECT COUNT(DISTINCT source_id || ':' || frame || ':' || x1) FROM detections") == 498

    write(path, [header, source(), *frames[:249]])  # cut at line 252, as the message says: the re-run completes
    summary = ingest(path, index)
    assert (summary["frames"], summary["skipped_frames"], summary["detections"]) == (0, 249, 0)
    write(path, [header, source(), *frames])  # the whole file: only the last frame is new
    summary = ingest(path, index)
    assert (summary["frames"], summary["skipped_frames"], summary["detections"]) == (1, 249, 2)
    assert db(index, "SELECT COUNT(*) FROM frames") == 250


def test_a_bad_line_in_the_middle_of_a_source_then_the_fixed_file(header, small_codebook, tmp_path):
    """Two sources; line 17 (frame 4 of source 1) is bad: source 0 and frames 0-3 of source 1 are stored, over
    several batches; the fixed file stores the rest, nothing twice."""
    lines = [header, source(0, "fp-a"), source(1, "fp-b"), *[line(i, 0) for i in range(10)],
             *[line(i, 1) for i in range(10)]]
    lines[17] = line(4, 1, xyxy=[[0, 0, 10]])
    path, index = write(tmp_path / "d.jsonl", lines), tmp_path / "idx"
    with pytest.raises(RecordError) as e:
        ingest(path, index, codebook=small_codebook, commit_every=3)
    assert one_line_error(e).startswith(f"{path}:18: xyxy[0] [0, 0, 10]: expected 4 finite numbers (x1, y1, x2, y2): "
                                        "the 14 frames before it were stored; fix or cut the file at line 18")
    assert db(index, "SELECT COUNT(*) FROM frames") == 14 and db(index, ORPHANS) == 0
    lines[17] = line(4, 1)
    summary = ingest(write(path, lines), index)
    assert (summary["frames"], summary["skipped_frames"], summary["sources"]) == (6, 14, 2)
    assert db(index, "SELECT COUNT(*) FROM frames") == 20 and db(index, "SELECT COUNT(*) FROM detections") == 40


def test_a_later_run_with_new_frames_before_the_bad_line_counts_both(header, small_codebook, tmp_path):
    index = tmp_path / "idx"
    ingest(write(tmp_path / "a.jsonl", [header, source(), *[line(i) for i in range(5)]]), index,
           codebook=small_codebook)
    path = write(tmp_path / "b.jsonl", [header, source(), *[line(i) for i in range(8)], line(8, time=None)])
    with pytest.raises(RecordError) as e:
        ingest(path, index)
    assert one_line_error(e) == (f"{path}:11: time missing: expected a finite number (seconds): the 8 frames before "
                                 f"it are stored (3 now, 5 already); fix or cut the file at line 11 and re-run "
                                 f"(stored frames are skipped)")
    assert db(index, "SELECT COUNT(*) FROM frames") == 8


# -- refused before any valid frame: the index is byte for byte as it was -----------------------------------------
@pytest.mark.parametrize("case", ["first frame bad", "new source bad", "header bad", "other codebook", "garbage",
                                  "code size"])
def test_a_refusal_before_any_valid_frame_leaves_the_index_unchanged(header, small_codebook, tmp_path, case):
    index = tmp_path / "idx"
    ingest(write(tmp_path / "a.jsonl", [header, source(), *[line(i) for i in range(5)]]), index,
           codebook=small_codebook)
    files_before, before = sorted(p.name for p in index.iterdir()), sha(index)
    bad = {
        "first frame bad": [header, source(1, "fp-new"), line(0, 1, frame=-5), line(1, 1)],
        "new source bad": [header, {"type": "source", "source": 1, "fingerprint": "fp-new"}, line(0, 1)],
        "header bad": [header | {"names": "person"}, source(1, "fp-new"), line(0, 1)],
        "other codebook": [header | {"codebook_fingerprint": "0" * 64}, source(1, "fp-new"), line(0, 1)],
        "garbage": ["hello"],
        "code size": [header | {"code_size": 16}, source(1, "fp-new"), line(0, 1, codes=["00" * 16] * 2)],
    }[case]
    path = write(tmp_path / "b.jsonl", bad)
    with pytest.raises((RecordError, StoreError, CodebookError)):
        ingest(path, index)
    assert sha(index) == before and sorted(p.name for p in index.iterdir()) == files_before
    with pytest.raises((RecordError, StoreError, CodebookError)):
        ingest(path, tmp_path / "new", codebook=small_codebook)
    assert not (tmp_path / "new").exists()


def test_a_file_without_frames_creates_no_index(header, small_codebook, tmp_path):
    summary = ingest(write(tmp_path / "d.jsonl", [header, source()]), tmp_path / "idx", codebook=small_codebook)
    assert summary == {"sources": 0, "frames": 0, "skipped_frames": 0, "detections": 0}
    assert not (tmp_path / "idx").exists()


# -- Parquet: rows are numbered from 1 -------------------------------------------------------------------------
BAD_ROWS = [
    ({"frame": -1}, r"frame -1: expected an int >= 0"),
    ({"time": math.nan}, r"time nan: expected a finite number"),
    ({"confidence": [0.5]}, r"confidence of 1 value: expected one finite number per box: 2"),
    ({"class_id": [0, 0, 1]}, r"class_id of 3 values: expected one int >= 0 per box: 2"),
    ({"source": 4}, r"source 4: expected one of the sources declared before its frames"),
    ({"codes": [b"\0" * CODE, b"\0" * (CODE + 1)]}, rf"codes\[1\] of {CODE + 1} bytes: expected {CODE} bytes"),
]


@pytest.mark.parametrize(("change", "says"), BAD_ROWS, ids=_ids(BAD_ROWS))
def test_a_bad_parquet_row_names_file_and_row(header, small_codebook, tmp_path, change, says):
    path = tmp_path / "d.parquet"
    with RecordWriter(path, header, [source()]) as w:
        for i in range(7):
            rec, codes = frame(i)
            if i == 4:
                rec = rec | {k: v for k, v in change.items() if k != "codes"}
                codes = change.get("codes", codes)
            w.frame(rec, codes)
    with pytest.raises(RecordError) as e:
        ingest(path, tmp_path / "idx", codebook=small_codebook)
    msg = one_line_error(e)
    assert re.match(re.escape(f"{path}:row 5: ") + says, msg), msg
    assert msg.endswith(": the 4 frames before it were stored; fix row 5 and re-run (stored frames are skipped)")
    assert db(tmp_path / "idx", "SELECT COUNT(*) FROM frames") == 4 and db(tmp_path / "idx", ORPHANS) == 0


def test_bad_parquet_metadata_is_refused_before_the_index_is_touched(header, small_codebook, tmp_path):
    path = tmp_path / "d.parquet"
    with RecordWriter(path, header, [{k: v for k, v in source().items() if k != "uri"}]) as w:
        w.frame(*frame(0))
    with pytest.raises(RecordError) as e:
        ingest(path, tmp_path / "idx", codebook=small_codebook)
    assert one_line_error(e).startswith(f"{path}:metadata sources[0]: uri missing: expected the source's path or URL")
    with RecordWriter(path, header | {"code_size": -8}, [source()]) as w:
        w.frame(*frame(0))
    with pytest.raises(RecordError) as e:
        ingest(path, tmp_path / "idx", codebook=small_codebook)
    assert one_line_error(e).startswith(f"{path}:metadata: header code_size -8: expected a positive int")
    assert not (tmp_path / "idx").exists()


# -- the reader's API -----------------------------------------------------------------------------------------
def test_read_records_yields_where_and_the_checked_record(header, tmp_path):
    path = write(tmp_path / "d.jsonl", [header, source(), "", line(0)])
    head, records = read_records(path)
    assert head["names"] == {0: "person"} and head["code_size"] == CODE
    (w1, src), (w2, fr) = list(records)
    assert (w1, w2) == (f"{path}:2", f"{path}:4")  # blank lines count
    assert src["type"] == "source" and src["uri"] == "cam0.mp4"
    assert fr["frame"] == 0 and fr["codes"] == frame(0)[1]  # hex -> bytes
    _, records = read_records(write(path, [header, source(), line(0, frame=-1)]))
    with pytest.raises(BadRecord) as e:
        list(records)
    assert (e.value.where, e.value.at) == (f"{path}:3", "line 3")
    assert e.value.problem == "frame -1: expected an int >= 0 (the frame's index in its source)"


# -- the index location travels unchanged -----------------------------------------------------------------------------
def test_a_location_with_a_scheme_travels_unchanged(header, small_codebook, tmp_path, monkeypatch, capsys):
    from yolo_vq.cli import main
    from yolo_vq.index.memory import Memory

    monkeypatch.chdir(tmp_path)  # a location taken for a relative path would make a folder named "sqlite:" here
    edge = write(tmp_path / "e.jsonl", [header, source()] + [line(i) for i in range(3)])
    loc = f"sqlite:{tmp_path / 'idx'}"
    with pytest.raises(StoreError, match="unknown store scheme 'nosuch:'"):
        ingest(edge, f"nosuch:{tmp_path / 'idx'}", codebook=small_codebook)
    assert ingest(edge, loc, codebook=small_codebook)["detections"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl", "idx"] and (tmp_path / "idx" / "index.db").is_file()
    assert ingest(edge, loc)["skipped_frames"] == 3  # found through the scheme: no codebook needed, nothing twice
    with Memory(loc) as a, Memory(tmp_path / "idx") as b:
        assert len(a) == len(b) == 6 and a.info()["db_bytes"] > 0
    assert main(["info", "--index", loc, "--json"]) in (0, None)
    assert json.loads(capsys.readouterr().out)["detections"] == 6
