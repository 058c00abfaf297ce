"""Sampled detections -> a trained codebook: the job behind ``yolo-vq fit``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import DEFAULT_RECIPE, EmbedConfig
from .features.embedder import Embedder
from .video import open_source

__all__ = ["embeddings_of", "fit_codebook", "part_blocks"]


def embeddings_of(
    model: Any, sources: Sequence[str | Path | int], *, recipe: str | Path | dict | EmbedConfig = DEFAULT_RECIPE,
    stride: int = 1, max_frames: int | None = None, batch: int = 8, progress: bool = True, **predict_args: Any,
) -> Iterator[np.ndarray]:
    """Yield (n, D) float32 embedding batches of the detections in ``sources`` (every ``stride``-th frame)."""
    from tqdm import tqdm

    emb = Embedder(model, recipe)
    args = {"verbose": False, **predict_args}
    with emb:
        for source in sources:
            src = open_source(source)
            try:
                total = src.frame_count // stride if src.frame_count else None
                if max_frames:
                    total = min(total or max_frames, max_frames)
                bar = tqdm(total=total, unit="frame", desc=f"fit {Path(src.uri).name}", disable=not progress)
                chunk = []
                for n, (_, _, img) in enumerate(src.frames(stride=stride)):
                    if max_frames and n >= max_frames:
                        break
                    chunk.append(img)
                    if len(chunk) == batch:
                        yield np.concatenate([r.vq_embeddings for r in model.predict(chunk, **args)])
                        bar.update(len(chunk))
                        chunk = []
                if chunk:
                    yield np.concatenate([r.vq_embeddings for r in model.predict(chunk, **args)])
                    bar.update(len(chunk))
                bar.close()
            finally:
                src.close()


def part_blocks(emb: Embedder) -> list[tuple[int, int]]:
    """The ``roi`` embedding's layout as ``(start, stop)`` dim ranges: one per pooled cell of each level (its C
    channels, cell-major as :class:`~yolo_vq.features.pool.BoxEmbedder` writes them), then the whole colour histogram.

    Product quantizers rotate each range among itself: channels of one location mix (dense features spread evenly
    over sub-spaces) without mixing locations, and the sparse histogram bins mix across the box."""
    blocks, start = [], 0
    for tap, level in zip(emb.taps, emb.config.levels):
        for _ in range(level.grid[0] * level.grid[1]):
            blocks.append((start, start + tap.channels))
            start += tap.channels
    if emb.config.colour is not None:
        blocks.append((start, start + emb.config.colour.dim))
    return blocks


def _supported_size(n: int, requested: int, floor: int) -> int | None:
    """The codebook size to train on ``n`` vectors: ``requested`` if ``n >= requested`` (the PQ rule:
    ``ProductQuantizer._fit`` and :func:`~yolo_vq.quant.kmeans` need at least as many training rows as centroids),
    else the largest power of two ``<= n``, or None below ``min(floor, requested)``."""
    if n >= requested:
        return requested
    size = 1 << (n.bit_length() - 1) if n > 0 else 0
    return size if size >= min(floor, requested) else None


def _options(kwargs: dict[str, Any]) -> str:
    """The sampling options in force, as CLI flags (for messages)."""
    opts = [f"--conf {kwargs.get('conf', 0.25)}", f"--stride {kwargs.get('stride', 1)}"]
    if kwargs.get("max_frames"):
        opts.append(f"at most {kwargs['max_frames']} frames per source")
    return ", ".join(opts)


def fit_codebook(
    model: Any, sources: Sequence[str | Path | int], out: str | Path, *,
    recipe: str | Path | dict | EmbedConfig = DEFAULT_RECIPE, code_bytes: int = 32, codebook_size: int = 256,
    min_codebook_size: int = 16, rotation: str | None = "auto", max_train: int = 256_000, seed: int = 0,
    lists: int | str | None = "auto", coarse_dim: int = 64, **kwargs: Any,
) -> tuple[Any, int]:
    """Train a product quantizer of ``code_bytes`` bytes per detection on detections sampled from ``sources``
    and save it to ``out`` (``.safetensors`` + ``.json``). Returns ``(quantizer, vectors seen)``.

    ``rotation``: ``"auto"`` (see :func:`part_blocks`) rotates the channels of each pooled cell among themselves
    and the colour histogram as a whole (the best mAP and recall@10 at 32 bytes in docs/benchmarks.md);
    ``"random"`` rotates all dims together; ``None`` none.

    ``lists``: also train the coarse quantizer of partitioned search on the same sample
    (:class:`~yolo_vq.quant.coarse.CoarseQuantizer`, PCA to ``coarse_dim`` then k-means; ``"auto"``: as many lists as
    the sample supports, see :func:`~yolo_vq.quant.coarse.supported_lists`), saved beside the codebook as
    ``<out>.coarse.safetensors``; ``0`` or None: none (indexes made with it are searched flat).

    ``codebook_size`` is what the data supports: PQ training needs at least as many vectors as centroids, so with
    fewer detections (after the ``max_train`` sample) it drops to the largest power of two that fits, down to
    ``min_codebook_size``, with a ``UserWarning``; the quantizer's ``stats`` (saved in the JSON) then hold
    ``codebook_size_requested`` and ``codebook_size_reason``, its config the size used. Codes stay uint8 (for sizes
    up to 256), so the bytes per detection do not change.

    Raises:
        ValueError: too few detections even for ``min_codebook_size`` centroids (says how many were found and
            which options give more).
    """
    from .quant import ProductQuantizer
    from .quant.base import sample_training
    from .quant.coarse import supported_lists

    if not isinstance(min_codebook_size, int) or min_codebook_size < 1:
        raise ValueError(f"min_codebook_size must be a positive int, got {min_codebook_size!r}")
    emb = Embedder(model, recipe)
    seen, read_all = 0, False
    names = [str(s) for s in sources]

    def batches():
        nonlocal seen, read_all
        for b in embeddings_of(model, sources, recipe=recipe, **kwargs):
            seen += len(b)
            yield b
        read_all = True

    blocks = None
    if rotation == "auto":
        rotation, blocks = ("random", part_blocks(emb)) if emb.config.mode == "roi" else (None, None)

    def quantizer(k: int) -> Any:
        return ProductQuantizer(dim=emb.dim, m=code_bytes, codebook_size=k, rotation=rotation,
                                rotation_blocks=blocks, max_train=max_train, seed=seed)

    if lists is not None and lists != 0:
        supported_lists(2, lists)  # checks the option before any video is read
    pq = quantizer(codebook_size)  # checks the options before any video is read
    # the bounded uniform sample ProductQuantizer.fit keeps (at most max_train rows, seeded), drawn here so the
    # codebook size can follow it; fit() on it keeps every row in order, so the codebook is what fit(stream) gives
    try:
        x, seen = sample_training(batches(), dim=emb.dim, max_train=max_train, seed=seed)
    except ValueError:
        if seen or not read_all:  # a bad batch or option, not an empty stream
            raise
        x = None
    n = 0 if x is None else int(x.shape[0])
    size = _supported_size(n, codebook_size, min_codebook_size)
    if size is None:
        floor = min(min_codebook_size, codebook_size)
        last = (f", or pass --codebook-size {1 << (n.bit_length() - 1)} (a weak codebook)" if n else
                " (none at all: check the source and --classes)")
        raise ValueError(
            f"found {seen} detections in {names} ({_options(kwargs)}), too few to train a codebook: PQ needs at least "
            f"as many as its centroids, here {floor} at the least: add video, lower --stride or --conf, or raise "
            f"--max-frames (fit) / --fit-frames (index){last}"
        )
    reason = None
    if size != codebook_size:
        asked, pq = pq.code_size, quantizer(size)
        same = (f"still {pq.code_size} B per detection" if asked == pq.code_size else
                f"{pq.code_size} B per detection instead of {asked}")
        reason = (f"found {seen} detections in {names} ({_options(kwargs)}), too few for --codebook-size "
                  f"{codebook_size} (PQ needs at least as many as its centroids): trained {size} centroids per "
                  f"sub-space ({same}); more video or a lower --stride or --conf gives a better codebook")
        warnings.warn(reason, UserWarning, stacklevel=2)
    pq.fit(x)
    pq.stats["n_seen"] = seen  # fit() saw only the sample
    if reason is not None:
        pq.stats["codebook_size_requested"] = codebook_size
        pq.stats["codebook_size_reason"] = reason
    emb.save_codebook(pq, out)
    if lists is not None and lists != 0:
        from .quant import CoarseQuantizer, save_coarse

        save_coarse(CoarseQuantizer.fit(x, lists, reduced_dim=coarse_dim, seed=seed), out)
    return pq, seen
