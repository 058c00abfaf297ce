"""The interface every quantizer shares, and the streaming sampler that feeds ``fit``.

A quantizer is an ``nn.Module`` whose codebooks (and rotation, mean...) are buffers, so ``state_dict``, ``.to()``
and ONNX export work as for any module (as in lucidrains/vector-quantize-pytorch).

Asymmetric distance (ADC) contract, for every quantizer::

    ||query - decode(codes)||^2 == sum_j tables[q, j, codes[n, j]] + norms(codes)[n]

with ``tables = distance_tables(query)`` of shape ``(q, code_len, codebook_size)``. ``norms`` is zero for
quantizers whose tables hold full sub-space distances (PQ, VQ: ``needs_norms = False``) and ``||decode(codes)||^2``
for those whose tables hold inner products (RQ: ``needs_norms = True``; store it per vector at encode time).
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .kmeans import exporting, fp32

__all__ = ["Quantizer", "sample_training"]

ArrayLike = Tensor | np.ndarray


def _as_matrix(x: Any, name: str, dim: int) -> Tensor:
    """``x`` as a float32 ``(n, dim)`` tensor on its own device (numpy -> cpu)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a numpy array or torch tensor of shape (n, {dim}), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point (n, {dim}), got {x.dtype}: cast it to float32")
    if not exporting() and (x.dim() != 2 or x.shape[1] != dim):  # shapes are fixed by the graph when exporting
        raise ValueError(
            f"{name} must be (n, {dim}), got {tuple(x.shape)}: this quantizer was built for dim={dim}; "
            "pass vectors of that size or build/load a quantizer for yours"
        )
    return x.float()


def sample_training(
    data: ArrayLike | Iterable[ArrayLike], *, dim: int, max_train: int | None, seed: int
) -> tuple[Tensor, int]:
    """Uniform sample of at most ``max_train`` rows from an array or a stream of ``(n_i, dim)`` batches.

    Bottom-k reservoir sampling: every row gets a seeded uniform key and the ``max_train`` smallest keys are kept,
    so the sample is uniform over everything seen, holds at most ``2 * max_train`` rows in memory, and depends only
    on the seed and the batch sequence. Kept rows are returned in arrival order; when everything fits, all rows
    are kept as they came. Rows are gathered on the device of the first batch.

    Returns:
        ``(x, n_seen)``: float32 ``(n, dim)`` with ``n = min(n_seen, max_train)``, and the rows seen.
    """
    if max_train is not None and (not isinstance(max_train, int) or max_train < 1):
        raise ValueError(f"max_train must be a positive int or None, got {max_train!r}")
    batches = [data] if isinstance(data, (Tensor, np.ndarray)) else data
    if not isinstance(batches, Iterable):
        raise TypeError(f"fit() takes an (n, {dim}) array or an iterable of them, got {type(data).__name__}")
    xs: list[Tensor] = []
    keys: list[Tensor] = []
    order: list[Tensor] = []
    pool, seen, thresh, g, device = 0, 0, math.inf, None, None

    def compact() -> None:
        nonlocal pool, thresh
        k, o, x = torch.cat(keys), torch.cat(order), torch.cat(xs)
        keep = k.topk(max_train, largest=False).indices
        keys[:], order[:], xs[:] = [k[keep]], [o[keep]], [x[keep]]
        pool, thresh = max_train, float(k[keep].max())

    for i, batch in enumerate(batches):
        b = _as_matrix(batch, f"training batch {i}", dim)
        if device is None:
            device = b.device
            g = torch.Generator(device=device).manual_seed(seed)
        b = b.to(device)
        nb = b.shape[0]
        if nb == 0:
            continue
        k = torch.rand(nb, generator=g, device=device)
        o = torch.arange(seen, seen + nb, device=device)
        seen += nb
        if max_train is not None and pool >= max_train:
            sel = k < thresh  # cannot enter the reservoir otherwise
            b, k, o = b[sel], k[sel], o[sel]
        xs.append(b)
        keys.append(k)
        order.append(o)
        pool += b.shape[0]
        if max_train is not None and pool >= 2 * max_train:
            compact()
    if seen == 0:
        raise ValueError(f"fit() got no training vectors: pass an (n, {dim}) array with n > 0 or a non-empty stream")
    if max_train is not None and pool > max_train:
        compact()
    if thresh == math.inf:  # nothing was dropped: the rows are still in arrival order
        return (xs[0] if len(xs) == 1 else torch.cat(xs)), seen
    return xs[0][order[0].argsort()], seen


class Quantizer(nn.Module, abc.ABC):
    """Base of :class:`ProductQuantizer`, :class:`ResidualQuantizer` and :class:`VectorQuantizer`.

    Subclasses register their codebooks as buffers in ``__init__`` (so a fresh module can ``load_state_dict``),
    implement :meth:`_fit`, :meth:`encode`, :meth:`decode`, :meth:`distance_tables` and :meth:`config`.

    Attributes:
        dim: input vector size D.
        code_len: code entries per vector (PQ: m, RQ: levels, VQ: 1).
        codebook_size: centroids per codebook K; codes are uint8 when K <= 256, else uint16.
        stats: training statistics filled by :meth:`fit` (``n_seen``, ``n_train``, ``distortion`` = mean squared
            L2 reconstruction error per training vector, ``relative_distortion`` = distortion / mean squared norm
            of the centered training vectors, ``fit_seconds``, ...).
        meta: metadata of the file it was loaded from (see :func:`load_codebook`), else ``{}``.
    """

    needs_norms: bool = False

    def __init__(self, *, dim: int, code_len: int, codebook_size: int, max_train: int | None, seed: int) -> None:
        super().__init__()
        for name, v, hi in (("dim", dim, None), ("codebook_size", codebook_size, 65536)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1 or (hi is not None and v > hi):
                raise ValueError(f"{name} must be an int in [1, {hi or 'inf'}], got {v!r}")
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.dim, self.code_len, self.codebook_size = dim, code_len, codebook_size
        self.max_train, self.seed = max_train, seed
        self.stats: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self._fitted = False
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_fitted", True))

    # -- description -------------------------------------------------------------------------------------------
    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8 if self.codebook_size <= 256 else torch.uint16

    @property
    def code_size(self) -> int:
        """Bytes per encoded vector."""
        return self.code_len * (1 if self.codebook_size <= 256 else 2)

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    @property
    def fitted(self) -> bool:
        return self._fitted

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild an empty module of the same shape."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    # -- training ----------------------------------------------------------------------------------------------
    def fit(self, data: ArrayLike | Iterable[ArrayLike]) -> Quantizer:
        """Train on ``(n, dim)`` float vectors, or on an iterable of such batches (streamed; see
        :func:`sample_training`: a seeded uniform sample of at most ``max_train`` rows is kept).

        The module moves to the device of the (first) batch. Deterministic given ``seed``, data and device.
        Returns ``self``.
        """
        t0 = time.perf_counter()
        x, seen = sample_training(data, dim=self.dim, max_train=self.max_train, seed=self.seed)
        self.to(x.device)
        with fp32(x.device), torch.no_grad():
            extra = self._fit(x) or {}
            self._fitted = True
            err = extra.pop("distortion", None)  # subclasses that know it exactly from training save a pass
            err = self._mean_error(x) if err is None else err
            mu = x.mean(0)  # mean squared norm of the centered vectors, in chunks (Tensor.var is slow on CPU)
            energy = sum(float((xs - mu).pow_(2).sum()) for xs in x.split(65536)) / x.shape[0]
        self.stats = {
            "n_seen": seen,
            "n_train": int(x.shape[0]),
            "distortion": err,
            "relative_distortion": err / energy if energy > 0 else 0.0,
            **extra,
            "fit_seconds": round(time.perf_counter() - t0, 3),
        }
        return self

    @abc.abstractmethod
    def _fit(self, x: Tensor) -> dict[str, Any] | None:
        """Fill the buffers from float32 ``(n, dim)`` training rows on the module's device; may return stats,
        among them ``distortion`` if it equals ``mean ||x - decode(encode(x))||^2`` (else :meth:`fit` computes it)."""

    def _mean_error(self, x: Tensor, chunk: int = 65536) -> float:
        total = sum(float((xs - self.decode(self.encode(xs))).pow(2).sum()) for xs in x.split(chunk))
        return total / max(1, x.shape[0])

    # -- coding ------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, x: ArrayLike) -> Tensor:
        """``(n, dim)`` float -> ``(n, code_len)`` codes, uint8 (K <= 256) or uint16."""

    @abc.abstractmethod
    def decode(self, codes: ArrayLike) -> Tensor:
        """``(n, code_len)`` integer codes -> ``(n, dim)`` float32 reconstructions."""

    @abc.abstractmethod
    def distance_tables(self, query: ArrayLike) -> Tensor:
        """``(q, dim)`` float -> ``(q, code_len, codebook_size)`` float32 ADC tables (see the module docstring)."""

    def norms(self, codes: ArrayLike) -> Tensor:
        """Per-vector term of the ADC distance, ``(n,)`` float32: zeros unless ``needs_norms``."""
        return torch.zeros(self._codes(codes).shape[0], device=self.device)

    def adc(self, query: ArrayLike, codes: ArrayLike) -> Tensor:
        """Squared L2 distances ``(q, n)`` float32 from queries to the decoded ``codes``, through the tables."""
        c = self._codes(codes)
        t = self.distance_tables(query)  # (q, L, K)
        d = t[:, torch.arange(self.code_len, device=c.device), c].sum(-1)  # (q, n, L) -> (q, n)
        return d + self.norms(c) if self.needs_norms else d

    def forward(self, x: ArrayLike) -> Tensor:
        """Same as :meth:`encode` (so the module itself can be exported)."""
        return self.encode(x)

    # -- input checks shared by subclasses ------------------------------------------------------------------------
    def _input(self, x: ArrayLike, name: str = "x") -> Tensor:
        self._check_fitted()
        if isinstance(x, np.ndarray):
            return _as_matrix(x, name, self.dim).to(self.device)
        x = _as_matrix(x, name, self.dim)
        if x.device != self.device:
            raise ValueError(
                f"{name} is on {x.device} but the quantizer is on {self.device}: move one of them, "
                f"e.g. quantizer.to({str(x.device)!r})"
            )
        return x

    def _codes(self, codes: ArrayLike) -> Tensor:
        """Codes as int64 ``(n, code_len)`` on the module's device, range-checked."""
        self._check_fitted()
        if isinstance(codes, np.ndarray):
            codes = torch.from_numpy(np.ascontiguousarray(codes).astype(np.int64, copy=False))
        if (
            not isinstance(codes, Tensor)
            or codes.is_floating_point()
            or codes.is_complex()
            or codes.dtype == torch.bool
        ):
            kind = codes.dtype if isinstance(codes, Tensor) else type(codes).__name__
            raise TypeError(f"codes must be an integer array (n, {self.code_len}), got {kind}")
        if codes.dim() != 2 or codes.shape[1] != self.code_len:
            raise ValueError(
                f"codes must be (n, {self.code_len}) for this quantizer, got {tuple(codes.shape)}: "
                "were they produced by another codebook?"
            )
        codes = codes.to(self.device, torch.int64)
        if not exporting() and codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]: "
                "were they produced by another codebook?"
            )
        return codes

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError(
                f"{type(self).__name__} is not trained: call .fit(x) or load one with yolo_vq.quant.load_codebook()"
            )
