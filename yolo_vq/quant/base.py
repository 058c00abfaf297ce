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
import inspect
import math
import time
from collections.abc import Iterable
from typing import Any, ClassVar, TypedDict

import numpy as np
import torch
from torch import Tensor, nn

from ._tensor import as_tensor, exporting, fp32
from .kmeans import KMeansResult, check_init, kmeans

__all__ = ["KMeansSettings", "Quantizer", "sample_training"]

ArrayLike = Tensor | np.ndarray


class KMeansSettings(TypedDict, total=False):
    """The training keywords every quantizer takes (defaults and meaning: :class:`Quantizer`)."""

    iters: int
    tol: float
    init: str
    max_train: int | None
    seed: int


KMEANS_SETTINGS: tuple[str, ...] = tuple(KMeansSettings.__annotations__)  # in config() order, after a class's own


def _as_matrix(x: Any, name: str, dim: int) -> Tensor:
    """``x`` as a float32 ``(n, dim)`` tensor on its own device (numpy -> cpu)."""
    x = as_tensor(x, name, f"(n, {dim})")
    if not exporting() and (x.dim() != 2 or x.shape[1] != dim):  # shapes are fixed by the graph when exporting
        raise ValueError(
            f"{name} must be (n, {dim}), got {tuple(x.shape)}: this quantizer was built for dim={dim}; "
            "pass vectors of that size or build/load a quantizer for yours"
        )
    return x


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

    Subclasses take their own keyword-only constructor arguments plus ``**settings`` (:class:`KMeansSettings`),
    passed on to this constructor; register their codebooks as buffers in ``__init__`` (so a fresh module can
    ``load_state_dict``); and implement :meth:`_fit`, :meth:`_encode`, :meth:`_decode` and :meth:`_distance_tables`
    (+ :meth:`_norms` when ``needs_norms``) on tensors that the public methods here have already checked.

    Args (training settings, the same for every quantizer):
        iters, tol, init: k-means settings (see :func:`yolo_vq.quant.kmeans`).
        max_train: rows sampled for training (bottom-k reservoir over the stream; None keeps all).
        seed: seeds sampling and k-means initialisation.

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
    #: :meth:`config`'s keys: the subclass constructor's keyword-only arguments, then :data:`KMEANS_SETTINGS`.
    config_keys: ClassVar[tuple[str, ...]] = KMEANS_SETTINGS

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
        cls.config_keys = (*own, *(k for k in KMEANS_SETTINGS if k not in own))

    def __init__(
        self,
        *,
        dim: int,
        code_len: int,
        codebook_size: int,
        iters: int = 25,
        tol: float = 1e-4,
        init: str = "auto",
        max_train: int | None = 256_000,
        seed: int = 0,
        **unexpected: Any,
    ) -> None:
        if unexpected:  # reached through a subclass's **settings: name the subclass, as Python would
            name = next(iter(unexpected))
            raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword argument {name!r}")
        super().__init__()
        for name, v, hi in (("dim", dim, None), ("codebook_size", codebook_size, 65536)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1 or (hi is not None and v > hi):
                raise ValueError(f"{name} must be an int in [1, {hi or 'inf'}], got {v!r}")
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        check_init(init)
        self.dim, self.code_len, self.codebook_size = dim, code_len, codebook_size
        self.iters, self.tol, self.init, self.max_train, self.seed = iters, tol, init, max_train, seed
        self.stats: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self.coarse: Any = None  # the attached CoarseQuantizer (IVF lists), set by load_codebook when the file has one
        # the identity head (yolo_vq.features.head.Head) whose outputs this codebook encodes, or None: attached as a
        # sub-module, so its tensors travel with the codebook's (state_dict, .to(device), the file's checksum)
        self.head: Any = None
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
    def input_dim(self) -> int:
        """Length of the vectors the embedder hands this codebook: the head's input where it has one, else ``dim``
        (the head maps them to the ``dim`` this quantizer encodes)."""
        return self.dim if self.head is None else self.head.dim_in

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    @property
    def fitted(self) -> bool:
        return self._fitted

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild an empty module of the same shape (``cls(**config())``; what a
        codebook file stores as ``quantizer.params``)."""
        return {k: getattr(self, k) for k in self.config_keys}

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
        if x.shape[0] < self.codebook_size:
            raise ValueError(
                f"training needs at least codebook_size={self.codebook_size} vectors, got {x.shape[0]}: "
                "pass more data or lower codebook_size"
            )
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
        """Fill the buffers from float32 ``(n, dim)`` training rows (``n >= codebook_size``) on the module's device;
        may return stats, among them ``distortion`` if it equals ``mean ||x - decode(encode(x))||^2`` (else
        :meth:`fit` computes it)."""

    def _kmeans(self, x: Tensor, **overrides: Any) -> KMeansResult:
        """:func:`kmeans` of ``codebook_size`` centroids with this quantizer's settings, some overridden."""
        settings = {"iters": self.iters, "tol": self.tol, "init": self.init, "seed": self.seed, **overrides}
        return kmeans(x, self.codebook_size, **settings)

    def _mean_error(self, x: Tensor, chunk: int = 65536) -> float:
        total = sum(float((xs - self.decode(self.encode(xs))).pow(2).sum()) for xs in x.split(chunk))
        return total / max(1, x.shape[0])

    # -- coding: the public methods check and convert their inputs, the subclass hooks compute -------------------
    def encode(self, x: ArrayLike, **options: Any) -> Tensor:
        """``(n, dim)`` float (numpy or torch) -> ``(n, code_len)`` codes, uint8 (K <= 256) or uint16.
        ONNX-exportable. ``options`` go to the subclass (e.g. ``beam_size`` of the residual quantizer)."""
        x = self._input(x)
        with fp32(x.device):
            return self._encode(x, **options).to(self.code_dtype)

    def decode(self, codes: ArrayLike) -> Tensor:
        """``(n, code_len)`` integer codes (numpy or torch) -> ``(n, dim)`` float32 reconstructions."""
        return self._decode(self._codes(codes))

    def distance_tables(self, query: ArrayLike) -> Tensor:
        """``(q, dim)`` float -> ``(q, code_len, codebook_size)`` float32 ADC tables (see the module docstring)."""
        q = self._input(query, "query")
        with fp32(q.device):
            return self._distance_tables(q)

    def norms(self, codes: ArrayLike) -> Tensor:
        """Per-vector term of the ADC distance, ``(n,)`` float32: zeros unless ``needs_norms``."""
        return self._norms(self._codes(codes))

    def adc(self, query: ArrayLike, codes: ArrayLike) -> Tensor:
        """Squared L2 distances ``(q, n)`` float32 from queries to the decoded ``codes``, through the tables."""
        c = self._codes(codes)
        t = self.distance_tables(query)  # (q, L, K)
        d = t[:, torch.arange(self.code_len, device=c.device), c].sum(-1)  # (q, n, L) -> (q, n)
        return d + self._norms(c) if self.needs_norms else d

    @abc.abstractmethod
    def _encode(self, x: Tensor) -> Tensor:
        """float32 ``(n, dim)`` on the module's device, autocast off -> ``(n, code_len)`` integer codes."""

    @abc.abstractmethod
    def _decode(self, codes: Tensor) -> Tensor:
        """int64 ``(n, code_len)`` codes in range, on the module's device -> ``(n, dim)`` float32."""

    @abc.abstractmethod
    def _distance_tables(self, query: Tensor) -> Tensor:
        """float32 ``(q, dim)`` on the module's device, autocast off -> ``(q, code_len, codebook_size)`` float32."""

    def _norms(self, codes: Tensor) -> Tensor:
        """int64 ``(n, code_len)`` checked codes -> ``(n,)`` float32; zeros unless ``needs_norms``."""
        return torch.zeros(codes.shape[0], device=self.device)

    def forward(self, x: ArrayLike) -> Tensor:
        """Same as :meth:`encode` (so the module itself can be exported)."""
        return self.encode(x)

    # -- input checks: the only place where the coding methods' inputs are converted -----------------------------
    def _input(self, x: ArrayLike, name: str = "x") -> Tensor:
        """Vectors as float32 ``(n, dim)`` on the module's device: numpy is copied there, a tensor elsewhere is an
        error (no hidden transfer)."""
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
        codes = as_tensor(codes, "codes", f"(n, {self.code_len})", codes=True)
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
