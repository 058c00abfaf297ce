"""Partitioned search at scale: build stores of 1M / 10M / 100M detections, then measure search through ``Memory`` and
``yolo-vq search`` against the exact flat scan and FAISS, in one run.

    python benchmarks/search_scale.py --rows 1M 10M          # build what is missing (resumable), then measure
    python benchmarks/search_scale.py --rows 100M --queries 100
    python benchmarks/search_scale.py --clean                # delete the stores
    python benchmarks/search_scale.py --smoke --cache DIR    # seconds, synthetic vectors (the test suite runs it)

The vectors. Base: the default recipe's embeddings of every detection of the real yolo11n-pose on vtest.avi
(imgsz 1280) and bikes.mp4 (imgsz 640, conf 0.05), computed once and cached. Row ``i`` of a store is a *variation*
of a base vector: ``normalize(b + 0.5 * (z @ (s * V)))`` with ``b`` a base vector drawn at random, ``V`` the base
set's top 64 principal axes, ``s`` their standard deviations and ``z ~ N(0, I_64)``: a new sighting spread along
the directions the real data varies in, so lists fill evenly and no two rows share a vector. Each chunk of
``CHUNK`` rows comes from its own seed (chunk number), so a resumed build writes the same rows. Codes: a 32-byte
PQ (256 centroids per sub-space, no rotation) trained on 256k variations; the coarse quantizer (PCA 64, lists
``4 sqrt(N)`` as a power of two, at most what 256k training rows support) likewise. Rows beyond 10M (the 100M store)
are not encoded again: chunk ``c`` takes the codes and lists of chunk ``c mod (10M / CHUNK)`` with 2 of its 32
sub-codes re-drawn at random per row (list kept), under new ids, sources and times. Classes: 10 ids drawn uniformly
(a class filter keeps ~10%); 10 sources (cameras), 20 detections per frame, 10 fps.

The write path: the bulk path ``yolo_vq.index.bulk.BulkWriter``: ``Store.add_frames`` (one transaction per chunk),
each row's list assigned from its float vector (``CoarseQuantizer.assign``, in a worker thread one chunk ahead), the
lists synced every ``BULK_SYNC_EVERY`` rows in a thread of their own and merged at the end. The add rate counts
assignment + store + sync, timed over ``WINDOW`` chunks added back to back and waited for (``ready``): not the
synthetic vectors' generation, their PQ encoding and the ``Detections`` objects holding them, which an indexer's
predict makes, and which are made for a window before it, while none of the writer's work runs.

Stores live in ``$YOLO_VQ_CACHE/search_scale/<rows>/`` (default ``~/.cache/yolo_vq``), never in the repository; each
size's results are written to ``<cache>/search_scale/results.json`` for ``benchmarks/plot_search_scale.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import numpy as np
import torch

CHUNK = 1 << 16  # rows per transaction and per seed
PASSES = 3  # alternating timed passes of ours and the bare engine over the queries
WINDOW = 16  # chunks made ahead (~4.6 GB of float vectors), then added back to back: the timed part of the build
PER_FRAME, FPS, SOURCES, CLASSES = 20, 10.0, 10, 10
ENCODED_UP_TO = 10_000_000  # rows beyond it re-use encoded chunks (see the module docstring)
DB_BYTES_PER_ROW, LIST_BYTES_PER_ROW = 150, 116  # measured at 10M (index.db incl. its indexes; a list row): disk check
KEEP_FREE = 15 << 30


def parse_rows(text: str) -> int:
    mult = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    try:
        n = int(float(text[:-1] if mult > 1 else text) * mult)
    except ValueError:
        n = 0
    if n < 1000:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a row count of at least 1000, e.g. 1M, 10M, 100M")
    return n


def label(rows: int) -> str:
    if rows % 1_000_000 == 0:
        return f"{rows // 1_000_000}M"
    return f"{rows // 1000}k" if rows % 1000 == 0 else str(rows)


def chunk_rows(rows: int, c: int) -> int:
    """Rows of chunk ``c`` of a ``rows`` store (the last one may be short)."""
    return min(CHUNK, rows - c * CHUNK)


# -- the vectors -------------------------------------------------------------------------------------------------------
def real_base(cache: Path) -> np.ndarray:
    """The default recipe's embeddings of every detection in vtest.avi (1280) and bikes.mp4 (640), cached."""
    path = cache / "base_embeddings.npy"
    if path.is_file():
        return np.load(path)
    from ultralytics import YOLO

    from yolo_vq import assets
    from yolo_vq.fit import embeddings_of

    model = YOLO(str(assets.pose_weights()))
    parts = [np.concatenate(list(embeddings_of(model, [assets.vtest_video()], imgsz=1280, conf=0.25))),
             np.concatenate(list(embeddings_of(model, [assets.bikes_video()], imgsz=640, conf=0.05)))]
    x = np.concatenate(parts).astype(np.float32)
    np.save(path, x)
    return x


def synthetic_base(n: int = 3000, dim: int = 64) -> np.ndarray:
    """Smoke runs: low-rank unit vectors (seconds, no model)."""
    g = np.random.default_rng(0)
    x = g.normal(size=(n, 8)) @ g.normal(size=(8, dim)) + 0.3 * g.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Variations:
    """Row vectors as variations of the base set (see the module docstring); ``chunk(c)`` is deterministic."""

    def __init__(self, base: np.ndarray, spread: float = 0.5, axes: int = 64):
        self.base = base
        c = base - base.mean(0)
        _, s, vt = np.linalg.svd(c, full_matrices=False)
        k = min(axes, len(s))
        self.w = (spread * (s[:k, None] / np.sqrt(len(base))) * vt[:k]).astype(np.float32)  # (k, D)

    def chunk(self, c: int, n: int = CHUNK, *, stream: int = 7) -> np.ndarray:
        """Rows of chunk ``c`` of a stream (7: the stores, 8: training samples, 9: queries)."""
        g = np.random.default_rng([stream, c])
        x = self.base[g.integers(0, len(self.base), n)] + g.standard_normal((n, len(self.w)), np.float32) @ self.w
        return x / np.linalg.norm(x, axis=1, keepdims=True)


# -- the codebook ------------------------------------------------------------------------------------------------------
def pq_codebook(root: Path, var: Variations, smoke: bool) -> Path:
    """The PQ every size shares, trained once on 256k variations (``root/pq``)."""
    from yolo_vq.quant import ProductQuantizer, save_codebook

    stem = root / "pq"
    if not stem.with_suffix(".json").is_file():
        x = np.concatenate([var.chunk(i, stream=8) for i in range(1 if smoke else 4)])
        pq = ProductQuantizer(dim=x.shape[1], m=8 if smoke else 32, iters=10 if smoke else 20).fit(x)
        save_codebook(pq, stem, embedding={"bench": "search_scale"}, model_fingerprint="search_scale")
    return stem


def size_codebook(root: Path, rows: int, pq: Path, var: Variations, smoke: bool) -> Path:
    """``pq`` with a coarse quantizer for ``rows`` (``root/<size>_cb``)."""
    from yolo_vq.quant import CoarseQuantizer, save_coarse
    from yolo_vq.quant.coarse import coarse_path

    stem = root / f"{label(rows)}_cb"
    if not coarse_path(stem).is_file():
        for suffix in (".safetensors", ".json"):
            shutil.copyfile(pq.with_name(pq.name + suffix), stem.with_name(stem.name + suffix))
        x = np.concatenate([var.chunk(i, stream=8) for i in range(1 if smoke else 4)])
        lists = int(2 ** round(np.log2(4 * np.sqrt(rows))))
        save_coarse(CoarseQuantizer.fit(x, lists, reduced_dim=16 if smoke else 64, iters=10), stem)
    return stem


# -- building ------------------------------------------------------------------------------------------------------------
def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_disk(path: Path, rows: int, have: int, free: int | None) -> None:
    """Print what the build needs; refuse (exit 2) when it would leave less than 15 GB free."""
    need = (rows - have) * (DB_BYTES_PER_ROW + LIST_BYTES_PER_ROW)
    free = free_bytes(path) if free is None else free
    print(f"{label(rows)}: {have:,} of {rows:,} rows stored; the rest needs ~{need / 1e9:.1f} GB "
          f"(index.db ~{DB_BYTES_PER_ROW} B + lists {LIST_BYTES_PER_ROW} B per row) under {path}, "
          f"{free / 1e9:.1f} GB free", flush=True)
    if free - need < KEEP_FREE:
        print(f"error: building {label(rows)} would leave {(free - need) / 1e9:.1f} GB free, below the 15 GB to keep: "
              f"free space, build a smaller size, or point --cache at a larger disk", file=sys.stderr)
        sys.exit(2)


def make_chunk(st, q, var: Variations, sources: list[int], rows: int, c: int,
               encoded_chunks: int) -> tuple[int, list, np.ndarray | None]:
    """Chunk ``c``'s input, as an indexer's predict hands it over: ``(source id, frames, float vectors or None)``."""
    from yolo_vq import Detections
    from yolo_vq.detections import LIST_ID
    from yolo_vq.index.store import Frame

    n = chunk_rows(rows, c)
    x, lists = None, None
    if c < encoded_chunks:
        x = var.chunk(c, n)
        with torch.no_grad():
            codes = q.encode(torch.from_numpy(x)).numpy()
    else:  # replicate an encoded chunk: 2 sub-codes re-drawn per row, the list kept
        g = np.random.default_rng([11, c])
        rows_c = st.rows(after_id=(c % encoded_chunks) * CHUNK, limit=n, fields=("codes", "list_id"))
        codes, lists = rows_c["codes"].copy(), rows_c["list_id"]
        at = g.integers(0, codes.shape[1], (n, 2))
        codes[np.arange(n)[:, None], at] = g.integers(0, q.codebook_size, (n, 2), dtype=np.uint8)
    g = np.random.default_rng([13, c])
    src = sources[c % SOURCES]
    first_frame = (c // SOURCES) * (CHUNK // PER_FRAME + 1)
    cls, conf = g.integers(0, CLASSES, n), g.uniform(0.25, 1, n).astype(np.float32)
    xy = g.uniform(0, 700, (n, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + 50], 1)
    frames = []
    for j, a in enumerate(range(0, n, PER_FRAME)):
        b = min(a + PER_FRAME, n)
        det = Detections(boxes[a:b], confidence=conf[a:b], class_id=cls[a:b], codes=codes[a:b],
                         track_id=np.arange(b - a) + 100 * (first_frame + j),
                         data={} if lists is None else {LIST_ID: lists[a:b]})
        frames.append(Frame(first_frame + j, (first_frame + j) / FPS, det))
    return src, frames, x


def build(root: Path, rows: int, var: Variations, pq: Path, smoke: bool, free: int | None = None,
          stop_after: int | None = None) -> dict:
    """Build (or resume) the ``rows`` store at ``root/<size>``; returns the build's rates."""
    from tqdm import tqdm

    from yolo_vq.index.bulk import BulkWriter
    from yolo_vq.index.registry import open_store, store_exists
    from yolo_vq.index.store import CodebookBinding, SourceInfo
    from yolo_vq.quant import load_codebook

    path = root / label(rows)
    have = 0
    if store_exists(path):
        with open_store(path, readonly=True) as st:
            have = st.max_id()
    if have % CHUNK and have != rows:
        raise SystemExit(f"error: {path} holds {have} rows, not whole chunks of {CHUNK}: not a store this script "
                         "built; delete it (--clean)")
    check_disk(root, rows, have, free)  # before anything is written
    cb = size_codebook(root, rows, pq, var, smoke)
    binding = CodebookBinding(cb, {"bench": "search_scale"}, "search_scale", {i: f"class{i}" for i in range(CLASSES)})
    with open_store(path, create=True, codebook=binding) as st, BulkWriter(st, load_codebook(st.codebook_path())) as w:
        q = w.keeper.codebook
        sources = [st.add_source(SourceInfo(f"camera{s}", f"search_scale-camera{s}", fps=FPS)).id for s in range(SOURCES)]
        stats_path = path / "build.json"
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {"add_s": 0.0, "encode_s": 0.0,
                                                                                    "rows": 0}
        encoded_chunks = ENCODED_UP_TO // CHUNK
        bar = tqdm(total=rows, initial=have, unit="row", unit_scale=True, desc=f"build {label(rows)}", smoothing=0.05)
        last = -(-rows // CHUNK) if have < rows else 0  # chunks in all (none left when the store is complete)
        todo = [c for c in range(have // CHUNK, last) if stop_after is None or c < stop_after]
        for w0 in range(0, len(todo), WINDOW):
            window = []
            for c in todo[w0:w0 + WINDOW]:  # made first (not timed), then added back to back (timed)
                t0 = time.perf_counter()
                window.append(make_chunk(st, q, var, sources, rows, c, encoded_chunks))
                stats["encode_s"] += time.perf_counter() - t0
            t1 = time.perf_counter()
            for src, frames, x in window:
                w.add(src, frames, vectors=x)  # lists of this chunk assigned while the chunk before is stored
            w.ready()  # ... and all of it inside the timed window: the last lists, the background sync
            stats["add_s"] += time.perf_counter() - t1
            n = sum(len(f.detections) for _, frames, _ in window for f in frames)
            stats["rows"] += n
            stats_path.write_text(json.dumps(stats))
            bar.update(n)
        bar.close()
        t = time.perf_counter()
        w.close()
        stats["add_s"] += time.perf_counter() - t
        stats_path.write_text(json.dumps(stats))
    return stats


# -- measuring -----------------------------------------------------------------------------------------------------------
def rss() -> dict[str, int]:
    """RssAnon and RssFile of this process, bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) * 1024
    return out


def timed(fn, queries) -> tuple[list, np.ndarray]:
    out, ms = [], []
    for q in queries:
        t0 = time.perf_counter()
        out.append(fn(q[None]))
        ms.append((time.perf_counter() - t0) * 1e3)
    return out, np.asarray(ms)


def recall(got: list, truth: list, k: int = 10) -> float:
    return float(np.mean([len(set(g[:k]) & set(t[:k])) / max(min(k, len(t)), 1) for g, t in zip(got, truth)]))


def pct(ms: np.ndarray) -> tuple[float, float]:
    return round(float(np.percentile(ms, 50)), 2), round(float(np.percentile(ms, 99)), 2)


def ids_of(res) -> list[int]:
    return res[0].data["id"].tolist()


def bare_ivf(mem, nprobe: int):
    """FAISS' own IVF engine on our lists and codes: ``IndexIVFPQ`` (by_residual off) holding our PQ centroids and the
    segments' codes per list, searched with our coarse probe through ``search_preassigned``."""
    import faiss

    q, lst = mem.codebook, mem.lists.lists
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatL2(q.dim), q.dim, lst.lists, q.code_size, 8)
    ivf.by_residual = False
    faiss.copy_array_to_vector(q.codebooks.numpy().ravel(), ivf.pq.centroids)
    ivf.is_trained = True
    for seg in lst.segments:
        for li in range(lst.lists):
            a, b = int(seg.offsets[li]), int(seg.offsets[li + 1])
            if b > a:
                ivf.invlists.add_entries(li, b - a, faiss.swig_ptr(np.ascontiguousarray(seg.ids[a:b])),
                                         faiss.swig_ptr(np.ascontiguousarray(seg.codes[a:b])))
    ivf.ntotal = lst.rows
    ivf.nprobe = nprobe

    def search(x):
        probe = q.coarse.probe(x, nprobe)
        return ivf.search_preassigned(x, 10, probe, np.zeros(probe.shape, np.float32))[1][0].tolist()

    return search


def measure(root: Path, rows: int, var: Variations, nq: int, smoke: bool, residual: bool = True) -> dict:
    import faiss
    import torch  # noqa: F401  (its libraries mapped before r0: what a search maps of the index is measured, not them)

    from yolo_vq import Memory
    from yolo_vq.index import ivf, mapped, memory, scan  # noqa: F401
    from yolo_vq.index.ivf import decode_codes

    path = root / label(rows)
    queries = var.chunk(0, nq, stream=9)  # new sightings: variations no store holds
    g = np.random.default_rng(5)
    r0 = rss()
    t0 = time.perf_counter()
    mem = Memory(path, mode="ivf")
    open_s = time.perf_counter() - t0
    info = mem.info()
    stored = np.sort(g.choice(np.arange(1, rows + 1), nq, replace=False))
    own = decode_codes(mem.codebook, mem.store.get(stored.tolist()).codes)
    res: dict = {"rows": rows, "label": label(rows), "open_s": round(open_s, 3), "lists": info["lists"],
                 "segments": info["segments"], "nprobe": info["nprobe"], "calibrated_recall": info["nprobe_recall_at_10"],
                 "disk_bytes_per_detection": info["disk_bytes_per_detection"],
                 "db_bytes_per_detection": round(info["db_bytes"] / rows, 1),
                 "lists_bytes_per_detection": round(info["lists_bytes"] / rows, 1)}
    # ours, at the calibrated nprobe: the first pass over the queries touches their lists' pages of the maps for the
    # first time in this process (page faults, reported as "cold"); timed again warm below, as a long-running process
    # (the server) answers, and as the bare engine answers from codes it holds in its own memory
    _, cold_ms = timed(lambda x: ids_of(mem.search(x, 10)), queries)
    ours_f, ours_f_ms = timed(lambda x: ids_of(mem.search(x, 10, classes=["class3"])), queries)
    by_id, by_id_ms = zip(*[timed(lambda x, i=i: ids_of(mem.search(x, 10, exclude=[int(i)])), own[j:j + 1])
                            for j, i in enumerate(stored)])
    by_id, by_id_ms = [b[0] for b in by_id], np.concatenate(by_id_ms)
    r1 = rss()  # before the bare engine holds its copy of the codes in this process' memory
    bare = bare_ivf(mem, info["nprobe"])
    timed(bare, queries)
    # ours and the bare engine in alternating passes (ours, bare, ours, bare, ours, bare): a drift of the machine
    # over the run (another tenant, frequency) falls on both; each one's latencies are those of all its passes
    passes = [(timed(lambda x: ids_of(mem.search(x, 10)), queries), timed(bare, queries)) for _ in range(PASSES)]
    ours, bare_res = passes[0][0][0], passes[0][1][0]
    ours_ms = np.concatenate([o[1] for o, _ in passes])
    bare_ms = np.concatenate([b[1] for _, b in passes])
    pass_ratios = [float(np.median(o[1]) / np.median(b[1])) for o, b in passes]
    del bare
    # the ground truth: every list scanned (exactly the flat scan's ADC results: tests/index/test_ivf.py), in batches
    truth = [r.data["id"].tolist() for r in mem.search(queries, 10, nprobe="all")]
    truth_f = [r.data["id"].tolist() for r in mem.search(queries, 10, nprobe="all", classes=["class3"])]
    truth_id = [[i for i in r.data["id"].tolist() if i != o][:10]
                for r, o in zip(mem.search(own, 11, nprobe="all"), stored.tolist())]
    _, all_ms = timed(lambda x: mem.search(x, 10, nprobe="all"), queries[: 20 if rows > 2_000_000 else nq])
    mem.close()
    res.update(
        p50_p99_ms=pct(ours_ms), recall=round(recall(ours, truth), 4), cold_p50_p99_ms=pct(cold_ms),
        filtered_p50_p99_ms=pct(ours_f_ms), filtered_recall=round(recall(ours_f, truth_f), 4),
        by_detection_p50_p99_ms=pct(by_id_ms), by_detection_recall=round(recall(by_id, truth_id), 4),
        bare_faiss_ivf_p50_p99_ms=pct(bare_ms), bare_faiss_ivf_recall=round(recall(bare_res, truth), 4),
        ratio_to_bare=round(float(np.median(ours_ms) / np.median(bare_ms)), 3),
        ratio_to_bare_per_pass=[round(r, 3) for r in pass_ratios],
        all_lists_p50_p99_ms=pct(all_ms),
        ram_anon_bytes_per_detection=round((r1["RssAnon"] - r0["RssAnon"]) / rows, 1),
        ram_file_bytes_per_detection=round((r1["RssFile"] - r0["RssFile"]) / rows, 1),
    )
    if rows <= 2_000_000:  # the flat mode (every code in RAM, from index.db): what auto mode uses below FLAT_BELOW
        t0 = time.perf_counter()
        flat = Memory(path, mode="flat")
        flat_open = time.perf_counter() - t0
        timed(lambda x: flat.search(x, 10), queries[:10])
        flat_res, flat_ms = timed(lambda x: ids_of(flat.search(x, 10)), queries)
        flat.close()
        res.update(flat_p50_p99_ms=pct(flat_ms), flat_open_s=round(flat_open, 3),
                   flat_recall=round(recall(flat_res, truth), 4))
    # `yolo-vq search` as a user runs it: a new process (interpreter, imports, open, one query, rows printed)
    cli = []
    for i in stored[: 1 if smoke else 5]:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "yolo_vq.cli", "search", "--index", str(path), "--detection", str(i),
                        "--json"], check=True, capture_output=True, env={**os.environ, "YOLO_OFFLINE": "1"})
        cli.append(time.perf_counter() - t)
    res["cli_search_s_median"] = round(float(np.median(cli)), 3)
    if rows == 1_000_000 and not smoke and residual:
        extra, float_truth = faiss_ivfpq_residual(var, rows, queries, mem_lists=info["lists"])
        res.update(extra, ours_recall_vs_float=round(recall(ours, float_truth), 4),
                   flat_adc_recall_vs_float=round(recall(truth, float_truth), 4))
    res["faiss"] = faiss.__version__
    return res


def faiss_ivfpq_residual(var: Variations, rows: int, queries: np.ndarray, mem_lists: int) -> tuple[dict, list]:
    """FAISS's own ``IVF{n},PQ32`` trained by FAISS (residual codes) on the same vectors: recall@10 against exact
    float search at the nprobe that reaches 0.95 (or all), beside ours against the same float truth."""
    import faiss

    train = var.chunk(0, stream=8)  # 65k vectors, 16 per list (FAISS' k-means at 10 iterations: minutes on 2 cores)
    index = faiss.index_factory(train.shape[1], f"IVF{mem_lists},PQ32")
    faiss.extract_index_ivf(index).cp.niter = 10
    index.train(train)
    best_d = np.full((len(queries), 10), -np.inf, np.float32)
    best_i = np.full((len(queries), 10), -1, np.int64)
    for c in range(rows // CHUNK):
        x = var.chunk(c)
        index.add(x)
        s = queries @ x.T
        part = np.argpartition(-s, 9, axis=1)[:, :10]
        d = np.concatenate([best_d, np.take_along_axis(s, part, 1)], 1)
        i = np.concatenate([best_i, part + c * CHUNK + 1], 1)
        top = np.argsort(-d, axis=1)[:, :10]
        best_d, best_i = np.take_along_axis(d, top, 1), np.take_along_axis(i, top, 1)
    truth = best_i.tolist()
    out = {}
    for nprobe in (16, 32, 64, 128, 256):
        index.nprobe = nprobe
        _, found = index.search(queries, 10)
        r = recall((found + 1).tolist(), truth)
        out[f"faiss_ivfpq_residual_recall_vs_float@nprobe{nprobe}"] = round(r, 4)
        _, ms = timed(lambda x: index.search(x, 10), queries[:50])
        out[f"faiss_ivfpq_residual_p50_ms@nprobe{nprobe}"] = pct(ms)[0]
    return out, truth


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", type=parse_rows, default=None, help="store sizes, e.g. 1M 10M 100M")
    ap.add_argument("--queries", type=int, default=200, help="queries per measurement (default 200)")
    ap.add_argument("--cache", type=Path, default=None, help="where the stores live (default <yolo_vq cache>/search_scale)")
    ap.add_argument("--clean", action="store_true", help="delete the stores (and cached vectors) and exit")
    ap.add_argument("--smoke", action="store_true", help="synthetic vectors, 150k rows: seconds (the test suite)")
    ap.add_argument("--build-only", action="store_true", help="build, do not measure")
    ap.add_argument("--skip-residual", action="store_true",
                    help="keep the FAISS IVF,PQ32 anchor of an earlier run (minutes at 1M) instead of measuring it")
    ap.add_argument("--free-bytes", type=int, default=None, help=argparse.SUPPRESS)  # tests inject the free space
    ap.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop after N chunks
    a = ap.parse_args(argv)
    from yolo_vq import assets

    root = a.cache or assets.cache_dir() / "search_scale"
    if a.clean:
        shutil.rmtree(root, ignore_errors=True)
        print(f"deleted {root}")
        return 0
    root.mkdir(parents=True, exist_ok=True)
    sizes = a.rows or ([150_000] if a.smoke else [1_000_000, 10_000_000])
    var = Variations(synthetic_base() if a.smoke else real_base(root))
    pq = pq_codebook(root, var, a.smoke)
    results_path = root / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    import faiss

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} at "
          f"{torch.get_num_threads()} threads, faiss {faiss.__version__}; base vectors {var.base.shape}")
    for rows in sizes:
        stats = build(root, rows, var, pq, a.smoke, a.free_bytes, a.stop_after)
        if a.build_only or (a.stop_after is not None):
            continue
        res = measure(root, rows, var, a.queries, a.smoke, residual=not a.skip_residual)
        if a.skip_residual:  # the anchor's keys from the earlier run, as they were measured
            res |= {k: v for k, v in results.get(label(rows), {}).items() if "residual" in k or "vs_float" in k}
        res["add_rate_per_s"] = round(stats["rows"] / max(stats["add_s"], 1e-9))
        res["encode_rate_per_s"] = round(stats["rows"] / max(stats["encode_s"], 1e-9))
        results[label(rows)] = res
        results_path.write_text(json.dumps(results, indent=1))
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
