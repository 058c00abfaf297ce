"""The edge export format in one place: what ``yolo-vq export`` writes into the ONNX file, what the runner accepts
from it, and the header of the records files the runner writes and ``yolo-vq ingest`` reads.

* :class:`Key`: the metadata keys (ONNX ``metadata_props``, each value JSON) and the records header's own keys; a
  records header is the graph's metadata plus ``type``, ``edge_format``, ``model`` and ``created_utc``;
* :data:`EXPORT_FORMAT` (metadata layout, under ``Key.FORMAT``) and :data:`EDGE_FORMAT` (records header, under
  ``Key.EDGE_FORMAT``): the versions this yolo_vq writes and reads;
* :data:`INPUTS`, :data:`OUTPUTS`, :data:`EMBEDDINGS`: the graph's input and output names;
* :func:`build_metadata` / :func:`encode` (export), :func:`read_metadata` (runner: decoded and checked against the
  graph), :func:`records_header` (runner);
* :class:`SourceInfo`: what describes a source (a records file's source record, an opened video, a source stored in
  an index), one record for all three.

Standard library only (the runner and ingest are torch-free).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgeError

__all__ = ["DEFAULT_OPSET", "EDGE_FORMAT", "EMBEDDINGS", "EXPORT_FORMAT", "HEADER", "INPUTS", "OUTPUTS", "SOURCE_FIELDS",
           "Key", "SourceInfo", "build_metadata", "decode", "encode", "read_metadata", "records_header"]

DEFAULT_OPSET = 18  # TorchScript exporter; onnxruntime >= 1.16 runs it (PITFALLS 11)
EXPORT_FORMAT = 1  # version of the metadata layout (Key.FORMAT)
EDGE_FORMAT = 1  # version of the records header (Key.EDGE_FORMAT)


@dataclass(frozen=True)
class SourceInfo:
    """A video, image folder or stream as the package describes it: where it is (``uri``), what it holds
    (``fingerprint``: its content's, so a renamed file resumes) and what is known of it (None: unknown). The opened
    capture (:class:`yolo_vq_edge.video.VideoSource`) and the stored source (:class:`yolo_vq.index.store.Source`)
    are this record plus their own parts; a records file's source record carries these fields."""

    uri: str
    fingerprint: str
    fps: float | None = None
    frame_count: int | None = None
    width: int | None = None
    height: int | None = None

    def described(self) -> dict[str, Any]:
        """The fields of :data:`SOURCE_FIELDS` as a dict (what a records file's source record holds)."""
        return {f: getattr(self, f) for f in SOURCE_FIELDS}


SOURCE_FIELDS = ("uri", "fingerprint", "fps", "frame_count", "width", "height")  # SourceInfo's, in order
HEADER = "header"  # the records header's Key.TYPE

INPUTS = ("images", "regions")
OUTPUTS = ("boxes", "scores", "classes", "codes", "valid")
EMBEDDINGS = "embeddings"  # the optional float output (export(..., embeddings=True))


class Key:
    """Metadata keys of an exported graph, and the records header's own (the header holds both)."""

    FORMAT = "yolo_vq_export"  # EXPORT_FORMAT
    VERSION = "yolo_vq_version"
    NAMES = "names"  # {class id: name}, JSON keys are strings
    TASK = "task"
    IMGSZ = "imgsz"  # [H, W] of the graph's input
    LETTERBOX_IMGSZ = "letterbox_imgsz"  # the imgsz asked for (predict's side for frames of SOURCE_SIZE)
    SOURCE_SIZE = "source_size"  # [h, w] of the camera exported for, or null
    STRIDE = "stride"
    BATCH = "batch"  # the fixed batch, or null (dynamic)
    END2END = "end2end"
    CONF = "conf"
    IOU = "iou"
    MAX_DET = "max_det"
    CODEBOOK_FINGERPRINT = "codebook_fingerprint"  # sha256 of the codebook tensors (the index checks it)
    CODE_SIZE = "code_size"  # bytes per code
    CODE_DTYPE = "code_dtype"  # "uint8" or "uint16"
    MODEL_FINGERPRINT = "model_fingerprint"
    EMBEDDING = "embedding"  # the Embedder's describe()
    INPUTS = "inputs"
    OUTPUTS = "outputs"
    # the records header's own
    TYPE = "type"  # HEADER
    EDGE_FORMAT = "edge_format"  # EDGE_FORMAT
    MODEL = "model"  # the .onnx path the runner ran
    CREATED = "created_utc"


_REQUIRED = (Key.FORMAT, Key.IMGSZ, Key.CODEBOOK_FINGERPRINT, Key.CODE_SIZE, Key.NAMES)


def build_metadata(*, version: str, names: Mapping[Any, str], task: str, input_hw: Sequence[int],
                   imgsz: int | Sequence[int], source_size: Sequence[int] | None, stride: int, batch: int | None,
                   end2end: bool, conf: float, iou: float, max_det: int, codebook_fingerprint: str, code_size: int,
                   code_dtype: Any, model_fingerprint: str, embedding: dict[str, Any],
                   outputs: Sequence[str]) -> dict[str, Any]:
    """The metadata an export writes (JSON values; :func:`encode` makes them ONNX ``metadata_props``).

    ``batch``: None for a dynamic batch; ``code_dtype``: the quantizer's (``torch.uint8`` is written ``"uint8"``)."""
    return {
        Key.FORMAT: EXPORT_FORMAT,
        Key.VERSION: version,
        Key.NAMES: {int(k): v for k, v in names.items()},
        Key.TASK: task,
        Key.IMGSZ: list(input_hw),
        Key.LETTERBOX_IMGSZ: imgsz if isinstance(imgsz, int) else list(imgsz),
        Key.SOURCE_SIZE: None if source_size is None else [int(v) for v in source_size],
        Key.STRIDE: stride,
        Key.BATCH: batch,
        Key.END2END: end2end,
        Key.CONF: conf,
        Key.IOU: iou,
        Key.MAX_DET: max_det,
        Key.CODEBOOK_FINGERPRINT: codebook_fingerprint,
        Key.CODE_SIZE: int(code_size),
        Key.CODE_DTYPE: str(code_dtype).replace("torch.", ""),
        Key.MODEL_FINGERPRINT: model_fingerprint,
        Key.EMBEDDING: embedding,
        Key.INPUTS: list(INPUTS),
        Key.OUTPUTS: list(outputs),
    }


def encode(meta: Mapping[str, Any]) -> dict[str, str]:
    """Metadata -> ONNX ``metadata_props`` (key -> JSON text)."""
    return {k: json.dumps(v) for k, v in meta.items()}


def decode(raw: Mapping[str, str]) -> dict[str, Any]:
    """ONNX ``metadata_props`` -> metadata: each value parsed as JSON, kept as text where it is not JSON."""
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, RecursionError):
            meta[k] = v
    return meta


def records_header(meta: Mapping[str, Any], model: str | Path) -> dict[str, Any]:
    """The header record of a records file: the graph's metadata, the header's version, the graph's path and the
    time it was written."""
    return {Key.TYPE: HEADER, Key.EDGE_FORMAT: EDGE_FORMAT, Key.MODEL: str(model), **meta,
            Key.CREATED: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def read_metadata(sess: Any, path: Path) -> dict[str, Any]:
    """The metadata of an onnxruntime session's graph, decoded and checked against the graph's inputs and outputs.

    Raises:
        EdgeError: an ONNX model without yolo_vq metadata (e.g. a plain Ultralytics export), another export format
            version, or metadata that does not fit the graph (see :func:`_check_graph`).
    """
    raw = sess.get_modelmeta().custom_metadata_map
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        outs = [o.name for o in sess.get_outputs()]
        raise EdgeError(f"{path} is an ONNX model without yolo_vq codes (outputs {outs}, metadata lacks {missing}): "
                        f"a plain Ultralytics export has no per-box codes; build one with `yolo-vq export --model M "
                        f"--codebook C --out model_vq.onnx`")
    meta = decode(raw)
    if meta[Key.FORMAT] != EXPORT_FORMAT:
        raise EdgeError(f"{path}: export format {meta[Key.FORMAT]!r}, this yolo_vq reads {EXPORT_FORMAT}; "
                        f"re-export it")
    _check_graph(sess, path, meta)
    return meta


def _sizes(v: Any, n: int) -> bool:
    """``v`` is a list of ``n`` ints in [1, 2**31)."""
    return isinstance(v, list) and len(v) == n and all(
        isinstance(x, int) and not isinstance(x, bool) and 0 < x < 1 << 31 for x in v)


def _check_graph(sess: Any, path: Path, meta: dict[str, Any]) -> None:
    """The metadata the runner uses, checked against the graph's inputs and outputs, so that a damaged or foreign
    graph is one :class:`EdgeError` here and not an onnxruntime or numpy error after the records file is begun."""
    inputs = {i.name: i.shape for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]

    def bad(what: str) -> EdgeError:
        return EdgeError(f"{path}: {what}; re-export it with `yolo-vq export`")

    if sorted(inputs) != sorted(INPUTS) or not set(OUTPUTS) <= set(outputs) \
            or len(inputs["images"]) != 4 or len(inputs["regions"]) != 2:
        raise bad(f"inputs {inputs} and outputs {outputs} are not those of a yolo_vq export (images (B, 3, H, W) and "
                  f"regions (B, 4) -> {', '.join(OUTPUTS)})")
    shape, imgsz, batch = inputs["images"], meta[Key.IMGSZ], meta.get(Key.BATCH)
    if not _sizes(imgsz, 2) or any(isinstance(s, int) and s != v for s, v in zip(shape[2:], imgsz)):
        raise bad(f"metadata imgsz {imgsz!r} is not the graph's input size [H, W] {shape[2:]}")
    fixed = shape[0] if isinstance(shape[0], int) else None
    if not (batch is None or _sizes([batch], 1)) or batch != fixed:
        raise bad(f"metadata batch {batch!r} is not the graph's input batch ({fixed or 'dynamic'})")
    names = meta[Key.NAMES]
    if not isinstance(names, dict) or not all(isinstance(k, str) and k.strip().isascii() and k.strip().isdigit()
                                              and isinstance(v, str) for k, v in names.items()):
        raise bad(f"metadata names {str(names)[:60]!r} is not a dict of class id -> name")
    side, src = meta.get(Key.LETTERBOX_IMGSZ), meta.get(Key.SOURCE_SIZE)
    if src is not None and not _sizes(src, 2):
        raise bad(f"metadata source_size {src!r} is not [height, width] of the camera")
    if isinstance(side, int) and src is not None:  # the scale letterbox_image uses for frames of that size
        r = min(side / src[0], side / src[1]) if 0 < side < 1 << 31 else 0.0
        if not (1 <= round(src[0] * r) <= imgsz[0] and 1 <= round(src[1] * r) <= imgsz[1]):
            raise bad(f"metadata letterbox_imgsz {side!r} scales a {src[1]}x{src[0]} frame beyond the graph's input "
                      f"{imgsz[1]}x{imgsz[0]}")
