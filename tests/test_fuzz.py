"""Every loader under fuzzed input (hypothesis, derandomized: the same examples on every run).

Property: no input crashes the interpreter or leaves a traceback on the CLI: ``main`` returns 0 or 2, never 70
(an internal error) or an exception, and 2 comes with exactly one ``error:`` line on stderr; an index directory is
byte-identical (every file but SQLite's ``-wal``/``-shm``) after a refused command and after a read-only one.

Targets: the codebook files of an index (and ``load_codebook`` itself), the bytes and values of ``index.db``
(search, and index with ``--codebook``: refused before any inference), edge records files (``ingest``: ``.jsonl``
and ``.parquet``; the store stays whole) and the metadata of an exported ONNX graph (``EdgeModel``, ``edge``: a
refused run leaves no records file). Each error line must also name the file or index it is about. Inputs are drawn
as edits of real files, so each failure hypothesis finds reads as a concrete ``@example`` (kept above each test,
with what it used to do). ``pytest --hypothesis-show-statistics`` counts the outcomes of each test.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import random
import re
import shutil
import sqlite3
import tempfile
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any
from unittest import mock

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from yolo_vq.cli import main
from yolo_vq.errors import CodebookError, EdgeError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

FUZZ = {"deadline": None, "derandomize": True, "database": None, "print_blob": True,
        "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                  HealthCheck.data_too_large, HealthCheck.filter_too_much]}

# -- shared helpers ---------------------------------------------------------------------------------------------


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` but SQLite's -wal/-shm (a reader may leave those)."""
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def cli(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured. The argv are well-formed, so argparse never exits."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def outcome(rc: int, err: str) -> str | None:
    """Check the CLI's property; the error line when it refused (rc 2), None when it succeeded."""
    assert rc in (0, 2), f"exit {rc}: {err}"
    assert "Traceback" not in err, err
    if rc == 0:
        event("exit 0")
        return None
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    event(f"exit 2: {gist(lines[0])}")
    return lines[0]


def gist(message: str) -> str:
    """A message without its paths, values and details: what `--hypothesis-show-statistics` counts."""
    return re.sub(r"\S*/\S+|\{.*|'.*|\(.*|\[.*|\d+", "", message)[:70]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@contextmanager
def scratch(work: Path):
    """A fresh directory per hypothesis example (a function-scoped tmp_path is shared by all of them)."""
    d = Path(tempfile.mkdtemp(dir=work))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def copy_index(index: Path, where: Path) -> Path:
    shutil.copytree(index, where / "idx", ignore=shutil.ignore_patterns("*-wal", "*-shm"))
    return where / "idx"


# -- JSON values and edits of real JSON documents ---------------------------------------------------------------

SCALAR = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
          | st.sampled_from([0, -1, 1, 2, 3, 7, 8, 2**31, 2**63, -2**63, 10**12, 10**30, 1e308, float("inf"),
                             float("nan"), "", "0", "uint8", "uint16", "float32", "random", "ProductQuantizer",
                             "VectorQuantizer", "ResidualQuantizer"]))
JSON = st.recursive(SCALAR, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=8)
Path_ = tuple[Any, ...]
Edit = tuple[Path_, str, Any]  # (path, "drop" | "set", value)


# JSON text nested deeper than Python's recursion limit: json.loads raises RecursionError, not JSONDecodeError
DEEP = st.builds(lambda n, c: c * n, st.integers(1000, 50_000), st.sampled_from(["[", '{"a":', "[{\"a\":"]))


def edits(paths: list[Path_], n: int = 3) -> st.SearchStrategy[list[Edit]]:
    """1..n edits of a document: drop or set (to any JSON value) a known path, or set a new top-level key."""
    path = st.sampled_from(paths) | st.tuples(st.text(max_size=6))
    edit = st.tuples(path, st.just("drop"), st.none()) | st.tuples(path, st.just("set"), JSON)
    return st.lists(edit, min_size=1, max_size=n)


def apply(doc: Any, changes: list[Edit]) -> Any:
    """``doc`` with ``changes`` applied (a path whose parent is gone or not a container is skipped)."""
    doc = copy.deepcopy(doc)
    for path, op, value in changes:
        parent = doc
        try:
            for k in path[:-1]:
                parent = parent[k]
        except (KeyError, IndexError, TypeError):
            continue
        key = path[-1]
        if isinstance(parent, dict):
            if op == "drop":
                parent.pop(key, None)
            else:
                parent[key] = value
        elif isinstance(parent, list) and isinstance(key, int) and -len(parent) <= key < len(parent):
            if op == "drop":
                del parent[key]
            else:
                parent[key] = value
    return doc


def dumps(doc: Any) -> str:
    return json.dumps(doc)  # NaN and Infinity as JSON's extensions, which json.loads reads back


# -- byte mutations ---------------------------------------------------------------------------------------------

Mutation = tuple  # ("truncate", at) | ("flip", [(at, xor), ...]) | ("length", n) | ("header", edits) | ...


def mutate_bytes(data: bytes, m: Mutation) -> bytes:
    """A generic byte mutation (offsets taken modulo the size)."""
    b = bytearray(data)
    kind = m[0]
    if kind == "truncate":
        return bytes(b[: m[1] % len(b)])
    if kind == "flip":
        for at, xor in m[1]:
            b[at % len(b)] ^= xor
        return bytes(b)
    if kind == "splice":  # overwrite a run with drawn bytes
        at = m[1] % len(b)
        b[at : at + len(m[2])] = m[2]
        return bytes(b)
    raise AssertionError(kind)


FLIPS = st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), min_size=1, max_size=8)
BYTE_MUTATION = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 2**20)),
    st.tuples(st.just("flip"), FLIPS),
    st.tuples(st.just("splice"), st.integers(0, 2**20), st.binary(min_size=1, max_size=16)),
)

# ================================================================================================================
# 1. codebook files
# ================================================================================================================

PQ_PARAMS = ["dim", "m", "codebook_size", "center", "pca_dim", "rotation", "rotation_blocks", "opq", "opq_iters",
             "opq_kmeans_iters", "iters", "tol", "init", "max_train", "seed"]
CB_PATHS: list[Path_] = [("format_version",), ("quantizer",), ("quantizer", "type"), ("quantizer", "params"),
                         *[("quantizer", "params", k) for k in PQ_PARAMS], ("dim",), ("code_size",), ("embedding",),
                         ("model_fingerprint",), ("stats",), ("tensors",), ("tensors", "sha256"),
                         ("tensors", "file"), ("yolo_vq_version",)]
ST_TENSORS = ["mean", "transform", "codebooks"]
ST_PATHS: list[Path_] = [("__metadata__",), ("__metadata__", "format"), *[p for t in ST_TENSORS for p in (
    (t,), (t, "dtype"), (t, "shape"), (t, "shape", 0), (t, "shape", 1), (t, "shape", -1), (t, "data_offsets"),
    (t, "data_offsets", 0), (t, "data_offsets", 1))]]

# What codebook.json becomes: replaced by any JSON or text, or the real one edited.
CB_JSON = st.one_of(
    st.tuples(st.just("replace"), JSON.map(dumps)),
    st.tuples(st.just("replace"), st.text(max_size=40) | DEEP),
    st.tuples(st.just("edit"), edits(CB_PATHS)),
    st.tuples(st.just("edit"), st.lists(st.tuples(st.sampled_from([("quantizer", "type")] + [
        ("quantizer", "params", k) for k in PQ_PARAMS]), st.just("set"), SCALAR | JSON), min_size=1, max_size=3)),
)
# What codebook.safetensors becomes: the real one mutated, its length prefix replaced, or its JSON header edited.
CB_TENSORS = st.one_of(
    BYTE_MUTATION,
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1) | st.integers(0, 4096)),
    st.tuples(st.just("header"), edits(ST_PATHS)),
    st.tuples(st.just("header-json"), JSON),
)


def mutate_safetensors(data: bytes, m: Mutation) -> bytes:
    n = int.from_bytes(data[:8], "little")
    if m[0] == "length":
        return m[1].to_bytes(8, "little") + data[8:]
    if m[0] in ("header", "header-json"):
        header = apply(json.loads(data[8 : 8 + n]), m[1]) if m[0] == "header" else m[1]
        text = dumps(header).encode()
        return len(text).to_bytes(8, "little") + text + data[8 + n :]
    return mutate_bytes(data, m)


def codebook_json(real: dict, case: tuple) -> str:
    return case[1] if case[0] == "replace" else dumps(apply(real, case[1]))


def set_sha(text: str, sha256: str | None) -> str:
    """``text`` (a codebook JSON) with ``tensors.sha256`` set (None: removed), when it has a tensors object."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return text
    if isinstance(doc, dict) and isinstance(doc.get("tensors"), dict):
        if sha256 is None:
            doc["tensors"].pop("sha256", None)
        else:
            doc["tensors"]["sha256"] = sha256
    return dumps(doc)


class Quiet(tuple):
    """Fixture data hypothesis prints with a failing example: a short repr instead of megabytes."""

    def __repr__(self) -> str:
        return f"<{len(self)} values>"


@pytest.fixture(scope="module")
def real_codebook(small_index) -> tuple[dict, bytes]:
    return Quiet((json.loads((small_index / "codebook.json").read_text()),
                  (small_index / "codebook.safetensors").read_bytes()))


@settings(max_examples=300, **FUZZ)
@given(js=st.none() | CB_JSON, tensors=st.none() | CB_TENSORS, rebind=st.booleans())
# was: exit 70 (TypeError: unhashable type: 'list', in load_codebook's quantizer type lookup)
@example(js=("edit", [(("quantizer", "type"), "set", [])]), tensors=None, rebind=False)
@example(js=("edit", [(("quantizer", "params", "dim"), "set", 10**12 + 1)]), tensors=None, rebind=False)  # was: hung
@example(js=("replace", '[{"a":' * 1000), tensors=None, rebind=False)  # was: exit 70, RecursionError
# was: exit 70, TypeError: 'bool' object is not subscriptable (the index's codebook check quoting the checksum)
@example(js=("edit", [(("tensors", "sha256"), "set", False)]), tensors=None, rebind=False)
def test_fuzzed_codebook_files_of_an_index(small_index, real_codebook, work, js, tensors, rebind):
    """search on an index whose codebook.json / .safetensors were damaged; ``rebind``: its new tensors' sha256 is
    written into codebook.json and index.db too (else the checksum refuses every tensor change)."""
    meta, st_bytes = real_codebook
    with scratch(work) as tmp:
        idx = copy_index(small_index, tmp)
        text = dumps(meta) if js is None else codebook_json(meta, js)
        data = st_bytes if tensors is None else mutate_safetensors(st_bytes, tensors)
        (idx / "codebook.safetensors").write_bytes(data)
        if rebind:
            new = hashlib.sha256(data).hexdigest()
            text = set_sha(text, new)
            with sqlite3.connect(idx / "index.db") as c:
                c.execute("UPDATE meta SET value = ? WHERE key = 'codebook_sha256'", (json.dumps(new),))
            c.close()
        (idx / "codebook.json").write_text(text)
        before = digest(idx)
        rc, _, err = cli(["search", "--index", idx, "--detection", "1"])
        line = outcome(rc, err)
        assert line is None or str(idx) in line, line  # the error names the index
        assert digest(idx) == before


@settings(max_examples=600, **FUZZ)
@given(js=st.none() | CB_JSON, tensors=st.none() | CB_TENSORS, sha_mode=st.sampled_from(["keep", "recompute", "drop"]))
@example(js=("edit", [(("quantizer", "type"), "set", [])]), tensors=None, sha_mode="keep")  # was: TypeError
@example(js=("replace", "[" * 1990), tensors=None, sha_mode="keep")  # was: RecursionError
# was: RuntimeError (allocating 4e24 bytes); dim 17408: 1.2 GB allocated before the shape check refused it
@example(js=("edit", [(("quantizer", "params", "dim"), "set", 10**12)]), tensors=None, sha_mode="keep")
@example(js=("edit", [(("quantizer", "params", "dim"), "set", 17408)]), tensors=None, sha_mode="keep")
@example(js=("edit", [(("quantizer", "params", "dim"), "set", 10**12 + 1)]), tensors=None, sha_mode="keep")  # hung
@example(js=("edit", [(("quantizer", "params", "m"), "set", 2**62), (("quantizer", "params", "dim"), "set", 2**62)]),
         tensors=None, sha_mode="keep")  # was: RuntimeError (storage size overflowed)
@example(js=("edit", [(("quantizer", "params", "rotation"), "set", "random"),
                      (("quantizer", "params", "rotation_blocks"), "set", [[float("inf"), 1]])]),
         tensors=None, sha_mode="keep")  # was: OverflowError
def test_load_codebook_raises_only_codebook_error(real_codebook, work, js, tensors, sha_mode):
    """``load_codebook`` on a fuzzed pair returns a quantizer or raises CodebookError; ``sha_mode`` recompute/drop
    lets changed tensors past the checksum, into the safetensors parser and the quantizer's constructor."""
    from yolo_vq.quant import Quantizer, load_codebook

    meta, st_bytes = real_codebook
    meta = meta | {"tensors": meta["tensors"] | {"file": "cb.safetensors"}}
    with scratch(work) as tmp:
        text = dumps(meta) if js is None else codebook_json(meta, js)
        data = st_bytes if tensors is None else mutate_safetensors(st_bytes, tensors)
        if sha_mode != "keep":
            text = set_sha(text, hashlib.sha256(data).hexdigest() if sha_mode == "recompute" else None)
        (tmp / "cb.safetensors").write_bytes(data)
        (tmp / "cb.json").write_text(text)
        try:
            q = load_codebook(tmp / "cb")
        except CodebookError as e:
            assert "\n" not in str(e).strip()
            event(gist(str(e)))
        else:
            assert isinstance(q, Quantizer) and q.fitted


# ================================================================================================================
# 2. index.db bytes
# ================================================================================================================

# ("flip", [(offset, xor)]), ("truncate", at), ("splice", at, bytes), ("page", n, seed, fill): page n overwritten
# (random bytes from seed, or a fill byte), ("btree", n, offset < 12, xor): a flip in page n's b-tree header,
# ("header", offset < 100, bytes): SQLite's file header overwritten, ("zero-header",).
DB_DAMAGE = st.one_of(
    BYTE_MUTATION,
    st.tuples(st.just("page"), st.integers(0, 1000), st.integers(0, 2**32 - 1), st.none() | st.integers(0, 255)),
    st.tuples(st.just("btree"), st.integers(0, 1000), st.integers(0, 11), st.integers(1, 255)),
    st.tuples(st.just("header"), st.integers(0, 99), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("zero-header")),
)
# Damage inside values, which no page check sees: a meta value replaced (by any JSON, or text that is none), a
# cell of a table set to any SQLite value (columns are dynamically typed: a REAL may come back as TEXT or BLOB).
SQL_VALUE = (st.none() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=12))
COLUMNS = {"detections": ["source_id", "frame", "time", "x1", "y1", "x2", "y2", "class_id", "confidence", "track_id",
                          "codes", "thumb"],
           "sources": ["uri", "fingerprint", "fps", "frame_count", "width", "height"],
           "frames": ["source_id", "frame", "detections"]}
META_KEYS_DB = ["schema_version", "codebook_sha256", "embedding", "model_fingerprint", "names", "code_size", "vectors"]
DB_VALUE_DAMAGE = st.one_of(
    st.tuples(st.just("meta"), st.sampled_from(META_KEYS_DB), JSON.map(dumps) | st.text(max_size=12)),
    st.sampled_from(list(COLUMNS)).flatmap(lambda t: st.tuples(
        st.just("cell"), st.just(t), st.sampled_from(COLUMNS[t]), st.integers(0, 20), SQL_VALUE)),
)
DB_DAMAGES = st.lists(DB_DAMAGE | DB_VALUE_DAMAGE, min_size=1, max_size=3)


def damage_values(db: Path, damages: list[Mutation]) -> None:
    """Apply the value damages (``meta``, ``cell``) through SQLite; a NOT NULL or UNIQUE refusal skips one."""
    c = sqlite3.connect(db, isolation_level=None)
    try:
        for m in damages:
            try:
                if m[0] == "meta":
                    c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (m[1], m[2]))
                elif m[0] == "cell":
                    _, table, col, nth, value = m
                    key = "source_id, frame" if table == "frames" else "rowid"  # frames has no rowid
                    c.execute(f"UPDATE {table} SET {col} = ? WHERE ({key}) = (SELECT {key} FROM {table} ORDER BY "
                              f"{key} LIMIT 1 OFFSET ?)", (value, nth))
            except sqlite3.IntegrityError:
                pass
    finally:
        c.close()


def damage_db(data: bytes, m: Mutation) -> bytes:
    b = bytearray(data)
    page = int.from_bytes(data[16:18], "big") or 4096
    if page == 1:
        page = 65536
    pages = max(1, len(b) // page)
    kind = m[0]
    if kind == "page":
        at = (m[1] % pages) * page
        fill = random.Random(m[2]).randbytes(page) if m[3] is None else bytes([m[3]]) * page
        b[at : at + page] = fill
        return bytes(b)
    if kind == "btree":
        n = m[1] % pages
        at = n * page + (100 if n == 0 else 0) + m[2]
        if at < len(b):
            b[at] ^= m[3]
        return bytes(b)
    if kind == "header":
        b[m[1] : m[1] + len(m[2])] = m[2][: 100 - m[1]]
        return bytes(b)
    if kind == "zero-header":
        b[:100] = bytes(100)
        return bytes(b)
    return mutate_bytes(data, m)


def damaged_copy(small_index: Path, tmp: Path, damages: list[Mutation]) -> Path:
    idx = copy_index(small_index, tmp)
    db = idx / "index.db"
    damage_values(db, [m for m in damages if m[0] in ("meta", "cell")])
    data = db.read_bytes()
    for m in damages:
        if data and m[0] not in ("meta", "cell"):
            data = damage_db(data, m)
    db.write_bytes(data)
    return idx


@settings(max_examples=300, **FUZZ)
@given(damages=DB_DAMAGES)
# was: exit 70, DatabaseError from Store.snapshot's COMMIT over the StoreError of the read (a page of detections)
@example(damages=[("flip", [(24576, 1)])])
# meta values of another form; each was exit 70: TypeError ('bool' object is not subscriptable), AttributeError
# ('bool' object has no attribute 'items'), TypeError (reshape to a str); not JSON: "error: Expecting value: ..."
@example(damages=[("meta", "codebook_sha256", "false")])
@example(damages=[("meta", "names", "true")])
@example(damages=[("meta", "code_size", '"8"')])
@example(damages=[("meta", "code_size", "{")])
@example(damages=[("meta", "code_size", "null")])  # was: exit 70, TypeError (reshape to None)
@example(damages=[("cell", "detections", "frame", 0, "")])  # was: "error: invalid literal for int() ...", no file named
@example(damages=[("splice", 3081, b"\x80")])  # was: "error: 'utf-8' codec can't decode byte 0x80 ...", no file named
def test_search_on_a_damaged_index_db(small_index, work, damages):
    with scratch(work) as tmp:
        idx = damaged_copy(small_index, tmp, damages)
        before = digest(idx)
        rc, _, err = cli(["search", "--index", idx, "--detection", "1"])
        line = outcome(rc, err)
        assert line is None or str(idx) in line, line  # the error names the index
        assert digest(idx) == before  # read-only: refused or not


@settings(max_examples=60, **FUZZ)
@given(damages=DB_DAMAGES)
def test_index_into_a_damaged_index_db(small_index, small_codebook, frames_folder, work, damages):
    """index --codebook on a damaged index: refused before any inference with the index as it was, or (the damage
    left it readable) done."""
    from yolo_vq.index.indexer import Indexer

    infer = Indexer._infer
    inferred: list[int] = []

    def spy(self, chunk):
        inferred.append(len(chunk))
        return infer(self, chunk)

    with scratch(work) as tmp:
        idx = damaged_copy(small_index, tmp, damages)
        before = digest(idx)
        with mock.patch.object(Indexer, "_infer", spy):
            rc, _, err = cli(["index", frames_folder, "--index", idx, "--codebook", small_codebook, "--quiet"])
        event(f"inferred {sum(inferred)} frames")
        if (line := outcome(rc, err)) is not None:
            assert str(idx) in line, line
            assert digest(idx) == before
            assert not inferred, f"refused after inference of {sum(inferred)} frames: {err}"


# ================================================================================================================
# 3. edge records (ingest)
# ================================================================================================================

FINGERPRINTS = ["fp-cam0", "fp-cam1", "<small_index>"]  # the last: the source small_index holds (frames 0-11)


@st.composite
def source_rec(draw) -> dict:
    return {"type": "source", "source": draw(st.integers(0, 2)), "uri": draw(st.sampled_from(["cam0.mp4", "cam1"])),
            "fingerprint": draw(st.sampled_from(FINGERPRINTS)), "fps": 25.0, "frame_count": 20, "width": 640,
            "height": 272}


@st.composite
def frame_rec(draw) -> dict:
    n = draw(st.integers(0, 3))
    coord = st.floats(0, 640, width=32)
    return {"type": "frame", "source": draw(st.integers(0, 2)), "frame": draw(st.integers(0, 15)),
            "time": draw(st.floats(0, 100, width=32)),
            "xyxy": [[draw(coord) for _ in range(4)] for _ in range(n)],
            "confidence": [draw(st.floats(0, 1, width=32)) for _ in range(n)],
            "class_id": [draw(st.integers(0, 2)) for _ in range(n)],
            "codes": [draw(st.binary(min_size=8, max_size=8)).hex() for _ in range(n)]}


REC_PATHS: list[Path_] = [(k,) for k in ("type", "source", "uri", "fingerprint", "fps", "frame_count", "width",
                                         "height", "frame", "time", "xyxy", "confidence", "class_id", "codes")] + [
    ("xyxy", 0), ("xyxy", 0, 0), ("xyxy", 0, 3), ("confidence", 0), ("class_id", 0), ("codes", 0), ("codes", -1)]
RECORD = source_rec() | frame_rec()
# A line: a record (maybe edited), any JSON, text, bytes, or a record cut short.
LINE = st.one_of(
    st.tuples(st.just("rec"), RECORD, st.just([])),
    st.tuples(st.just("rec"), RECORD, edits(REC_PATHS, 2)),
    st.tuples(st.just("json"), JSON),
    st.tuples(st.just("raw"), (st.text(max_size=30) | DEEP).map(str.encode) | st.binary(max_size=30)),
    st.tuples(st.just("cut"), RECORD, st.integers(0, 200)),
)
HEADER_PATHS: list[Path_] = [(k,) for k in ("type", "edge_format", "yolo_vq_export", "imgsz", "codebook_fingerprint",
                                            "code_size", "code_dtype", "names", "model_fingerprint", "embedding")] + [
    ("names", "0"), ("imgsz", 0)]


def render_line(item: tuple, real_fp: str) -> bytes:
    kind = item[0]
    if kind == "raw":
        return item[1] + b"\n"
    if kind == "json":
        return dumps(item[1]).encode() + b"\n"
    rec = dict(item[1])
    if rec.get("fingerprint") == "<small_index>":
        rec["fingerprint"] = real_fp
    if kind == "cut":
        return dumps(rec).encode()[: item[2]] + b"\n"
    return dumps(apply(rec, item[2])).encode() + b"\n"


@pytest.fixture(scope="module")
def edge_header(index_model, small_codebook) -> dict:
    """The header `yolo-vq edge` writes for a graph exported with ``small_codebook`` (as tests/test_faults.py's)."""
    from yolo_vq import Embedder
    from yolo_vq.quant import codebook_checksum

    emb = Embedder(index_model)
    return {"type": "header", "edge_format": 1, "yolo_vq_export": 1, "imgsz": [288, 640],
            "codebook_fingerprint": codebook_checksum(small_codebook), "code_size": 8, "code_dtype": "uint8",
            "names": {str(k): v for k, v in index_model.names.items()}, "model_fingerprint": emb.fingerprint,
            "embedding": emb.describe()}


@pytest.fixture(scope="module")
def stored(small_index) -> tuple[str, set]:
    """small_index's source fingerprint and its stored (fingerprint, frame) pairs."""
    from yolo_vq.index.registry import open_store

    with open_store(small_index, readonly=True) as s:
        (src,) = s.sources()
        return src.fingerprint, {(src.fingerprint, int(f)) for f in s.frames_done(src.id)}


def new_frames_before_error(path: Path, done: set) -> int:
    """Frames the reader yields before its first error that are not in the index yet: 0 means ingest may store
    nothing (the oracle for "refused before any valid frame")."""
    from yolo_vq.edge.records import RecordError, read_records

    new, fps = set(), {}
    try:
        _, recs = read_records(path)
        for _, r in recs:
            if r["type"] == "source":
                fps[r["source"]] = r["fingerprint"]
            elif (fps[r["source"]], r["frame"]) not in done:
                new.add((fps[r["source"]], r["frame"]))
    except RecordError:
        pass
    return len(new)


def check_store(idx: Path) -> None:
    """The index after an ingest, whatever its outcome: whole, no source without frames, counts that agree."""
    c = sqlite3.connect(idx / "index.db")
    try:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert c.execute("SELECT COUNT(*) FROM sources s WHERE NOT EXISTS "
                         "(SELECT 1 FROM frames f WHERE f.source_id = s.id)").fetchone()[0] == 0
        n, total = c.execute("SELECT (SELECT COUNT(*) FROM detections), "
                             "(SELECT COALESCE(SUM(detections), 0) FROM frames)").fetchone()
        assert n == total
        assert c.execute("SELECT COUNT(DISTINCT length(codes)) FROM detections").fetchone()[0] <= 1
    finally:
        c.close()


def ingest_and_check(small_index: Path, tmp: Path, path: Path, done: set) -> None:
    idx = copy_index(small_index, tmp)
    before = digest(idx)
    rc, out, err = cli(["ingest", path, "--index", idx])
    line = outcome(rc, err)
    assert line is None or str(path) in line or str(idx) in line, line  # names the file or the index
    fresh = new_frames_before_error(path, done)
    if (line is not None and fresh == 0) or (line is None and "ingested 0 frames" in out):
        assert digest(idx) == before, (line, out)
    check_store(idx)


@settings(max_examples=400, **FUZZ)
@given(header_edits=st.just([]) | edits(HEADER_PATHS, 2),
       sources=st.lists(source_rec(), max_size=2, unique_by=lambda r: r["source"]), lines=st.lists(LINE, max_size=8))
def test_ingest_fuzzed_jsonl(small_index, edge_header, stored, work, header_edits, sources, lines):
    """A header (maybe edited), valid source records (so that frames can be stored), then fuzzed lines."""
    real_fp, done = stored
    with scratch(work) as tmp:
        path = tmp / "cam.jsonl"
        path.write_bytes(dumps(apply(edge_header, header_edits)).encode() + b"\n"
                         + b"".join(render_line(x, real_fp) for x in [("rec", s, []) for s in sources] + lines))
        ingest_and_check(small_index, tmp, path, done)


# Parquet: rows of frames (typed as the schema wants, values anywhere in range), sources and header in the metadata
# (maybe edited), then the file's bytes maybe mutated.
PQ_FRAME = st.fixed_dictionaries({
    "source": st.integers(0, 2), "frame": st.integers(-2, 15), "time": st.floats(width=64),
    "n": st.integers(0, 2), "conf": st.floats(width=32), "class_id": st.integers(-1, 3),
    "code_len": st.sampled_from([8, 8, 7]),
})


def pq_frame(f: dict) -> tuple[dict, list[bytes]]:
    n = f["n"]
    return ({"source": f["source"], "frame": f["frame"], "time": f["time"], "xyxy": [[1.0, 2.0, 30.0, 40.0]] * n,
             "confidence": [f["conf"]] * n, "class_id": [f["class_id"]] * n}, [bytes(f["code_len"])] * n)


@settings(max_examples=200, **FUZZ)
@given(header_edits=st.just([]) | edits(HEADER_PATHS, 2),
       sources=st.lists(source_rec(), max_size=2, unique_by=lambda r: r["source"]),
       source_edits=st.just([]) | edits(REC_PATHS, 2), frames=st.lists(PQ_FRAME, max_size=4),
       damage=st.none() | BYTE_MUTATION)
def test_ingest_fuzzed_parquet(small_index, edge_header, stored, work, header_edits, sources, source_edits, frames,
                               damage):
    from yolo_vq.edge.records import RecordWriter

    real_fp, done = stored
    with scratch(work) as tmp:
        path = tmp / "cam.parquet"
        srcs = [apply(s | {"fingerprint": real_fp} if s["fingerprint"] == "<small_index>" else s, source_edits)
                for s in sources]
        with RecordWriter(path, apply(edge_header, header_edits), srcs) as w:
            for f in frames:
                w.frame(*pq_frame(f))
        if damage is not None:
            path.write_bytes(mutate_bytes(path.read_bytes(), damage))
        ingest_and_check(small_index, tmp, path, done)


# ================================================================================================================
# 4. ONNX metadata (EdgeModel, edge)
# ================================================================================================================

ONNX_META = {"yolo_vq_export": 1, "imgsz": [32, 32], "letterbox_imgsz": 32, "source_size": None, "batch": 1,
             "codebook_fingerprint": "f" * 64, "code_size": 8, "code_dtype": "uint8", "names": {"0": "person"},
             "model_fingerprint": "0123456789abcdef", "embedding": {"dim": 448}, "task": "detect",
             "inputs": ["images", "regions"], "outputs": ["boxes", "scores", "classes", "codes", "valid"]}


def tiny_onnx(props: dict[str, str]) -> bytes:
    """A valid graph with the edge runner's inputs and outputs (constant: one box, 8-byte code) and ``props``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    outs = {"boxes": np.array([[[2, 2, 20, 20]]], np.float32), "scores": np.array([[0.9]], np.float32),
            "classes": np.array([[0]], np.int64), "codes": np.arange(8, dtype=np.uint8).reshape(1, 1, 8),
            "valid": np.array([[True]])}
    nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, f"{k}_value"))
             for k, v in outs.items()]
    graph = helper.make_graph(
        nodes, "tiny_vq",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32]),
         helper.make_tensor_value_info("regions", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
         for k, v in outs.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in props.items())
    return model.SerializeToString()


META_KEYS = sorted(ONNX_META)
# A metadata edit: drop a key, set it to raw text, to any JSON, or to an edited valid value; or add another key.
META_EDIT = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(META_KEYS), st.none()),
    st.tuples(st.just("text"), st.sampled_from(META_KEYS) | st.text(max_size=8), st.text(max_size=16) | DEEP),
    st.tuples(st.just("json"), st.sampled_from(META_KEYS) | st.text(max_size=8), JSON),
    st.tuples(st.just("edit"), st.sampled_from(META_KEYS),
              edits([(0,), (1,), (-1,), ("0",), ("1",), ("dim",)], 2)),
)
ONNX_CASE = st.one_of(
    st.tuples(st.just("meta"), st.lists(META_EDIT, min_size=1, max_size=4)),
    st.tuples(st.just("bytes"), st.binary(max_size=64)),
    st.tuples(st.just("mutated"), BYTE_MUTATION),
)


def onnx_bytes(case: tuple) -> bytes:
    props = {k: json.dumps(v) for k, v in ONNX_META.items()}
    if case[0] == "bytes":
        return case[1]
    if case[0] == "mutated":
        return mutate_bytes(tiny_onnx(props), case[1])
    for op, key, value in case[1]:
        if op == "drop":
            props.pop(key, None)
        elif op == "text":
            props[key] = value
        elif op == "json":
            props[key] = dumps(value)
        else:
            props[key] = dumps(apply(ONNX_META[key], value))
    return tiny_onnx(props)


@pytest.fixture(scope="module")
def two_frames(work) -> Path:
    """A 2-frame MJPG .avi (64x48)."""
    path = work / "two.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    for i in range(2):
        w.write(np.full((48, 64, 3), 60 + 100 * i, np.uint8))
    w.release()
    assert cv2.VideoCapture(str(path)).read()[0]
    return path


@pytest.fixture(scope="module")
def broken_folder(work) -> Path:
    """Two PNGs, the second cut after its header: the edge run fails at frame 1, after frame 0 was written."""
    d = work / "broken"
    d.mkdir()
    cv2.imwrite(str(d / "000.png"), np.full((48, 64, 3), 90, np.uint8))
    (d / "001.png").write_bytes((d / "000.png").read_bytes()[:60])
    return d


def test_the_tiny_graph_runs_as_an_exported_one(work, two_frames):
    """The fuzz base: the unedited tiny graph loads and `edge` writes its records."""
    with scratch(work) as tmp:
        (tmp / "m.onnx").write_bytes(onnx_bytes(("meta", [])))
        rc, _, err = cli(["edge", tmp / "m.onnx", two_frames, "--out", tmp / "o.jsonl", "--quiet"])
        assert rc == 0, err
        lines = [json.loads(x) for x in (tmp / "o.jsonl").read_text().splitlines()]
        assert [x["type"] for x in lines] == ["header", "source", "frame", "frame"]
        assert lines[2]["codes"] == [bytes(range(8)).hex()]


@settings(max_examples=400, **FUZZ)
@given(case=ONNX_CASE, broken=st.booleans())
# was: exit 70, onnxruntime InvalidArgument (metadata batch None for a graph of batch 1)
@example(case=("meta", [("drop", "batch", None)]), broken=False)
@example(case=("mutated", ("splice", 726, b"\x80")), broken=False)  # was: UnicodeDecodeError (metadata not UTF-8)
@example(case=("mutated", ("splice", 23543, b"\x80")), broken=False)  # was: UnicodeDecodeError (a name not UTF-8)
@example(case=("meta", [("text", "names", "[" * 100_000)]), broken=False)  # was: RecursionError, exit 70
@example(case=("meta", []), broken=True)  # was: exit 2 leaving o.jsonl with the header, source and frame 0
def test_fuzzed_onnx_metadata(work, two_frames, broken_folder, case, broken):
    """EdgeModel and `edge` on the tiny graph with edited metadata (or other bytes), on the 2-frame video or, with
    ``broken``, a folder whose second image does not decode."""
    from yolo_vq.edge.runner import EdgeModel

    with scratch(work) as tmp:
        model = tmp / "m.onnx"
        model.write_bytes(onnx_bytes(case))
        try:
            EdgeModel(model)
        except EdgeError as e:
            assert "\n" not in str(e).strip()
        out, source = tmp / "o.jsonl", broken_folder if broken else two_frames
        rc, _, err = cli(["edge", model, source, "--out", out, "--quiet"])
        if (line := outcome(rc, err)) is not None:
            assert str(model) in line or str(source) in line, line  # names the graph or the source
            assert not out.exists(), f"a refused edge run left {out.name}: {out.read_text()[:200]!r}"
