"""Detector + embedding recipe + codebook encode as ONE ONNX graph: the edge device emits boxes and codes.

The graph (:class:`~yolo_vq.edge.graph.VQGraph`) runs the fused detector on a letterboxed batch, selects detections
in-graph (YOLO26's end-to-end head needs no NMS; YOLOv8/YOLO11 heads get class-wise NMS), pools every kept box on the
tapped maps exactly as :class:`~yolo_vq.features.pool.BoxEmbedder` does on the server (RoIAlign, stripes, frame-mean
centering, the HSV colour cue from the same input, normalisation) and encodes the vectors with the codebook. So the
codes an edge device ships are the codes ``yolo-vq index`` would have stored for the same input.

Inputs and outputs (N = ``max_det``)::

    images      (B, 3, H, W) float32   RGB in [0, 1], letterboxed as Ultralytics does (pad value 114/255)
    regions     (B, 4)       float32   x0, y0, x1, y1: each frame's area inside the input, in input pixels
                                       (``yolo_vq.edge.runner.letterbox_batch`` returns both)
    boxes       (B, N, 4)    float32   x1, y1, x2, y2 in input pixels, clipped to the frame's region
    scores      (B, N)       float32
    classes     (B, N)       int64
    codes       (B, N, C)    uint8     codebook codes (uint16 for codebooks of more than 256 entries)
    valid       (B, N)       bool      False for padding rows (zero codes and embeddings; other outputs meaningless)
    embeddings  (B, N, D)    float32   only with ``embeddings=True``

Boxes are clipped to ``regions`` before pooling, as Ultralytics clips them to the frame, so boxes that spill into the
padding pool what the server pools. Input size is fixed at export: export for the camera's frame size
(``source_size``) to get the input shape the server's ``predict`` uses (it letterboxes to the smallest stride
multiple), hence the very same codes; another input size gives codes of the same codebook from a differently scaled
input.

``export`` runs four steps: :func:`_prepare` (the recipe, the codebook loaded once and checked against the model, the
detector copy and the :class:`~yolo_vq.edge.graph.VQGraph`), :func:`_trace` (``torch.onnx.export``), the metadata
(:func:`yolo_vq.edge._format.build_metadata`, written by :func:`_write_metadata`) and :func:`_self_check`
(onnxruntime vs PyTorch on real images).
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from .._letterbox import input_size
from ..errors import ExportError
from ..features.embedder import Embedder
from ..features.pool import BoxEmbedder
from ..features.tap import detect_head
from ..quant import codebook_checksum
from . import _format
from ._format import DEFAULT_OPSET, EMBEDDINGS, EXPORT_FORMAT, INPUTS, OUTPUTS
from .graph import VQGraph, class_nms

__all__ = ["EXPORT_FORMAT", "ExportCheck", "ExportError", "VQGraph", "class_nms", "export", "input_size"]



@dataclass(frozen=True)
class ExportCheck:
    """onnxruntime vs the same graph in PyTorch on real images (``export`` fills it in and raises when it fails)."""

    images: int
    detections: int
    max_box_error: float
    code_bytes_equal: float
    same_detections: bool

    def line(self) -> str:
        return (f"self-check on {self.images} images: {self.detections} detections, boxes max relative error "
                f"{self.max_box_error:.2e}, {self.code_bytes_equal:.2%} of code bytes identical")


@dataclass
class _Prepared:
    """What :func:`_prepare` makes: the graph to trace and what the metadata records."""

    graph: VQGraph
    embedder: Embedder  # the server's recipe on this model: dim, fingerprint and describe() for the metadata
    quantizer: nn.Module  # the graph's copy (float32, CPU)
    fingerprint: str  # the codebook's sha256
    input_hw: tuple[int, int]
    stride: int
    end2end: bool


def _check_settings(model: Any, conf: float, iou: float, max_det: int, batch: int, half: bool) -> None:
    if half:
        raise ExportError("half=True: fp16 weights need a CUDA export (onnxruntime's CPU provider runs few fp16 "
                          "kernels); export fp32 (the default) for CPU edge devices")
    if not 0 <= conf < 1 or not 0 < iou <= 1 or max_det < 1 or batch < 1:
        raise ExportError(f"need 0 <= conf < 1, 0 < iou <= 1, max_det >= 1 and batch >= 1; got conf={conf}, iou={iou}, "
                          f"max_det={max_det}, batch={batch}")
    if getattr(model, "task", "detect") == "obb":
        raise ExportError("task 'obb': rotated-box NMS and rotated pooling are not in the export graph yet; export a "
                          "detect, segment or pose model")


def _recorded_recipe(codebook: str | Path | Any) -> Any:
    """The recipe a codebook records: from a loaded quantizer's ``meta``, or from a saved one's JSON alone (its
    tensors are loaded once, with every check, by :func:`_load_codebook`)."""
    if not isinstance(codebook, str | Path):
        meta = getattr(codebook, "meta", {}) or {}
    else:
        from ..quant import load_codebook
        from ..quant.io import codebook_paths

        try:
            meta = json.loads(codebook_paths(codebook)[1].read_text())
        except (OSError, ValueError, RecursionError):  # missing, not UTF-8, not JSON
            meta = None
        if not isinstance(meta, dict):
            load_codebook(codebook)  # the codebook's own error for a file it cannot read
            meta = {}
    recipe = meta.get("embedding", {}).get("config")
    if recipe is None:
        raise ExportError("the codebook records no embedding recipe: pass recipe=...")
    return recipe


def _load_codebook(codebook: str | Path | Any, emb: Embedder) -> Any:
    """The quantizer, checked to encode this recipe on this model (a path: loaded once, by the Embedder's checks)."""
    quantizer = emb.load_codebook(codebook) if isinstance(codebook, str | Path) else codebook
    wanted = getattr(quantizer, "input_dim", getattr(quantizer, "dim", None))
    if wanted != emb.recipe_dim:
        raise ExportError(f"codebook takes dim={wanted} vectors, recipe {emb.config.name!r} on this model gives "
                          f"dim={emb.recipe_dim}")
    return quantizer


def _codebook_fingerprint(quantizer: Any) -> str:
    sha = codebook_checksum(getattr(quantizer, "meta", None) or {})
    if not sha:
        raise ExportError("the codebook has no recorded checksum: export needs a codebook saved with save_codebook "
                          "(e.g. `yolo-vq fit`), so the server can check edge codes against its index")
    return sha


class _DFLSoftmaxInPlace(nn.Module):
    """Ultralytics' ``DFL`` (the expected distance over ``c1`` bins of each box side) with its softmax written out
    over the bins' axis where they lie: (B, 4 * c1, A) -> (B, 4, A), the same values to float rounding (max |diff|
    4e-6 px on random logits). ``DFL`` transposes the bins to axis 1 and calls Softmax there, which onnxruntime runs
    as transpose, softmax, transpose back: 2.5 ms of a 30 ms yolo11n-pose frame at 288x640 (its profiler), against
    ~0.2 ms for these elementwise ops and two reductions."""

    def __init__(self, dfl: nn.Module) -> None:
        super().__init__()
        self.c1 = dfl.c1
        self.register_buffer("bins", dfl.conv.weight.detach().reshape(1, 1, dfl.c1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        x = x.view(b, 4, self.c1, a)
        e = (x - x.amax(2, keepdim=True)).exp()
        return (e * self.bins).sum(2) / e.sum(2)


def _model_copy(yolo: Any, end2end: bool, dynamic: bool, max_det: int) -> nn.Module:
    """A fused copy of the detector prepared as Ultralytics' own ONNX exporter prepares it (the user's model is left
    as it is): heads in export mode, C2f blocks on their ``split`` forward (a cheaper graph, the same numbers), and
    the heads' DFL with its softmax in place (:class:`_DFLSoftmaxInPlace`: the same numbers, 2.3 ms a frame less)."""
    from ultralytics.nn.modules import C2f, Detect
    from ultralytics.nn.modules.block import DFL

    model = copy.deepcopy(yolo.model).float().eval().cpu()
    if hasattr(model, "end2end"):
        model.end2end = end2end  # before fusion, as AutoBackend does
    model.fuse(verbose=False)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, Detect):
            m.dynamic, m.export, m.format, m.xyxy, m.shape = dynamic, True, "onnx", False, None
            if isinstance(getattr(m, "dfl", None), DFL):  # reg_max 1 (YOLO26): no DFL, an Identity
                m.dfl = _DFLSoftmaxInPlace(m.dfl)
            if end2end:
                m.max_det = max_det
        elif isinstance(m, C2f):
            m.forward = m.forward_split
    return model


def _prepare(model: Any, codebook: str | Path | Any, recipe: Any, *, imgsz: int | tuple[int, int],
             source_size: tuple[int, int] | None, conf: float, iou: float, max_det: int, dynamic: bool,
             embeddings: bool, nms: bool | None) -> _Prepared:
    """Recipe, codebook (loaded once), detector copy and the graph to trace; every check before anything is written."""
    emb = Embedder(model, _recorded_recipe(codebook) if recipe is None else recipe)
    if emb.config.mode != "roi":
        raise ExportError(f"recipe {emb.config.name!r} part mode={emb.config.mode!r}: anchor features need the head's "
                          f"anchor index per box, which the export graph does not keep; use a 'roi' recipe")
    quantizer = _load_codebook(codebook, emb)
    fingerprint = _codebook_fingerprint(quantizer)
    head = detect_head(model.model)
    end2end = getattr(head, "one2one_cv2", None) is not None and nms is not True
    stride = int(max(head.stride.tolist()))
    hw = input_size(imgsz, source_size, stride)
    det = _model_copy(model, end2end, dynamic, max(int(max_det), 300))
    q = copy.deepcopy(quantizer).float().cpu().eval()
    graph = VQGraph(det, BoxEmbedder(emb.config, emb.taps), q, input_hw=hw, conf=conf, iou=iou,
                    max_det=max_det, end2end=end2end, embeddings=embeddings).eval()
    return _Prepared(graph, emb, q, fingerprint, hw, stride, end2end)


def _trace(graph: VQGraph, out: Path, hw: tuple[int, int], *, batch: int, dynamic: bool, opset: int) -> list[str]:
    """``torch.onnx.export`` of ``graph`` to ``out`` (TorchScript exporter); returns the output names."""
    outputs = [*OUTPUTS, *([EMBEDDINGS] if graph.with_embeddings else [])]
    dummy = torch.zeros(batch, 3, *hw), torch.tensor([[0.0, 0.0, hw[1], hw[0]]]).repeat(batch, 1)
    axes = {n: {0: "batch"} for n in [*INPUTS, *outputs]} if dynamic else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # dynamo=False: the exporter Ultralytics uses
        torch.onnx.export(graph, dummy, str(out), dynamo=False, opset_version=opset, input_names=list(INPUTS),
                          output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
    return outputs


def _write_metadata(out: Path, meta: dict[str, Any]) -> None:
    """Add ``meta`` to the ONNX file's ``metadata_props`` (each value JSON)."""
    import onnx

    proto = onnx.load(str(out))
    proto.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in _format.encode(meta).items())
    onnx.save(proto, str(out))


def export(
    model: Any,
    codebook: str | Path | Any,
    out: str | Path,
    *,
    recipe: Any = None,
    imgsz: int | tuple[int, int] = 640,
    source_size: tuple[int, int] | None = None,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    dynamic: bool = True,
    batch: int = 1,
    opset: int = DEFAULT_OPSET,
    half: bool = False,
    embeddings: bool = False,
    nms: bool | None = None,
    check_images: list[np.ndarray] | None = None,
) -> tuple[Path, ExportCheck]:
    """Export ``model`` + recipe + ``codebook`` as one ONNX file at ``out`` and check it in onnxruntime.

    Args:
        model: an ``ultralytics.YOLO`` with PyTorch weights (``.pt`` or ``.yaml``); Detect, Segment or Pose head.
        codebook: a codebook path (or a loaded quantizer from ``load_codebook``) trained on this model + recipe.
        recipe: the embedding recipe; default: the codebook's own.
        imgsz, source_size: the fixed input size, see :func:`input_size`.
        conf, iou, max_det: detection settings baked into the graph (``predict``'s defaults).
        dynamic: dynamic batch dimension; else the batch is fixed at ``batch``.
        opset: ONNX opset (TorchScript exporter).
        half: fp16 weights; not supported by this CPU export path (a clear error).
        embeddings: also output the float embeddings.
        nms: ``None`` (default): end-to-end heads (YOLO26) use their NMS-free top-k, others NMS; ``True`` forces NMS
            on the one-to-many head of an end-to-end model (as ``predict`` does by default in Ultralytics 8.4).
        check_images: BGR images for the self-check (default: Ultralytics' ``bus.jpg`` and ``zidane.jpg``).

    Returns:
        The written path and the self-check result.

    Raises:
        ExportError: an unsupported head or recipe part, bad settings, or a failed self-check (the file is removed).
        yolo_vq.quant.CodebookError: a codebook of another model or recipe.
    """
    import onnx

    _check_settings(model, conf, iou, max_det, batch, half)
    p = _prepare(model, codebook, recipe, imgsz=imgsz, source_size=source_size, conf=conf, iou=iou, max_det=max_det,
                 dynamic=dynamic, embeddings=embeddings, nms=nms)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        outputs = _trace(p.graph, out, p.input_hw, batch=batch, dynamic=dynamic, opset=opset)
        meta = _format.build_metadata(
            version=__version__, names=model.names, task=getattr(model, "task", "detect"), input_hw=p.input_hw,
            imgsz=imgsz, source_size=source_size, stride=p.stride, batch=None if dynamic else batch,
            end2end=p.end2end, conf=conf, iou=iou, max_det=p.graph.max_det, codebook_fingerprint=p.fingerprint,
            code_size=p.quantizer.code_size, code_dtype=p.quantizer.code_dtype,
            model_fingerprint=p.embedder.fingerprint, embedding=p.embedder.describe(), outputs=outputs)
        _write_metadata(out, meta)
        try:
            onnx.checker.check_model(str(out))
            check = _self_check(p.graph, out, p.input_hw, dynamic, batch, check_images, meta)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    finally:
        p.graph.remove_hooks()
    return out, check


def pair_outputs(got: list[np.ndarray], ref: list[np.ndarray], i: int, tol: float = 1e-3
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """Pair image ``i``'s valid rows of two graph outputs (boxes, scores, classes, codes, valid) by class and box.

    Row order may differ between runtimes where scores tie. Returns the paired row indices ``(a, b)`` and the number
    of rows left unpaired that do not sit on a score tie at the ``max_det`` cut (those are disagreements).
    """
    va, vb = np.flatnonzero(got[4][i]), np.flatnonzero(ref[4][i])
    ba, bb = got[0][i][va].astype(np.float64), ref[0][i][vb].astype(np.float64)
    err = np.abs(ba[:, None] - bb[None]).max(-1) / np.maximum(np.abs(bb).max(-1), 1.0)[None]  # (a, b) relative
    err[got[2][i][va][:, None] != ref[2][i][vb][None]] = np.inf
    pa, pb = [], []
    if err.size:  # greedy, closest rows first; each reference row is taken once
        for j in np.argsort(err.min(1), kind="stable"):
            k = int(np.argmin(err[j]))
            if err[j, k] <= tol:
                pa.append(va[j])
                pb.append(vb[k])
                err[:, k] = np.inf
    full = len(got[4][i])
    cut = min(ref[1][i][vb].min(initial=np.inf), got[1][i][va].min(initial=np.inf))
    rest_a = np.setdiff1d(va, pa)
    rest_b = np.setdiff1d(vb, pb)
    tied = np.concatenate([got[1][i][rest_a], ref[1][i][rest_b]]) <= cut * (1 + 1e-3) + 1e-7
    unpaired = len(tied) if len(va) < full and len(vb) < full else int((~tied).sum())
    return np.asarray(pa, np.int64), np.asarray(pb, np.int64), unpaired


def _self_check(graph: VQGraph, path: Path, hw: tuple[int, int], dynamic: bool, batch: int,
                images: list[np.ndarray] | None, meta: dict) -> ExportCheck:
    """Run ``path`` in onnxruntime and ``graph`` in PyTorch on >= 2 real letterboxed images; raise if they differ."""
    import onnxruntime as ort

    from .runner import letterbox_batch

    if images is None:
        import cv2

        from ..assets import ultralytics_image

        images = [cv2.imread(str(ultralytics_image(n))) for n in ("bus.jpg", "zidane.jpg")]
    if len(images) < 2:
        raise ExportError(f"the self-check needs >= 2 images, got {len(images)}")
    x, regions = letterbox_batch(images, meta)
    step = len(x) if dynamic else batch
    if not dynamic:  # whole fixed-size batches, repeating images if there are fewer than one batch
        reps, keep = -(-step // len(x)), max(step, len(x) - len(x) % step)
        x, regions = np.concatenate([x] * reps)[:keep], np.concatenate([regions] * reps)[:keep]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst, equal, total, paired, unpaired = 0.0, 0, 0, 0, 0
    for s in range(0, len(x), step):
        chunk, reg = x[s : s + step], regions[s : s + step]
        got = sess.run(None, {"images": chunk, "regions": reg})
        with torch.no_grad():
            ref = [t.numpy() for t in graph(torch.from_numpy(chunk), torch.from_numpy(reg))]
        for i in range(len(chunk)):
            a, b, bad = pair_outputs(got, ref, i)
            unpaired += bad
            paired += len(a)
            if len(a):
                scale = np.maximum(np.abs(ref[0][i][b]), 1.0)
                worst = max(worst, float((np.abs(got[0][i][a] - ref[0][i][b]) / scale).max()))
                equal += int((got[3][i][a] == ref[3][i][b]).sum())
                total += ref[3][i][b].size
    check = ExportCheck(len(x), paired, worst, equal / total if total else 1.0, unpaired == 0)
    if unpaired or check.code_bytes_equal < 0.99:
        raise ExportError(f"{path}: onnxruntime disagrees with PyTorch ({check.line()}; {unpaired} detections "
                          f"without a counterpart); the file was removed. Try another opset (opset=17..20)")
    return check
