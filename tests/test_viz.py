"""Crops, contact sheets, JPEG thumbnails and image files, on the real bus.jpg."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from yolo_vq.viz import (
    CAPTION_H,
    MARGIN,
    QUERY_COLOUR,
    TITLE_H,
    Tile,
    contact_sheet,
    crop,
    decode_jpeg,
    encode_jpeg,
    write_image,
)

TILE = (96, 192)


@pytest.fixture(scope="module")
def bus() -> np.ndarray:
    path = Path(importlib.util.find_spec("ultralytics").submodule_search_locations[0]) / "assets" / "bus.jpg"
    image = cv2.imread(str(path))
    assert image is not None and image.shape == (1080, 810, 3), path
    return image


def sheet_size(n: int, columns: int, tile=TILE, title=None) -> tuple[int, int]:
    """(height, width) from the formula in contact_sheet's docstring."""
    rows = math.ceil((n + 1) / columns)
    width = columns * (tile[0] + MARGIN) + MARGIN
    height = (TITLE_H if title else 0) + rows * (tile[1] + CAPTION_H + MARGIN) + MARGIN
    return height, width


# -- crop --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(96, 192), (64, 64), (200, 50)])
@pytest.mark.parametrize("box", [(50, 400, 245, 905), (17, 230, 805, 750), (0.5, 0.5, 3.7, 2.2)])
def test_crop_size_and_dtype(bus, box, size):
    out = crop(bus, box, size=size)
    assert out.shape == (size[1], size[0], 3) and out.dtype == np.uint8


def test_crop_exact_fit_is_the_pixels(bus):
    # a box of exactly the tile size, unpadded, is copied without resampling
    np.testing.assert_array_equal(crop(bus, (100, 100, 196, 292), pad=0), bus[100:292, 100:196])


def test_crop_letterboxes_with_grey_bars(bus):
    out = crop(bus, (17, 230, 805, 750), pad=0)  # a wide bus into a tall tile: bars above and below
    assert (out[0] == 114).all() and (out[-1] == 114).all()
    assert not (out[TILE[1] // 2] == 114).all()


@pytest.mark.parametrize(
    "box,pad,same_as",
    [
        ((100, 100, 200, 300), 0.1, (90, 80, 210, 320)),  # inside: padded by 10% of width/height on each side
        ((0, 0, 100, 200), 0.1, (0, 0, 110, 220)),  # top-left corner: padding clipped
        ((700, 900, 810, 1080), 0.2, (678, 864, 810, 1080)),  # bottom-right corner: padding clipped
        ((-50, 500, 60, 600), 0.5, (0, 450, 115, 650)),  # box partly outside the image
    ],
)
def test_crop_padding_clipped_at_borders(bus, box, pad, same_as):
    np.testing.assert_array_equal(crop(bus, box, pad=pad), crop(bus, same_as, pad=0))


@pytest.mark.parametrize(
    "box",
    [(10, 10, 10, 50), (50, 10, 10, 50), (10, 60, 50, 10), (np.nan, 0, 10, 10), (0, 0, np.inf, 10),
     (2000, 2000, 2100, 2100), (-100, -100, -50, -50), (10.2, 10.2, 10.4, 10.4)],
)
def test_degenerate_box_gives_grey_tile(bus, box):
    out = crop(bus, box)
    assert out.shape == (TILE[1], TILE[0], 3) and (out == 114).all()


BUS = "bus"  # stands for the bus.jpg fixture in the table below


@pytest.mark.parametrize(
    "image,box,kwargs,exc,match",
    [
        (BUS, (0, 0, 10), {}, ValueError, "box must be 4 numbers"),
        (BUS, [[0, 0, 10, 10]], {}, ValueError, "box must be 4 numbers"),
        (BUS, (0, 0, 10, 10), {"pad": -0.1}, ValueError, "pad must be"),
        (BUS, (0, 0, 10, 10), {"size": (0, 10)}, ValueError, "size must be"),
        (BUS, (0, 0, 10, 10), {"size": 96}, TypeError, "size must be"),
        (np.zeros((10, 10), np.uint8), (0, 0, 5, 5), {}, ValueError, r"\(H, W, 3\) uint8.*COLOR_GRAY2BGR"),
        (np.zeros((10, 10, 3), np.float32), (0, 0, 5, 5), {}, ValueError, "got .*float32"),
        ([[0]], (0, 0, 5, 5), {}, TypeError, "numpy array"),
    ],
)
def test_crop_rejects_bad_input(bus, image, box, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        crop(bus if isinstance(image, str) else image, box, **kwargs)


# -- contact sheets ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiles(bus) -> list[np.ndarray]:
    boxes = [(50, 400, 245, 905), (222, 405, 344, 860), (670, 380, 810, 875), (0, 550, 63, 873), (17, 230, 805, 750)]
    return [crop(bus, b) for b in boxes]


@pytest.mark.parametrize("n,columns", [(0, 1), (0, 5), (4, 5), (5, 5), (9, 5), (7, 3), (3, 1), (12, 4)])
@pytest.mark.parametrize("title", [None, "", "query: person #1"])
def test_sheet_size_follows_formula(tiles, n, columns, title):
    results = [Tile(tiles[i % len(tiles)], f"#{i}", 1 - i / 20) for i in range(n)]
    sheet = contact_sheet(Tile(tiles[0]), results, columns=columns, title=title)
    assert sheet.shape == (*sheet_size(n, columns, title=title), 3) and sheet.dtype == np.uint8


def test_sheet_size_other_tile_letterboxes(tiles):
    sheet = contact_sheet(Tile(tiles[0]), [Tile(tiles[1], "a", 0.5)], columns=2, tile=(64, 64))
    assert sheet.shape == (*sheet_size(1, 2, tile=(64, 64)), 3)


def test_query_is_framed(tiles):
    sheet = contact_sheet(Tile(tiles[0]), [Tile(tiles[1], "x", 0.9)], columns=2)
    x0, y0 = MARGIN, MARGIN  # query cell
    x1 = MARGIN + TILE[0] + MARGIN  # first result cell, same row
    h = TILE[1] + CAPTION_H
    for dy, dx in [(-1, 10), (h, 10), (50, -1), (50, TILE[0])]:  # just outside each side of the query cell
        np.testing.assert_array_equal(sheet[y0 + dy, x0 + dx], QUERY_COLOUR)
        assert not (sheet[y0 + dy, x1 + dx] == QUERY_COLOUR).all()  # results are not framed
    # the frame does not cover the tile
    np.testing.assert_array_equal(sheet[y0:y0 + TILE[1], x0:x0 + TILE[0]], tiles[0])
    np.testing.assert_array_equal(sheet[y0:y0 + TILE[1], x1:x1 + TILE[0]], tiles[1])


def test_query_frame_below_title(tiles):
    sheet = contact_sheet(Tile(tiles[0]), [], columns=1, title="t")
    np.testing.assert_array_equal(sheet[TITLE_H + MARGIN - 1, MARGIN + 10], QUERY_COLOUR)
    np.testing.assert_array_equal(sheet[TITLE_H + MARGIN:TITLE_H + MARGIN + TILE[1], MARGIN:MARGIN + TILE[0]],
                                  tiles[0])


@pytest.mark.parametrize(
    "before,after",
    [
        (Tile(np.zeros((192, 96, 3), np.uint8), "", 0.5), Tile(np.zeros((192, 96, 3), np.uint8), "t=12.4s f=310 #7", 0.5)),
        (Tile(np.zeros((192, 96, 3), np.uint8), "a", None), Tile(np.zeros((192, 96, 3), np.uint8), "a", 0.123)),
    ],
)
def test_captions_draw_in_caption_band(tiles, before, after):
    a = contact_sheet(Tile(tiles[0]), [Tile(tiles[1], "y", 0.1), before], columns=3)
    b = contact_sheet(Tile(tiles[0]), [Tile(tiles[1], "y", 0.1), after], columns=3)
    x = MARGIN + 2 * (TILE[0] + MARGIN)  # third cell
    band = (slice(MARGIN + TILE[1], MARGIN + TILE[1] + CAPTION_H), slice(x, x + TILE[0]))
    assert (a[band] != b[band]).any()
    a[band], b[band] = 0, 0
    np.testing.assert_array_equal(a, b)  # nothing else changed


def test_query_caption_default_and_given(tiles):
    band = (slice(MARGIN + TILE[1], MARGIN + TILE[1] + CAPTION_H), slice(MARGIN, MARGIN + TILE[0]))
    default = contact_sheet(Tile(tiles[0]), [])
    given = contact_sheet(Tile(tiles[0], "person #1"), [])
    assert (default[band] == QUERY_COLOUR).all(axis=-1).any()  # "query" written in the frame colour
    assert (default[band] != given[band]).any()


def test_long_captions_and_title_stay_inside(tiles):
    long = "t=101.2s f=2530 #15 cam=north-gate-entrance-with-a-very-long-name " * 3
    sheet = contact_sheet(Tile(tiles[0], long), [Tile(tiles[1], long, 12345.678)], columns=2, title=long)
    assert sheet.shape == (*sheet_size(1, 2, title=long), 3)
    assert (sheet[:, -MARGIN:] == sheet[0, -1]).all()  # right margin untouched by text


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"columns": 0}, ValueError, "columns must be an int >= 1"),
        ({"columns": 2.5}, ValueError, "columns must be an int >= 1"),
        ({"tile": (96,)}, TypeError, "tile must be"),
        ({"results": [np.zeros((4, 4, 3), np.uint8)]}, TypeError, "must be a Tile"),
    ],
)
def test_sheet_rejects_bad_input(tiles, kwargs, exc, match):
    kwargs = {"results": [], **kwargs}
    with pytest.raises(exc, match=match):
        contact_sheet(Tile(tiles[0]), **kwargs)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((np.zeros((4, 4), np.uint8),), ValueError, r"Tile.image must be .*\(H, W, 3\)"),
        ((np.zeros((4, 4, 3), np.uint8), 7), TypeError, "Tile.caption must be a str"),
        ((np.zeros((4, 4, 3), np.uint8), "", "0.5"), TypeError, "Tile.score must be a number"),
    ],
)
def test_tile_rejects_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        Tile(*args)


# -- JPEG and files ----------------------------------------------------------------------------------------------------
def test_jpeg_round_trip(tiles):
    data = encode_jpeg(tiles[0])
    assert isinstance(data, bytes) and data[:2] == b"\xff\xd8"
    back = decode_jpeg(data)
    assert back.shape == tiles[0].shape and back.dtype == np.uint8
    assert np.abs(back.astype(np.int16) - tiles[0]).mean() < 4
    assert len(encode_jpeg(tiles[0], quality=30)) < len(data) < len(encode_jpeg(tiles[0], quality=100))


@pytest.mark.parametrize("data", [b"", b"garbage bytes", b"\xff\xd8\xff\xe0 truncated"])
def test_decode_rejects_undecodable(data):
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_jpeg(data)


@pytest.mark.parametrize("quality", [0, 101, 85.0, True])
def test_encode_rejects_bad_quality(tiles, quality):
    with pytest.raises(ValueError, match="quality must be an int in 1..100"):
        encode_jpeg(tiles[0], quality=quality)


def test_write_png_creates_folders(tmp_path, tiles):
    path = write_image(tmp_path / "a" / "b" / "sheet.png", tiles[0])
    assert path == tmp_path / "a" / "b" / "sheet.png"
    np.testing.assert_array_equal(cv2.imread(str(path)), tiles[0])  # PNG is lossless


def test_write_jpg(tmp_path, tiles):
    path = write_image(str(tmp_path / "sheet.JPG"), tiles[0])
    assert cv2.imread(str(path)).shape == tiles[0].shape


def test_write_unknown_extension_raises(tmp_path, tiles):
    path = tmp_path / "sub" / "sheet.xyz"
    with pytest.raises(ValueError, match=r"sheet\.xyz.*'\.xyz'.*\.jpg, \.jpeg, \.png") as info:
        write_image(path, tiles[0])
    assert "sheet.png" in str(info.value)  # the fix
    assert not path.parent.exists()  # nothing created
