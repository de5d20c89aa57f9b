"""Run logging on rank 0: JSONL metrics, TensorBoard when installed, a progress bar with rates."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
from lightning_utilities.core.rank_zero import rank_zero_only, rank_zero_warn
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from diffit_toolkit.optional import missing, require
from diffit_toolkit.runs.files import open_no_follow, write_text_atomic
from diffit_toolkit.errors import first_line
from diffit_toolkit.recipe import LoggingSection, RecipeError, WandbSection

#: Seconds an online W&B run may take to reach its server before training stops with an error.
WANDB_INIT_TIMEOUT = 30.0


def _start_wandb(section: WandbSection, run_dir: Path, config: dict[str, Any], name: str):
    """A W&B run under ``<run>/wandb``; its id is kept in the run folder, so a resumed training
    run continues the same W&B run."""
    import wandb

    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    write_text_atomic(id_file, run_id + "\n", root=run_dir)
    settings = {}
    if section.mode == "online":
        settings["init_timeout"] = WANDB_INIT_TIMEOUT
        Console(stderr=True).print(f"connecting to Weights & Biases (online, up to {WANDB_INIT_TIMEOUT:g} s)")
    try:
        return wandb.init(project=section.project, entity=section.entity, name=section.name or name, tags=section.tags,
                          mode=section.mode, dir=str(run_dir), id=run_id, resume="allow", config=config,
                          settings=wandb.Settings(**settings))
    except wandb.errors.Error as exc:  # no API key, no network, a wrong entity: before any step is trained
        reason = first_line(exc).rstrip(".")
        raise RecipeError(f"recipe error at logging.wandb: W&B could not start ({reason}); set "
                          "WANDB_API_KEY or run `wandb login`, or set logging.wandb.mode=offline to log under the run "
                          "folder and upload later with `wandb sync`") from exc


def format_eta(seconds: float) -> str:
    """``"42 s"``, ``"3.5 min"`` or ``"2.1 h"``: the time left, read at a glance."""
    if seconds < 60:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _record(line: str) -> dict[str, Any] | None:
    """A metrics line as a dict, or ``None`` for a torn or foreign line (a crash mid-write)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step", 0), int) else None


def _truncate_after(path: Path, step: int) -> None:
    """Drop metric lines beyond ``step`` (written by a run that stopped after its last checkpoint)
    and torn lines (a process killed in the middle of writing one)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(errors="replace").splitlines()
            if (record := _record(line)) is not None and record.get("step", 0) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept), root=path.parent)


class RunLogger:
    """Metrics to ``metrics.jsonl`` (one line per logged step; ``loss`` is the mean since the
    previous line); TensorBoard (scalars, among them the learning rate, and sample grids) and
    Weights & Biases as the recipe's ``logging`` section asks; a progress bar with it/s, img/s,
    loss and ETA. Every method runs on global rank 0 only (``@rank_zero_only``); elsewhere it
    does nothing.

    Args:
        logging: the recipe's [`LoggingSection`][diffit_toolkit.recipe.LoggingSection] (default: TensorBoard
            when installed, no W&B).
        config: what W&B records as the run's config (the resolved recipe).
        name: the W&B run name when the section gives none.
    """

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, batch_size: int,
                 show_progress: bool = True, logging: LoggingSection | None = None,
                 config: dict[str, Any] | None = None, name: str = "run") -> None:
        self.logging = logging or LoggingSection()
        self.wandb = None
        self.batch_size = batch_size
        self.start_step = start_step
        self.total_steps = total_steps
        self.t0 = time.perf_counter()
        self.last_log = (self.t0, start_step)
        self.window: list[float] = []
        self.console = Console(stderr=True)
        self.metrics = None
        self.tb = None
        self.progress = None
        self._open(run_dir, show_progress, config or {}, name)

    @rank_zero_only
    def _open(self, run_dir: Path, show_progress: bool, config: dict[str, Any], name: str) -> None:
        start_step, total_steps = self.start_step, self.total_steps
        if self.logging.tensorboard:
            require("tensorboard", "logging.tensorboard")
        if self.logging.wandb is not None:
            require("wandb", "logging.wandb")
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        _truncate_after(path, start_step)
        self.metrics = os.fdopen(open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, run_dir), "a")
        reason = missing("tensorboard")
        if self.logging.tensorboard is False:
            pass
        elif reason is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        else:
            rank_zero_warn(f"TensorBoard logging is off: {reason}", stacklevel=2)
        if self.logging.wandb is not None:
            self.wandb = _start_wandb(self.logging.wandb, run_dir, config, name)
        if show_progress and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                TextColumn("{task.fields[rates]}  loss {task.fields[loss]}  eta {task.fields[eta]}"),
                console=self.console,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, rates="", loss="-",
                                               eta="-")
            self.progress.start()

    @rank_zero_only
    def step(self, step: int, loss: float, log: bool, **extra: Any) -> None:
        now = time.perf_counter()
        done = step - self.start_step
        rate = done / max(now - self.t0, 1e-9)
        self.window.append(loss)
        if self.progress is not None:  # the ETA from the mean rate since the start: steady, not the last second's
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", eta=format_eta(
                (self.total_steps - step) / max(rate, 1e-9)), rates=f"{rate:.2f} it/s {rate * self.batch_size:.1f} img/s")
        if not log:
            return
        loss = sum(self.window) / len(self.window)  # mean over the steps since the last line
        self.window.clear()
        t_prev, s_prev = self.last_log
        window_rate = (step - s_prev) / max(now - t_prev, 1e-9)
        self.last_log = (now, step)
        eta = (self.total_steps - step) / max(rate, 1e-9)
        record = {"step": step, "loss": loss, "it_per_s": window_rate, "img_per_s": window_rate * self.batch_size,
                  "elapsed_s": now - self.t0, **{k: v for k, v in extra.items() if v is not None}}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step":
                    self.tb.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
        if self.progress is None:
            self.console.print(
                f"step {step}/{self.total_steps}  loss {loss:.4f}  {window_rate:.2f} it/s  "
                f"{window_rate * self.batch_size:.1f} img/s  eta {format_eta(eta)}", highlight=False)

    @rank_zero_only
    def image(self, tag: str, path: Path, step: int) -> None:
        """A sample grid (a PNG written by the run) to TensorBoard and W&B."""
        if self.tb is None and self.wandb is None:
            return
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        if self.tb is not None:
            self.tb.add_image(tag, pixels, step, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(pixels, caption=f"step {step}")}, step=step)

    @rank_zero_only
    def message(self, text: str) -> None:
        (self.progress.console if self.progress else self.console).print(text, highlight=False, soft_wrap=True)

    @rank_zero_only
    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.metrics is not None:
            self.metrics.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
