"""Per-detection embeddings during normal Ultralytics inference (``predict``, ``track``, ``model(...)``, streams).

The :class:`Embedder` taps the recipe's layers and, through two ``on_predict_postprocess_end`` callbacks, embeds each
batch's detections in one batched pass and attaches the vectors to the ``Results``:

* ``result.vq_embeddings``: (n, D) float32 numpy, one row per box of the result, in its row order;
* ``result.vq_image_embedding``: (D_img,) float32 numpy, the whole frame.

The first callback runs before any tracker and embeds the detector's own boxes (the boxes an exported graph sees too);
the second runs last and follows the rows through the tracker's re-ordering (``model.track()``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import letterbox
from ._rows import head_candidates, match_rows
from .config import DEFAULT_RECIPE, EmbedConfig, load_recipe
from .embed import BoxEmbedder, anchor_features, image_embedding
from .tap import Tap, TapInfo, detect_head

__all__ = ["Embedder", "EMBEDDINGS", "IMAGE_EMBEDDING"]

EMBEDDINGS = "vq_embeddings"  # attribute names with the default prefix "vq"
IMAGE_EMBEDDING = "vq_image_embedding"


def _boxes(result) -> Any:
    return result.obb if getattr(result, "obb", None) is not None else result.boxes


def _geometry(result, input_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xyxy, geom)`` in input pixels: the boxes to pool, and the geometry rows are matched on (see ``_rows``)."""
    b = _boxes(result)
    xyxy = letterbox.to_input(b.xyxy, result.orig_shape, input_hw)
    if getattr(result, "obb", None) is None:
        return xyxy, xyxy
    c = b.xywhr[:, :2]
    return xyxy, letterbox.to_input(torch.cat([c, c], dim=1), result.orig_shape, input_hw)[:, :2]


class _Seen:
    """What the first callback saw of one result: its object and rows, to follow them through a tracker."""

    __slots__ = ("result", "emb", "conf", "cls", "geom", "input_hw")

    def __init__(self, result, emb, conf, cls, geom, input_hw):
        self.result, self.emb, self.conf, self.cls, self.geom = result, emb, conf, cls, geom
        self.input_hw = input_hw


class Embedder:
    """Attach per-detection embeddings to every ``Results`` a YOLO model produces while the context is open.

    Example::

        model = YOLO("yolo11n-pose.pt")
        with Embedder(model) as emb:                      # the default recipe, see docs/benchmarks.md
            for r in model.track("video.mp4", stream=True):
                vectors = r.vq_embeddings                 # (n, emb.dim) float32, L2-normalised

    Args:
        model: an ``ultralytics.YOLO`` with PyTorch weights (``.pt`` or ``.yaml``), Detect/Segment/Pose/OBB head.
        recipe: a preset name (``yolo_vq.list_recipes()``), a YAML path, a dict or an :class:`EmbedConfig`.
        prefix: attribute prefix on ``Results`` (``{prefix}_embeddings``, ``{prefix}_image_embedding``), so several
            embedders (e.g. recipes compared in one pass) can share one model.
    """

    def __init__(self, model: Any, recipe: str | Path | dict | EmbedConfig = DEFAULT_RECIPE, *, prefix: str = "vq"):
        self.config = load_recipe(recipe)
        self.model = model
        self.attr, self.image_attr = f"{prefix}_embeddings", f"{prefix}_image_embedding"
        anchor = self.config.mode == "anchor"
        layers = ["head"] if anchor else [lv.layer for lv in self.config.levels]
        self.tap = Tap(model, layers, capture_head=anchor)
        self._box = None if anchor else BoxEmbedder(self.config, self.tap.info)
        self._seen: list[_Seen] = []
        self._callbacks: dict[str, Any] = {}

    @property
    def taps(self) -> list[TapInfo]:
        """The tapped layers (index, module, channels, stride)."""
        return self.tap.info

    @property
    def dim(self) -> int:
        """Per-detection embedding length D."""
        if self._box is not None:
            return self._box.dim
        return min(t.channels for t in self.tap.info)

    # -- context ---------------------------------------------------------------------------------------------------
    def __enter__(self) -> Embedder:
        self.tap.__enter__()
        emb = self  # closures, not bound methods: see Tap.__enter__

        def on_start(predictor) -> None:
            # Our first callback runs before any tracker's, our last after all of them (track() registers its
            # callbacks when first called, possibly after we did).
            cbs = predictor.callbacks["on_predict_postprocess_end"]
            for fn, at in ((emb._callbacks["first"], 0), (emb._callbacks["last"], None)):
                if fn in cbs:
                    cbs.remove(fn)
                cbs.insert(len(cbs) if at is None else at, fn)

        def first(predictor) -> None:
            emb._embed_batch(predictor.results)

        def last(predictor) -> None:
            emb._follow_rows(predictor.results)

        self._callbacks = {"on_start": on_start, "first": first, "last": last}
        self.model.add_callback("on_predict_start", on_start)
        self.model.add_callback("on_predict_postprocess_end", first)
        self.model.add_callback("on_predict_postprocess_end", last)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove callbacks and hooks (idempotent)."""
        for event, key in (("on_predict_start", "on_start"), ("on_predict_postprocess_end", "first"),
                           ("on_predict_postprocess_end", "last")):
            fn = self._callbacks.get(key)
            cbs = self.model.callbacks.get(event, [])
            if fn is not None and fn in cbs:
                cbs.remove(fn)
        self._callbacks = {}
        self._seen = []
        self.tap.close()

    # -- work ------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _embed_batch(self, results: list) -> None:
        head_out = self.tap.head_output
        images, maps = self.tap.pop()
        input_hw = tuple(images.shape[2:])
        rois, geoms = [], []
        for i, r in enumerate(results):
            xyxy, geom = _geometry(r, input_hw)
            rois.append(torch.cat([xyxy.new_full((len(xyxy), 1), i), xyxy], dim=1))
            geoms.append(geom)
        rois_t = torch.cat(rois) if rois else images.new_zeros((0, 5), dtype=torch.float32)
        if self._box is not None:
            emb, img = self._box.embed(images, maps, rois_t, image=True)
        else:
            emb = self._anchor_embeddings(head_out, maps, results, input_hw, geoms)
            img = image_embedding(maps)
        emb_np = emb.float().cpu().numpy()  # one device->host copy per batch
        img_np = img.float().cpu().numpy()
        self._seen = []
        start = 0
        for i, r in enumerate(results):
            b = _boxes(r)
            e = emb_np[start : start + len(b)]
            start += len(b)
            setattr(r, self.attr, e)
            setattr(r, self.image_attr, img_np[i])
            self._seen.append(_Seen(r, e, b.conf, b.cls, geoms[i], input_hw))

    def _anchor_embeddings(self, head_out, maps, results, input_hw, geoms) -> torch.Tensor:
        head = detect_head(self.tap.module)
        bidx, anchors = [], []
        for b, r in enumerate(results):
            boxes = _boxes(r)
            region = letterbox.image_region(r.orig_shape, input_hw)
            c_conf, c_cls, c_geom, c_anchor = head_candidates(head, head_out, b, region)
            rows = match_rows(boxes.conf, boxes.cls, geoms[b], c_conf, c_cls, c_geom)
            anchors.append(c_anchor[rows])
            bidx.append(torch.full_like(rows, b))
        v = anchor_features(maps, torch.cat(bidx), torch.cat(anchors))
        return F.normalize(v, dim=1) if self.config.final_norm else v

    def _follow_rows(self, results: list) -> None:
        for i, r in enumerate(results):
            src = self._seen[i] if i < len(self._seen) else None
            if src is None or r is src.result:
                continue
            b = _boxes(r)
            if len(b) == 0 or len(src.conf) == 0:
                setattr(r, self.attr, src.emb[:0])
            else:
                # the tracker replaced the Results: same scores and classes, Kalman-smoothed boxes, new row order
                rows = match_rows(b.conf, b.cls, _geometry(r, src.input_hw)[1], src.conf, src.cls, src.geom)
                setattr(r, self.attr, src.emb[rows.cpu().numpy()])
            setattr(r, self.image_attr, getattr(src.result, self.image_attr))
        self._seen = []
