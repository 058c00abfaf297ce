"""Find which candidate row produced each final detection, without touching Ultralytics' NMS or tracker.

A kept detection carries its candidate's exact score and class (NMS and the trackers copy them), so rows are matched
on ``(score, class)`` equality, ties broken by box geometry: the xyxy box clipped to the image as ``scale_boxes``
clips it (or the centre, for rotated boxes). Used to recover the head anchor of each detection (``anchor``
embeddings, on NMS and end-to-end heads alike) and to follow rows through ``model.track()``, which re-orders, drops
and Kalman-smooths boxes.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["head_candidates", "match_rows"]

_MISMATCH = 1e9


def match_rows(
    conf: torch.Tensor, cls: torch.Tensor, geom: torch.Tensor,
    cand_conf: torch.Tensor, cand_cls: torch.Tensor, cand_geom: torch.Tensor,
) -> torch.Tensor:
    """Index (n,) int64 of the candidate (m rows) matching each query row (n rows).

    Args:
        conf, cls: (n,) scores and classes of the final detections; geom: (n, k) their boxes or centres.
        cand_conf, cand_cls, cand_geom: the same for the candidates, in the same pixel frame.
    Raises:
        RuntimeError: a detection has no candidate with its exact score and class (an internal invariant).
    """
    if conf.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=conf.device)
    same = (cand_conf.float()[None, :] == conf.float()[:, None]) & (cand_cls.long()[None, :] == cls.long()[:, None])
    cost = torch.cdist(geom.float(), cand_geom.float(), p=1.0) + (~same).float() * _MISMATCH
    best, idx = cost.min(dim=1)
    if bool((best >= _MISMATCH).any()):
        raise RuntimeError("a detection has no candidate with its exact score and class; please report this model")
    return idx


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, tuple | list):
        out = out[0]
    return out


def head_candidates(
    head: torch.nn.Module, out: Any, b: int, region: tuple[float, float, float, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate rows of image ``b`` from the head's raw output: ``(conf, cls, geom, anchor)``.

    ``geom`` is (m, 4) xyxy clipped to ``region`` (the letterboxed image's area in input pixels), or (m, 2) centres
    for OBB heads. NMS heads (v8/11) emit every anchor: conf/cls are the best class score and its index, anchor = the
    row. End-to-end heads (YOLO26) emit their top-k rows; each row's anchor is recovered by re-running the head's own
    ``get_topk_index`` on its class scores (``ultralytics/nn/modules/head.py``, ``Detect.postprocess``).
    """
    y = _first_tensor(out)
    rotated = type(head).__name__.startswith("OBB")
    if getattr(head, "end2end", False):
        preds = out[1] if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], dict) else None
        if preds is None:
            raise RuntimeError("end-to-end head output carries no raw predictions; is the model in export mode?")
        p = preds.get("one2one", preds)
        scores = p["scores"][b : b + 1].float().sigmoid().permute(0, 2, 1)  # (1, A, nc), as Detect._inference
        anchor = head.get_topk_index(scores, head.max_det)[2][0]
        rows = y[b]
        conf, cls, box = rows[:, 4], rows[:, 5], rows[:, :4]
        xyxy = None if rotated else box
    else:
        rows = y[b]  # (4 + nc + extra, A), boxes as xywh
        conf, cls = rows[4 : 4 + head.nc].max(dim=0)
        anchor = torch.arange(rows.shape[1], device=rows.device)
        box = rows[:4].T
        xyxy = None if rotated else torch.cat([box[:, :2] - box[:, 2:] / 2, box[:, :2] + box[:, 2:] / 2], dim=1)
    if xyxy is None:
        return conf, cls, box[:, :2], anchor
    lo, hi = xyxy.new_tensor(region[:2]), xyxy.new_tensor(region[2:])
    return conf, cls, torch.cat([xyxy[:, :2].clamp(lo, hi), xyxy[:, 2:].clamp(lo, hi)], dim=1), anchor
