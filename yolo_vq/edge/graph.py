"""The export graph as a PyTorch module: the fused detector, in-graph detection selection (end-to-end top-k, or
class-wise NMS that exports as one ``NonMaxSuppression``), the recipe's pooling on the tapped maps and the codebook's
encode. :mod:`yolo_vq.edge.export` traces it to ONNX; inputs and outputs are described there.

The tapped maps are captured by a :class:`~yolo_vq.features.tap.Tap` on the detector, the server's own hooks: hooks
only keep references to tensors during the trace, so the exported graph and its node order are those of
:meth:`VQGraph.forward`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torchvision.ops import nms

from ..features.pool import BoxEmbedder
from ..features.tap import Tap, detect_head

__all__ = ["VQGraph", "class_nms"]


class _NMS(torch.autograd.Function):
    """``torchvision.ops.nms`` that exports as one ONNX ``NonMaxSuppression`` + ``Gather`` of the kept indices.

    torchvision's ``batched_nms`` exports its empty-input check as an ``If`` sub-graph, which onnxruntime runs per image
    (profiled in docs/benchmarks.md, edge section)."""

    @staticmethod
    def forward(ctx: Any, boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
        return nms(boxes, scores, iou)

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, iou: float) -> Any:
        def const(v: Any, dtype: torch.dtype) -> Any:
            return g.op("Constant", value_t=torch.tensor(v, dtype=dtype))

        kept = g.op("NonMaxSuppression", g.op("Unsqueeze", boxes, const([0], torch.int64)),
                    g.op("Unsqueeze", scores, const([0, 1], torch.int64)), const([2**31 - 1], torch.int64),
                    const([iou], torch.float32))  # (k, 3): [batch, class, box index]
        return g.op("Gather", kept, const(2, torch.int64), axis_i=1)


def class_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices kept by NMS within each group (int64 ``groups``), highest score first: torchvision's ``batched_nms``
    (each group's boxes shifted apart by more than the largest coordinate), exportable without sub-graphs."""
    top = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()  # defined for no boxes too (no sub-graph)
    shift = groups.to(boxes.dtype) * (top + 1)
    return _NMS.apply(boxes + shift[:, None], scores, float(iou))


class VQGraph(nn.Module):
    """``images -> boxes, scores, classes, codes, valid[, embeddings]`` (shapes: :mod:`yolo_vq.edge.export`).

    Args:
        model: a fused, eval-mode Ultralytics ``DetectionModel`` (a copy: a :class:`Tap` hooks it until
            :meth:`remove_hooks`).
        box: the recipe's :class:`BoxEmbedder` (its taps index ``model.model``).
        quantizer: a fitted quantizer whose ``encode`` maps (n, D) float32 to codes.
        input_hw: fixed input (H, W).
        conf, iou, max_det: Ultralytics' ``predict`` settings (score > conf, class-wise NMS IoU, rows per image).
        end2end: use the one-to-one head's own top-k (YOLO26) instead of NMS.
        embeddings: also output the float vectors.
    """

    def __init__(self, model: nn.Module, box: BoxEmbedder, quantizer: nn.Module, *, input_hw: tuple[int, int],
                 conf: float, iou: float, max_det: int, end2end: bool,
                 embeddings: bool = False):
        super().__init__()
        self.model, self.box, self.quantizer = model, box, quantizer
        self.layers = [t.layer for t in box.taps]
        self.nc = len(model.names)
        self.conf, self.iou, self.end2end, self.with_embeddings = float(conf), float(iou), end2end, embeddings
        anchors = sum(math.ceil(input_hw[0] / s) * math.ceil(input_hw[1] / s) for s in detect_head(model).stride.tolist())
        self.max_det = min(int(max_det), anchors)
        self.tap = Tap(model, self.layers)  # the server's hooks, on this copy
        if [t.layer for t in self.tap.info] != self.layers:
            raise ValueError(f"the recipe's taps {self.layers} must be distinct layers of the model")
        self.tap.__enter__()

    def remove_hooks(self) -> None:
        """Remove the hooks from ``model`` (idempotent)."""
        self.tap.close()

    def forward(self, images: torch.Tensor, regions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Node order matters for speed: onnxruntime's default execution order is a depth-first walk from the outputs
        # that follows the newest input first. The output buffers take their sizes from `images` (not from detector
        # outputs) and are made, with their scatter indices, before the recipe runs, so the walk reaches the
        # recipe's reads of the tapped map (BoxEmbedder.embed) before the rest of the detector: the map leaves
        # onnxruntime's NCHWc layout right after the layer that wrote it, while it is in cache (docs/benchmarks.md).
        y = self.model(images)
        y = y[0] if isinstance(y, tuple | list) else y  # eval mode: (predictions, raw head outputs)
        y = y[0] if isinstance(y, tuple | list) else y  # Segment: (predictions, protos)
        _, maps = self.tap.pop()  # in self.layers order
        boxes, scores, classes, valid = self._select(y)
        lo, hi = regions[:, None, :2].repeat(1, 1, 2), regions[:, None, 2:].repeat(1, 1, 2)  # (B, 1, 4) each
        boxes = torch.minimum(torch.maximum(boxes, lo), hi)  # Ultralytics clips to the frame
        head = getattr(self.quantizer, "head", None)  # the identity head: a MatMul and a normalisation before encoding
        n, m = int(scores.shape[1]), self.quantizer.code_len  # static: the batch is the only free size
        d = self.box.dim if head is None else head.dim
        b = images.shape[0]
        image_of = torch.arange(b, device=images.device, dtype=torch.float32).view(-1, 1, 1).expand(-1, n, 1)
        rows = valid.reshape(-1).nonzero()  # (kept, 1): pool and encode the kept rows only, not the padding
        codes = torch.zeros((b * n, m), dtype=self.quantizer.code_dtype, device=images.device)
        at_codes = rows.expand(-1, m)
        full = torch.zeros((b * n, d), device=images.device) if self.with_embeddings else None
        at_emb = rows.expand(-1, d) if self.with_embeddings else None
        rois = torch.cat([image_of, boxes], dim=2).reshape(-1, 5)[rows.squeeze(1)]
        emb = self.box(images, maps, rois)  # (kept, D)
        if head is not None:
            emb = head(emb)  # (kept, d)
        codes = codes.scatter(0, at_codes, self.quantizer.encode(emb))  # static widths: exact output shapes
        out = (boxes, scores, classes, codes.reshape(-1, n, m), valid)
        if not self.with_embeddings:
            return out
        return (*out, full.scatter(0, at_emb, emb).reshape(-1, n, d))

    def _select(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head output -> (B, N) rows: boxes (xyxy input px), scores, int64 classes, valid, as ``predict`` keeps them."""
        if self.end2end:  # (B, K, 6 + extra) [x1, y1, x2, y2, score, class], already top-k by score
            y = y[:, : self.max_det]
            scores = y[..., 4]
            return y[..., :4], scores, y[..., 5].long(), scores > self.conf
        # (B, 4 + nc + extra, A): xywh, class scores, then mask coefficients / keypoints (no full transpose)
        b, a = y.shape[0], y.shape[2]
        xy, wh = y[:, :2], y[:, 2:4]
        boxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=1).transpose(1, 2)  # (B, A, 4)
        scores, classes = y[:, 4 : 4 + self.nc].max(dim=1)  # (B, A)
        cand = (scores > self.conf).reshape(-1).nonzero().squeeze(1)  # flat b * A + a
        bi = torch.div(cand, a, rounding_mode="floor")
        keep = class_nms(boxes.reshape(-1, 4)[cand], scores.reshape(-1)[cand], bi * self.nc + classes.reshape(-1)[cand],
                         self.iou)
        kept = torch.zeros(b * a, dtype=torch.bool, device=y.device)
        kept[cand[keep]] = True
        ranked = torch.where(kept.view(b, a), scores, torch.full_like(scores, -1.0))
        top, idx = ranked.topk(self.max_det, dim=1)  # highest kept first, as Ultralytics truncates to max_det
        gather = idx.unsqueeze(2).expand(-1, -1, 4)
        return boxes.gather(1, gather), top, classes.gather(1, idx), top > self.conf
