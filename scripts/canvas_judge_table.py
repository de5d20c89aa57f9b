"""Print how the digits-canvas judge scores real and broken canvases (the table in docs/evaluation.md).

Usage:  OMP_NUM_THREADS=1 python scripts/canvas_judge_table.py [--cache judge.pt]
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.process_time()
    metric = CanvasMetric(seed=0, cache=args.cache)
    print(f"judge ready in {time.process_time() - started:.0f} CPU-s; held-out accuracy {100 * metric.test_accuracy():.1f} %, "
          f"offset error {metric.offset_error():.2f} px")
    x, _, _ = make_canvases("floor")
    gen = torch.Generator().manual_seed(0)
    cases = {
        "the 1440 floor canvases themselves": x,
        "1440 of the 11 496 training canvases": make_canvases("train")[0],
        "floor canvases + Gaussian noise (std 0.05)": (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(-1, 1),
        "floor canvases, 1 % of pixels set to 0.5": torch.where(torch.rand(x.shape, generator=gen) < 0.01, torch.full_like(x, 0.5), x),
        "floor canvases blurred (3x3 box)": F.avg_pool2d(x, 3, stride=1, padding=1),
    }
    images, _ = glyphs("floor")
    cases["the 180 floor digits, all at the centre"] = paste(images, torch.full((len(images), 2), 4), 16)
    print("| images | n | FD | floor | FD / floor | copy ratio |\n|---|---|---|---|---|---|")
    for name, images in cases.items():
        s = metric.score(images)
        print(f"| {name} | {s.num_images} | {s.fd:.3f} | {s.floor:.3f} | {s.fd / s.floor:.2f} | {s.copy_ratio:.2f} |")


if __name__ == "__main__":
    main()
