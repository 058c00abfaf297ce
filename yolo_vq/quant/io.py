"""Codebook files: tensors in ``<stem>.safetensors``, everything else in ``<stem>.json``.

Loading never unpickles (``safetensors.torch.load_file`` + ``json``). The JSON records what the codebook belongs to
(the caller's embedding config and model fingerprint) so a mismatch can say which model/layers it was made for.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CodebookError
from .base import Quantizer
from .coarse import FORMAT as COARSE_FORMAT
from .coarse import CoarseQuantizer, load_coarse
from .files import bytes_sha256, coarse_path, codebook_paths, file_sha256
from .pq import ProductQuantizer
from .rq import ResidualQuantizer
from .vq import VectorQuantizer

__all__ = [
    "CodebookError",
    "codebook_checksum",
    "codebook_paths",
    "fingerprint_module",
    "load_codebook",
    "save_coarse",
    "save_codebook",
]

FORMAT_VERSION = 1
_QUANTIZERS: dict[str, type[Quantizer]] = {
    c.__name__: c for c in (ProductQuantizer, ResidualQuantizer, VectorQuantizer)
}


def codebook_checksum(path: str | os.PathLike | Mapping[str, Any]) -> str | None:
    """The sha256 of a codebook's tensors as its JSON records it (a codebook path, or the loaded ``quantizer.meta``):
    what indexes and exported graphs identify a codebook by. None if unreadable or not recorded."""
    if isinstance(path, Mapping):
        meta: Any = path
    else:
        try:
            meta = json.loads(codebook_paths(path)[1].read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: [[[[...
            return None
    tensors = meta.get("tensors") if isinstance(meta, Mapping) else None
    sha = tensors.get("sha256") if isinstance(tensors, Mapping) else None
    return sha if isinstance(sha, str) else None  # a checksum of another type is none recorded


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("yolo-vq")
    except PackageNotFoundError:  # not installed: running from a checkout
        return "unknown"


def save_codebook(
    quantizer: Quantizer,
    path: str | os.PathLike,
    *,
    embedding: Mapping[str, Any] | None = None,
    model_fingerprint: str | None = None,
) -> tuple[Path, Path]:
    """Write a trained quantizer as ``<stem>.safetensors`` (its buffers) + ``<stem>.json`` (everything else).

    Args:
        quantizer: a fitted :class:`Quantizer`.
        path: ``stem``, ``stem.safetensors`` or ``stem.json``; parent folders are created.
        embedding: JSON-serialisable description of the vectors (e.g. tap layers, mode, pool, dim).
        model_fingerprint: identifies the model the vectors come from (e.g. :func:`fingerprint_module`).

    Returns:
        The two paths written. Each file is written to a temporary name and renamed, so a crash leaves no half file.
    """
    from safetensors.torch import save

    if not isinstance(quantizer, Quantizer):
        raise TypeError(f"quantizer must be a yolo_vq Quantizer, got {type(quantizer).__name__}")
    if not quantizer.fitted:
        raise ValueError(f"{type(quantizer).__name__} is not trained: call .fit(x) before save_codebook()")
    if model_fingerprint is not None and not isinstance(model_fingerprint, str):
        raise TypeError(f"model_fingerprint must be a str or None, got {type(model_fingerprint).__name__}")
    try:  # checked before anything is written, so a bad call leaves an existing codebook intact
        json.dumps(embedding)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"embedding must be JSON-serialisable (str, int, float, list, dict), got {embedding!r}: {e}"
        ) from None
    st_path, js_path = codebook_paths(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in quantizer.state_dict().items()}
    tmp = st_path.with_name(st_path.name + ".tmp")
    # bytes written by Python, not safetensors' save_file (which creates its file 0600): the mode follows the
    # umask like the JSON's
    tmp.write_bytes(save(tensors, metadata={"format": "pt", "yolo_vq_format_version": str(FORMAT_VERSION)}))
    os.replace(tmp, st_path)
    meta = {
        "format_version": FORMAT_VERSION,
        "quantizer": {"type": type(quantizer).__name__, "params": quantizer.config()},
        "dim": quantizer.dim,
        "code_size": quantizer.code_size,
        "embedding": dict(embedding) if embedding is not None else None,
        "model_fingerprint": model_fingerprint,
        "stats": quantizer.stats,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "yolo_vq_version": _version(),
        "tensors": {"file": st_path.name, "sha256": file_sha256(st_path)},
    }
    if quantizer.head is not None:  # its tensors are in the file (head.mean, head.proj): part of the checksum
        h = quantizer.head
        meta["head"] = {"kind": h.kind, "dim_in": h.dim_in, "dim": h.dim, "stats": h.stats}
        if h.hidden:  # head.w1, head.b1, head.w2 too
            meta["head"]["hidden"] = h.hidden
    tmp = js_path.with_name(js_path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, js_path)
    return st_path, js_path


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _describe(meta: Mapping[str, Any]) -> str:
    emb = meta.get("embedding") or {}
    emb_s = ", ".join(f"{k}={v}" for k, v in emb.items()) if isinstance(emb, Mapping) else str(emb)
    return f"model fingerprint {meta.get('model_fingerprint')!r}, embedding ({emb_s or 'not recorded'})"


def load_codebook(
    path: str | os.PathLike,
    *,
    expect_dim: int | None = None,
    expect_fingerprint: str | None = None,
    allow_mismatch: bool = False,
    device: str | torch.device = "cpu",
) -> Quantizer:
    """Read a codebook written by :func:`save_codebook`; no pickle involved.

    Args:
        path: ``stem``, ``stem.safetensors`` or ``stem.json``.
        expect_dim: the embedding size it will be used with; None skips the check.
        expect_fingerprint: the model fingerprint it will be used with; None skips the check.
        allow_mismatch: warn (``UserWarning``) instead of raising on a dim or fingerprint mismatch.
        device: where the buffers go.

    Returns:
        The fitted quantizer; the JSON metadata (embedding, model_fingerprint, stats, created_utc, ...) is on
        ``quantizer.meta`` and the training stats on ``quantizer.stats``.

    Raises:
        CodebookError: missing/corrupt/truncated files, unknown format version or quantizer type, missing or
            misshapen tensors, checksum mismatch; dim or fingerprint mismatch unless ``allow_mismatch``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st_path, js_path = codebook_paths(path)
    try:
        meta = json.loads(js_path.read_text())
    except FileNotFoundError:
        raise CodebookError(f"{js_path}: codebook metadata file missing (expected next to {st_path.name})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: [[[[...
        raise CodebookError(
            f"{js_path}: not valid codebook JSON ({_one_line(e)}); re-save it with save_codebook()"
        ) from None
    if not isinstance(meta, dict):
        raise CodebookError(f"{js_path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CodebookError(
            f"{js_path}: format_version {meta.get('format_version')!r} is not supported (this yolo_vq reads "
            f"{FORMAT_VERSION}); re-save the codebook with this version"
        )
    q = meta.get("quantizer")
    qtype = q.get("type") if isinstance(q, dict) else None
    if not isinstance(qtype, str) or qtype not in _QUANTIZERS:  # a list or dict is no name (and unhashable)
        raise CodebookError(f"{js_path}: unknown quantizer type {qtype!r}, expected one of {sorted(_QUANTIZERS)}")
    if not st_path.is_file():
        raise CodebookError(f"{st_path}: codebook tensor file missing (its metadata {js_path.name} exists)")
    listed = meta.get("tensors")
    expected_sha = listed.get("sha256") if isinstance(listed, dict) else None
    if expected_sha is not None and file_sha256(st_path) != expected_sha:
        raise CodebookError(f"{st_path}: checksum does not match {js_path.name}; the file is corrupt or was replaced")
    try:
        tensors = load_file(str(st_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # truncated or corrupt header/data
        raise CodebookError(f"{st_path}: unreadable safetensors file ({type(e).__name__}: {_one_line(e)})") from None
    head = _load_head(tensors, meta, js_path, st_path)  # takes the head.* tensors out of ``tensors``
    cls, params = _QUANTIZERS[qtype], q.get("params", {})
    try:
        with torch.device("meta"):  # shapes only: a damaged dim or m allocates nothing (dim 10**12 asked for TBs)
            shaped = cls(**params)
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:  # RuntimeError: sizes torch cannot hold
        raise CodebookError(f"{js_path}: bad {qtype} parameters {q.get('params')!r} ({_one_line(e)})") from None
    try:
        shaped.load_state_dict(tensors, strict=True, assign=True)  # names and shapes against the file's tensors
    except RuntimeError as e:
        raise CodebookError(f"{st_path}: tensors do not match the {qtype} in {js_path.name} ({_one_line(e)})") from None
    quantizer = cls(**params)  # as large as the file's tensors now
    quantizer.load_state_dict(tensors, strict=True)
    quantizer.head = head
    quantizer.to(device)
    quantizer.stats = dict(meta["stats"]) if isinstance(meta.get("stats"), dict) else {}
    quantizer.meta = meta
    quantizer.coarse = load_coarse(path, meta)  # None unless the JSON lists one; CodebookError when it is damaged

    if head is not None and head.dim != quantizer.dim:
        raise CodebookError(f"{st_path}: its head outputs dim={head.dim} vectors, its {qtype} encodes dim="
                            f"{quantizer.dim}; the file is inconsistent: fit the codebook again")
    problems = []
    if expect_dim is not None and quantizer.input_dim != expect_dim:
        problems.append(f"it takes dim={quantizer.input_dim} vectors, got expect_dim={expect_dim}")
    if expect_fingerprint is not None and meta.get("model_fingerprint") != expect_fingerprint:
        problems.append(
            f"it was made for model fingerprint {meta.get('model_fingerprint')!r}, got {expect_fingerprint!r}"
        )
    if problems:
        msg = (
            f"codebook {js_path} does not fit: {'; '.join(problems)}. It belongs to {_describe(meta)}. "
            "Fix: train a codebook on this model's embeddings or load the matching one "
            "(allow_mismatch=True to use it anyway)"
        )
        if not allow_mismatch:
            raise CodebookError(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    return quantizer


def _load_head(tensors: dict[str, Tensor], meta: Mapping[str, Any], js_path: Path, st_path: Path) -> Any:
    """The identity head stored in a codebook (``head.mean``, ``head.proj`` tensors, and ``head.w1``, ``head.b1``,
    ``head.w2`` where the JSON's ``"head"`` lists ``hidden`` units; + the JSON's ``"head"``), or
    None; removes its tensors from ``tensors``. CodebookError where the two disagree."""
    from ..features.head import Head

    listed = meta.get("head")
    found = {k.removeprefix("head."): tensors.pop(k) for k in [k for k in tensors if k.startswith("head.")]}
    if listed is None and not found:
        return None
    hidden = isinstance(listed, Mapping) and bool(listed.get("hidden"))  # a head with a hidden layer (kind mlp)
    if not isinstance(listed, Mapping) or set(found) != {"mean", "proj", *(("w1", "b1", "w2") if hidden else ())}:
        raise CodebookError(f"{js_path}: the identity head is half there (JSON {'lists' if listed else 'lacks'} it"
                            f"{' with a hidden layer' if hidden else ''}, the tensor file holds "
                            f"{sorted(found) or 'none of'} its tensors); fit the codebook again")
    try:
        head = Head(found["mean"], found["proj"], str(listed.get("kind")),
                    mlp=(found["w1"], found["b1"], found["w2"]) if hidden else None)
        if hidden and head.hidden != listed.get("hidden"):
            raise ValueError(f"its JSON says {listed.get('hidden')} hidden units, its tensors hold {head.hidden}")
    except ValueError as e:
        raise CodebookError(f"{st_path}: bad identity head ({_one_line(e)})") from None
    head.stats = dict(listed.get("stats") or {}) if isinstance(listed.get("stats"), Mapping) else {}
    return head


def fingerprint_module(*items: nn.Module | Tensor | Mapping[str, Tensor], length: int = 16) -> str:
    """Short sha256 hex over the parameters and buffers of modules (or tensors / name->tensor dicts).

    Within each item, entries are hashed sorted by name (name, dtype, shape, raw bytes); items are hashed in the
    order given. Deterministic across runs and devices; any change to a weight changes the fingerprint.
    """
    if not items:
        raise ValueError("fingerprint_module needs at least one module, tensor or dict of tensors")
    h = hashlib.sha256()
    for i, item in enumerate(items):
        if isinstance(item, nn.Module):
            named: Iterable[tuple[str, Tensor]] = {
                **dict(item.named_parameters()),
                **dict(item.named_buffers()),
            }.items()
        elif isinstance(item, Tensor):
            named = [("", item)]
        elif isinstance(item, Mapping):
            named = item.items()
        else:
            raise TypeError(f"fingerprint_module takes nn.Module, Tensor or dict of tensors, got {type(item).__name__}")
        for name, t in sorted(named, key=lambda kv: kv[0]):
            if not isinstance(t, Tensor):
                raise TypeError(f"fingerprint_module: entry {name!r} is {type(t).__name__}, not a tensor")
            t = t.detach().to("cpu").contiguous()
            h.update(f"{i}:{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:length]

def save_coarse(coarse: CoarseQuantizer, codebook: str | os.PathLike) -> Path:
    """Attach ``coarse`` to a saved codebook: write ``<stem>.coarse.safetensors`` and list it (sha256, lists, dims,
    training stats) under ``"coarse"`` in ``<stem>.json``; each file goes to a temporary name first and is renamed.
    The codebook's own tensors and checksum are untouched. Returns the tensor file's path.

    Raises:
        CodebookError: the codebook is unreadable, or encodes another dim than ``coarse`` takes.
    """
    from safetensors.numpy import save

    q = load_codebook(codebook)  # verifies the codebook it is attached to
    if q.dim != coarse.dim:
        raise CodebookError(f"the coarse quantizer takes dim={coarse.dim} vectors, the codebook {codebook} encodes "
                            f"dim={q.dim}: train it on this codebook's embeddings")
    _, js = codebook_paths(codebook)
    path = coarse_path(codebook)
    data = save({"mean": coarse.mean, "proj": coarse.proj, "centroids": coarse.centroids},
                metadata={"yolo_vq_coarse_format": str(COARSE_FORMAT)})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    meta = json.loads(js.read_text())
    meta["coarse"] = {"file": path.name, "sha256": bytes_sha256(data), "format": COARSE_FORMAT, "lists": coarse.lists,
                      "dim": coarse.dim, "reduced_dim": coarse.reduced_dim, "stats": coarse.stats}
    tmp = js.with_name(js.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, js)
    coarse.sha256 = meta["coarse"]["sha256"]
    return path
