"""The search page's JSON API (FastAPI's TestClient): every endpoint, the same results as `yolo-vq search --json`,
a readable 4xx JSON error for each bad input, and an index that serving never changes."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import cv2
import numpy as np
import pytest

from tests.serve.conftest import STRIDE, digest
from yolo_vq import assets
from yolo_vq.cli import main

pytest.importorskip("fastapi", reason="the serve extra (pip install 'yolo-vq[serve]') is part of the test extra")
from fastapi.testclient import TestClient

from yolo_vq.serve import create_app


@pytest.fixture(scope="module")
def client(served, pose_vq):
    index, _, _ = served
    with TestClient(create_app(index, model=pose_vq[0], max_upload=2 * 1024 * 1024)) as c:
        yield c


@pytest.fixture(scope="module")
def frame_jpg(tmp_path_factory):
    cap = cv2.VideoCapture(str(assets.bikes_video()))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 100)
    ok, image = cap.read()
    cap.release()
    assert ok
    path = tmp_path_factory.mktemp("query") / "frame100.jpg"
    cv2.imwrite(str(path), image)
    return path


def cli_json(*args: str) -> list[dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["search", *args, "--json"]) == 0
    return json.loads(out.getvalue())


def upload(path) -> dict:
    return {"image": (path.name, path.read_bytes(), "image/jpeg")}


def test_the_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'src="/app.js"' in page.text and 'href="/style.css"' in page.text and "http" not in page.text.lower()
    assert "fetch(" in client.get("/app.js").text and ".tile" in client.get("/style.css").text
    assert "/search" in client.get("/openapi.json").json()["paths"] and client.get("/docs").status_code == 200
    assert client.get("/", params={"name": "../app.py", "media": "text/plain"}).text == page.text  # no file by name


def test_info_sources_detection_track_and_pictures(client, served):
    _, _, video = served
    info = client.get("/info").json()
    assert info["index"] == "index" and info["detections"] > 20 and "person" in info["classes"]
    assert info["max_upload_bytes"] == 2 * 1024 * 1024
    sources = client.get("/sources").json()
    assert [(s["id"], s["name"], s["frame_count"]) for s in sources] == [(1, "bikes.mp4", 250)]
    row = client.get("/detections/1").json()
    assert row["id"] == 1 and row["source"] == str(video) and row["frame"] % STRIDE == 0 and len(row["box"]) == 4
    crop = client.get("/detections/1/crop.jpg")
    assert crop.headers["content-type"] == "image/jpeg" and cv2.imdecode(np.frombuffer(crop.content, np.uint8), 1) \
        is not None
    frame = client.get("/detections/1/frame.jpg")
    assert frame.headers["x-picture"] == "video"
    assert cv2.imdecode(np.frombuffer(frame.content, np.uint8), 1).shape == (272, 640, 3)
    rows = client.get(f"/sources/1/frames/{row['frame']}").json()
    assert 1 in [d["id"] for d in rows["detections"]] and rows["frame_count"] == 250
    nxt = client.get(f"/sources/1/frames/{row['frame'] + 1}.jpg")  # a neighbour that was not indexed still shows
    assert nxt.status_code == 200 and nxt.headers["x-picture"] == "video"
    track = client.get(f"/tracks/1/{row['track']}").json()
    assert 1 in [d["id"] for d in track["detections"]]
    assert all(d["track"] == row["track"] for d in track["detections"])


def test_search_equals_the_cli(client, served, frame_jpg, pose_model_path):
    index, _, _ = served
    by_id = client.post("/search", data={"detection": 3, "k": 8}).json()
    assert by_id["query"] == {"kind": "detection", "detection": 3}
    assert by_id["results"] == cli_json("--index", str(index), "--detection", "3", "-k", "8")
    assert 3 not in [r["id"] for r in by_id["results"]]
    filtered = {"classes": "person", "time_from": "1", "time_to": "8", "min_conf": "0.2", "k": "5"}
    got = client.post("/search", data={"detection": 3, **filtered}).json()["results"]
    assert got == cli_json("--index", str(index), "--detection", "3", "--class", "person", "--time-from", "1",
                           "--time-to", "8", "--min-conf", "0.2", "-k", "5")
    assert got and all(r["class"] == "person" and 1 <= r["time"] <= 8 and r["confidence"] >= 0.2 for r in got)
    found = client.post("/detect", files=upload(frame_jpg)).json()
    assert (found["width"], found["height"]) == (640, 272) and found["detections"]
    box = found["detections"][0]["box"]
    by_image = client.post("/search", files=upload(frame_jpg), data={"box": ",".join(map(str, box)), "k": 10}).json()
    assert by_image["query"] == {"kind": "image", "box": box}
    assert by_image["results"] == cli_json("--index", str(index), "--image", str(frame_jpg), "--crop",
                                           ",".join(map(str, box)), "--model", str(pose_model_path), "-k", "10")
    first = client.post("/search", files=upload(frame_jpg), data={"k": 4}).json()  # no box: its first detection
    assert len(first["results"]) == 4
    track = client.get("/detections/3").json()["track"]
    by_track = client.post("/search", data={"track": f"1:{track}", "rerank": 50, "k": 5}).json()
    assert by_track["results"] == cli_json("--index", str(index), "--track", f"1:{track}", "--rerank", "50",
                                           "-k", "5")
    appearances = client.post("/search", data={"detection": 3, "per_track": 1, "k": 5}).json()["results"]
    assert appearances == cli_json("--index", str(index), "--detection", "3", "--per-track", "1", "-k", "5")
    assert all("track_start" in r for r in appearances)


BAD = [  # (method, path, form, files, status, words the message must contain)
    ("post", "/search", {"detection": 1, "k": 0}, None, 422, ["k", "greater than"]),
    ("post", "/search", {"detection": 1, "classes": "unicorn"}, None, 400, ["unknown class 'unicorn'", "person"]),
    ("post", "/search", {"detection": 999999}, None, 404, ["999999"]),
    ("post", "/search", {"track": "1:99999"}, None, 404, ["no track 1:99999"]),
    ("post", "/search", {"track": "../index.db"}, None, 422, ["SOURCE_ID:TRACK_ID"]),
    ("post", "/search", {"detection": "/etc/passwd"}, None, 422, ["detection", "integer"]),
    ("post", "/search", {"detection": 1, "source": "../../index.db"}, None, 422, ["source", "integer"]),
    ("post", "/search", {}, None, 422, ["exactly one query", "none"]),
    ("post", "/search", {"detection": 1, "track": "1:1"}, None, 422, ["exactly one query", "detection, track"]),
    ("post", "/search", {"detection": 1, "time_from": 9, "time_to": 2}, None, 400, ["time"]),
    ("post", "/search", {"box": "5,5,1,1"}, "jpg", 422, ["box '5,5,1,1'"]),
    ("post", "/search", {}, "text", 415, ["not an image", "JPEG or PNG"]),
    ("post", "/search", {}, "blank", 400, ["no detections in the query image", "box"]),
    ("post", "/search", {"box": "900,10,950,60"}, "jpg", 400, ["lies outside the 640x272 query image"]),
    ("post", "/search", {}, "huge", 413, ["2 MB limit"]),
    ("post", "/detect", {}, "text", 415, ["not an image"]),
    ("get", "/detections/424242", None, None, 404, ["no stored detection with id 424242"]),
    ("get", "/detections/..%2F..%2Findex.db", None, None, 404, ["not found here", "/docs"]),
    ("get", "/detections/index.db", None, None, 422, ["detection_id", "integer"]),
    ("delete", "/detections/1", None, None, 405, ["method not allowed"]),
    ("get", "/detections/1/crop.jpg?prefer=/etc/passwd", None, None, 422, ["prefer", "video"]),
    ("get", "/tracks/1/99999", None, None, 404, ["no track 1:99999"]),
    ("get", "/sources/7/frames/1", None, None, 404, ["no source with id 7", "[1]"]),
    ("get", "/sources/1/frames/250", None, None, 404, ["outside source 1"]),
    ("get", "/sources/1/frames/-1.jpg", None, None, 404, ["cannot be read"]),
]


@pytest.mark.parametrize("method,path,form,files,status,words", BAD, ids=[f"{b[1]}-{b[4]}-{i}" for i, b in
                                                                          enumerate(BAD)])
def test_bad_input_is_one_readable_json_error(client, frame_jpg, method, path, form, files, status, words):
    payload = {"jpg": upload(frame_jpg), "text": {"image": ("notes.txt", b"hello, not a picture", "text/plain")},
               "huge": {"image": ("big.png", b"\x89PNG" + bytes(3 * 1024 * 1024), "image/png")},
               "blank": {"image": ("grey.png", cv2.imencode(".png", np.full((272, 640, 3), 127, np.uint8))[1].tobytes(),
                                   "image/png")}}.get(files)
    r = client.request(method.upper(), path, data=form, files=payload)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    for w in words:
        assert w in detail, detail


def test_serving_changes_nothing_in_the_index(served, pose_vq, frame_jpg):
    index, _, _ = served
    before = digest(index)
    with TestClient(create_app(index, model=pose_vq[0])) as c:
        for args in BAD:
            c.request(args[0].upper(), args[1], data=args[2])
        c.post("/search", data={"detection": 2})
        c.post("/search", files=upload(frame_jpg), data={"k": 3})
        c.get("/detections/2/frame.jpg")
    assert digest(index) == before


def test_it_picks_up_detections_another_process_stores(served, pose_vq, tmp_path, frames_folder):
    """An index being written while served: new detections become searchable without a restart."""
    from yolo_vq import Indexer

    index, cb, _ = served
    live = tmp_path / "live"
    shutil.copytree(index, live)
    with TestClient(create_app(live, model=pose_vq[0])) as c:
        before = c.get("/info").json()["detections"]
        with Indexer(pose_vq[0], live, codebook=cb, conf=0.1) as ix:
            ix.index_source(frames_folder, progress=False)
        after = c.get("/info").json()
        assert after["detections"] > before and after["sources"] == 2
        r = c.post("/search", data={"detection": before + 1, "source": 2, "k": 3}).json()
        assert r["results"] and all(x["source"] == str(frames_folder) for x in r["results"])


def test_pictures_fall_back_to_thumbnails_when_the_video_is_gone(served, pose_vq, tmp_path):
    index, _, video = served
    moved = tmp_path / "moved.mp4"
    with TestClient(create_app(index, model=pose_vq[0])) as c:
        video.rename(moved)
        try:
            frame = c.get("/detections/1/frame.jpg")
            assert frame.status_code == 200 and frame.headers["x-picture"] == "thumbnail"
            assert c.get("/detections/1/crop.jpg").status_code == 200
            gone = c.get("/sources/1/frames/0.jpg")
            assert gone.status_code == 404 and "video is gone" in gone.json()["detail"]
        finally:
            moved.rename(video)


def test_serve_cli_bad_input_is_one_line(served, tmp_path, capsys):
    import socket

    index, _, _ = served
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--index", str(index), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err
    assert main(["serve", "--index", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["serve", "--index", str(index), "--port", "70000"])
    assert e.value.code == 2 and "'70000': expected a TCP port" in capsys.readouterr().err
