"""Write the learning curve of a `diffit-toolkit ablate` run on the digits canvas as a CSV and a PNG.

Usage (after ``OMP_NUM_THREADS=1 diffit-toolkit ablate recipes/benchmark/curve.yaml``):

    python scripts/benchmark_curve.py runs/benchmark_curve docs/images/benchmark_curve

One row per evaluated step: the training CPU-seconds up to that step (the run's measured training
CPU time, pro rata by step), the FD, the real-vs-real floor, their ratio and the copy ratio.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def curve_rows(out: Path) -> list[dict]:
    rows = []
    for result in sorted(out.glob("*/seed_*/result.json")):
        data = json.loads(result.read_text())
        final = max(r["step"] for r in data["rows"])
        for r in sorted(data["rows"], key=lambda r: r["step"]):
            rows.append({"recipe": r["recipe"], "seed": r["seed"], "step": r["step"],
                         "train_cpu_seconds": r["train_cpu_seconds"] * r["step"] / final,
                         "fd": r["fd"], "floor": r["floor"], "fd_over_floor": r["fd"] / r["floor"],
                         "copy_ratio": r.get("copy_ratio", float("nan")), "num_images": r["num_images"]})
    if not rows:
        raise SystemExit(f"no finished runs (result.json) under {out}: run `diffit-toolkit ablate` first")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the ablate output folder")
    parser.add_argument("stem", type=Path, help="write STEM.csv and STEM.png")
    parser.add_argument("--glyph-ceiling", type=float, default=None,
                        help="FD / floor of a trained 8x8 digits model's samples pasted on canvases (a reference line)")
    args = parser.parse_args()
    rows = curve_rows(args.out)
    args.stem.parent.mkdir(parents=True, exist_ok=True)
    with args.stem.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (recipe, seed) in sorted({(r["recipe"], r["seed"]) for r in rows}):
        mine = [r for r in rows if (r["recipe"], r["seed"]) == (recipe, seed)]
        ax.plot([r["train_cpu_seconds"] / 60 for r in mine], [r["fd_over_floor"] for r in mine], marker="o",
                label=f"{recipe} (seed {seed})")
        for r in mine:
            ax.annotate(f"{r['step']}", (r["train_cpu_seconds"] / 60, r["fd_over_floor"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.axhline(1.0, color="gray", linestyle="--", label="real-vs-real floor")
    ax.axhline(1.5, color="gray", linestyle=":", label="1.5 x floor")
    if args.glyph_ceiling:
        ax.axhline(args.glyph_ceiling, color="tab:green", linestyle="-.",
                   label="8x8 digits model, pasted (glyph quality)")
    ax.set_yscale("log")
    ax.set_xlabel("training CPU-minutes (one thread; labels: step)")
    ax.set_ylabel("FD / real-vs-real floor (log scale)")
    ax.set_title("Digits canvas, default preset (U-shaped DiffiT, TMSA in 4x4 windows, batch 64)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.stem.with_suffix(".png"), dpi=110)
    print(f"wrote {args.stem.with_suffix('.csv')} and {args.stem.with_suffix('.png')}")


if __name__ == "__main__":
    main()
