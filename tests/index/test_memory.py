"""Searching an index: exact re-ranking of an ADC shortlist with kept float16 vectors, and indexes without them."""

from __future__ import annotations

import numpy as np
import pytest

from yolo_vq import Indexer, Memory
from yolo_vq.cli import main
from yolo_vq.index.registry import open_store
from yolo_vq.index.store import SCHEMA_VERSION, StoreError

CONF = 0.01  # bikes frames 30-41: ~160 low-confidence detections, enough rows for a shortlist to matter


@pytest.fixture(scope="module")
def kept(index_model, small_codebook, bikes_frames, tmp_path_factory):
    """Frames indexed from the user's loop with vectors kept; returns (index, their embeddings in id order)."""
    idx = tmp_path_factory.mktemp("kept") / "idx"
    embeddings = []
    with Indexer(index_model, idx, codebook=small_codebook, keep_vectors=True) as ix:
        for r in index_model.predict(bikes_frames, conf=CONF, verbose=False):
            embeddings.append(r.vq_embeddings)
            ix.add(r, source="cam0")
    return idx, np.concatenate(embeddings)


def test_kept_vectors_are_the_embeddings_in_float16(kept):
    idx, emb = kept
    with open_store(idx, readonly=True) as s:
        ids, _ = s.codes()
        vectors, present = s.vectors(ids)
        assert s.vector_dim == emb.shape[1] and len(ids) == len(emb) > 100 and present.all()
    np.testing.assert_array_equal(vectors, emb.astype(np.float16).astype(np.float32))


def test_rerank_is_exact_cosine_over_the_adc_shortlist(kept):
    idx, emb = kept
    with Memory(idx) as mem:
        ids = mem.store.codes()[0]
        exact = emb.astype(np.float16).astype(np.float32)
        for qi in (0, 57, len(ids) - 1):
            q = emb[qi : qi + 1]
            cos = exact @ q[0] / (np.linalg.norm(exact, axis=1) * np.linalg.norm(q[0]))
            full = mem.search(q, 10, rerank=len(ids))[0]  # shortlist = everything: exact search
            np.testing.assert_array_equal(full.data["id"], ids[np.argsort(-cos, kind="stable")[:10]])
            np.testing.assert_allclose(full.data["score"], np.sort(cos)[::-1][:10], rtol=1e-5)
            assert full.data["id"][0] == ids[qi]  # a stored detection finds itself first
            short = mem.search(q, 5, rerank=20)[0]
            adc = mem.search(q, 20)[0].data["id"]  # the shortlist: ADC's top 20
            pos = np.searchsorted(ids, adc)
            np.testing.assert_array_equal(short.data["id"], adc[np.argsort(-cos[pos], kind="stable")[:5]])
        q = emb[:1]
        assert not np.array_equal(mem.search(q, 10)[0].data["id"], mem.search(q, 10, rerank=len(ids))[0].data["id"])


def test_an_index_without_vectors_searches_and_rerank_says_how(index_model, small_codebook, bikes_frames, tmp_path):
    idx = tmp_path / "idx"
    with Indexer(index_model, idx, codebook=small_codebook, conf=CONF) as ix:
        ix.add(bikes_frames[:6], source="cam0")
    with Memory(idx) as mem:  # what earlier versions wrote: no vectors kept, same schema version
        assert mem.store.vector_dim is None
        q = mem.vectors_of(mem.store.codes()[0][:1])
        assert len(mem.search(q, 5)[0]) == 5 and mem.store.get_meta("schema_version") == SCHEMA_VERSION
        with pytest.raises(StoreError, match=r"keeps no float vectors to re-rank with: index it with --keep-vectors"):
            mem.search(q, 5, rerank=50)
    with Indexer(index_model, idx, keep_vectors=True, conf=CONF) as ix:  # start keeping them
        ix.add(bikes_frames[6:9], source="cam0")
    with Indexer(index_model, idx, conf=CONF) as ix:  # ... and a later run goes on keeping them
        ix.add(bikes_frames[9:], source="cam0")
    with Memory(idx) as mem:
        det = mem.store.get(mem.store.codes()[0])
        present = mem.store.vectors(det.data["id"])[1]
        assert not present[det.data["frame"] < 6].any() and present[det.data["frame"] >= 6].all()
        res = mem.search(q, len(det), rerank=len(det))[0]  # old rows: their decoded vectors stand in
        stored, has = mem.store.vectors(res.data["id"])
        v = np.where(has[:, None], stored, mem.codebook.decode(res.codes).numpy())
        assert 0 < has.sum() < len(has)
        np.testing.assert_allclose(res.data["score"], v @ q[0] / np.linalg.norm(v, axis=1) / np.linalg.norm(q[0]),
                                   rtol=1e-5)
        assert (res.data["score"][:-1] >= res.data["score"][1:]).all()
        for bad in (4, True, 2.5):
            with pytest.raises(ValueError, match=r"rerank must be an int >= k \(5\)"):
                mem.search(q, 5, rerank=bad)


def test_cli_keep_vectors_and_rerank(small_codebook, bikes_frames, tmp_path, capsys):
    import cv2

    (tmp_path / "frames").mkdir()
    for i, f in enumerate(bikes_frames):
        cv2.imwrite(str(tmp_path / "frames" / f"{i:02d}.png"), f)
    idx = str(tmp_path / "idx")
    assert main(["index", str(tmp_path / "frames"), "--index", idx, "--codebook", str(small_codebook),
                 "--keep-vectors", "--conf", str(CONF), "--quiet"]) == 0
    with open_store(idx, readonly=True) as s:
        dim = s.vector_dim
    assert f"8 B codes + {2 * dim} B float16 vectors per detection" in capsys.readouterr().out
    assert main(["search", "--index", idx, "--detection", "3", "-k", "5", "--rerank", "40", "--json"]) == 0
    rows = __import__("json").loads(capsys.readouterr().out)
    with Memory(idx) as mem:
        want = mem.search(mem.vectors_of([3]), 5, exclude=[3], rerank=40)[0]
    assert [r["id"] for r in rows] == want.data["id"].tolist() and 3 not in [r["id"] for r in rows]
    assert main(["search", "--index", idx, "--detection", "3", "-k", "5", "--rerank", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: rerank must be an int >= k (5)")


def test_per_track_gives_appearances_with_their_time_spans(small_index):
    """search(per_track=N): at most N hits per track, the same best hit first as the plain search, every kept
    track's time span; an untracked detection counts as an appearance of its own."""
    from yolo_vq import Memory

    with Memory(small_index) as m:
        q = m.vectors_of([1])
        plain = m.search(q, k=len(m))[0]
        one = m.search(q, k=5, per_track=1)[0]
        keys = [(s, t) if t >= 0 else (-1, i) for s, t, i in zip(one.data["source_id"].tolist(), one.track_id.tolist(),
                                                               one.data["id"].tolist())]
        assert len(keys) == len(set(keys)) == min(5, len({(s, t) if t >= 0 else (-1, i) for s, t, i in zip(
            plain.data["source_id"].tolist(), plain.track_id.tolist(), plain.data["id"].tolist())}))
        assert int(one.data["id"][0]) == int(plain.data["id"][0])
        for s, t, a, b in zip(one.data["source_id"].tolist(), one.track_id.tolist(), one.data["track_start"].tolist(),
                              one.data["track_end"].tolist()):
            if t >= 0:
                times = m.store.get(m.store.track_ids(s, t)).data["time"]
                assert (a, b) == (float(times.min()), float(times.max()))
        two = m.search(q, k=50, per_track=2)[0]
        counts = np.unique([t for t in two.track_id.tolist() if t >= 0], return_counts=True)[1]
        assert counts.max() <= 2
        with pytest.raises(ValueError, match="per_track must be a positive int"):
            m.search(q, per_track=0)


def test_search_cli_per_track_rows_and_sheet(small_index, tmp_path, capsys):
    import json

    assert main(["search", "--index", str(small_index), "--detection", "1", "--per-track", "1", "-k", "4", "--json",
                 "--sheet", str(tmp_path / "s.jpg"), "--sheet-from", "thumbs"]) == 0
    rows = json.loads(capsys.readouterr().out.split("\ncontact sheet:")[0])
    assert rows and all(r["track_start"] <= r["time"] <= r["track_end"] for r in rows)
    tracked = [(r["source"], r["track"]) for r in rows if r["track"] >= 0]
    assert len(tracked) == len(set(tracked)) and (tmp_path / "s.jpg").is_file()


def test_a_stored_detection_queries_with_its_tracks_codes_around_it(small_index, kept):
    """Without kept vectors, search --detection queries with the normalised mean of the decoded codes of its track's
    detections within TRACK_WINDOW frames (itself included); window 0 or an untracked detection: its own codes; with
    kept vectors: its kept vector."""
    from yolo_vq.index.memory import TRACK_WINDOW
    from yolo_vq.index.query import Query

    with Memory(small_index) as m:
        det = m.store.get(m.store.codes()[0])
        tracked = np.flatnonzero(det.track_id >= 0)
        i = int(tracked[len(tracked) // 2])
        same = (det.track_id == det.track_id[i]) & (np.abs(det.data["frame"] - det.data["frame"][i]) <= TRACK_WINDOW)
        assert same.sum() > 1  # the test means something: the track has neighbours within the window
        want = m.vectors_of(det.data["id"][same]).mean(0)
        want /= np.linalg.norm(want)
        got = m.detection_vector(int(det.data["id"][i]))
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(Query.detection(m, int(det.data["id"][i])).vectors, got)
        own = m.vectors_of([int(det.data["id"][i])])
        np.testing.assert_array_equal(m.detection_vector(int(det.data["id"][i]), window=0), own)
        assert not np.allclose(got, own)
        if (det.track_id < 0).any():
            j = int(det.data["id"][np.flatnonzero(det.track_id < 0)[0]])
            np.testing.assert_array_equal(m.detection_vector(j), m.vectors_of([j]))
        with pytest.raises(KeyError):
            m.detection_vector(10**9)
    idx, emb = kept
    with Memory(idx) as m:
        np.testing.assert_array_equal(m.detection_vector(3), m.vectors_of([3]))
