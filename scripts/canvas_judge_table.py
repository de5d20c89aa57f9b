"""Print how a canvas judge scores real and broken canvases (the tables in docs/evaluation.md).

Usage:  OMP_NUM_THREADS=1 python scripts/canvas_judge_table.py [--cache judge.pt] [--glyph-model RUN]
        OMP_NUM_THREADS=1 python scripts/canvas_judge_table.py --testbed shapes_canvas [--cache judge.pt]

``--glyph-model`` adds a row for the samples of a trained 8x8 digits model (a run folder), each
pasted at a random offset: how the judge rates the glyphs a small model learns, placed perfectly.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from diffit_toolkit.data.canvas import glyphs, make_canvases, paste
from diffit_toolkit.eval.canvas import CanvasMetric


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="keep the trained judge in this file")
    parser.add_argument("--glyph-model", default=None, help="run folder of an 8x8 digits model to paste")
    parser.add_argument("--testbed", default="digits_canvas", choices=("digits_canvas", "shapes_canvas"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.testbed == "shapes_canvas":
        print_table(*shapes_canvas_cases(args.cache))
        return
    started = time.process_time()
    metric = CanvasMetric(seed=0, cache=args.cache)
    print(f"judge ready in {time.process_time() - started:.0f} CPU-s; held-out accuracy {100 * metric.test_accuracy():.1f} %, "
          f"offset error {metric.offset_error():.2f} px")
    x, _, _ = make_canvases("floor")
    gen = torch.Generator().manual_seed(0)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), value=-1.0), 3, stride=1)
    cases = {
        "the 1440 floor canvases themselves": x,
        "1440 of the 11 496 training canvases": make_canvases("train")[0],
        "floor canvases + Gaussian noise (std 0.05)": (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(-1, 1),
        "floor canvases, 1 % of pixels set to 0.5": torch.where(torch.rand(x.shape, generator=gen) < 0.01, torch.full_like(x, 0.5), x),
        "floor canvases, 10 % of a 3x3 box blur mixed in": 0.9 * x + 0.1 * blurred,
        "floor canvases blurred (3x3 box)": blurred,
    }
    images, _ = glyphs("floor")
    cases["the 180 floor digits, all at the centre"] = paste(images, torch.full((len(images), 2), 4), 16)
    if args.glyph_model:
        from diffit_toolkit.data.canvas import random_offsets
        from diffit_toolkit.inference.pipeline import load_pipeline

        model = load_pipeline(args.glyph_model, device="cpu")
        samples, _ = model.sample(len(x), model.recipe.sample)
        cases["samples of the 8x8 model, each pasted at a random offset"] = paste(
            samples[:, 0].clamp(-1, 1), random_offsets(len(samples), 16, gen), 16)
    print_table(metric, cases)


def shapes_canvas_cases(cache: str | None) -> tuple[object, dict[str, torch.Tensor]]:
    """The shapes-canvas judge and the same kinds of real and broken images."""
    from diffit_toolkit.data.shapes_canvas import SHAPES_CANVAS_CLASSES, make_shapes_canvas
    from diffit_toolkit.eval.shapes_canvas import ShapesCanvasMetric

    started = time.process_time()
    metric = ShapesCanvasMetric(seed=0, cache=cache)
    row, col, radius = metric.geometry_error().tolist()
    print(f"judge ready in {time.process_time() - started:.0f} CPU-s; held-out accuracy {100 * metric.test_accuracy():.1f} %, "
          f"centre error {row:.2f} / {col:.2f} px, radius error {radius:.2f} px")
    x, y, geometry = make_shapes_canvas("floor")
    gen = torch.Generator().manual_seed(0)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), value=-1.0), 3, stride=1)
    shift = (8 - geometry[:, :2]).round().long()
    return metric, {
        "the 1440 floor images themselves": x,
        "1440 of the 20 000 training images": make_shapes_canvas("train")[0][:1440],
        "floor images + Gaussian noise (std 0.05)": (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(-1, 1),
        "floor images, 1 % of pixels set to 0.5": torch.where(torch.rand(x.shape, generator=gen) < 0.01, torch.full_like(x, 0.5), x),
        "floor images, 10 % of a 3x3 box blur mixed in": 0.9 * x + 0.1 * blurred,
        "floor images blurred (3x3 box)": blurred,
        "floor images, each shape moved to the centre": torch.stack(
            [torch.roll(x[i], tuple(shift[i].tolist()), (1, 2)) for i in range(len(x))]),
        "the floor's circles only": x[y == SHAPES_CANVAS_CLASSES.index("circle")],
    }


def print_table(metric, cases: dict[str, torch.Tensor]) -> None:
    print("| images | n | FD | floor | FD / floor | copy ratio |\n|---|---|---|---|---|---|")
    for name, images in cases.items():
        s = metric.score(images)
        print(f"| {name} | {s.num_images} | {s.fd:.3f} | {s.floor:.3f} | {s.fd / s.floor:.2f} | {s.copy_ratio:.2f} |")


if __name__ == "__main__":
    main()
