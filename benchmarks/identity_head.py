"""Does an identity head learned on the user's own footage find the same person again more often? Float mAP /
Rank-1 / R@10 of the raw recipe embedding, the label-free whitening, the linear head learned from tracks and the
MLP head (a hidden layer trained on top of the linear one), on held-out time.

Protocol (the issue's "honest number"): learn on frames < ``--split`` of the clip only (397: the first half of
vtest.avi), evaluate on frames >= ``--split`` (queries and gallery from the second half only), same metrics as
``benchmarks/retrieval.py`` (tracker ids as identities, the query's own track within +-G frames left out). Each head's
settings (output dims, shrinkage) are chosen without looking at the second half: fitted on the first two thirds of
the training frames, scored on the last third, the best refitted on all training frames. Also "whole video": fit and
evaluate on the whole clip (what a user does: fit on their footage, then search it).

Reads the pass that ``benchmarks/retrieval.py`` saves (run it first; ``--recipe`` must be one it computed):

    python benchmarks/retrieval.py --recipes s4-8stripes-colour-center s4s8-stripes-colour-center
    python benchmarks/identity_head.py
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("YOLO_OFFLINE", "1")

DIMS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)  # output dims as a fraction of the input's (no constant fitted to one model)
SHRINKS = (0.01, 0.1, 1.0)


def scores(x, track, frame, gap, queries=2000):
    from yolo_vq.metrics import cosine_scores, retrieval_scores, valid_queries

    q = valid_queries(track, frame, gap)
    if len(q) > queries:
        q = np.sort(np.random.default_rng(0).choice(q, queries, replace=False))
    return retrieval_scores(cosine_scores(x, q), q, track, frame, gap), q


def main() -> None:
    from yolo_vq import assets
    from yolo_vq.config import DEFAULT_RECIPE
    from yolo_vq.features.head import choose_head
    from yolo_vq.metrics import bootstrap_map

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--video", default="vtest", help="the stem of the clip retrieval.py ran on (default vtest)")
    ap.add_argument("--imgsz", type=int, default=1280)
    ap.add_argument("--recipe", default=DEFAULT_RECIPE)
    ap.add_argument("--split", type=int, default=397, help="first evaluated frame (default 397: vtest's second half)")
    ap.add_argument("--gap", type=int, default=30)
    ap.add_argument("--data", default=None, help="a pass saved by retrieval.py (default: found by --video/--imgsz)")
    args = ap.parse_args()

    path = Path(args.data) if args.data else assets.cache_dir() / f"retrieval_{args.video}_{args.imgsz}_all.npz"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run benchmarks/retrieval.py first (see this script's docstring)")
    data = dict(np.load(path))
    if args.recipe not in data:
        raise SystemExit(f"{path} has no {args.recipe!r}: run retrieval.py --recipes {args.recipe}")
    x, track, frame = data[args.recipe].astype(np.float64), data["track"], data["frame"]
    print(f"{args.video} at imgsz {args.imgsz}, recipe {args.recipe} ({x.shape[1]} dims), {len(x)} detections, "
          f"{len(np.unique(track[track >= 0]))} tracks; G={args.gap}\n")

    train, test = frame < args.split, frame >= args.split
    every = np.ones_like(train)
    for title, fit_on, eval_on in ((f"held-out time: fit on frames < {args.split}, evaluate on frames >= {args.split}",
                                    train, test),
                                   ("whole video: fit and evaluate on every frame", every, every)):
        print(f"### {title}\n")
        print("| embedding | dims | settings (chosen on the fitting frames) | mAP | 95% CI | vs raw | Rank-1 | R@10 | "
              "fit s |")
        print("|---|---|---|---|---|---|---|---|---|")
        raw, q = scores(x[eval_on], track[eval_on], frame[eval_on], args.gap)
        qt = track[eval_on][q]
        lo, hi = bootstrap_map(raw.ap, qt)
        print(f"| raw recipe | {x.shape[1]} | - | {raw.mAP:.3f} | {lo:.3f}..{hi:.3f} | | {raw.rank1:.3f} | "
              f"{raw.recall10:.3f} | |")
        for kind in ("whiten", "tracks", "mlp"):
            t0 = time.perf_counter()
            dims = sorted({max(1, round(f * x.shape[1])) for f in DIMS})
            head, rep = choose_head(x[fit_on], track[fit_on], frame[fit_on], kinds=(kind,), dims=dims,
                                    shrinks=SHRINKS, gap=args.gap)
            took = time.perf_counter() - t0
            s, q2 = scores(head.project(x[eval_on]), track[eval_on], frame[eval_on], args.gap)
            assert np.array_equal(q, q2)
            lo, hi = bootstrap_map(s.ap, qt)
            d_lo, d_hi = bootstrap_map(s.ap, qt, baseline=raw.ap)
            c = rep["chosen"]
            print(f"| head: {kind} | {c['dim']} | shrink {c['shrink']} (validation mAP {rep['validation_map']:.3f}) | "
                  f"{s.mAP:.3f} | {lo:.3f}..{hi:.3f} | {d_lo:+.3f}..{d_hi:+.3f} | {s.rank1:.3f} | {s.recall10:.3f} | "
                  f"{took:.1f} |")
        print()


if __name__ == "__main__":
    main()
