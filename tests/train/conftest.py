"""A tiny digits recipe for the trainer tests (one block of width 32: steps take milliseconds)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

TINY = {
    "name": "tiny",
    "model": {"backbone": "latent_diffit", "preset": None, "input_size": 8, "in_channels": 1, "patch_size": 2,
              "hidden_size": 32, "depth": 1, "num_heads": 2, "num_classes": 10, "mechanism": "tmsa"},
    "diffusion": {"process": "gaussian", "schedule": "cosine", "learn_sigma": False},
    "data": {"kind": "digits"},
    "train": {"batch_size": 64, "lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0, "ema_decay": 0.9,
              "max_steps": 12, "log_every": 1, "ckpt_every": 0, "keep_last": 50},
    "sample": {"sampler": "ddim", "steps": 4, "num_images": 20, "guidance_scale": 2.0, "clip_denoised": True},
}


@pytest.fixture(scope="session")
def tiny_recipe():
    """``tiny_recipe(folder, run, **train_overrides) -> path`` of a recipe writing to ``folder/run``."""

    def write(folder: Path, run: str, **train) -> Path:
        data = json.loads(json.dumps(TINY))
        data["output_dir"] = str(folder / run)
        data["train"].update(train)
        path = folder / f"{run}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def _wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError("training did not progress")


@pytest.fixture(scope="session")
def wait_for_steps():
    """``wait_for_steps(run_dir, n, proc)``: wait until the training process ``proc`` has logged ``n``
    metric lines in ``run_dir`` (fails at once if it exits first)."""
    return _wait_for_steps
