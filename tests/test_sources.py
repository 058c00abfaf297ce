"""What ``open_source`` refuses and keeps (PITFALLS 12): FFmpeg renders text and binary files as video, and the
CLI's ``index``/``fit`` (and ``edge.run``) must stop on them with one ``error:`` line before anything is stored."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from yolo_vq import assets
from yolo_vq.cli import main
from yolo_vq.errors import SourceError
from yolo_vq.video import open_source

TEXT = b"Notes about the survey clip, not the clip itself.\nThe quick brown fox jumps over the lazy dog.\n" * 20
SAUCE = b"SAUCE00" + b" " * 121  # the 128-byte comment record of ANSI-art files, at the very end
EXPECTED = "expected a video file (mp4/avi/mkv/mov/webm/...), an image folder, a webcam index or a stream URL"


def _random(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _picture(seed: int = 0, shape=(120, 160, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _truncated_png(path: Path) -> None:
    """A PNG whose header OpenCV recognises (``haveImageReader``) but whose data stops halfway (imread -> None)."""
    png = cv2.imencode(".png", _picture(3))[1].tobytes()
    path.write_bytes(png[: len(png) // 2])


def _file(name: str, data: bytes):
    def make(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name
    return make


def _folder(files: dict[str, bytes | np.ndarray | None]):
    """A folder of ``name: bytes`` (written as is), ``name: image`` (cv2.imwrite) or ``name: None`` (truncated PNG)."""
    def make(d: Path) -> Path:
        f = d / "frames"
        f.mkdir()
        for name, data in files.items():
            if data is None:
                _truncated_png(f / name)
            elif isinstance(data, bytes):
                (f / name).write_bytes(data)
            else:
                assert cv2.imwrite(str(f / name), data)
        return f
    return make


# (id, what to build in tmp_path, words the one-line message must hold). Each of these was measured with OpenCV
# 5.1.0 / libavformat 63.1: the text-art ones all yield frames of rendered text through the old check.
REFUSED = [
    ("text.txt", _file("notes.txt", TEXT), ["text art", "codec 'ansi'", "FOURCC 'ansi'"]),
    ("text.nfo", _file("release.nfo", TEXT), ["text art", "codec 'ansi'"]),
    ("text.asc", _file("art.asc", TEXT), ["text art", "codec 'ansi'"]),
    ("text.ans", _file("art.ans", TEXT), ["text art", "codec 'ansi'"]),
    ("random.nfo", _file("random.nfo", _random(4096)), ["text art", "codec 'ansi'"]),  # tty takes any bytes
    ("random.bin", _file("dump.bin", _random(4000)), ["text art", "codec 'bintext'", "binary text"]),  # 25 x 160 B
    ("random.bin-4096", _file("dump4k.bin", _random(4096)), ["OpenCV can open"]),  # no demuxer: cannot open
    ("xbin-as.mp4", _file("clip.mp4", b"XBIN\x1a" + bytes([80, 0, 25, 0, 16, 0]) + _random(4000)),
     ["text art", "codec 'bintext'", "XBIN header"]),
    ("idf-as.avi", _file("clip.avi", bytes([0x04, 0x31, 0x2E, 0x34, 0, 0, 0, 0, 0x4F, 0, 0x15, 0]) + _random(20000)),
     ["text art", "codec 'idf'"]),
    ("sauce.json", _file("notes.json", TEXT + SAUCE), ["text art", "codec 'bintext'", "SAUCE record"]),
    ("random.cdg", _file("song.cdg", _random(4096)), ["text art", "codec 'cdgraphics'"]),
    ("empty.mp4", _file("empty.mp4", b""), ["empty (0 bytes)"]),
    ("text-as.jpg", _file("a.jpg", TEXT), ["not a video OpenCV can decode", "FOURCC 'MJPG'"]),
    ("folder-text-a.jpg", _folder({"a.jpg": TEXT, "b.jpg": _picture()}),
     ["'a.jpg' is not an image OpenCV can read", "1 of 2 image files have no image header"]),
    ("folder-two-bad", _folder({"a.jpg": TEXT, "b.png": _random(500), "c.jpg": _picture()}),
     ["'a.jpg' is not an image", "2 of 3 image files"]),
    ("folder-no-images", _folder({"notes.txt": TEXT, "clip.nfo": TEXT}), ["has no images", "among its 2 files"]),
    ("folder-first-truncated", _folder({"a.png": None, "b.jpg": _picture()}),
     ["first image 'a.png' cannot be decoded"]),
]


@pytest.mark.parametrize("make, words", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_open_source_refuses_what_is_not_video(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(SourceError) as e:
        open_source(path)
    msg = str(e.value)
    assert "\n" not in msg and repr(str(path)) in msg, msg  # one line, naming the source
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    if not path.is_dir():  # files say what would be accepted instead
        assert EXPECTED in msg, msg
    assert isinstance(e.value, ValueError)  # callers catching ValueError (the CLI) keep working


def test_a_missing_path_is_still_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(tmp_path / "nope.mp4")


def test_an_image_that_fails_later_names_itself(tmp_path):
    """Headers are checked at open, pixels of later images only when read: the failure names the file."""
    folder = _folder({"a.jpg": _picture(), "b.png": None})(tmp_path)
    src = open_source(folder)
    frames = src.frames()
    i, _, img = next(frames)
    assert i == 0 and img.shape == (120, 160, 3)
    with pytest.raises(SourceError, match=r"cannot decode image '.*b\.png'.*re-export"):
        next(frames)


def _avi(d: Path) -> Path:
    p = d / "tiny.avi"
    w = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"MJPG"), 5, (160, 120))
    assert w.isOpened()
    for k in range(5):
        w.write(_picture(k))
    w.release()
    return p


def _playlist(d: Path) -> Path:
    """A local HLS playlist (a text file) of two MPEG-TS segments: text containers FFmpeg reads as video stay."""
    for s in range(2):
        w = cv2.VideoWriter(str(d / f"seg{s}.ts"), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"mp4v"), 5, (160, 120))
        assert w.isOpened()
        for k in range(3):
            w.write(_picture(10 * s + k))
        w.release()
    p = d / "live.m3u8"
    p.write_text("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:0\n"
                 "#EXTINF:0.6,\nseg0.ts\n#EXTINF:0.6,\nseg1.ts\n#EXT-X-ENDLIST\n")
    return p


def _palette_bmp(d: Path) -> Path:
    """An 8-bit palette BMP: FOURCC 0 and a PAL8 stream like text art, but a real image (cv2.haveImageReader)."""
    from PIL import Image

    p = d / "palette.bmp"
    Image.fromarray(_picture(5, (120, 160))).convert("P").save(p)
    return p


# (id, what to build, frames expected with stride, stride, frame size)
ACCEPTED = [
    ("bikes.mp4", lambda d: assets.bikes_video(), 5, 50, (272, 640)),
    ("mjpg.avi", _avi, 5, 1, (120, 160)),
    ("image-folder", _folder({"a.jpg": _picture(1), "b.jpg": _picture(2)}), 2, 1, (120, 160)),
    ("single.jpg", _file("still.jpg", cv2.imencode(".jpg", _picture(4))[1].tobytes()), 1, 1, (120, 160)),
    ("playlist.m3u8", _playlist, 6, 1, (120, 160)),
    ("palette.bmp", _palette_bmp, 1, 1, (120, 160)),
]


@pytest.mark.parametrize("make, n, stride, hw", [r[1:] for r in ACCEPTED], ids=[r[0] for r in ACCEPTED])
def test_real_media_open_and_yield_their_frames(tmp_path, make, n, stride, hw):
    src = open_source(make(tmp_path))
    try:
        got = list(src.frames(stride=stride))
    finally:
        src.close()
    assert (src.width, src.height) == (hw[1], hw[0])
    assert len(got) == n and all(img.shape == (*hw, 3) and img.dtype == np.uint8 for _, _, img in got)


# -- the commands that read sources stop with one line and store nothing ----------------------------------------------
def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def test_cli_index_refuses_a_text_file_and_stores_nothing(tmp_path, capsys, small_codebook):
    txt = _file("notes.txt", TEXT)(tmp_path)
    idx = tmp_path / "idx"
    capsys.readouterr()
    assert main(["index", str(txt), "--index", str(idx), "--codebook", str(small_codebook), "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert "notes.txt" in line and "text art" in line and "codec 'ansi'" in line
    if (idx / "index.db").exists():  # the index may be created before the source is opened: it must stay empty
        from yolo_vq.index.registry import open_store

        with open_store(idx, readonly=True) as s:
            assert s.count() == 0 and s.sources() == []


def test_cli_fit_refuses_a_text_file_and_writes_no_codebook(tmp_path, capsys):
    txt = _file("notes.txt", TEXT)(tmp_path)
    capsys.readouterr()
    assert main(["fit", str(txt), "--out", str(tmp_path / "cb")]) == 2
    line = _one_error_line(capsys)
    assert "notes.txt" in line and "text art" in line
    assert not list(tmp_path.glob("cb*"))


def test_edge_run_refuses_a_text_file_before_writing(tmp_path):
    """``edge.run`` opens every source before it writes: a bare EdgeModel (no ONNX graph) is enough to show the
    refusal comes from ``open_source`` and no records file is started."""
    from yolo_vq.edge.runner import EdgeModel, run

    txt = _file("notes.txt", TEXT)(tmp_path)
    good = assets.bikes_video()
    out = tmp_path / "records.jsonl"
    with pytest.raises(SourceError, match="text art"):
        run(object.__new__(EdgeModel), [good, txt], out, progress=False)
    assert not out.exists()
