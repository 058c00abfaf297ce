"""Letterbox geometry: box mapping is the exact inverse of Ultralytics' scale_boxes, for letterboxed non-square inputs,
and the server (Ultralytics' predictor), the export's input size and the edge runner letterbox frames alike."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ultralytics.utils.ops import scale_boxes

from yolo_vq._letterbox import (
    PAD_VALUE,
    image_region,
    input_size,
    letterbox_image,
    letterbox_params,
    to_input,
    to_original,
)
from yolo_vq.errors import ExportError


@pytest.mark.parametrize(
    "orig,inp,expected",
    [
        ((576, 768), (960, 1280), (5 / 3, 5 / 3, 0.0, 0.0)),  # vtest.avi at imgsz 1280: no padding
        ((272, 640), (288, 640), (1.0, 1.0, 0.0, 8.0)),  # bikes.mp4 at 640: 8 px bands
        ((1080, 810), (640, 480), (480 / 810, 640 / 1080, 0.0, 0.0)),  # bus.jpg
        ((272, 640), (640, 640), (1.0, 1.0, 0.0, 184.0)),  # square letterbox (export)
    ],
)
def test_params(orig, inp, expected):
    assert letterbox_params(orig, inp) == pytest.approx(expected)


@pytest.mark.parametrize("orig,inp", [((576, 768), (960, 1280)), ((272, 640), (160, 320)), ((1080, 810), (640, 480)),
                                       ((333, 517), (320, 512))])
def test_inverse_of_scale_boxes(orig, inp):
    g = torch.Generator().manual_seed(0)
    h, w = inp
    xy = torch.rand(50, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
    boxes = torch.cat([xy, xy + torch.rand(50, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])], 1)
    x0, y0, x1, y1 = image_region(orig, inp)
    boxes = torch.stack([boxes[:, 0].clamp(x0, x1), boxes[:, 1].clamp(y0, y1), boxes[:, 2].clamp(x0, x1),
                         boxes[:, 3].clamp(y0, y1)], 1)  # inside the image, where scale_boxes does not clip
    back = scale_boxes(inp, boxes.clone(), orig)
    torch.testing.assert_close(to_input(back, orig, inp), boxes, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(to_original(boxes, orig, inp), back, atol=1e-3, rtol=1e-5)


# -- one geometry for the server, the export and the edge runner --------------------------------------------------
FRAMES = [(1, 1), (1, 999), (999, 1), (333, 517), (271, 640), (1079, 1921), (1080, 1920)]  # (h, w)


def _server_letterbox(frame: np.ndarray, side: int, rect: bool) -> np.ndarray:
    """The network input Ultralytics' own predictor makes of one frame (its ``pre_transform``, which builds
    ``LetterBox(imgsz, auto=rect, stride=32)`` for a PyTorch model), as ``model.predict(imgsz=side, rect=rect)``."""
    from ultralytics.models.yolo.detect import DetectionPredictor
    from ultralytics.utils.checks import check_imgsz

    predictor = DetectionPredictor(overrides={"imgsz": side, "rect": rect, "mode": "predict"})
    predictor.imgsz = check_imgsz(side, stride=32, min_dim=2)
    predictor.model = SimpleNamespace(format="pt", stride=32)
    return predictor.pre_transform([frame])[0]


@pytest.mark.parametrize("side", [320, 640, 1280])
@pytest.mark.parametrize("hw", FRAMES, ids=[f"{h}x{w}" for h, w in FRAMES])
@pytest.mark.parametrize("camera", [True, False], ids=["source_size", "square"])
def test_server_export_and_edge_runner_agree(hw, side, camera):
    """For one frame: the export's input size is the shape predict letterboxes it to; the edge runner's letterbox is
    predict's, pixel for pixel; its regions row is the frame's area under scale_boxes; and boxes mapped back to the
    frame (the runner's ``to_original``, after the graph's clip to the region) are what ``scale_boxes`` returns."""
    from yolo_vq.edge.runner import letterbox_batch

    rng = np.random.default_rng(hw[0] * 7919 + hw[1] + side)
    frame = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    server = _server_letterbox(frame, side, rect=camera)
    input_hw = input_size(side, hw if camera else None)
    assert server.shape == (*input_hw, 3)
    meta = {"imgsz": list(input_hw), "letterbox_imgsz": side, "source_size": list(hw) if camera else None}
    x, regions = letterbox_batch([frame], meta)
    assert x.shape == (1, 3, *input_hw) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], server[..., ::-1].transpose(2, 0, 1).astype(np.float32) / 255.0)
    np.testing.assert_array_equal(letterbox_image(frame, input_hw, imgsz=side, source_size=hw if camera else None),
                                  server)

    # regions: the frame's area in input pixels, which scale_boxes maps onto the whole frame (unclipped: xywh)
    x0, y0, x1, y1 = (float(v) for v in regions[0])
    assert (x0, y0, x1, y1) == pytest.approx(image_region(hw, input_hw), abs=1e-4)
    corner_size = scale_boxes(input_hw, torch.tensor([[x0, y0, x1 - x0, y1 - y0]], dtype=torch.float64), hw,
                              xywh=True)
    torch.testing.assert_close(corner_size, torch.tensor([[0.0, 0.0, hw[1], hw[0]]], dtype=torch.float64),
                               atol=1e-3, rtol=1e-6)
    rows = np.flatnonzero((server != PAD_VALUE).any(axis=(1, 2)))  # the frame's pixels inside the input (noise)
    cols = np.flatnonzero((server != PAD_VALUE).any(axis=(0, 2)))
    assert rows.min() >= y0 - 0.5 and rows.max() < y1 + 0.5 and cols.min() >= x0 - 0.5 and cols.max() < x1 + 0.5

    # boxes back to original pixels: the graph clips to the region, the runner maps back and clips to the frame
    h1, w1 = input_hw
    xy = rng.uniform(-0.1, 1.0, (40, 2)) * [w1, h1]
    boxes = np.concatenate([xy, xy + rng.uniform(0, 0.5, (40, 2)) * [w1, h1]], 1).astype(np.float32)
    lo, hi = np.float32([x0, y0, x0, y0]), np.float32([x1, y1, x1, y1])
    edge = to_original(np.minimum(np.maximum(boxes, lo), hi), hw, input_hw, clip=True)
    ref = scale_boxes(input_hw, torch.from_numpy(boxes.copy()), hw).numpy()  # clips to the frame
    assert edge.dtype == np.float32
    np.testing.assert_array_equal(edge, ref)  # to the bit, here


@pytest.mark.parametrize("orig,inp", [((272, 640), (288, 640)), ((1080, 810), (640, 480)), ((1, 999), (32, 320))])
def test_numpy_and_torch_boxes_map_alike(orig, inp):
    """The server (torch) and the edge runner (numpy) get the very same float32 values from one mapping."""
    g = np.random.default_rng(1)
    boxes = (g.uniform(-20, 700, (30, 4))).astype(np.float32)
    for fn, kw in ((to_input, {}), (to_original, {}), (to_original, {"clip": True})):
        a, b = fn(boxes, orig, inp, **kw), fn(torch.from_numpy(boxes), orig, inp, **kw)
        assert isinstance(a, np.ndarray) and a.dtype == np.float32 and b.dtype == torch.float32
        np.testing.assert_array_equal(a, b.numpy())
    clipped = to_original(boxes, orig, inp, clip=True)
    assert clipped.min() >= 0 and (clipped[:, [0, 2]] <= orig[1]).all() and (clipped[:, [1, 3]] <= orig[0]).all()


def test_input_size_errors():
    with pytest.raises(ExportError, match="source_size must be"):
        input_size(640, (0, 640))
    with pytest.raises(ExportError, match="multiple of the model stride 32"):
        input_size(100)
    assert input_size((384, 640)) == (384, 640) and input_size(640, (272, 640)) == (288, 640)
