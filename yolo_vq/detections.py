"""The one data carrier: detections with their embeddings (and, later, codes), numpy at the public edge."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

__all__ = ["FRAME", "ID", "LIST_ID", "PREFIX", "SCORE", "SOURCE_ID", "TIME", "Detections", "ResultAttrs",
           "result_attrs"]

# Keys of ``Detections.data`` that the store and search fill (named once, as supervision names its data fields).
ID = "id"  # (n,) int64 stored detection id
SOURCE_ID = "source_id"  # (n,) int64 id of the source (video, folder, stream) in the index
FRAME = "frame"  # (n,) int64 frame number in its source
TIME = "time"  # (n,) float64 seconds from the source's start
SCORE = "score"  # (n,) float32 similarity to the query, best first
LIST_ID = "list_id"  # (n,) int32 coarse (IVF) list of each row, -1 for none: set before storing, kept by the store

PREFIX = "vq"  # the default prefix of the attributes an Embedder sets on Ultralytics ``Results``


class ResultAttrs(NamedTuple):
    """Names of the attributes an :class:`~yolo_vq.Embedder` sets on each Ultralytics ``Results``."""

    embeddings: str  # (n, D) float32, one row per box
    image_embedding: str  # (D_img,) float32, the whole frame
    codes: str  # (n, code_len) uint8/uint16 codebook codes


def result_attrs(prefix: str = PREFIX) -> ResultAttrs:
    """``vq_embeddings``, ``vq_image_embedding``, ``vq_codes`` for the default prefix."""
    return ResultAttrs(f"{prefix}_embeddings", f"{prefix}_image_embedding", f"{prefix}_codes")


def _check(name: str, a: Any, dtype: type, shape: tuple, fix: str = "") -> np.ndarray:
    """Coerce ``a`` to ``dtype`` and check its shape (``None`` in ``shape`` matches any length)."""
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}{fix}")
    if arr.ndim != len(shape) or (arr.shape != shape and any(s is not None and s != t for s, t in zip(shape, arr.shape))):
        want = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(arr.shape)}{fix}")
    return np.ascontiguousarray(arr, dtype=dtype)


@dataclass(eq=False)
class Detections:
    """Detections of one or more frames, validated on construction.

    Attributes:
        xyxy: (n, 4) float32 boxes in original-image pixels.
        confidence: (n,) float32 scores.
        class_id: (n,) int64 class indices.
        track_id: (n,) int64 tracker ids, -1 where untracked.
        embeddings: (n, D) float32 per-detection vectors (D may be 0 when none were computed).
        codes: (n, C) uint8 codebook codes, or None until quantized.
        data: extra per-row arrays of length n (e.g. ``frame``, ``source``), kept through slicing and concatenation.
    """

    xyxy: np.ndarray
    confidence: np.ndarray | None = None
    class_id: np.ndarray | None = None
    track_id: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    codes: np.ndarray | None = None
    data: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.xyxy = _check("xyxy", self.xyxy, np.float32, (None, 4), ": boxes are (x1, y1, x2, y2) rows")
        n = len(self.xyxy)
        self.confidence = _check("confidence", np.ones(n) if self.confidence is None else self.confidence,
                                 np.float32, (n,))
        self.class_id = _check("class_id", np.zeros(n) if self.class_id is None else self.class_id, np.int64, (n,))
        self.track_id = _check("track_id", np.full(n, -1) if self.track_id is None else self.track_id, np.int64, (n,))
        emb = np.zeros((n, 0)) if self.embeddings is None else self.embeddings
        self.embeddings = _check("embeddings", emb, np.float32, (n, None), ": one vector per box")
        if self.embeddings.size and not np.isfinite(self.embeddings).all():
            raise ValueError("embeddings contain NaN or inf; check the tapped maps (fp16 overflow?)")
        if self.codes is not None:
            codes = np.asarray(self.codes)
            if codes.dtype not in (np.uint8, np.uint16):
                raise TypeError(f"codes must be uint8 or uint16, got {codes.dtype}")
            self.codes = _check("codes", codes, codes.dtype.type, (n, None))
        data = {}
        for k, v in dict(self.data).items():
            arr = np.asarray(v)
            if arr.ndim == 0 or len(arr) != n:
                raise ValueError(f"data[{k!r}] must have one entry per detection ({n}), got shape {arr.shape}")
            data[k] = arr
        self.data = data

    # -- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def of_arrays(cls, xyxy: np.ndarray, *, confidence: np.ndarray, class_id: np.ndarray, track_id: np.ndarray,
                  codes: np.ndarray | None, data: dict[str, np.ndarray]) -> Detections:
        """Detections of arrays that already have the attributes' dtypes, shapes and C order (a search's result rows,
        read from the index's own files), without the constructor's checks (~12 us of a ~1 ms search); no
        embeddings."""
        d = cls.__new__(cls)
        d.xyxy, d.confidence, d.class_id, d.track_id, d.codes, d.data = xyxy, confidence, class_id, track_id, codes, data
        d.embeddings = np.zeros((len(xyxy), 0), np.float32)
        return d

    @classmethod
    def empty(cls, dim: int = 0, code_size: int | None = None) -> Detections:
        """No detections, with (0, dim) embeddings and, if ``code_size`` is given, (0, code_size) codes."""
        return cls(
            np.zeros((0, 4), np.float32),
            embeddings=np.zeros((0, dim), np.float32),
            codes=None if code_size is None else np.zeros((0, code_size), np.uint8),
        )

    @classmethod
    def from_ultralytics(cls, result: Any, *, prefix: str = PREFIX, **data: Any) -> Detections:
        """From an Ultralytics ``Results`` (boxes or oriented boxes; track ids if tracked; embeddings and codes if an
        :class:`~yolo_vq.Embedder` with this ``prefix`` was attached). Extra keyword arrays/scalars go to ``data``
        (scalars broadcast)."""
        b = result.obb if getattr(result, "obb", None) is not None else result.boxes
        if b is None:
            raise TypeError("result has no boxes: yolo_vq handles detect, segment, pose and obb results")
        n = len(b)
        attrs = result_attrs(prefix)
        emb = getattr(result, attrs.embeddings, None)
        extra = {k: (np.full(n, v) if np.ndim(v) == 0 else v) for k, v in data.items()}
        return cls(
            b.xyxy.cpu().numpy(),
            confidence=b.conf.cpu().numpy(),
            class_id=b.cls.cpu().numpy(),
            track_id=b.id.cpu().numpy() if b.id is not None else None,
            embeddings=emb,
            codes=getattr(result, attrs.codes, None),
            data=extra,
        )

    @classmethod
    def concat(cls, items: Sequence[Detections] | Iterable[Detections]) -> Detections:
        """Concatenate; embedding dims, code sizes and ``data`` keys must agree."""
        items = list(items)
        if not items:
            return cls.empty()
        dims = {d.embeddings.shape[1] for d in items if len(d)} or {items[0].embeddings.shape[1]}
        if len(dims) > 1:
            raise ValueError(f"cannot concatenate embeddings of different dims {sorted(dims)}")
        has_codes = {d.codes is not None for d in items}
        if len(has_codes) > 1:
            raise ValueError("cannot concatenate detections with and without codes: encode all of them first")
        keys = {tuple(sorted(d.data)) for d in items}
        if len(keys) > 1:
            raise ValueError(f"cannot concatenate detections with different data keys {sorted(keys)}")
        dim = dims.pop()
        return cls(
            np.concatenate([d.xyxy for d in items]),
            confidence=np.concatenate([d.confidence for d in items]),
            class_id=np.concatenate([d.class_id for d in items]),
            track_id=np.concatenate([d.track_id for d in items]),
            embeddings=np.concatenate([d.embeddings.reshape(-1, dim) for d in items]),
            codes=np.concatenate([d.codes for d in items]) if items[0].codes is not None else None,
            data={k: np.concatenate([d.data[k] for d in items]) for k in items[0].data},
        )

    # -- access ----------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.xyxy)

    def __getitem__(self, index: int | slice | np.ndarray | Sequence[int]) -> Detections:
        """Rows by int, slice, integer array or boolean mask; always returns ``Detections``."""
        if isinstance(index, int | np.integer):
            index = [int(index)]
        return Detections(
            self.xyxy[index],
            confidence=self.confidence[index],
            class_id=self.class_id[index],
            track_id=self.track_id[index],
            embeddings=self.embeddings[index],
            codes=None if self.codes is None else self.codes[index],
            data={k: v[index] for k, v in self.data.items()},
        )

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    @property
    def dim(self) -> int:
        """Embedding length D (0 when none were computed)."""
        return self.embeddings.shape[1]

    def with_data(self, **data: Any) -> Detections:
        """A copy with extra per-row ``data`` (scalars broadcast)."""
        n = len(self)
        merged: Mapping[str, Any] = {**self.data, **{k: np.full(n, v) if np.ndim(v) == 0 else v for k, v in data.items()}}
        copy = {k: None if v is None else v.copy() for k, v in
                (("codes", self.codes), ("embeddings", self.embeddings))}
        return Detections(self.xyxy.copy(), confidence=self.confidence.copy(), class_id=self.class_id.copy(),
                          track_id=self.track_id.copy(), **copy,
                          data={k: np.array(v, copy=True) for k, v in merged.items()})

    def __repr__(self) -> str:
        codes = "none" if self.codes is None else f"{self.codes.shape[1]}B {self.codes.dtype}"
        return f"Detections(n={len(self)}, dim={self.dim}, codes={codes}, data={sorted(self.data)})"
