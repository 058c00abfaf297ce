"""Our codebooks vs FAISS at the same bytes per vector, on real detection embeddings.

Embeddings: the default recipe on ``vtest.avi`` with the real ``yolo11n-pose.pt`` at imgsz 1280, from the cached pass
of ``benchmarks/retrieval.py`` (run there first, or this script runs that pass for the default recipe). Codebooks are
trained on the detections of the first half of the frames and evaluated on the second half (training and evaluating
on the same vectors flatters a codebook: PITFALLS 8).

For 8, 16, 32 and 64 bytes per vector, ours (PQ, PQ after a random rotation, OPQ, optionally RQ) vs FAISS
``IndexPQ`` and ``OPQ+PQ``, each trained with ``--seeds`` seeds (mean and range: a single codebook's mAP moves by
about +-0.005 with the seed here):
* recall@10: |ADC top-10 ∩ exact float top-10| / 10, every held-out vector a query against the others;
* MSE: mean squared reconstruction error per vector (sum over dims);
* mAP retention: mAP of ADC search over codes / mAP of exact float search (identity protocol of retrieval.py);
* training time and encode throughput, same run, same thread count.

    pip install -e '.[dev]'          # (faiss-cpu is a core dependency)
    python benchmarks/codebooks.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
# torch and faiss each run an OpenMP pool; busy-waiting workers of one would steal the 2 cores from the other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def load_embeddings(args) -> dict[str, np.ndarray]:
    from retrieval import RECIPES, collect

    from yolo_vq import assets
    from yolo_vq.config import DEFAULT_RECIPE

    cache = args.embeddings or assets.cache_dir() / "retrieval_vtest_1280_all.npz"
    data = dict(np.load(cache)) if cache.is_file() else {}
    if args.embeddings is not None and DEFAULT_RECIPE not in data:
        raise SystemExit(f"error: {cache} holds no default-recipe pass: write one with benchmarks/retrieval.py")
    if DEFAULT_RECIPE not in data:
        print(f"no cached default-recipe pass at {cache}: running it (about 6 min on 2 cores)", file=sys.stderr)
        ns = argparse.Namespace(model=assets.pose_weights(), video=assets.vtest_video(), imgsz=1280, frames=0,
                                threads=args.threads, recipes=[DEFAULT_RECIPE])
        assert DEFAULT_RECIPE in RECIPES
        fresh = collect(ns)
        data = data | fresh if data and np.array_equal(data["frame"], fresh["frame"]) else fresh
        np.savez(cache, **data)
    return {"x": data[DEFAULT_RECIPE].astype(np.float32), "frame": data["frame"], "track": data["track"]}


def knn(dist_fn, n: int, k: int = 10, chunk: int = 256) -> np.ndarray:
    """Top-k (n, k) indices of each row's nearest other rows under ``dist_fn(rows) -> (len(rows), n)``."""
    out = np.empty((n, k), np.int64)
    for s in range(0, n, chunk):
        rows = np.arange(s, min(n, s + chunk))
        d = dist_fn(rows)
        d[np.arange(len(rows)), rows] = np.inf  # not itself
        out[rows] = np.argsort(d, axis=1, kind="stable")[:, :k]
    return out


def full_dist(dist_fn, n: int, chunk: int = 256) -> np.ndarray:
    return np.concatenate([dist_fn(np.arange(s, min(n, s + chunk))) for s in range(0, n, chunk)])


def main() -> None:
    import faiss

    from yolo_vq.config import DEFAULT_RECIPE, load_recipe
    from yolo_vq.metrics import retrieval_scores, valid_queries
    from yolo_vq.quant import ProductQuantizer, ResidualQuantizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bytes", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--gap", type=int, default=30)
    ap.add_argument("--iters", type=int, default=25, help="k-means iterations, both sides")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rq", action="store_true", help="also our residual quantizer (slow; weak with little data)")
    ap.add_argument("--embeddings", type=Path, default=None,
                    help="a pass written by benchmarks/retrieval.py (default: its vtest.avi pass at imgsz 1280)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    d = load_embeddings(args)
    x, frame, track = d["x"], d["frame"], d["track"]
    half = (frame.max() + 1) // 2
    xtr, xte = x[frame < half], x[frame >= half]
    fte, tte = frame[frame >= half], track[frame >= half]
    n, dim = xte.shape
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, faiss "
          f"{faiss.__version__}, {args.threads} threads both sides")
    print(f"vectors: dim {dim}, train {len(xtr)} (frames < {half}), eval {n} (frames >= {half}); "
          f"k-means {args.iters} iterations\n")

    exact = knn(lambda r: ((xte[r, None, :] - xte[None, :, :]) ** 2).sum(-1), n)
    q = valid_queries(tte, fte, args.gap)
    float_map = retrieval_scores(xte[q] @ xte.T, q, tte, fte, args.gap).mAP
    print(f"float embedding mAP (held-out half, {len(q)} queries): {float_map:.3f}\n")

    def ours(make):
        t0 = time.perf_counter()
        qz = make().fit(torch.from_numpy(xtr))
        t_train = time.perf_counter() - t0
        xt = torch.from_numpy(xte)
        big = xt.repeat(max(1, 100_000 // n), 1)
        t0 = time.perf_counter()
        codes_big = qz.encode(big)
        t_enc = time.perf_counter() - t0
        codes = qz.encode(xt)
        mse = float(((qz.decode(codes) - xt) ** 2).sum(1).mean())

        def dist(rows):
            return qz.adc(xt[rows], codes).numpy()

        return t_train, len(codes_big) / t_enc, mse, dist, qz.code_size

    def theirs(factory, seed):
        index = faiss.index_factory(dim, factory)
        index.verbose = False
        for p in ([faiss.downcast_VectorTransform(index.chain.at(0))] if "OPQ" in factory else []):
            p.niter = 10  # as ours (opq_iters=10 rounds of 4 PQ k-means iterations; FAISS' default is 50 rounds)
        pq = faiss.downcast_index(index.index if "OPQ" in factory else index)
        pq.pq.cp.niter = args.iters
        pq.pq.cp.seed = seed
        t0 = time.perf_counter()
        index.train(xtr)
        t_train = time.perf_counter() - t0
        big = np.tile(xte, (max(1, 100_000 // n), 1))
        t0 = time.perf_counter()
        codes_big = index.sa_encode(big)
        t_enc = time.perf_counter() - t0
        codes = index.sa_encode(xte)
        mse = float(((index.sa_decode(codes) - xte) ** 2).sum(1).mean())
        index.add(xte)

        def dist(rows):
            dd, ii = index.search(xte[rows], n)  # ADC over all stored codes
            out = np.empty_like(dd)
            np.put_along_axis(out, ii, dd, axis=1)
            return out

        return t_train, len(codes_big) / t_enc, mse, dist, codes.shape[1]

    # fit_codebook's default (yolo_vq.fit.part_blocks): each stripe's 64 channels, then the whole colour histogram
    recipe = load_recipe(DEFAULT_RECIPE)
    (level,), cnn = recipe.levels, dim - recipe.colour.dim
    cell = cnn // (level.grid[0] * level.grid[1])
    parts = [(a, a + cell) for a in range(0, cnn, cell)] + [(cnn, dim)]
    ProductQuantizer(dim=dim, m=8, iters=2).fit(torch.from_numpy(xtr))  # warm-up: first-call costs out of timings
    faiss.IndexPQ(dim, 8, 8).train(xtr)
    print(f"| bytes | method | recall@10 | MSE | mAP retention (mean, range over {args.seeds} seeds) | train s | "
          "encode vec/s |")
    print("|---|---|---|---|---|---|---|")
    for b in args.bytes:
        if dim % b:
            print(f"| {b} | (dim {dim} not divisible by {b}: skipped) ||||||")
            continue
        arms = [
            # "np": no polysemous training (index_factory's PQ default, a Hamming-order search aid we do not offer)
            ("FAISS PQ", lambda s, b=b: theirs(f"PQ{b}np", s)),
            ("FAISS OPQ+PQ", lambda s, b=b: theirs(f"OPQ{b},PQ{b}np", s)),
            ("ours PQ", lambda s, b=b: ours(lambda: ProductQuantizer(dim=dim, m=b, iters=args.iters, seed=s))),
            ("ours PQ + random rotation", lambda s, b=b: ours(
                lambda: ProductQuantizer(dim=dim, m=b, rotation="random", iters=args.iters, seed=s))),
            ("ours PQ + rotations within recipe parts", lambda s, b=b: ours(
                lambda: ProductQuantizer(dim=dim, m=b, rotation="random", rotation_blocks=parts, iters=args.iters,
                                         seed=s))),
            ("ours OPQ (random init)", lambda s, b=b: ours(
                lambda: ProductQuantizer(dim=dim, m=b, rotation="random", opq=True, iters=args.iters, seed=s))),
        ]
        if args.rq:
            arms.append(("ours RQ", lambda s, b=b: ours(
                lambda: ResidualQuantizer(dim=dim, levels=b, iters=args.iters, seed=s))))
        for name, run in arms:
            rows = []
            for seed in range(args.seeds):
                t_train, enc_rate, mse, dist, size = run(seed)
                assert size == b, (name, size)
                approx = knn(dist, n)
                recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
                m = retrieval_scores(-full_dist(dist, n)[q], q, tte, fte, args.gap).mAP
                rows.append((recall, mse, m / float_map, t_train, enc_rate))
            r = np.asarray(rows)
            mean = r.mean(0)
            print(f"| {b} | {name} | {mean[0]:.3f} | {mean[1]:.4f} | {mean[2]:.3f} ({r[:, 2].min():.3f}.."
                  f"{r[:, 2].max():.3f}) | {mean[3]:.2f} | {mean[4]:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
