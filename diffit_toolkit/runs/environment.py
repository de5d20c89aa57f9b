"""What a run ran on: the facts that decide whether a resumed run is bit-identical.

Floating-point reductions in matrix multiplies and convolutions are split across threads and
picked per instruction set, so the same step on another CPU, with another thread count or another
torch build gives results that agree only to rounding. The trainer records these facts in the run
folder (``environment.json``, one entry per start) and in every checkpoint, and says so when a run
resumes on a different setup.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from diffit_toolkit.runs.files import write_text_atomic

#: The facts that must match for a resumed run to be bit-identical to an uninterrupted one.
EXACTNESS_KEYS = ("torch", "cuda", "device", "threads", "world_size", "strategy")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_device(device: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` (``None``: CUDA when available) as a device that exists here;
    anything else is a one-line ``ValueError``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device '{device}': use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda or "no CUDA"
            raise ValueError(f"device '{device}' was requested but PyTorch sees no CUDA GPU here (torch "
                             f"{torch.__version__}, built with {built}): use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device '{device}' does not exist: {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def describe_environment(device: torch.device, world_size: int, strategy: str = "ddp") -> dict[str, Any]:
    """The current process's setup: torch/CUDA versions, device name, intra-op threads, processes
    and how they share the model (``strategy``: ``ddp`` or ``fsdp``; ``single`` for one process)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": f"{device.type}: {name}",
        "threads": torch.get_num_threads(),
        "world_size": world_size,
        "strategy": strategy if world_size > 1 else "single",
        "python": platform.python_version(),
        "platform": sys.platform,
    }


def exactness_differences(recorded: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """``["threads 1 -> 2", ...]``: the facts that differ between two setups (empty when the
    recorded setup is unknown, as in checkpoints written before it was recorded)."""
    if not recorded:
        return []
    return [f"{key} {recorded.get(key)} -> {current.get(key)}" for key in EXACTNESS_KEYS
            if key in recorded and recorded.get(key) != current.get(key)]


def record_environment(run_dir: Path, current: dict[str, Any], step: int) -> None:
    """Append this start (at ``step``) to ``run_dir/environment.json``."""
    path = run_dir / "environment.json"
    history: list[dict[str, Any]] = []
    if path.is_file():
        try:
            loaded = json.loads(path.read_text())
            history = loaded if isinstance(loaded, list) else []
        except (OSError, ValueError):
            history = []
    history.append({"start_step": step, **current})
    write_text_atomic(path, json.dumps(history, indent=2) + "\n", root=run_dir)
