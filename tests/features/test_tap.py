"""Feature taps on every YOLO family: resolution, capture inside predict/track/stream, clean removal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import FAMILIES, yolo
from yolo_vq import Tap, assets
from yolo_vq.features.tap import resolve_layers

IMGSZ = 320
LOW = 1e-9  # random-weight YAML models score ~1e-5 (head bias init): keep their boxes for plumbing tests


@pytest.mark.parametrize("cfg,task", FAMILIES)
def test_tap_shapes_strides_and_unchanged_outputs(cfg, task, bus):
    model = yolo(cfg)
    plain = model.predict(bus, imgsz=IMGSZ, conf=LOW, verbose=False)[0]
    with Tap(model, ["head", "backbone"]) as tap:
        assert [t.stride for t in tap.info] == [8, 16, 32, 4, 8, 16, 32]
        head = model.model.model[-1]
        assert [t.layer for t in tap.info[:3]] == list(head.f)
        tapped = model.predict(bus, imgsz=IMGSZ, conf=LOW, verbose=False)[0]
        im, maps = tap.pop()
    assert task == model.task
    h, w = im.shape[2:]
    assert (h, w) == (IMGSZ, 256)  # bus.jpg is 810x1080 portrait, rect letterbox at stride 32
    for t, m in zip(tap.info, maps):
        assert m.shape == (1, t.channels, h // t.stride, w // t.stride), (t, m.shape)
    # the hooks observe, they do not change what the model outputs
    a, b = (plain.obb if task == "obb" else plain.boxes), (tapped.obb if task == "obb" else tapped.boxes)
    assert len(a) > 0
    torch.testing.assert_close(a.data, b.data)
    assert not model.predictor.model.model.model[-1]._forward_hooks  # removed on exit


def test_tap_fires_on_later_calls_after_to_and_in_streams(bikes_frames):
    model = yolo("yolo11n.yaml")
    with Tap(model, ["s4"]) as tap:
        for _ in range(2):  # the second call reuses the predictor (and its deep copy)
            model.predict(bikes_frames[0], imgsz=IMGSZ, verbose=False)
            im, maps = tap.pop()
            assert maps[0].shape[1] == tap.info[0].channels
        model.to("cpu")  # rebuilds the predictor and its copy of the model
        model(bikes_frames[0], imgsz=IMGSZ, verbose=False)  # __call__ == predict
        assert tap.pop()[1][0].shape[0] == 1
        # images of different sizes in one call: Ultralytics letterboxes them to one shape and runs one batch
        sources = [bikes_frames[0], bikes_frames[1][:200, :500], bikes_frames[2]]
        for i, _ in enumerate(model.predict(sources, imgsz=IMGSZ, stream=True, verbose=False)):
            if i == 0:
                assert tap.pop()[0].shape[0] == 3
        # a video stream in batches of 4: one capture per batch, read while streaming
        shapes = []
        for i, _ in enumerate(model.predict(str(assets.bikes_video()), imgsz=IMGSZ, stream=True, batch=4,
                                             vid_stride=25, verbose=False)):
            if i % 4 == 0:
                shapes.append(tuple(tap.pop()[0].shape))
        assert shapes == [(4, 3, 160, IMGSZ), (4, 3, 160, IMGSZ), (2, 3, 160, IMGSZ)]
    with pytest.raises(RuntimeError, match="no captured maps"):
        tap.pop()


def test_tap_inside_track(bikes_frames):
    model = yolo("yolo11n.yaml")
    with Tap(model, ["p3"]) as tap:
        model.track(bikes_frames[0], imgsz=IMGSZ, conf=LOW, verbose=False, persist=True)
        assert tap.pop()[1][0].shape[1] == tap.info[0].channels


def test_tap_removed_on_exception(bus):
    model = yolo("yolo11n.yaml")
    with pytest.raises(ZeroDivisionError), Tap(model, ["s8"]):
        model.predict(bus, imgsz=IMGSZ, verbose=False)
        1 / 0
    net = model.predictor.model.model
    assert not any(m._forward_hooks for m in net.modules())
    assert not net._forward_pre_hooks
    assert all(getattr(cb, "__name__", "") != "on_predict_start" or cb.__module__ != "yolo_vq.features.tap"
               for cb in model.callbacks["on_predict_start"])


def test_tap_on_bare_module():
    net = yolo("yolo11n.yaml").model.eval()
    with Tap(net, [2, "p5"]) as tap, torch.no_grad():
        net(torch.zeros(2, 3, 128, 96))
        im, maps = tap.pop()
    assert im.shape == (2, 3, 128, 96)
    assert [m.shape[2:] for m in maps] == [(32, 24), (4, 3)]


@pytest.mark.parametrize(
    "layers,match",
    [
        ([99], r"layer 99 cannot be tapped: this DetectionModel has layers 0\.\.23"),
        (["p7"], "unknown layer name 'p7'"),
        ([1.5], "layer must be an int index or a name"),
    ],
)
def test_bad_layers(layers, match):
    with pytest.raises((ValueError, TypeError), match=match):
        resolve_layers(yolo("yolo11n.yaml").model, layers)


def test_unsupported_head_names_supported_ones():
    with pytest.raises(ValueError, match="Classify head; yolo_vq .* supports the Detect family"):
        Tap(yolo("yolo11n-cls.yaml"), ["head"])


def test_tap_refuses_exported_models(tmp_path):
    class Fake:  # what a predictor running an ONNX file exposes: no nn.Module inside
        model = type("AB", (), {"format": "onnx", "model": None})()

    with pytest.raises(TypeError, match="'onnx' model, which has no feature maps"):
        Tap._predictor_module(Fake())


def test_tap_info_channels_match_model():
    model = yolo("yolov8n.yaml")
    info = resolve_layers(model.model, ["s4", "s32", 0])
    assert [(t.layer, t.stride) for t in info] == [(2, 4), (9, 32), (0, 2)]
    assert np.all([t.channels > 0 for t in info])
