"""Per-detection embeddings during normal Ultralytics inference (``predict``, ``track``, ``model(...)``, streams).

The :class:`Embedder` taps the recipe's layers and, through two ``on_predict_postprocess_end`` callbacks, embeds each
batch's detections in one batched pass and attaches the vectors to the ``Results``:

* ``result.vq_embeddings``: (n, D) float32 numpy, one row per box of the result, in its row order;
* ``result.vq_image_embedding``: (D_img,) float32 numpy, the whole frame;
* ``result.vq_codes``: (n, code_len) uint8/uint16 numpy codebook codes, when a codebook is given.

The first callback runs before any tracker and embeds the detector's own boxes (the boxes an exported graph sees too);
the second runs last and follows the rows through the tracker's re-ordering (``model.track()``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import _letterbox as letterbox
from ..config import DEFAULT_RECIPE, EmbedConfig, load_recipe
from ..detections import PREFIX, result_attrs
from ._rows import head_candidates, match_rows
from .pool import BoxEmbedder, anchor_features, image_embedding
from .tap import Tap, TapInfo, detect_head

__all__ = ["CODES", "EMBEDDINGS", "IMAGE_EMBEDDING", "Embedder"]

EMBEDDINGS, IMAGE_EMBEDDING, CODES = result_attrs()  # attribute names with the default prefix "vq"


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

    __slots__ = ("cls", "conf", "emb", "geom", "input_hw", "result")

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
        codebook: a trained quantizer (``yolo_vq.quant``) or the path of a saved one; each batch's embeddings are then
            also encoded, on the model's device, into ``{prefix}_codes``. A saved codebook must belong to this model
            and recipe (see :meth:`load_codebook`).
        prefix: attribute prefix on ``Results`` (``{prefix}_embeddings``, ``{prefix}_image_embedding``,
            ``{prefix}_codes``), so several embedders (e.g. recipes compared in one pass) can share one model.
    """

    def __init__(
        self, model: Any, recipe: str | Path | dict | EmbedConfig = DEFAULT_RECIPE, *, codebook: Any = None,
        prefix: str = PREFIX,
    ):
        self.config = load_recipe(recipe)
        self.model = model
        self.attr, self.image_attr, self.codes_attr = result_attrs(prefix)
        anchor = self.config.mode == "anchor"
        layers = ["head"] if anchor else [lv.layer for lv in self.config.levels]
        self.tap = Tap(model, layers, capture_head=anchor)
        self._box = None if anchor else BoxEmbedder(self.config, self.tap.info)
        self._seen: list[_Seen] = []
        self._callbacks: dict[str, Any] = {}
        self.codebook = self.load_codebook(codebook) if isinstance(codebook, str | Path) else codebook
        wanted = getattr(self.codebook, "input_dim", getattr(self.codebook, "dim", None))
        if self.codebook is not None and wanted != self.recipe_dim:
            raise ValueError(
                f"codebook takes dim={wanted} vectors, but recipe {self.config.name!r} on this model gives "
                f"dim={self.recipe_dim}: train a codebook on these embeddings"
            )

    @property
    def taps(self) -> list[TapInfo]:
        """The tapped layers (index, module, channels, stride)."""
        return self.tap.info

    @property
    def codebook(self) -> Any:
        """The quantizer each batch's embeddings are encoded with (None: none). Setting one with an identity head
        makes the embeddings the head's outputs (what its codes encode)."""
        return self._codebook

    @codebook.setter
    def codebook(self, quantizer: Any) -> None:
        self._codebook = quantizer
        self.head = getattr(quantizer, "head", None)

    @property
    def recipe_dim(self) -> int:
        """Length of the recipe's pooled vector (the identity head's input)."""
        if self._box is not None:
            return self._box.dim
        return min(t.channels for t in self.tap.info)

    @property
    def dim(self) -> int:
        """Per-detection embedding length D: the identity head's output where the codebook has one, else the
        recipe's."""
        return self.recipe_dim if self.head is None else self.head.dim

    def _headed(self, emb: torch.Tensor) -> torch.Tensor:
        return emb if self.head is None else self.head.to(emb.device)(emb.float())

    @property
    def fingerprint(self) -> str:
        """Short hash of the weights the embeddings depend on: every layer up to the deepest tapped one (the head
        too in ``anchor`` mode), as loaded (unfused). Codebooks record it so they are never used with another model."""
        from ..quant.io import fingerprint_module

        layers = self.tap._module.model
        last = len(layers) - 1 if self.config.mode == "anchor" else max((t.layer for t in self.taps), default=0)
        return fingerprint_module(*(layers[i] for i in range(last + 1)))

    def embed_boxes(self, image: np.ndarray, boxes: np.ndarray, **predict_args: Any) -> np.ndarray:
        """Embed given xyxy ``boxes`` (n, 4) (original pixels) of one BGR ``image``: (n, D) float32.

        Runs the model once on the image to fill the tapped maps; for query crops ("this region") rather than
        detections. Only ``roi`` recipes can embed arbitrary boxes.
        """
        if self._box is None:
            raise ValueError(f"recipe {self.config.name!r} (mode 'anchor') only embeds the model's own detections; "
                             f"use a 'roi' recipe to embed arbitrary boxes")
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        h, w = image.shape[:2]
        if len(boxes) and (boxes[:, 2] <= boxes[:, 0]).any() | (boxes[:, 3] <= boxes[:, 1]).any():
            raise ValueError(f"boxes must be x1,y1,x2,y2 with x2 > x1 and y2 > y1, got {boxes.tolist()}")
        tap = Tap(self.model, [lv.layer for lv in self.config.levels])
        with tap, torch.inference_mode():
            self.model.predict(image, verbose=False, **predict_args)
            images, maps = tap.pop()
            xyxy = letterbox.to_input(torch.from_numpy(boxes).to(images.device), (h, w), tuple(images.shape[2:]))
            rois = torch.cat([xyxy.new_zeros((len(xyxy), 1)), xyxy], dim=1)
            return self._headed(self._box(images, maps, rois)).float().cpu().numpy()

    def save_codebook(self, quantizer: Any, path: str | Path) -> tuple[Path, Path]:
        """Save a quantizer trained on these embeddings, recording this model's fingerprint and recipe."""
        from ..quant import save_codebook

        if quantizer.input_dim != self.recipe_dim:
            raise ValueError(f"quantizer takes dim={quantizer.input_dim} vectors, these embeddings have dim="
                             f"{self.recipe_dim}")
        return save_codebook(quantizer, path, embedding=self.describe(), model_fingerprint=self.fingerprint)

    def load_codebook(self, path: str | Path, *, allow_mismatch: bool = False) -> Any:
        """Load a saved codebook, checking it was trained on this model's weights and this embedding size.

        Raises:
            yolo_vq.quant.CodebookError: corrupt files, or a codebook of another model/recipe (it says which one),
                unless ``allow_mismatch`` (then a warning).
        """
        from ..quant import load_codebook

        return load_codebook(path, expect_dim=self.recipe_dim, expect_fingerprint=self.fingerprint,
                             allow_mismatch=allow_mismatch, device=next(self.tap._module.parameters()).device)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description of these embeddings, stored with codebooks and indexes."""
        yaml_file = getattr(self.tap._module, "yaml", {}).get("yaml_file", "")
        return {
            "recipe": self.config.name,
            "mode": self.config.mode,
            "layers": [t.layer for t in self.taps],
            "strides": [t.stride for t in self.taps],
            "dim": self.recipe_dim,
            "model": f"{type(self.tap._module).__name__} {Path(str(yaml_file)).stem}".strip(),
            "config": self.config.to_dict(),
        }

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
        emb = self._headed(emb)
        emb_np = emb.float().cpu().numpy()  # one device->host copy per batch
        img_np = img.float().cpu().numpy()
        codes_np = None
        if self.codebook is not None:
            self.codebook.to(emb.device)
            codes_np = self.codebook.encode(emb.float()).cpu().numpy()
        self._seen = []
        start = 0
        for i, r in enumerate(results):
            b = _boxes(r)
            e = emb_np[start : start + len(b)]
            start += len(b)
            setattr(r, self.attr, e)
            setattr(r, self.image_attr, img_np[i])
            if codes_np is not None:
                setattr(r, self.codes_attr, codes_np[start - len(b) : start])
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
                rows = np.zeros(0, dtype=np.int64)
            else:
                # the tracker replaced the Results: same scores and classes, Kalman-smoothed boxes, new row order
                rows = match_rows(b.conf, b.cls, _geometry(r, src.input_hw)[1], src.conf, src.cls, src.geom)
                rows = rows.cpu().numpy()
            setattr(r, self.attr, src.emb[rows])
            if (codes := getattr(src.result, self.codes_attr, None)) is not None:
                setattr(r, self.codes_attr, codes[rows])
            setattr(r, self.image_attr, getattr(src.result, self.image_attr))
        self._seen = []
