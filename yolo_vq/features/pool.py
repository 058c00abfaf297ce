"""Feature maps + boxes -> per-detection vectors, in plain tensor ops (RoIAlign, pooling, norms) that export to ONNX.

Everything here works on the *network input* frame: boxes in letterboxed input pixels, maps as captured by a
:class:`~yolo_vq.features.tap.Tap`, the colour cue computed from the same letterboxed input. Mapping from original
pixels is :func:`yolo_vq._letterbox.to_input`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ColourSpec, EmbedConfig
from .tap import TapInfo

__all__ = ["BoxEmbedder", "CellTaps", "anchor_features", "cell_taps", "colour_hist", "hsv_bin_index",
           "image_embedding", "map_rows", "pool_cells"]


def _l2(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=dim, eps=1e-12)


def _rgb_bins(r: torch.Tensor, g: torch.Tensor, b: torch.Tensor, full: float, spec: ColourSpec) -> torch.Tensor:
    """Joint HSV bin of colours given as integer-valued float32 sums of 8-bit values (``full`` = the sum of white).

    Every bin edge is decided by one division of exact integers (``floor(a / b)``), so PyTorch and onnxruntime put a
    colour in the same bin even where it sits exactly on an edge (plain float HSV flips such cells, e.g. uniform
    85/255 greys, on 1-ulp differences between runtimes). Returns float32 small integers in ``[0, prod(bins))``.
    """
    hb, sb, vb = spec.bins
    v = torch.maximum(torch.maximum(r, g), b)
    d = v - torch.minimum(torch.minimum(r, g), b)
    dd = d.clamp_min(1.0)
    num = torch.where(v == r, g - b + torch.where(g < b, 6.0 * d, torch.zeros_like(d)),
                      torch.where(v == g, b - r + 2.0 * d, r - g + 4.0 * d))  # hue * d, in [0, 6d)

    def q(a: torch.Tensor, den: torch.Tensor | float, n: int) -> torch.Tensor:  # floor(n * a / den), in [0, n)
        return torch.floor(a * n / den).clamp(0, n - 1)

    h = torch.where(d > 0, q(num, 6.0 * dd, hb), torch.zeros_like(d))  # grey: hue 0 (saturation tells them apart)
    sat = torch.where(v > 0, q(d, v.clamp_min(1.0), sb), torch.zeros_like(d))
    return (h * sb + sat) * vb + q(v, full, vb)


def _to_8bit(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.float() * 255.0)  # inputs are 8-bit frames / 255: exact integers again


def hsv_bin_index(images: torch.Tensor, spec: ColourSpec) -> torch.Tensor:
    """Joint HSV bin of every ``spec.stride`` x ``spec.stride`` cell of the input (average colour of the cell).

    Args:
        images: (B, 3, H, W) RGB in [0, 1] (8-bit values / 255), any float dtype.
    Returns:
        (B, H // stride, W // stride) float32 holding small integer bin indices in ``[0, prod(bins))``.
    """
    st = spec.stride
    x = (F.avg_pool2d(_to_8bit(images), st) * (st * st)).round()  # exact sums (ONNX pools have no divisor_override)
    return _rgb_bins(x[:, 0], x[:, 1], x[:, 2], 255.0 * st * st, spec)


def _axis_samples(lo: torch.Tensor, hi: torch.Tensor, bins: int, ratio: int, size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoIAlign's sample points along one axis (``aligned=True``, ``ratio`` samples per bin) and their bilinear
    neighbours, exactly as torchvision/ONNX RoiAlign place and clamp them.

    Args: lo, hi (n,) roi edges in cells (already ``* scale - 0.5``); bins per roi; size of the map along this axis.
    Returns: (n, bins * ratio) int64 low and high neighbour, and float32 weights of each (0 outside the map).
    """
    step = (hi - lo) / bins
    at = torch.arange(bins, device=lo.device, dtype=lo.dtype)
    frac = (at[:, None] + (torch.arange(ratio, device=lo.device, dtype=lo.dtype)[None] + 0.5) / ratio).reshape(-1)
    p = lo[:, None] + step[:, None] * frac[None]  # (n, bins * ratio)
    inside = ((p >= -1.0) & (p <= size)).float()
    p = p.clamp_min(0.0)
    low = p.floor().clamp_max(size - 1)
    p = torch.minimum(p, low.where(low >= size - 1, p))  # at the last cell: sample it exactly
    high = (low + 1).clamp_max(size - 1)
    w_high = p - low
    return low.long(), high.long(), (1.0 - w_high) * inside, w_high * inside


class CellTaps(NamedTuple):
    """RoIAlign's bilinear taps of every output cell of every box (:func:`cell_taps`), kept separable so each reader
    turns them into positions of its own layout (:meth:`at`). ``k = samples * ratio`` samples per cell and axis, each
    reading 2 neighbours; ``T = 4 * k * k`` taps per cell."""

    image: torch.Tensor  # (n, 1, 1, 1, 1) int64: the image of each box
    ys: torch.Tensor  # (n, rows, 1, 2k, 1) int64: the map rows each cell row reads
    xs: torch.Tensor  # (n, 1, cols, 1, 2k) int64: the map columns each cell column reads
    weights: torch.Tensor  # (n, rows * cols, T) float32, cells row-major; each cell's sum to at most 1
    hw: tuple[int, int]  # (H, W) of the map (every tap lies inside it)

    def at(self, image_stride: int, row_stride: int, col_stride: int = 1) -> torch.Tensor:
        """(n, rows * cols, T) int64 positions ``image * image_stride + y * row_stride + x * col_stride``."""
        p = self.image * image_stride + self.ys * row_stride + self.xs * col_stride  # (n, rows, cols, 2k, 2k)
        return p.reshape(-1, int(self.weights.shape[1]), int(self.weights.shape[2]))


def cell_taps(rois: torch.Tensor, scale: float, grid: tuple[int, int], samples: int, ratio: int,
              hw: tuple[int, int]) -> CellTaps:
    """RoIAlign's bilinear taps of every output cell: which map cells each reads, with which weight.

    A cell is ``samples`` x ``samples`` RoIAlign bins of ``ratio`` x ``ratio`` samples each (``aligned=True``), each
    sample reading its four neighbour cells; the weighted sum of the tapped cells (:func:`pool_cells`) is then exactly
    ``avg_pool2d(roi_align(map, rois, grid * samples, scale, ratio, aligned=True), samples)`` up to float rounding,
    for any ``rois`` (past the map's edges too). A pure gather: no map-wide work, nothing copied but the taps.

    Args:
        rois: (n, 5) float32 ``[batch_index, x1, y1, x2, y2]`` in input pixels.
        scale: 1 / the map's stride.
        grid: (rows, cols) output cells per box.
        hw: (H, W) of the map.
    """
    rows, cols = grid
    h, w = (int(v) for v in hw)
    k = samples * ratio  # samples per cell along each axis
    r = rois.float()
    ylo, yhi, wyl, wyh = _axis_samples(r[:, 2] * scale - 0.5, r[:, 4] * scale - 0.5, rows * samples, ratio, h)
    xlo, xhi, wxl, wxh = _axis_samples(r[:, 1] * scale - 0.5, r[:, 3] * scale - 0.5, cols * samples, ratio, w)
    ys = torch.stack([ylo, yhi], 2).reshape(-1, rows, 1, 2 * k, 1)  # k samples x 2 neighbours per cell row
    wy = torch.stack([wyl, wyh], 2).reshape(-1, rows, 1, 2 * k, 1)
    xs = torch.stack([xlo, xhi], 2).reshape(-1, 1, cols, 1, 2 * k)
    wx = torch.stack([wxl, wxh], 2).reshape(-1, 1, cols, 1, 2 * k) / float(k * k)  # a cell: the mean of k * k samples
    weights = (wy * wx).reshape(-1, rows * cols, 4 * k * k)
    return CellTaps(r[:, 0].long().reshape(-1, 1, 1, 1, 1), ys, xs, weights, (h, w))


def map_rows(fmap: torch.Tensor) -> torch.Tensor:
    """A (B, C, H, W) map as (B, H * W, C) rows: a free view of the channels_last maps Ultralytics' CPU path
    produces (no whole-map copy, PITFALLS 3); for an NCHW map one layout copy (in onnxruntime: its reorder out of the
    NCHWc layout straight to NHWC, which any reader of a tapped map pays)."""
    c, h, w = (int(v) for v in fmap.shape[1:])  # static sizes: no Shape op on the map in an exported graph
    return fmap.permute(0, 2, 3, 1).reshape(-1, h * w, c)


def _frame_mean(rows: torch.Tensor) -> torch.Tensor:
    """(B, H * W, C) rows -> (B, C) float32 averages, as one (1, H * W) @ rows product: onnxruntime's ReduceMean over
    the middle axis of a 3-D tensor is far slower than this MatMul."""
    hw = int(rows.shape[1])
    return torch.matmul(rows.new_full((1, hw), 1.0 / hw, dtype=torch.float32), rows.float()).squeeze(1)


def pool_cells(rows: torch.Tensor, taps: CellTaps) -> torch.Tensor:
    """Each cell's weighted sum of its tapped map rows: (B, H * W, C) rows (:func:`map_rows`) -> (n, cells, C)
    float32, as :func:`cell_taps` defines the cells."""
    c, (h, w) = int(rows.shape[2]), taps.hw
    cells, t = int(taps.weights.shape[1]), int(taps.weights.shape[2])
    vals = rows.reshape(-1, c)[taps.at(h * w, w).reshape(-1)].float().reshape(-1, t, c)  # (n * cells, T, C)
    return torch.matmul(taps.weights.reshape(-1, 1, t), vals).reshape(-1, cells, c)


def colour_hist(images: torch.Tensor, rois: torch.Tensor, spec: ColourSpec, ratio: int,
                taps: CellTaps | None = None) -> torch.Tensor:
    """Per-stripe HSV bin histograms of each box: (n, stripes, nb) float32 (not normalised).

    Equal to RoIAlign (``stripes * 2`` x 2 bins, ``ratio`` samples, then 2 x 2 average pooling) over the one-hot map
    of :func:`hsv_bin_index`, without building either map: only the cells RoIAlign's samples read are summed and
    binned (each a ``stride`` x ``stride`` block of input pixels), and their bilinear weights added to their bins.

    Args: images (B, 3, H, W) RGB in [0, 1]; rois (n, 5) ``[b, x1, y1, x2, y2]`` input px; ``taps``: the
    :func:`cell_taps` of these rois on the (H // stride, W // stride) cells with ``(stripes, 1)`` cells of 2 x 2
    bins, when already computed (a level of the same stride shares them).
    """
    st = spec.stride
    nb = spec.bins[0] * spec.bins[1] * spec.bins[2]
    big_h, big_w = int(images.shape[2]), int(images.shape[3])  # static sizes: no Shape op in an exported graph
    taps = taps or cell_taps(rois, 1.0 / st, (spec.stripes, 1), 2, ratio, (big_h // st, big_w // st))
    # gather runs of `run` pixels: one channel's row of a cell where rows align on cells, else single pixels
    run = st if big_w % st == 0 else 1
    corner = taps.at(3 * big_h * big_w // run, st * big_w // run, st // run)  # (n, stripes, T): each cell, channel 0
    block = (torch.arange(3, device=rois.device)[:, None, None] * (big_h * big_w)
             + torch.arange(st, device=rois.device)[None, :, None] * big_w
             + torch.arange(0, st, run, device=rois.device)[None, None, :]).reshape(-1) // run  # a cell's runs
    px = _to_8bit(images.reshape(-1, run)[(corner[..., None] + block).reshape(-1)]).reshape(-1, 3, st * st)
    rgb = px.sum(-1)  # (n * stripes * T, 3): each tapped cell's colour, as exact sums of 8-bit values
    bins = _rgb_bins(rgb[:, 0], rgb[:, 1], rgb[:, 2], 255.0 * st * st, spec).long().reshape(corner.shape)
    n, stripes = corner.shape[0], spec.stripes
    slot = (torch.arange(n * stripes, device=rois.device).reshape(-1, stripes, 1)) * nb + bins
    out = torch.zeros(n * stripes * nb, device=rois.device, dtype=torch.float32)
    out = out.scatter_add(0, slot.reshape(-1), taps.weights.reshape(-1))
    return out.reshape(-1, stripes, nb)


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


class BoxEmbedder(nn.Module):
    """The ``roi`` recipe as a module: (input, tapped maps, boxes) -> (n, D) float32 embeddings.

    Args:
        config: the recipe (``mode='roi'``).
        taps: the resolved :class:`TapInfo` of each level, in the order of ``config.levels``.

    ``forward(images, maps, rois)``:
        images: (B, 3, H, W) letterboxed input, RGB in [0, 1] (only read by a colour cue).
        maps: one (B, C_l, H / s_l, W / s_l) map per level, in ``config.levels`` order.
        rois: (n, 5) float32 ``[batch_index, x1, y1, x2, y2]`` in input pixels.
    """

    def __init__(self, config: EmbedConfig, taps: Sequence[TapInfo]):
        super().__init__()
        if config.mode != "roi":
            raise ValueError(f"BoxEmbedder runs 'roi' recipes, got mode {config.mode!r}")
        if len(taps) != len(config.levels):
            raise ValueError(f"need one TapInfo per level: {len(config.levels)} levels, {len(taps)} taps")
        self.config = config
        self.taps = list(taps)

    @property
    def dim(self) -> int:
        """Embedding length D."""
        d = sum(t.channels * lv.grid[0] * lv.grid[1] for t, lv in zip(self.taps, self.config.levels))
        return d + (self.config.colour.dim if self.config.colour is not None else 0)

    def forward(self, images: torch.Tensor, maps: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        return self.embed(images, maps, rois)[0]

    def embed(
        self, images: torch.Tensor, maps: Sequence[torch.Tensor], rois: torch.Tensor, *, image: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Box embeddings (n, D) and, with ``image=True``, whole-frame embeddings (B, D_img), sharing the work."""
        cfg = self.config
        rois = rois.float()
        if rois.shape[0] == 0 and not _tracing():  # nothing to pool (tracing keeps the general path)
            img = image_embedding(maps, images=images, colour=cfg.colour) if image else None
            return rois.new_zeros((0, self.dim)), img
        # The order below is the order of the exported graph's nodes, which onnxruntime's default execution order
        # follows (a depth-first walk from the outputs, newest inputs first): the colour part and everything derived
        # from the boxes come first, the map's rows, frame mean and gathers last, so onnxruntime reads the tapped map
        # out of its NCHWc layout right after the layer that wrote it (while it is in cache) and frees the original,
        # instead of reading it cold after the detector has finished (docs/benchmarks.md, edge section).
        shared: dict[tuple, CellTaps] = {}

        def taps_of(scale: float, grid: tuple[int, int], samples: int, hw: tuple[int, int]) -> CellTaps:
            # the colour cells and a stride-4 level with the same grid read the very same taps: compute them once
            key = (scale, tuple(grid), samples, hw)
            if key not in shared:
                shared[key] = cell_taps(rois, scale, grid, samples, cfg.sampling_ratio, hw)
            return shared[key]

        colour = None
        if (c := cfg.colour) is not None:
            cells_hw = (int(images.shape[2]) // c.stride, int(images.shape[3]) // c.stride)
            hist = colour_hist(images, rois, c, cfg.sampling_ratio, taps_of(1.0 / c.stride, (c.stripes, 1), 2, cells_hw))
            hist = hist / hist.sum(-1, keepdim=True).clamp_min(1e-6)  # (n, stripes, nb) bin fractions
            v = hist.sqrt().reshape(-1, c.dim)  # Hellinger: sqrt of bin fractions, so L2 compares distributions fairly
            colour = (_l2(v) if cfg.level_norm else v) * c.weight
        parts, means = [], []
        image_of = rois[:, 0].long()
        for t, lv, fmap in zip(self.taps, cfg.levels, maps):
            hw = int(fmap.shape[2]), int(fmap.shape[3])
            taps = taps_of(1.0 / t.stride, lv.grid, lv.samples, hw)
            rows = map_rows(fmap)  # (B, H * W, C)
            cells = pool_cells(rows, taps)  # (n, r * c, C)
            if cfg.center or image:
                means.append(_frame_mean(rows))  # (B, C)
            if cfg.center:  # minus the frame's average feature, per image
                cells = cells - means[-1][image_of][:, None, :]
            v = cells.reshape(-1, lv.grid[0] * lv.grid[1] * cells.shape[2])  # cell-major (n, r * c * C)
            parts.append((_l2(v) if cfg.level_norm else v) * lv.weight)
        if colour is not None:
            parts.append(colour)
        out = torch.cat(parts, dim=1)
        out = _l2(out) if cfg.final_norm else out
        return out, (image_embedding(maps, means or None, images=images, colour=cfg.colour) if image else None)


def image_embedding(
    maps: Sequence[torch.Tensor], means: Sequence[torch.Tensor] | None = None, *,
    images: torch.Tensor | None = None, colour: ColourSpec | None = None,
) -> torch.Tensor:
    """Whole-frame vectors (B, D_img) float32: each tapped map global-average-pooled and L2-normalised, concatenated
    and L2-normalised again (``means`` reuses per-level (B, C) averages already computed). A recipe without maps
    (colour only) gets the frame's HSV histogram (sqrt, L2) from ``images`` and ``colour`` instead."""
    if not maps:
        if images is None or colour is None:
            raise ValueError("image_embedding needs maps, or images and a colour spec")
        idx = hsv_bin_index(images, colour).flatten(1).long()  # (B, cells)
        nb = colour.bins[0] * colour.bins[1] * colour.bins[2]
        hist = torch.zeros(idx.shape[0], nb, device=idx.device).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
        return _l2(hist.sqrt())
    means = [_frame_mean(map_rows(m)) for m in maps] if means is None else means
    return _l2(torch.cat([_l2(m) for m in means], dim=1))


def anchor_features(maps: Sequence[torch.Tensor], batch_index: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """The head-cell vector of each detection, reduced as Ultralytics' ``DetectionPredictor.get_obj_feats`` does.

    Each level's (C_l) channels are averaged in groups down to the shortest level's channel count ``s``, and anchors
    are numbered level by level, row-major within a level (the order of the head's flattened predictions).

    Args:
        maps: the detection head's inputs, (B, C_l, H_l, W_l) each.
        batch_index: (n,) int64 image of each detection.
        anchor: (n,) int64 anchor index of each detection.
    Returns:
        (n, s) float32.
    """
    s = min(m.shape[1] for m in maps)
    out = maps[0].new_zeros((anchor.shape[0], s), dtype=torch.float32)
    start = 0
    for m in maps:
        _, c, h, w = m.shape
        local = anchor - start
        sel = (local >= 0) & (local < h * w)
        if sel.any():
            li = local[sel]
            v = m[batch_index[sel], :, li // w, li % w].float()  # (k, C)
            out[sel] = v.view(-1, s, c // s).mean(-1)
        start += h * w
    return out
