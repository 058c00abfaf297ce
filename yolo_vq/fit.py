"""Sampled detections -> a trained codebook: the job behind ``yolo-vq fit``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import DEFAULT_RECIPE, EmbedConfig
from .features.embedder import Embedder
from .features.head import HEADS
from .video import open_source

__all__ = ["embeddings_of", "fit_codebook", "part_blocks"]


def embeddings_of(
    model: Any, sources: Sequence[str | Path | int], *, recipe: str | Path | dict | EmbedConfig = DEFAULT_RECIPE,
    stride: int = 1, max_frames: int | None = None, batch: int = 8, progress: bool = True, **predict_args: Any,
) -> Iterator[np.ndarray]:
    """Yield (n, D) float32 embedding batches of the detections in ``sources`` (every ``stride``-th frame)."""
    for emb, _, _ in _detections_of(model, sources, recipe=recipe, stride=stride, max_frames=max_frames, batch=batch,
                                    progress=progress, **predict_args):
        yield emb


def tracked_embeddings(
    model: Any, sources: Sequence[str | Path | int], *, recipe: str | Path | dict | EmbedConfig = DEFAULT_RECIPE,
    stride: int = 1, max_frames: int | None = None, batch: int = 8, progress: bool = True,
    tracker: str = "bytetrack.yaml", **predict_args: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every detection of ``sources`` with ``model.track``: embeddings (n, D) float32, track ids (n,) int64 (-1:
    not tracked; a source's tracks never share an id with another's) and frames (n,) int64 (distinct across
    sources, so only detections of one source's frame count as seen together). What an identity head learns from."""
    parts = list(_detections_of(model, sources, recipe=recipe, stride=stride, max_frames=max_frames, batch=batch,
                                progress=progress, tracker=tracker, **predict_args))
    if not parts:
        return np.zeros((0, Embedder(model, recipe).recipe_dim), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return tuple(np.concatenate(c) for c in zip(*parts))  # type: ignore[return-value]


def _detections_of(
    model: Any, sources: Sequence[str | Path | int], *, recipe: str | Path | dict | EmbedConfig, stride: int,
    max_frames: int | None, batch: int, progress: bool, tracker: str | None = None, **predict_args: Any,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Batches of (embeddings, track ids, frames) as :func:`tracked_embeddings` describes (track ids -1 and the
    frames still distinct across sources without ``tracker``)."""
    from tqdm import tqdm

    emb = Embedder(model, recipe)
    args = {"verbose": False, **predict_args}
    with emb:
        for k, source in enumerate(sources):
            src = open_source(source)
            base = k << 40  # frames and track ids of source k: distinct from every other source's
            try:
                total = src.frame_count // stride if src.frame_count else None
                if max_frames:
                    total = min(total or max_frames, max_frames)
                bar = tqdm(total=total, unit="frame", desc=f"fit {Path(src.uri).name}", disable=not progress)
                for trackers in (getattr(getattr(model, "predictor", None), "trackers", None) or []):
                    trackers.reset()  # a new source starts new tracks
                chunk: list[tuple[int, np.ndarray]] = []

                def run(chunk, base=base, bar=bar):
                    imgs = [img for _, img in chunk]
                    rs = (model.track(imgs, persist=True, tracker=tracker, **args) if tracker
                          else model.predict(imgs, **args))
                    for (n, _), r in zip(chunk, rs):
                        ids = r.boxes.id
                        ids = np.full(len(r.boxes), -1, np.int64) if ids is None else \
                            base + ids.cpu().numpy().astype(np.int64)
                        yield r.vq_embeddings, ids, np.full(len(r.boxes), base + n, np.int64)
                    bar.update(len(chunk))

                for n, (i, _, img) in enumerate(src.frames(stride=stride)):
                    if max_frames and n >= max_frames:
                        break
                    chunk.append((i, img))
                    if len(chunk) == batch:
                        yield from run(chunk)
                        chunk = []
                if chunk:
                    yield from run(chunk)
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


def _learn_head(model: Any, sources: Sequence[str | Path | int], recipe: Any, kind: str, code_bytes: int,
                max_train: int, seed: int, log: Any, kwargs: dict[str, Any]) -> tuple[Any, np.ndarray | None, int]:
    """Track the sources, choose and fit the head (:func:`fit_codebook`'s ``head``); returns ``(head or None, the
    training sample through the head, detections seen)``."""
    import time

    from .features.head import choose_head

    t0 = time.perf_counter()
    x, track, frame = tracked_embeddings(model, sources, recipe=recipe, **kwargs)
    n_tracks = len(np.unique(track[track >= 0]))
    log(f"head: {len(x)} detections in {n_tracks} tracks ({time.perf_counter() - t0:.0f} s tracking)")
    if not len(x):
        return None, None, 0
    d = x.shape[1]
    dims = [m for m in (code_bytes * 2**i for i in range(8)) if m <= min(d, 512)] or [code_bytes]
    t1 = time.perf_counter()
    kinds = HEADS if kind == "auto" else ("none", kind)
    head, report = choose_head(x, track, frame, kinds=kinds, dims=dims)
    if "fallback" in report:
        log(f"head: none ({report['fallback']})")
    else:
        by_kind: dict[str, dict] = {}
        for c in report["candidates"]:
            if "validation_map" in c and c["validation_map"] > by_kind.get(c["kind"], {}).get("validation_map", -1):
                by_kind[c["kind"]] = c
        failed = {c["kind"]: c["error"] for c in report["candidates"] if "error" in c and c["kind"] not in by_kind}
        figures = ", ".join(f"{k} {c['validation_map']:.3f}" + (f" ({c['dim']} dims)" if k != "none" else "")
                            for k, c in by_kind.items())
        why = "".join(f"; {k}: {e}" for k, e in failed.items())
        c = report["chosen"]
        log(f"head: {c['kind']}" + (f", {c['dim']} dims, shrink {c['shrink']}" if c["kind"] != "none" else "")
            + f", chosen by same-track mAP on the last third of the frames ({report['queries']} queries, fitted on "
            f"the first two thirds): {figures}{why} ({time.perf_counter() - t1:.0f} s)")
    if head is not None:
        head.stats = {**head.stats, "detections": len(x), "tracks": int(n_tracks)}
    rng = np.random.default_rng(seed)
    sample = x if len(x) <= max_train else x[np.sort(rng.choice(len(x), max_train, replace=False))]
    return head, (sample if head is None else head.project(sample)), len(x)


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
    lists: int | str | None = "auto", coarse_dim: int = 64, head: str = "none", log: Any = None, **kwargs: Any,
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

    ``head``: an identity head before the codebook (:mod:`yolo_vq.features.head`), learned from the sources' own
    tracks (the detections are then tracked: ``model.track``): ``"auto"`` chooses among none, the label-free
    whitening, the linear head learned from tracks and the MLP on top of it, and their output sizes (multiples of
    ``code_bytes``), by same-track mAP on the last third of the frames (:func:`~yolo_vq.features.head.choose_head`);
    ``"whiten"`` / ``"tracks"`` / ``"mlp"`` choose only that kind's settings (against no head); ``"none"``
    (default): no head, no tracking. The codebook is trained on the head's outputs and saved with the head; ``log``
    (a callable taking a line) hears what was chosen and by which figures. The choice report is in the codebook's
    JSON (``head.stats``) and ``quantizer.stats["head"]``.

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

    dim, pca = emb.dim, None
    if isinstance(code_bytes, int) and code_bytes >= 1 and dim % code_bytes and head == "none":
        # e.g. the colour preset's 432 dims at 32 bytes: PQ splits D into code_bytes equal sub-spaces, so project
        # onto the top principal axes that fit (a few low-variance dims dropped), said in a warning and the stats
        pca = dim // code_bytes * code_bytes
        if pca == 0:
            raise ValueError(f"--bytes {code_bytes} is more than the recipe's {dim} dims: at most {dim} bytes")
        rotation, blocks = ("random" if rotation else None), None  # the recipe's parts do not survive PCA
        warnings.warn(f"recipe {emb.config.name!r} gives {dim} dims, not a multiple of {code_bytes} bytes: the codebook "
                      f"first projects onto the top {pca} principal axes (PCA; the energy kept is in its stats as "
                      f"pca_energy_kept)", UserWarning, stacklevel=2)

    def quantizer(k: int) -> Any:
        return ProductQuantizer(dim=dim, m=code_bytes, codebook_size=k, rotation=rotation, pca_dim=pca,
                                rotation_blocks=blocks, max_train=max_train, seed=seed)

    if head not in ("none", "auto", *HEADS):
        raise ValueError(f"head must be one of none, auto, {', '.join(h for h in HEADS if h != 'none')}, got "
                         f"{head!r}")
    if lists is not None and lists != 0:
        supported_lists(2, lists)  # checks the option before any video is read
    pq = quantizer(codebook_size)  # checks the options before any video is read

    def plain() -> tuple[np.ndarray | None, int]:
        # the bounded uniform sample ProductQuantizer.fit keeps (at most max_train rows, seeded), drawn here so the
        # codebook size can follow it; fit() on it keeps every row in order, so the codebook is what fit(stream)
        # gives
        try:
            return sample_training(batches(), dim=emb.dim, max_train=max_train, seed=seed)
        except ValueError:
            if seen or not read_all:  # a bad batch or option, not an empty stream
                raise
            return None, seen

    learned = None
    if head != "none":
        learned, x, seen = _learn_head(model, sources, recipe, head, code_bytes, max_train, seed, log or print,
                                       kwargs)
        if learned is not None:
            dim, rotation, blocks = learned.dim, "random", None  # the head's dims are no longer the recipe's parts
            pq = quantizer(codebook_size)
        elif _supported_size(0 if x is None else len(x), codebook_size, min_codebook_size) != codebook_size:
            # no head, and the tracker (which drops boxes below its own score thresholds) kept too few detections
            # for the codebook asked for: train it on every detection, as without --track
            (log or print)(f"head: the tracker kept {0 if x is None else len(x)} detections, too few for "
                           f"--codebook-size {codebook_size}: the codebook is trained on the untracked detections")
            seen = 0
            x, seen = plain()
    else:
        x, seen = plain()
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
    if learned is not None:
        pq.head = learned
        pq.stats["head"] = learned.stats
    if reason is not None:
        pq.stats["codebook_size_requested"] = codebook_size
        pq.stats["codebook_size_reason"] = reason
    emb.save_codebook(pq, out)
    if lists is not None and lists != 0:
        from .quant import CoarseQuantizer, save_coarse

        save_coarse(CoarseQuantizer.fit(x, lists, reduced_dim=coarse_dim, seed=seed), out)
    return pq, seen
