"""Image grids and the loss curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from diffit_toolkit.runs.files import atomic_output

#: Grids upscale small images (8x8 digits) with nearest neighbours to at least this many pixels.
MIN_GRID_CELL = 32


def save_grid(images: torch.Tensor, path: Path, rows: int) -> Path:
    """Save ``images`` (B, C, H, W) in [-1, 1] as a PNG grid with ``rows`` rows (atomically: a
    link at ``path`` is replaced, never written through)."""
    x = images.detach().float().clamp(-1, 1).add(1).div(2).cpu()
    if x.shape[-1] < MIN_GRID_CELL:
        x = F.interpolate(x, scale_factor=math.ceil(MIN_GRID_CELL / x.shape[-1]), mode="nearest")
    cols = math.ceil(x.shape[0] / rows)
    from torchvision.utils import save_image  # torchvision imports slowly: on first use

    with atomic_output(path) as tmp:
        save_image(x, str(tmp), nrow=cols, padding=2, pad_value=1.0)
    return path


def save_loss_curve(metrics: Path, path: Path) -> Path | None:
    """Plot the logged loss from ``metrics.jsonl`` to a PNG (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, color="tab:blue", alpha=0.4 if len(rows) > 100 else 1.0, linewidth=1.5,
            label="loss (mean per logging window)")
    if len(rows) > 100:  # many lines: add a centred moving average
        k = len(rows) // 50
        smooth = [sum(losses[max(0, i - k) : i + k + 1]) / len(losses[max(0, i - k) : i + k + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"moving average ({2 * k + 1} lines)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path
