"""The store contract as users reach it: every implementation, driven through ``Indexer``, ``Memory``, edge ingest and
the CLI (not through ``open_store`` alone), at the location a user writes (``scheme:PATH``), so a new implementation
is tested by the same cases the day its scheme is added to ``LOCATIONS``.

The interface itself, method by method, is ``test_store.py``; SQLite's own behaviour is ``test_sqlite.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.edge.test_ingest import header, line, source, write  # noqa: F401 - header is a fixture
from yolo_vq import Indexer, Memory
from yolo_vq.cli import main
from yolo_vq.edge.ingest import ingest
from yolo_vq.index.registry import open_store, store_exists

# implementation -> the location a user writes for an index in the folder d (the Lance store adds f"lance:{d}")
LOCATIONS = {"sqlite": lambda d: f"sqlite:{d}"}


@pytest.fixture(params=sorted(LOCATIONS))
def where(request, tmp_path):
    return LOCATIONS[request.param](tmp_path / "idx")


def cli_json(capsys, *argv: str):
    capsys.readouterr()
    assert main(list(argv)) in (0, None)
    return json.loads(capsys.readouterr().out)


def test_index_search_and_the_cli_at_a_location(where, index_model, small_codebook, frames_folder, capsys):
    assert not store_exists(where) and not Indexer.has_codebook(where)
    with Indexer(index_model, where, codebook=small_codebook, track=True, conf=0.1) as ix:
        first = ix.index_source(frames_folder, progress=False)
    assert store_exists(where) and Indexer.has_codebook(where) and first.detections > 10
    with Indexer(index_model, where, track=True, conf=0.1) as ix:  # the index's own codebook; stored frames skipped
        again = ix.index_source(frames_folder, progress=False)
    assert again.frames == again.detections == 0
    with Memory(where) as mem, open_store(where, readonly=True) as st:
        assert len(mem) == st.count() == first.detections
        ids, _ = st.codes()
        det = st.get(ids)
        hit = mem.search(mem.vectors_of(ids[:1]), 5, exclude=ids[:1])[0]
        assert len(hit) == 5 and ids[0] not in hit.data["id"]
        tracked = det.track_id >= 0
        sid, tid = int(det.data["source_id"][tracked][0]), int(det.track_id[tracked][0])
        assert mem.store.track_ids(sid, tid).tolist() == ids[(det.track_id == tid)].tolist()
        person = [k for k, v in mem.names.items() if v == "person"]
        assert mem.search(mem.vectors_of(ids[:1]), 3, classes=person)[0].class_id.tolist() == [person[0]] * 3
    info = cli_json(capsys, "info", "--index", where, "--json")
    assert info["detections"] == first.detections and info["index"] == where and info["db_bytes"] > 0
    rows = cli_json(capsys, "search", "--index", where, "--detection", str(ids[0]), "-k", "4", "--json")
    assert len(rows) == 4 and ids[0] not in [r["id"] for r in rows]


def test_ingest_into_a_location_then_search(where, header, small_codebook, tmp_path, capsys):  # noqa: F811
    edge = write(tmp_path / "e.jsonl", [header, source()] + [line(i) for i in range(5)])
    assert not store_exists(where)
    assert ingest(edge, where, codebook=small_codebook)["detections"] == 10
    assert ingest(edge, where)["skipped_frames"] == 5  # the index found at the location: nothing twice
    with Memory(where) as mem:
        assert len(mem) == 10
        ids = np.sort(mem.store.codes()[0])
        got = mem.search(mem.vectors_of(ids[3:4]), 1)[0]
        assert got.data["id"].tolist() == [ids[3]]  # a stored detection finds itself first
    rows = cli_json(capsys, "search", "--index", where, "--detection", str(ids[3]), "--json")
    assert len(rows) == 9
