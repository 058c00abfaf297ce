"""Feature taps: forward hooks that capture intermediate maps of an Ultralytics YOLO model during inference.

Ultralytics 8.4's predictor runs a deep copy of the model (``AutoBackend`` copies and fuses ``YOLO(...).model``), so a
hook on the original never fires. A :class:`Tap` on a ``YOLO`` object therefore hooks the predictor's own model from an
``on_predict_start`` callback, as ``ultralytics/trackers/track.py`` does, and re-hooks whenever the predictor (and its
copy) is rebuilt, e.g. after ``model.to(...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Tap", "TapInfo", "detect_head", "resolve_layers"]

_STRIDE_GROUPS = {"s4": 4, "s8": 8, "s16": 16, "s32": 32}
_HEAD_LEVELS = ("p3", "p4", "p5")
_PROBE = 64  # probe input side: two cells at stride 32


@dataclass(frozen=True)
class TapInfo:
    """One tapped layer: its index in ``model.model``, module type, output channels and stride (input px per cell)."""

    layer: int
    module: str
    channels: int
    stride: int


def _layers(model: nn.Module) -> nn.ModuleList:
    seq = getattr(model, "model", None)
    if not isinstance(seq, nn.Sequential | nn.ModuleList):
        raise TypeError(
            f"expected an Ultralytics model (YOLO(...) or its .model, a DetectionModel with a .model layer list), "
            f"got {type(model).__name__}"
        )
    return seq


def detect_head(model: nn.Module) -> nn.Module:
    """The model's detection head (``Detect`` or a subclass: Segment, Pose, OBB, YOLO26 heads), else a clear error."""
    from ultralytics.nn.modules.head import Detect

    head = _layers(model)[-1]
    if not isinstance(head, Detect):
        raise ValueError(
            f"model has a {type(head).__name__} head; yolo_vq embeds detections and supports the Detect family "
            f"(Detect, Segment, Pose, OBB and their YOLO26 end-to-end variants) of YOLOv8, YOLO11 and YOLO26"
        )
    return head


def _probe_shapes(model: nn.Module) -> dict[int, tuple[int, int]]:
    """(channels, stride) of every layer whose output is a single map, from one small forward pass."""
    layers = _layers(model)
    p = next(model.parameters())
    shapes: dict[int, tuple[int, int]] = {}

    def hook(i: int):
        def fn(_m, _inp, out):
            if torch.is_tensor(out) and out.ndim == 4:
                shapes[i] = (int(out.shape[1]), _PROBE // int(out.shape[2]))

        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    was_training = model.training
    try:
        model.eval()  # BatchNorm in train mode would update its running statistics
        with torch.no_grad():
            model(torch.zeros(1, 3, _PROBE, _PROBE, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def resolve_layers(model: nn.Module, layers: Sequence[int | str]) -> list[TapInfo]:
    """Resolve layer indices and named groups to :class:`TapInfo` (deduplicated, in the order given).

    Names: ``"head"`` (the detection head's inputs, P3/P4/P5), ``"p3"``/``"p4"``/``"p5"``, ``"backbone"`` (the last
    backbone layer of each stride 4, 8, 16, 32) and ``"s4"``/``"s8"``/``"s16"``/``"s32"``.
    """
    seq = _layers(model)
    shapes = _probe_shapes(model)
    n_backbone = len(getattr(model, "yaml", {}).get("backbone", ())) or len(seq)
    out: list[int] = []
    for spec in layers:
        if isinstance(spec, bool) or not isinstance(spec, int | str):
            raise TypeError(f"layer must be an int index or a name, got {spec!r} ({type(spec).__name__})")
        if isinstance(spec, int):
            if not -len(seq) <= spec < len(seq) or (spec % len(seq)) not in shapes:
                valid = sorted(shapes)
                raise ValueError(
                    f"layer {spec} cannot be tapped: this {type(model).__name__} has layers 0..{len(seq) - 1}, and "
                    f"those with a single feature map are {valid}; or use a name: head, p3, p4, p5, backbone, s4..s32"
                )
            out.append(spec % len(seq))
        elif spec == "head" or spec in _HEAD_LEVELS:
            f = detect_head(model).f
            out += list(f) if spec == "head" else [f[_HEAD_LEVELS.index(spec)]]
        elif spec == "backbone" or spec in _STRIDE_GROUPS:
            for name in _STRIDE_GROUPS if spec == "backbone" else (spec,):
                cands = [i for i in range(n_backbone) if shapes.get(i, (0, 0))[1] == _STRIDE_GROUPS[name]]
                if not cands:
                    raise ValueError(f"{type(model).__name__} has no backbone layer with stride {_STRIDE_GROUPS[name]}")
                out.append(cands[-1])
        else:
            raise ValueError(
                f"unknown layer name {spec!r}: expected an int index or one of head, p3, p4, p5, backbone, s4, s8, "
                f"s16, s32"
            )
    uniq = list(dict.fromkeys(out))
    return [TapInfo(i, type(seq[i]).__name__, shapes[i][0], shapes[i][1]) for i in uniq]


class Tap:
    """Capture chosen layers' outputs (and the network input) on every forward pass of a YOLO model.

    Use as a context manager; hooks and callbacks are removed on exit, also on exceptions::

        model = YOLO("yolo11n.pt")
        with Tap(model, ["head", "s4"]) as tap:
            for r in model.predict("video.mp4", stream=True):
                maps = tap.maps      # {layer: (B, C, H/stride, W/stride) tensor} of the latest batch
                im = tap.input       # (B, 3, H, W) float RGB in [0, 1], letterboxed network input

    Captures hold the latest forward pass only (the predictor's warm-up pass is overwritten by the first batch).
    ``pop()`` returns them and clears them, so stale maps are never read twice.

    Args:
        model: an ``ultralytics.YOLO`` object (hooks its predictor's model on every ``predict``/``track``/call) or a
            bare Ultralytics ``nn.Module`` (hooked directly, e.g. for export).
        layers: layer indices and/or names, see :func:`resolve_layers`.
        capture_head: also keep the detection head's raw output (``head_output``), which anchor recovery needs.
    """

    def __init__(self, model: Any, layers: Sequence[int | str] = ("head",), *, capture_head: bool = False):
        from ultralytics.engine.model import Model

        self.yolo = model if isinstance(model, Model) else None  # YOLO is an nn.Module too: test it first
        module = getattr(model, "model", None) if self.yolo is not None else model
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"Tap needs a PyTorch YOLO model (YOLO('*.pt') or YOLO('*.yaml')), got {type(model).__name__} "
                f"with model={type(module).__name__}: exported models carry no feature maps; use yolo_vq's ONNX export"
            )
        if isinstance(layers, int | str):
            layers = [layers]
        self.info: list[TapInfo] = resolve_layers(module, layers)
        self._module = module
        self._maps: dict[int, torch.Tensor] = {}
        self._input: list[torch.Tensor | None] = [None]
        self._head: list[Any] = [None]
        self.capture_head = capture_head
        if capture_head:
            detect_head(module)  # fail early with the supported-heads message
        self._handles: list[Any] = []
        self._hooked: nn.Module | None = None
        self._callback = None

    # -- attach / detach -------------------------------------------------------------------------------------------
    def __enter__(self) -> Tap:
        if self.yolo is None:
            self._hook(self._module)
            return self
        tap = self  # a closure, not a bound method: Ultralytics deep-copies predictors' state, not callbacks

        def on_predict_start(predictor) -> None:
            tap._hook(tap._predictor_module(predictor))

        self._callback = on_predict_start
        self.yolo.add_callback("on_predict_start", on_predict_start)
        if getattr(self.yolo, "predictor", None) is not None:  # already built: hook now, for model(...) calls too
            self._hook(self._predictor_module(self.yolo.predictor))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove all hooks and callbacks and drop captured tensors (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked = None
        if self.yolo is not None and self._callback is not None:
            cbs = self.yolo.callbacks.get("on_predict_start", [])
            if self._callback in cbs:
                cbs.remove(self._callback)
            self._callback = None
        self._maps.clear()
        self._input[0] = None
        self._head[0] = None

    @staticmethod
    def _predictor_module(predictor) -> nn.Module:
        m = getattr(predictor.model, "model", None)
        if not isinstance(m, nn.Module) or not hasattr(m, "model"):
            raise TypeError(
                f"the predictor runs a {getattr(predictor.model, 'format', '?')!r} model, which has no feature maps "
                f"to tap: load the PyTorch weights (.pt) instead, or export with yolo_vq to get codes at the edge"
            )
        return m

    def _hook(self, module: nn.Module) -> None:
        if module is self._hooked:
            return
        for h in self._handles:  # the previous predictor copy is gone (e.g. after model.to(...))
            h.remove()
        self._handles.clear()
        layers = _layers(module)
        maps, inp, head = self._maps, self._input, self._head

        def capture(i: int):
            def fn(_m, _args, out):
                maps[i] = out

            return fn

        def capture_input(_m, args):
            inp[0] = args[0]

        def keep_head(_m, _args, out):
            head[0] = out

        self._handles.append(module.register_forward_pre_hook(capture_input))
        if self.capture_head:
            self._handles.append(layers[-1].register_forward_hook(keep_head))
        for t in self.info:
            self._handles.append(layers[t.layer].register_forward_hook(capture(t.layer)))
        self._hooked = module

    # -- captures --------------------------------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module | None:
        """The module currently hooked (the predictor's copy for a YOLO object)."""
        return self._hooked

    @property
    def maps(self) -> dict[int, torch.Tensor]:
        """Latest captured maps by layer index: (B, C, H/stride, W/stride), the model's dtype and device."""
        return dict(self._maps)

    @property
    def input(self) -> torch.Tensor | None:
        """Latest network input (B, 3, H, W), RGB in [0, 1], letterboxed; ``None`` before the first forward."""
        return self._input[0]

    def pop(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Return ``(input, [map per tapped layer, in self.info order])`` and clear the captures.

        Raises:
            RuntimeError: no forward pass was captured since the last ``pop`` (the tap is not attached, or the model
                was called outside the tapped predictor).
        """
        missing = [t.layer for t in self.info if t.layer not in self._maps]
        if missing or self._input[0] is None:
            raise RuntimeError(
                f"no captured maps for layers {missing or [t.layer for t in self.info]}: run the model inside "
                f"'with Tap(...)' (and read each batch once)"
            )
        out = self._input[0], [self._maps[t.layer] for t in self.info]
        self._maps.clear()
        self._input[0] = None
        return out

    @property
    def head_output(self) -> Any:
        """Latest raw output of the detection head (``capture_head=True``), as ``Detect.forward`` returned it."""
        return self._head[0]
