"""Draw a benchmark's per-seed scores: one column per mechanism, a dot per seed, the mean with its
standard deviation, and the real-vs-real floor when given.

    python scripts/benchmark_plot.py runs/canvas_study/benchmark.json docs/images/canvas_mechanisms.png \
        --testbed canvas --title "Digits canvas, 1800 steps"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="benchmark.json written by diffit-toolkit benchmark")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--testbed", default="canvas")
    parser.add_argument("--title", default=None)
    parser.add_argument("--floor", type=float, default=None, help="real-vs-real floor to draw")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(args.report.read_text())
    arms = [a for a in report["testbeds"][args.testbed]["mechanisms"].values() if a["n"]]
    arms.sort(key=lambda a: a["mean"])
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, arm in enumerate(arms):
        values = arm["values"]
        ax.scatter([i] * len(values), values, s=14, color="tab:blue", alpha=0.6, zorder=2)
        ax.errorbar(i + 0.18, arm["mean"], yerr=arm["std"], fmt="o", color="black", capsize=3, zorder=3)
    if args.floor is not None:
        ax.axhline(args.floor, color="gray", linestyle="--", label="real-vs-real floor")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels([f"{a['mechanism']}\n({a['params'] / 1e6:.2f} M, n={a['n']})" for a in arms], fontsize=8)
    ax.set_ylabel("FD (lower is better)")
    ax.set_title(args.title or f"{args.testbed}: per-seed FD, mean ± std", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
