"""Per-detection embeddings: dims per family, box mapping, anchor parity with Ultralytics, real-image identity."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from tests.conftest import FAMILIES, yolo
from yolo_vq import Detections, Embedder, Tap
from yolo_vq._letterbox import image_region, to_input
from yolo_vq.config import ColourSpec
from yolo_vq.features._rows import head_candidates, match_rows
from yolo_vq.features.pool import (
    _frame_mean,
    anchor_features,
    cell_taps,
    colour_hist,
    hsv_bin_index,
    map_rows,
    pool_cells,
)

LOW = 1e-9  # random-weight YAML models score ~1e-5: keep their boxes for plumbing tests


@pytest.mark.parametrize("recipe", ["default", "head-avg", "anchor", "colour"])
@pytest.mark.parametrize("cfg,task", FAMILIES + [("yolo26n.yaml", "e2e")])
def test_embedding_dims_every_family(cfg, task, recipe, bus):
    model = yolo(cfg)
    with Embedder(model, recipe) as emb:
        r = model.predict(bus, imgsz=320, conf=LOW, verbose=False, **({"nms": False} if task == "e2e" else {}))[0]
    assert model.predictor.model.end2end == (task == "e2e")
    e = r.vq_embeddings
    n = len(r.obb if task == "obb" else r.boxes)
    assert n > 0
    assert e.shape == (n, emb.dim) and e.dtype == np.float32
    assert np.isfinite(e).all()
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    assert r.vq_image_embedding.ndim == 1 and np.isfinite(r.vq_image_embedding).all()
    if recipe == "default":  # stride-4 stripes (C x 8) + 8 stripes x 72 HSV bins
        assert emb.dim == emb.taps[0].channels * 8 + 8 * 72 and emb.taps[0].stride == 4
    d = Detections.from_ultralytics(r)
    assert d.embeddings.shape == e.shape


def test_empty_frame_gives_empty_rows(pose_model_path):
    from ultralytics import YOLO

    model = YOLO(pose_model_path)
    with Embedder(model) as emb:
        r = model.predict(np.zeros((240, 320, 3), np.uint8), verbose=False)[0]
    assert len(r.boxes) == 0
    assert r.vq_embeddings.shape == (0, emb.dim) and r.vq_embeddings.dtype == np.float32
    assert Detections.from_ultralytics(r).embeddings.shape == (0, emb.dim)


def test_deterministic(pose_model_path, zidane):
    from ultralytics import YOLO

    model = YOLO(pose_model_path)
    with Embedder(model):
        a = model.predict(zidane, verbose=False)[0].vq_embeddings
        b = model.predict(zidane, verbose=False)[0].vq_embeddings
    assert len(a) >= 2
    np.testing.assert_array_equal(a, b)


def test_roi_pooling_equals_manual_roi_align_on_letterboxed_input(pose_model_path, bikes_frames):
    """640x272 at imgsz 320: gain 0.5, input 320x160 with 12 px bands top and bottom (computed here by hand)."""
    from ultralytics import YOLO

    model = YOLO(pose_model_path)
    recipe = {"mode": "roi", "levels": [{"layer": "s8", "grid": [2, 1], "samples": 1}], "level_norm": False,
              "final_norm": False}
    frame = bikes_frames[5]
    with Embedder(model, recipe) as emb, Tap(model, ["s8"]) as tap:
        r = model.predict(frame, imgsz=320, conf=0.05, verbose=False)[0]
        im, (fmap,) = tap.pop()
    assert im.shape[2:] == (160, 320)
    n = len(r.boxes)
    assert n > 0
    boxes = r.boxes.xyxy.clone() * 0.5  # gain = min(160/272, 320/640)
    boxes[:, [1, 3]] += 12  # pad = round((160 - 136) / 2 - 0.1)
    ref = roi_align(fmap.float().contiguous(), [boxes], (2, 1), spatial_scale=1 / 8, sampling_ratio=2, aligned=True)
    ref = ref.permute(0, 2, 3, 1).flatten(1).numpy()  # cell-major, as documented
    np.testing.assert_allclose(r.vq_embeddings, ref, atol=1e-4, rtol=1e-4)
    assert emb.dim == ref.shape[1]


def test_gathered_pooling_equals_roi_align_on_a_real_channels_last_map(pose_model_path, bikes_frames):
    """The recipe's cells (a gather of RoIAlign's bilinear taps from the map's rows) equal torchvision's RoIAlign over
    the whole map, averaged to the grid, and the frame mean equals the map's mean, on Ultralytics' channels_last map."""
    from ultralytics import YOLO

    model = YOLO(pose_model_path)
    with Tap(model, ["s4"]) as tap:
        r = model.predict(bikes_frames[3], imgsz=640, conf=0.05, verbose=False)[0]
        im, (fmap,) = tap.pop()
    assert fmap.is_contiguous(memory_format=torch.channels_last) and not fmap.is_contiguous()
    xy = to_input(r.boxes.xyxy, r.orig_shape, im.shape[2:])
    rois = torch.cat([torch.zeros(len(xy), 1), xy], 1)
    assert len(rois) > 0
    taps = cell_taps(rois, 1 / 4, (8, 1), 2, 2, fmap.shape[2:])
    rows = map_rows(fmap)
    assert rows.data_ptr() == fmap.data_ptr()  # a view: no copy of the map
    got = pool_cells(rows, taps)  # (n, 8, C)
    ref = F.avg_pool2d(roi_align(fmap.float().contiguous(), rois, (16, 2), spatial_scale=1 / 4, sampling_ratio=2,
                                 aligned=True), 2)
    torch.testing.assert_close(got, ref.flatten(2).transpose(1, 2), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(_frame_mean(rows), fmap.float().mean(dim=(2, 3)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("grid,samples", [((8, 1), 2), ((2, 3), 1), ((1, 1), 3)])
def test_gathered_pooling_equals_roi_align_past_the_edges(grid, samples, layout):
    """Random maps and boxes, including boxes past every edge, boxes covering the whole map and sub-cell boxes."""
    g = torch.Generator().manual_seed(1)
    b, c, h, w, st = 2, 16, 40, 56, 4
    fmap = torch.randn(b, c, h, w, generator=g)
    if layout == "channels_last":
        fmap = fmap.contiguous(memory_format=torch.channels_last)
    xy = torch.rand(300, 2, generator=g) * torch.tensor([w * st, h * st]) * 1.2 - 10
    rois = torch.cat([torch.randint(0, b, (300, 1), generator=g).float(), xy,
                      xy + torch.rand(300, 2, generator=g) * 150 + 0.1], 1)
    rois[:3, 1:] = torch.tensor([[0.0, 0, w * st, h * st], [w * st - 3, h * st - 3, w * st + 9, h * st + 9], [0, 0, 1, 1]])
    got = pool_cells(map_rows(fmap), cell_taps(rois, 1 / st, grid, samples, 2, (h, w)))
    ref = F.avg_pool2d(roi_align(fmap.contiguous(), rois, (grid[0] * samples, grid[1] * samples), spatial_scale=1 / st,
                                 sampling_ratio=2, aligned=True), samples)
    torch.testing.assert_close(got, ref.flatten(2).transpose(1, 2), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("source", ["pose-pt", "yolov8n.yaml"])
def test_anchor_mode_equals_ultralytics_reid_features(source, pose_model_path, zidane):
    """Ultralytics' own per-box features: the tracker's Detect pre-hook (trackers/track.py) + get_obj_feats."""
    model = yolo(pose_model_path if source == "pose-pt" else source)
    conf = 0.25 if source == "pose-pt" else LOW
    model.predict(zidane, conf=conf, verbose=False)  # build the predictor
    predictor = model.predictor

    def pre_hook(module, args):  # exactly what trackers/track.py registers for ReID "auto"
        predictor._feats = list(args[0])

    handle = predictor.model.model.model[-1].register_forward_pre_hook(pre_hook)
    try:
        with Embedder(model, {"mode": "anchor", "final_norm": False}):
            r = model.predict(zidane, conf=conf, verbose=False)[0]
    finally:
        handle.remove()
        predictor._feats = None
    assert len(r.boxes) > 0
    np.testing.assert_allclose(r.vq_embeddings, r.feats.cpu().numpy(), rtol=1e-5, atol=1e-6)


def test_anchor_recovered_for_end_to_end_head(bus):
    """YOLO26's one-to-one head: the recovered anchor's own decoded box and score are the detection's."""
    model = yolo("yolo26n.yaml")
    with Tap(model, ["head"], capture_head=True) as tap, Embedder(model, {"mode": "anchor", "final_norm": False}):
        r = model.predict(bus, imgsz=320, conf=LOW, verbose=False, nms=False)[0]  # nms=False: one-to-one head
        out = tap.head_output
        im, maps = tap.pop()
        head = tap.module.model[-1]
    assert head.end2end and len(r.boxes) > 0
    xyxy = to_input(r.boxes.xyxy, r.orig_shape, im.shape[2:])
    region = image_region(r.orig_shape, im.shape[2:])
    conf, cls, geom, anchor = head_candidates(head, out, 0, region)
    a = anchor[match_rows(r.boxes.conf, r.boxes.cls, xyxy, conf, cls, geom)]
    raw = out[1].get("one2one", out[1])
    decoded = head._inference(raw)[0]  # (4 + nc, A): xyxy boxes and scores of every anchor, one-to-one branch
    lo, hi = torch.tensor(region[:2]), torch.tensor(region[2:])
    raw_boxes = decoded[:4, a].T
    clipped = torch.cat([raw_boxes[:, :2].clamp(lo, hi), raw_boxes[:, 2:].clamp(lo, hi)], 1)  # as scale_boxes clips
    torch.testing.assert_close(clipped, xyxy, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(decoded[4:, a].max(dim=0).values, r.boxes.conf.float())
    feats = anchor_features(maps, torch.zeros_like(a), a)
    np.testing.assert_allclose(r.vq_embeddings, feats.numpy(), rtol=1e-6)


def test_tracking_keeps_embeddings_on_their_boxes(pose_model_path, bikes_frames):
    """model.track() drops, reorders and smooths boxes; each row keeps the embedding of its detection."""
    from ultralytics import YOLO

    frames = bikes_frames[:8]
    plain_model, track_model = YOLO(pose_model_path), YOLO(pose_model_path)
    with Embedder(plain_model) as _:
        plain = [plain_model.predict(f, conf=0.1, verbose=False)[0] for f in frames]
    with Embedder(track_model) as _:
        tracked = [track_model.track(f, conf=0.1, persist=True, verbose=False)[0] for f in frames]
    checked = 0
    for p, t in zip(plain, tracked):
        assert t.vq_embeddings.shape == (len(t.boxes), p.vq_embeddings.shape[1])
        for j in range(len(t.boxes)):
            i = int(np.argmin(np.abs(p.boxes.conf.numpy() - float(t.boxes.conf[j]))))
            np.testing.assert_allclose(t.vq_embeddings[j], p.vq_embeddings[i], atol=1e-6)
            checked += 1
    assert checked > 0 and any(t.boxes.id is not None for t in tracked)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = np.prod(np.clip(rb - lt, 0, None))
    return inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)


@pytest.mark.parametrize("recipe", ["default", "s4-stripes", "colour"])
def test_same_person_closer_after_shift_and_rescale(recipe, pose_model_path, zidane):
    """Real weights, real image: each person re-found in a shifted, 0.8x-rescaled copy is nearest to itself."""
    from ultralytics import YOLO

    model = YOLO(pose_model_path)
    s, dx, dy = 0.8, 37, 21
    moved = np.full((640, 1100, 3), 114, np.uint8)
    small = cv2.resize(zidane, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
    moved[dy : dy + small.shape[0], dx : dx + small.shape[1]] = small
    with Embedder(model, recipe):
        a = model.predict(zidane, verbose=False)[0]
        b = model.predict(moved, verbose=False)[0]
    boxes_a = a.boxes.xyxy.numpy()
    boxes_b = (b.boxes.xyxy.numpy() - [dx, dy, dx, dy]) / s  # back to the original frame
    pairs = [(i, max(range(len(boxes_b)), key=lambda j: _iou(boxes_a[i], boxes_b[j]))) for i in range(len(boxes_a))]
    pairs = [(i, j) for i, j in pairs if _iou(boxes_a[i], boxes_b[j]) > 0.7]
    assert len(pairs) >= 2, "expected both people of zidane.jpg in both images"
    for i, j in pairs:
        same = _cos(a.vq_embeddings[i], b.vq_embeddings[j])
        others = [_cos(a.vq_embeddings[i], b.vq_embeddings[k]) for _, k in pairs if k != j]
        print(f"{recipe}: person {i}: cos to itself {same:.3f}, to others {np.round(others, 3).tolist()}")
        assert same > max(others)


@pytest.mark.parametrize("stride", [4, 3])
@pytest.mark.parametrize("stripes", [8, 6])
def test_colour_histogram_equals_roi_align_over_one_hot_bins(stripes, stride):
    """The colour cue bins only the cells RoIAlign's samples read (gathered from the input) instead of pooling a
    (B, nb, H, W) one-hot map of every cell: same numbers, boxes past the edges and tiny boxes included; stride 3 does
    not divide the width (pixel-wise gather instead of runs of a cell's row)."""
    g = torch.Generator().manual_seed(0)
    b, h, w, nb = 2, 40, 56, 72
    spec = ColourSpec(stripes=stripes, bins=(8, 3, 3), stride=stride)
    extra = 0 if stride == 4 else 2  # stride 4: the width is a multiple of it (runs of a cell's row)
    images = torch.randint(0, 256, (b, 3, h * stride + 1, w * stride + extra), generator=g).float() / 255
    one_hot = (hsv_bin_index(images, spec).unsqueeze(1) == torch.arange(nb).view(1, -1, 1, 1)).float()
    assert one_hot.shape[2:] == (h, w)
    xy = torch.rand(200, 2, generator=g) * torch.tensor([w * stride, h * stride]) * 1.1 - 5
    rois = torch.cat([torch.randint(0, b, (200, 1), generator=g).float(), xy,
                      xy + torch.rand(200, 2, generator=g) * 120 + 0.5], 1)
    rois[:3, 1:] = torch.tensor([[0.0, 0, w * stride, h * stride], [w * stride - 3, h * stride - 3, w * stride,
                                                                      h * stride], [0, 0, 2, 2]])
    ref = F.avg_pool2d(roi_align(one_hot, rois, (stripes * 2, 2), spatial_scale=1 / stride, sampling_ratio=2,
                                 aligned=True), 2)
    ref = ref.reshape(-1, nb, stripes).transpose(1, 2)
    torch.testing.assert_close(colour_hist(images, rois, spec, 2), ref, atol=1e-5, rtol=0)


def _exact_hsv_bin(rgb: tuple[int, int, int], count: int, bins: tuple[int, int, int]) -> int:
    """Reference: the joint HSV bin of the average of ``count`` pixels summing to ``rgb``, in exact rationals."""
    from fractions import Fraction

    r, g, b = (Fraction(v, 255 * count) for v in rgb)
    v, d = max(r, g, b), max(r, g, b) - min(r, g, b)
    s = d / v if v else Fraction(0)
    if d == 0:
        h = Fraction(0)
    elif v == r:
        h = ((g - b) / d) % 6
    elif v == g:
        h = (b - r) / d + 2
    else:
        h = (r - g) / d + 4
    hb, sb, vb = bins
    q = lambda t, n: min(int(t * n), n - 1)
    return (q(h / 6, hb) * sb + q(s, sb)) * vb + q(v, vb)


def test_hsv_bins_are_exact_and_the_same_in_onnxruntime(tmp_path):
    """Colours on bin edges (uniform 85/255 and 170/255 cells, greys, pure hues, ties between channels) land in the
    bin exact rational arithmetic gives, in PyTorch and in onnxruntime alike (float HSV flipped such cells between
    the two runtimes, so edge devices shipped other codes)."""
    import onnxruntime as ort

    spec = ColourSpec(stripes=1, bins=(8, 3, 3), stride=4)
    levels = [0, 1, 42, 85, 127, 128, 170, 212, 213, 254, 255]
    cells = [(r, g, b) for r in levels for g in levels for b in levels]  # 1331 uniform cells, many on edges
    g = torch.Generator().manual_seed(3)
    side = 37
    noisy = torch.randint(0, 256, (1, 3, 4 * side, 4 * side), generator=g)  # and random 4 x 4 mixtures
    img = torch.zeros(1, 3, 4 * side, 4 * side)
    for i, c in enumerate(cells):
        y, x = divmod(i, side)
        img[0, :, 4 * y : 4 * y + 4, 4 * x : 4 * x + 4] = torch.tensor(c).view(3, 1, 1)
    images = torch.cat([img, noisy.float()]) / 255
    bins = hsv_bin_index(images, spec)
    sums = F.avg_pool2d(images * 255, 4, divisor_override=1).round().long()
    want = torch.tensor([[[_exact_hsv_bin(tuple(sums[b, :, y, x].tolist()), 16, spec.bins) for x in range(side)]
                          for y in range(side)] for b in range(2)])
    assert torch.equal(bins.long(), want)

    class Bins(torch.nn.Module):
        def forward(self, x):
            return hsv_bin_index(x, spec)

    path = tmp_path / "bins.onnx"
    torch.onnx.export(Bins(), (images,), str(path), dynamo=False, opset_version=18, input_names=["x"])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": images.numpy()})[0]
    np.testing.assert_array_equal(got, bins.numpy())
