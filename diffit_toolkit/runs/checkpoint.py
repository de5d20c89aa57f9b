"""Checkpoints: safetensors weights plus a ``weights_only``-loadable training state, written
atomically (a temporary folder renamed into place), the last k kept.

Layout of ``<run>/checkpoints/step_0001000/``:

* ``model.safetensors``, ``ema.safetensors``: the weights (nothing pickled);
* ``state.pt``: optimizer, scheduler, step, RNG and data-position state (tensors and plain
  Python values only, so ``torch.load(..., weights_only=True)`` reads it);
* ``config.json``: the resolved recipe and the model's config.

A folder named ``step_*`` exists only once every file in it is complete: a crash while writing
leaves a ``.tmp-*`` folder that loading ignores and the next save removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; one line naming the file."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _state_dict_for_safetensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; the copies are cheap next to the file write.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or ``None``."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically and prune to the newest ``keep_last``.

    On any error (a full disk, say) the partial folder is removed, the previous checkpoints are
    untouched, and a :class:`CheckpointError` says what failed.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(_state_dict_for_safetensors(model_state), str(tmp / "model.safetensors"))
        save_file(_state_dict_for_safetensors(ema_state), str(tmp / "ema.safetensors"))
        with open(tmp / "state.pt", "wb") as f:
            torch.save(train_state, f)
            f.flush()
            os.fsync(f.fileno())
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for name in ("model.safetensors", "ema.safetensors", "config.json"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"; the previous checkpoint {previous} is intact" if previous else ""
        raise CheckpointError(f"could not write checkpoint {final} ({exc.strerror or exc}){kept}") from None
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint folder: ``model``, ``ema`` (state dicts), ``state`` and ``config``.

    Nothing is unpickled beyond tensors and plain values (``weights_only=True``).
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    needed = ["model.safetensors", "ema.safetensors", "state.pt", "config.json"]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint (missing {', '.join(missing)}): pass a step_* folder")
    try:
        return {
            "model": load_file(str(path / "model.safetensors"), device=str(map_location)),
            "ema": load_file(str(path / "ema.safetensors"), device=str(map_location)),
            "state": torch.load(path / "state.pt", map_location=map_location, weights_only=True),
            "config": json.loads((path / "config.json").read_text()),
            "path": path,
        }
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"could not read checkpoint {path}: {type(exc).__name__}: {first}") from None
