"""Box mapping is the exact inverse of Ultralytics' scale_boxes, for letterboxed non-square inputs."""

from __future__ import annotations

import pytest
import torch
from ultralytics.utils.ops import scale_boxes

from yolo_vq._letterbox import image_region, letterbox_params, to_input, to_original


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
