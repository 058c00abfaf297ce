"""Feature maps + boxes -> per-detection vectors, in plain tensor ops (RoIAlign, pooling, norms) that export to ONNX.

Everything here works on the *network input* frame: boxes in letterboxed input pixels, maps as captured by a
:class:`~yolo_vq.tap.Tap`, the colour cue computed from the same letterboxed input. Mapping from original pixels is
:func:`yolo_vq.letterbox.to_input`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from .config import ColourSpec, EmbedConfig
from .tap import TapInfo

__all__ = ["BoxEmbedder", "anchor_features", "hsv_bin_index", "image_embedding"]


def _l2(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=dim, eps=1e-12)


def hsv_bin_index(images: torch.Tensor, spec: ColourSpec) -> torch.Tensor:
    """Joint HSV bin of every ``spec.stride`` x ``spec.stride`` cell of the input (average colour of the cell).

    Args:
        images: (B, 3, H, W) RGB in [0, 1], any float dtype.
    Returns:
        (B, H // stride, W // stride) float32 holding small integer bin indices in ``[0, prod(bins))``.
    """
    x = F.avg_pool2d(images.float(), spec.stride) if spec.stride > 1 else images.float()
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = torch.maximum(torch.maximum(r, g), b)
    d = v - torch.minimum(torch.minimum(r, g), b)
    s = d / v.clamp_min(1e-6)
    dd = d.clamp_min(1e-6)
    h = torch.where(v == r, torch.remainder((g - b) / dd, 6.0), torch.where(v == g, (b - r) / dd + 2, (r - g) / dd + 4))
    h = torch.where(d > 1e-6, h / 6.0, torch.zeros_like(h))  # grey cells: hue 0 (the saturation bin tells them apart)
    hb, sb, vb = spec.bins

    def q(t: torch.Tensor, n: int) -> torch.Tensor:
        return (t * n).floor().clamp(0, n - 1)

    return (q(h, hb) * sb + q(s, sb)) * vb + q(v, vb)


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


def _sampled_hist(bins: torch.Tensor, rois: torch.Tensor, stripes: int, nb: int, scale: float, ratio: int
                  ) -> torch.Tensor:
    """Per-stripe bin histograms of each box: (n, stripes, nb) float32.

    Equal to RoIAlign over the one-hot bin map (``stripes * 2`` x 2 bins of ``ratio`` x ``ratio`` samples, then 2 x 2
    average pooling), without building that (B, nb, H, W) map: each sample's four neighbour cells add their bilinear
    weights to their bins (a scatter-add over n x 128 x 4 entries instead of nb maps of every cell).

    Args: bins (B, H, W) float32 bin index per cell (:func:`hsv_bin_index`); rois (n, 5) ``[b, x1, y1, x2, y2]``
    input px; ``scale`` = 1 / cell size.
    """
    h, w = bins.shape[1], bins.shape[2]
    r = rois.float()
    ylo, yhi, wyl, wyh = _axis_samples(r[:, 2] * scale - 0.5, r[:, 4] * scale - 0.5, stripes * 2, ratio, h)
    xlo, xhi, wxl, wxh = _axis_samples(r[:, 1] * scale - 0.5, r[:, 3] * scale - 0.5, 2, ratio, w)
    base = r[:, 0].long() * (h * w)  # (n,)
    ys, wy = torch.stack([ylo, yhi], 2), torch.stack([wyl, wyh], 2)  # (n, Py, 2)
    xs, wx = torch.stack([xlo, xhi], 2), torch.stack([wxl, wxh], 2)  # (n, Px, 2)
    cell = base[:, None, None, None, None] + ys[:, :, None, :, None] * w + xs[:, None, :, None, :]  # (n,Py,Px,2,2)
    weight = wy[:, :, None, :, None] * wx[:, None, :, None, :]
    b = bins.reshape(-1).long()[cell.reshape(-1)].reshape(cell.shape)
    py = cell.shape[1]
    stripe = torch.arange(py, device=rois.device) // (2 * ratio)  # sample row -> stripe
    n = r.shape[0]
    slot = (torch.arange(n, device=rois.device)[:, None, None, None, None] * stripes
            + stripe[None, :, None, None, None]) * nb + b
    out = torch.zeros(n * stripes * nb, device=rois.device, dtype=torch.float32)
    out = out.scatter_add(0, slot.reshape(-1), weight.reshape(-1))
    return out.reshape(-1, stripes, nb) / float(4 * ratio * ratio)  # RoIAlign's sample mean, then 2 x 2 pooling


def _windows(rois: torch.Tensor, scale: float, hw: tuple[int, int]) -> list[list[int]]:
    """Per box ``[b, x0, y0, x1, y1]``: the cells RoIAlign (aligned) can read for it, with a safety margin."""
    c = rois[:, 1:] * scale - 0.5
    lo = (c[:, 0:2].floor() - 1).clamp_min(0)
    hi = c[:, 2:4].ceil() + 2
    hi = torch.minimum(hi, hi.new_tensor([hw[1], hw[0]]))
    return torch.cat([rois[:, :1], lo, torch.maximum(hi, lo + 1)], dim=1).long().tolist()


def _roi_grid(
    fmap: torch.Tensor | Callable[[int, int, int, int, int], torch.Tensor], rois: torch.Tensor,
    grid: tuple[int, int], samples: int, scale: float, sampling_ratio: int, windows: list[list[int]] | None = None,
) -> torch.Tensor:
    """RoIAlign at ``grid * samples`` bins, averaged down to ``grid``: (n, C, rows, cols) float32.

    With ``windows`` (CPU, n >= 1), each box is pooled on its own window of cells: ``roi_align`` copies a non-contiguous
    (channels_last) map whole on every call, ~10x the work of the boxes themselves (PITFALLS 3); the values agree
    to float rounding. ``fmap`` may then be a callable ``(b, x0, y0, x1, y1) -> (1, C, h, w)`` window.
    """
    size = (grid[0] * samples, grid[1] * samples)
    if windows is None:
        out = roi_align(fmap.float(), rois, size, spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=True)
    else:
        parts = []
        for k, (b, x0, y0, x1, y1) in enumerate(windows):
            win = fmap(b, x0, y0, x1, y1) if callable(fmap) else fmap[b : b + 1, :, y0:y1, x0:x1]
            shift = rois.new_tensor([b, x0 / scale, y0 / scale, x0 / scale, y0 / scale])
            r = rois[k : k + 1] - shift
            parts.append(roi_align(win.float(), r, size, spatial_scale=scale, sampling_ratio=sampling_ratio,
                                   aligned=True))
        out = torch.cat(parts)
    return F.avg_pool2d(out, samples) if samples > 1 else out


def _crops_pay(t: torch.Tensor) -> bool:
    # CPU only (a GPU kernel over the whole map is cheap) and never while tracing for export (data-dependent loop).
    return t.device.type == "cpu" and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()


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
        if rois.shape[0] == 0 and _crops_pay(rois):  # nothing to pool (tracing keeps the general path)
            img = image_embedding(maps, images=images, colour=cfg.colour) if image else None
            return rois.new_zeros((0, self.dim)), img
        parts = []
        means = [m.float().mean(dim=(2, 3)) for m in maps] if cfg.center or image else None  # (B, C) per level
        for i, (t, lv, fmap) in enumerate(zip(self.taps, cfg.levels, maps)):
            scale = 1.0 / t.stride
            win = _windows(rois, scale, fmap.shape[2:]) if _crops_pay(fmap) else None
            cells = _roi_grid(fmap, rois, lv.grid, lv.samples, scale, cfg.sampling_ratio, win)  # (n, C, r, c)
            if cfg.center:  # minus the frame's average feature, per image
                cells = cells - means[i][rois[:, 0].long()][:, :, None, None]
            # cell-major (n, r * c * C); explicit sizes so zero boxes reshape in onnxruntime too
            v = cells.permute(0, 2, 3, 1).reshape(-1, lv.grid[0] * lv.grid[1] * cells.shape[1])
            parts.append((_l2(v) if cfg.level_norm else v) * lv.weight)
        if (c := cfg.colour) is not None:
            nb, st = c.bins[0] * c.bins[1] * c.bins[2], c.stride
            hw = (images.shape[2] // st, images.shape[3] // st)
            if _crops_pay(images):  # bin only the cells under the boxes (the same values as binning the frame)
                bins = images.new_zeros((images.shape[0], *hw), dtype=torch.float32)
                for b, x0, y0, x1, y1 in _windows(rois, 1.0 / st, hw):
                    bins[b, y0:y1, x0:x1] = hsv_bin_index(images[b : b + 1, :, y0 * st : y1 * st, x0 * st : x1 * st],
                                                          c)[0]
            else:
                bins = hsv_bin_index(images, c)
            hist = _sampled_hist(bins, rois, c.stripes, nb, 1.0 / st, cfg.sampling_ratio)
            hist = hist / hist.sum(-1, keepdim=True).clamp_min(1e-6)  # (n, stripes, nb) bin fractions
            v = hist.sqrt().reshape(-1, c.stripes * nb)  # Hellinger: sqrt of bin fractions, so L2 compares distributions fairly
            parts.append((_l2(v) if cfg.level_norm else v) * c.weight)
        out = torch.cat(parts, dim=1)
        out = _l2(out) if cfg.final_norm else out
        return out, (image_embedding(maps, means, images=images, colour=cfg.colour) if image else None)


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
    means = [m.float().mean(dim=(2, 3)) for m in maps] if means is None else means
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
