"""Guidance sweeps: sample one checkpoint at several classifier-free guidance scales and score each.

Papers report the best FID over guidance scales; users need the whole curve, because guidance
trades sample quality and class fidelity against diversity.
[`guidance_sweep`][diffit_toolkit.eval.sweep.guidance_sweep] draws the same
noise and labels at every scale (only the scale changes), scores the images with any *judge* (a
callable ``(images, labels) -> dict of numbers``) and returns one row per scale;
[`plot_guidance_sweep`][diffit_toolkit.eval.sweep.plot_guidance_sweep] draws the trade-off curve
(one line per setting, one point per scale).

The judges: [`digits_judge`][diffit_toolkit.eval.sweep.digits_judge],
[`shapes_judge`][diffit_toolkit.eval.sweep.shapes_judge] and
[`canvas_judge`][diffit_toolkit.eval.sweep.canvas_judge] (the offline class-accuracy + Frechet
distance metrics of the embedded data sets, with their real-vs-real floor and copy check) and
[`inception_judge`][diffit_toolkit.eval.sweep.inception_judge] (FID / IS against a
reference, local Inception weights).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

#: A judge scores images (float [-1, 1] NCHW) with their requested labels; returns named numbers.
Judge = Callable[[torch.Tensor, "torch.Tensor | None"], dict[str, float]]


#: Largest guidance scale a sweep takes (the range of a recipe's ``sample.guidance_scale``).
MAX_GUIDANCE_SCALE = 1e4


def parse_scales(text: str) -> list[float]:
    """``"1,1.5,2"`` -> ``[1.0, 1.5, 2.0]``; a one-line ``ValueError`` for anything else."""
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"guidance scales are comma-separated numbers, e.g. 1,1.5,2,3; got '{text}'") from None
    if not scales or any(s < 0 or not math.isfinite(s) or s > MAX_GUIDANCE_SCALE for s in scales):
        raise ValueError(f"guidance scales must be finite numbers >= 0 and at most {MAX_GUIDANCE_SCALE:g} (the "
                         f"recipe's range), e.g. 1,1.5,2,3; got '{text}'")
    return scales


def guidance_sweep(generator: Any, scales: Sequence[float], sample: Any, num_images: int, judge: Judge, *,
                   seed: int = 0, batch_size: int = 256, log: Callable[[str], None] | None = None,
                   progress: Callable[[int, int, str], None] | None = None) -> list[dict[str, float]]:
    """Score ``num_images`` samples of ``generator`` at every guidance scale.

    Args:
        generator: a [`Pipeline`][diffit_toolkit.inference.pipeline.Pipeline] (a loaded checkpoint).
        scales: guidance scales (1: the plain conditional model).
        sample: the [`SampleSection`][diffit_toolkit.recipe.SampleSection] to sample with; only
            ``guidance_scale`` changes between the rows.
        num_images: samples per scale (classes cycled).
        judge: ``(images, labels) -> {metric: value}``.
        seed: sampling seed, the same at every scale (same noise, same labels).
        batch_size: images per forward batch.
        log: called with one line per scale.
        progress: called as ``progress(done, num_images, "sampling at guidance <scale>")`` after every batch.

    Returns:
        one dict per scale: ``guidance_scale``, the judge's numbers, ``sample_seconds``.
    """
    rows = []
    for scale in scales:
        settings = sample.model_copy(update={"guidance_scale": float(scale)})
        started = time.perf_counter()
        tick = None if progress is None else (lambda done, s=scale: progress(done, num_images, f"sampling at guidance {s:g}"))
        images, labels = generator.sample(num_images, settings, batch_size=batch_size, seed=seed, progress=tick)
        seconds = time.perf_counter() - started
        row = {"guidance_scale": float(scale), **judge(images, labels), "sample_seconds": seconds}
        rows.append(row)
        if log is not None:
            log(format_row(row))
    return rows


def format_row(row: dict[str, float]) -> str:
    """One line per scale for the terminal."""
    parts = [f"guidance {row['guidance_scale']:g}:"]
    for key, value in row.items():
        if key in ("guidance_scale", "sample_seconds", "num_images", "num_samples", "num_given"):
            continue
        if key == "accuracy":
            parts.append(f"accuracy {100 * value:.1f}%")
        else:
            parts.append(f"{key} {value:.4g}")
    return "  ".join(parts)


def best_row(rows: Sequence[dict[str, float]], key: str = "fd") -> dict[str, float]:
    """The row with the lowest ``key`` (the paper convention: best FID over scales)."""
    finite = [r for r in rows if key in r and math.isfinite(r[key])]
    if not finite:
        raise ValueError(f"no row has a finite '{key}'")
    return min(finite, key=lambda r: r[key])


def write_sweep_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Rows as CSV (columns: the union of the rows' keys, in first-seen order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def plot_guidance_sweep(curves: dict[str, Sequence[dict[str, float]]], path: str | Path, *, x: str = "accuracy",
                        y: str = "fd", floor: float | None = None, title: str | None = None) -> Path:
    """The trade-off plot: ``y`` (e.g. FD, log scale) against ``x`` (e.g. class accuracy), one line
    per setting in ``curves``, each point labelled with its guidance scale."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"accuracy": "class accuracy of samples (%)", "fd": "Frechet distance (log scale, lower is better)",
              "fid": "FID (log scale, lower is better)", "is_mean": "Inception Score (higher is better)"}
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for name, rows in curves.items():
        xs = [(100 * r[x] if x == "accuracy" else r[x]) for r in rows]
        ys = [(100 * r[y] if y == "accuracy" else r[y]) for r in rows]
        (line,) = ax.plot(xs, ys, marker="o", label=name)
        for r, xv, yv in zip(rows, xs, ys):
            ax.annotate(f"{r['guidance_scale']:g}", (xv, yv), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=line.get_color())
    if floor is not None:
        ax.axhline(floor, color="gray", linestyle="--", label="real-vs-real floor")
    if y in ("fd", "fid"):
        ax.set_yscale("log")
    ax.set_xlabel(labels.get(x, x))
    ax.set_ylabel(labels.get(y, y))
    ax.set_title(textwrap.fill(title or "Guidance trade-off (labels: guidance scale)", 64), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- judges ------------------------------------------------------------------------------------


def digits_judge(cache: str | Path | None = None) -> Judge:
    """Class accuracy and FD of 8x8 digits ([`DigitsMetric`][diffit_toolkit.eval.digits.DigitsMetric])."""
    from diffit_toolkit.eval.digits import DigitsMetric

    metric = DigitsMetric(cache=cache)
    return lambda images, labels: metric.score(images, labels).as_dict()


def shapes_judge(cache: str | Path | None = None) -> Judge:
    """Class accuracy and FD of 32x32 shapes ([`ShapesMetric`][diffit_toolkit.eval.shapes.ShapesMetric])."""
    from diffit_toolkit.eval.shapes import ShapesMetric

    metric = ShapesMetric(cache=cache)
    return lambda images, labels: metric.score(images, labels).as_dict()


def canvas_judge(cache: str | Path | None = None) -> Judge:
    """FD (and class accuracy with labels) of 16x16 digit canvases
    ([`CanvasMetric`][diffit_toolkit.eval.canvas.CanvasMetric])."""
    from diffit_toolkit.eval.canvas import CanvasMetric

    metric = CanvasMetric(cache=cache)
    return lambda images, labels: metric.score(images, labels).as_dict()


def shapes_canvas_judge(cache: str | Path | None = None) -> Judge:
    """FD (and class accuracy with labels) of 16x16 shape canvases
    ([`ShapesCanvasMetric`][diffit_toolkit.eval.shapes_canvas.ShapesCanvasMetric])."""
    from diffit_toolkit.eval.shapes_canvas import ShapesCanvasMetric

    metric = ShapesCanvasMetric(cache=cache)
    return lambda images, labels: metric.score(images, labels).as_dict()


def inception_judge(ref: Any, extractor: Any) -> Judge:
    """FID against ``ref`` (an [`ImageSet`][diffit_toolkit.eval.inputs.ImageSet]) and the Inception Score."""
    from diffit_toolkit.eval.inputs import ImageSet
    from diffit_toolkit.eval.metrics import evaluate_sets

    def judge(images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        x = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()
        result = evaluate_sets(ImageSet("samples", x, labels), ref, extractor, kid=False, prc=False)
        return {k: v for k, v in result.items() if k in ("fid", "is_mean", "is_std", "num_samples")}

    return judge
