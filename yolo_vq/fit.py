"""Sampled detections -> a trained codebook: the job behind ``yolo-vq fit``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import DEFAULT_RECIPE, EmbedConfig
from .embedder import Embedder
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
    channels, cell-major as :class:`~yolo_vq.embed.BoxEmbedder` writes them), then the whole colour histogram.

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


def fit_codebook(
    model: Any, sources: Sequence[str | Path | int], out: str | Path, *,
    recipe: str | Path | dict | EmbedConfig = DEFAULT_RECIPE, code_bytes: int = 32, codebook_size: int = 256,
    rotation: str | None = "auto", max_train: int = 256_000, seed: int = 0, **kwargs: Any,
) -> tuple[Any, int]:
    """Train a product quantizer of ``code_bytes`` bytes per detection on detections sampled from ``sources``
    and save it to ``out`` (``.safetensors`` + ``.json``). Returns ``(quantizer, vectors seen)``.

    ``rotation``: ``"auto"`` (see :func:`part_blocks`) rotates the channels of each pooled cell among themselves
    and the colour histogram as a whole (the best mAP and recall@10 at 32 bytes in docs/benchmarks.md);
    ``"random"`` rotates all dims together; ``None`` none.

    Raises:
        ValueError: too few detections for ``codebook_size`` centroids (say how many were found).
    """
    from .quant import ProductQuantizer

    emb = Embedder(model, recipe)
    seen = 0

    def batches():
        nonlocal seen
        for b in embeddings_of(model, sources, recipe=recipe, **kwargs):
            seen += len(b)
            yield b

    blocks = None
    if rotation == "auto":
        rotation, blocks = ("random", part_blocks(emb)) if emb.config.mode == "roi" else (None, None)
    pq = ProductQuantizer(dim=emb.dim, m=code_bytes, codebook_size=codebook_size, rotation=rotation,
                          rotation_blocks=blocks, max_train=max_train, seed=seed)
    try:
        pq.fit(batches())
    except ValueError as e:
        raise ValueError(f"found {seen} detections in {[str(s) for s in sources]}, too few to train "
                         f"{codebook_size} centroids: add video, lower --stride or --conf, or --codebook-size ({e})"
                         ) from None
    emb.save_codebook(pq, out)
    return pq, seen
