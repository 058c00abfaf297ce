"""Live streams: an HTTP MJPEG stream served from this process, read by OpenCV, indexed and resumed."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest

from yolo_vq import Indexer
from yolo_vq.index.registry import open_store
from yolo_vq.video import open_source


@pytest.fixture
def mjpeg(bikes_frames):
    """``http://127.0.0.1:PORT/live``: each connection gets bikes.mp4 frames 30-41 as a multipart MJPEG stream,
    then the stream ends (as a camera that goes away)."""
    parts = [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for f in bikes_frames]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            for jpg in parts:
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                 + str(len(jpg)).encode() + b"\r\n\r\n" + jpg + b"\r\n")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/live", len(parts)
    server.shutdown()
    server.server_close()


def test_http_stream_is_read_frame_by_frame(mjpeg, bikes_frames):
    url, n = mjpeg
    src = open_source(url)
    try:
        assert src.frame_count is None and src.fingerprint == open_source(url).fingerprint  # identity: the URL
        got = list(src.frames())
    finally:
        src.close()
    assert [i for i, _, _ in got] == list(range(n))
    diff = np.abs(got[3][2].astype(int) - bikes_frames[3].astype(int)).mean()
    assert got[3][2].shape == bikes_frames[3].shape and diff < 3  # the same picture, through JPEG


def test_indexing_a_stream_again_continues_its_numbering(mjpeg, index_model, small_codebook, tmp_path):
    """A stream does not replay: a second run must store the new frames after the old ones, dropping none."""
    url, n = mjpeg
    with Indexer(index_model, tmp_path / "idx", codebook=small_codebook, conf=0.1) as ix:
        first = ix.index_source(url, progress=False)
        second = ix.index_source(url, stride=2, progress=False)
    assert (first.frames, second.frames) == (n, n // 2)
    with open_store(tmp_path / "idx", readonly=True) as s:
        (source,) = s.sources()
        assert source.uri == url and source.frame_count is None
        assert s.frames_done(source.id).tolist() == [*range(n), *range(n, 2 * n, 2)]
