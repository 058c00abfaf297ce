"""Plot ``benchmarks/search_scale.py``'s results: top-10 latency against stored detections.

    python benchmarks/plot_search_scale.py                                   # the default results file
    python benchmarks/plot_search_scale.py --results R.json --out docs/search_scale.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def plot(results: dict, out: Path) -> Path:
    """Latency (p50, p99 as a bar) of the flat scan, ours at the calibrated nprobe and FAISS' IVF engine on the same
    lists, log-log, with recall@10 against the flat scan written at each of our points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = sorted(results.values(), key=lambda r: r["rows"])
    if not rows:
        raise ValueError("no results to plot: run benchmarks/search_scale.py first")
    n = [r["rows"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    arms = [("all_lists_p50_p99_ms", "every code scanned (exact ADC, the flat scan's results)", "tab:gray", "s"),
            ("p50_p99_ms", "yolo_vq lists, calibrated nprobe", "tab:blue", "o"),
            ("filtered_p50_p99_ms", "yolo_vq lists + 10% class filter", "tab:cyan", "v"),
            ("bare_faiss_ivf_p50_p99_ms", "FAISS IVF engine, same lists and codes", "tab:orange", "^")]
    for key, name, colour, marker in arms:
        pts = [(x, r[key]) for x, r in zip(n, rows) if key in r]
        if not pts:
            continue
        xs, v = zip(*pts)
        p50 = [p[0] for p in v]
        p99 = [p[1] for p in v]
        ax.errorbar(xs, p50, yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p99)]], label=f"{name} (p50, bar to p99)",
                    color=colour, marker=marker, capsize=3)
    for j, (x, r) in enumerate(zip(n, rows)):
        last = j == len(rows) - 1 and len(rows) > 1  # the last label goes left of its point, inside the axes
        ax.annotate(f"recall {r['recall']:.2f}\nnprobe {r['nprobe']}/{r['lists']}", (x, r["p50_p99_ms"][0]),
                    textcoords="offset points", xytext=(-70 if last else 6, -24), fontsize=7, color="tab:blue")
    ax.axhline(20, color="tab:red", lw=0.8, ls="--")
    ax.text(n[0], 21, "20 ms", color="tab:red", fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("stored detections")
    ax.set_ylabel("top-10 search, ms (one query)")
    ax.set_title("Search latency vs index size (2-core CPU; recall@10 vs the flat scan)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    from yolo_vq import assets

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=assets.cache_dir() / "search_scale" / "results.json")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "search_scale.png")
    a = ap.parse_args(argv)
    print(plot(json.loads(a.results.read_text()), a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
