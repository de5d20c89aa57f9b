"""The trainer: recipe -> data, model, process -> AdamW steps with EMA -> checkpoints, grids.

[`Trainer`][diffit_toolkit.train.trainer.Trainer] holds what a step needs; its ``train_step`` is the
step that ``train`` runs and ``bench`` times, its ``fit`` the loop; [`train`][diffit_toolkit.train.trainer.train]
wires it to a run folder (lock, resume, logging).

Runs unchanged in one process, under ``torchrun`` (DDP or FSDP2 over NCCL, or gloo on the CPU)
and under SLURM. Rank 0 alone logs and writes files; checkpoints hold full (unsharded) states, so
a run can go on under another strategy or process count. Everything a step depends on (weights, EMA,
optimizer, scheduler, RNG states, the position in the data) is in the checkpoint, so a resumed
run continues exactly where the stopped one was.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset

from diffit_toolkit.errors import RunFailure, one_line
from diffit_toolkit.build import build_dataset, build_model, build_optimizer, build_process, data_facts
from diffit_toolkit.inference.pipeline import Pipeline
from diffit_toolkit.inference.writers import save_sample_grid
from diffit_toolkit.recipe import Recipe, RecipeError
from diffit_toolkit.runs.files import write_text_atomic
from diffit_toolkit.runs import (
    CheckpointError,
    check_run_dir,
    check_state_dict,
    check_train_state,
    describe_environment,
    exactness_differences,
    latest_checkpoint,
    load_checkpoint,
    load_newest_verified,
    record_environment,
    run_lock,
    save_checkpoint,
    save_loss_curve,
)
from diffit_toolkit.train.data import ResumableSampler
from diffit_toolkit.train.distributed import (
    DistEnv,
    barrier,
    cleanup_distributed,
    full_model_state,
    load_model_state,
    local,
    no_gradient_sync,
    setup_distributed,
    shard_model,
)
from diffit_toolkit.train.logging import RunLogger
from diffit_toolkit.train.state import EmaCount, OptimizerState, RandomState, RankRandomStates, TrainState


class TrainingError(RunFailure, RuntimeError):
    """A run that cannot go on (diverged, out of memory, ...); one line with what to change."""


#: Signals that ask a run to checkpoint and stop (cluster preemption: SLURM sends SIGTERM, or
#: SIGUSR1 with ``--signal``; ``kill`` sends SIGTERM; Ctrl-C sends SIGINT).
STOP_SIGNALS = tuple(
    s for s in (getattr(signal, name, None) for name in ("SIGTERM", "SIGUSR1", "SIGINT")) if s is not None
)


@contextlib.contextmanager
def stop_requests():
    """Turn SIGTERM/SIGUSR1/SIGINT into a flag the loop checks after each step (main thread
    only). A second Ctrl-C while the first is being honoured interrupts at once."""
    flag = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if signum == signal.SIGINT and flag["signal"] == "SIGINT":
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class TrainResult:
    """What a finished (or stopped) run left behind. Under FSDP ``model`` and ``ema`` are the
    sharded modules (DTensor parameters, this rank's shards); the checkpoint holds the full ones."""

    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None
    grid: Path | None = None
    loss_curve: Path | None = None
    seconds: float = 0.0
    model: torch.nn.Module | None = None
    ema: torch.nn.Module | None = None
    stopped_by: str | None = None
    skipped_steps: int = 0
    #: Steps this call ran (0 for a run that was already finished).
    steps_run: int = 0


def ema_average_fn(decay: float, warmup: bool):
    """``AveragedModel``'s multi-tensor update: ``ema <- d * ema + (1 - d) * param`` with
    ``d = decay``, or ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates when warming up."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        torch._foreach_lerp_(ema_params, params, 1 - d)

    return update


def _agreed_stop(local: str | None, env: DistEnv) -> str | None:
    """A stop request seen by any rank stops every rank at the same step."""
    if not env.distributed:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=env.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return (local or "SIGTERM") if flag.item() else None


def _autocast(env: DistEnv, precision: str):
    if env.device.type != "cuda" or precision == "fp32":
        return torch.autocast(env.device.type, enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def accumulate_gradients(train_model: torch.nn.Module, process, x: torch.Tensor, y: torch.Tensor | None,
                         generator: torch.Generator, micro_batches: int, scaler: torch.amp.GradScaler,
                         autocast, sync_model: torch.nn.Module | None = None) -> torch.Tensor:
    """Forward and backward ``x`` (this process's share of the batch) as ``micro_batches`` equal
    slices, accumulating into ``.grad`` the gradient of the mean loss over all of ``x``.

    Each slice's mean loss is scaled by ``1 / micro_batches``, so the gradient equals that of one
    pass over ``x``. Under DDP or FSDP (``sync_model``, the wrapped or sharded model) the slices
    before the last run without gradient synchronisation (``no_sync()``,
    ``set_requires_gradient_sync(False)``): gradients are all-reduced or reduce-scattered once per
    step, not once per slice. Returns the (detached) mean loss.
    """
    total = torch.zeros((), device=x.device)
    xs = x.chunk(micro_batches)
    ys = y.chunk(micro_batches) if y is not None else (None,) * micro_batches
    for i, (xm, ym) in enumerate(zip(xs, ys)):
        last = i == micro_batches - 1
        sync = contextlib.nullcontext() if last else no_gradient_sync(sync_model)
        with sync:
            with autocast():
                loss = process.loss(train_model, xm, ym, generator).mean()
                if micro_batches > 1:
                    loss = loss / micro_batches
            scaler.scale(loss).backward()
        total += loss.detach().float()
    return total


@torch.no_grad()
def sample_images(recipe: Recipe, process, model, facts: dict[str, Any], device: torch.device):
    """``recipe.sample.num_images`` EMA samples and their labels for a grid (one row per class for
    class-conditional models), through the same path as ``diffit-toolkit sample``."""
    n = recipe.sample.num_images
    return Pipeline(model, process, recipe, facts, device).sample(n, recipe.sample, batch_size=n, seed=recipe.sample.seed)


@dataclass
class StepStats:
    """One optimisation step: the batch's mean loss and gradient norm (the same on every rank),
    and whether the update was applied (``False``: a non-finite loss or gradient, skipped)."""

    loss: float
    grad_norm: float
    applied: bool


class Trainer:
    """The model, its EMA, the optimizer, schedule and gradient scaler, the process and, when a
    dataset is given, the data order: everything a step needs and a checkpoint holds.

    [`train_step`][diffit_toolkit.train.trainer.Trainer.train_step] is the one optimisation step
    that ``train`` runs and ``bench`` times; [`fit`][diffit_toolkit.train.trainer.Trainer.fit] is
    the loop around it (run folder, logging, checkpoints, grids, stop signals);
    [`state`][diffit_toolkit.train.state.TrainState] is what a checkpoint remembers.

    Args:
        recipe: a validated recipe.
        env: this process's place ([`setup_distributed`][diffit_toolkit.train.distributed.setup_distributed]).
        dataset: the training data (``None``: no data order, e.g. for timing steps on given batches).
        model: a built model to train instead of the recipe's (``bench`` builds its own).
    """

    def __init__(self, recipe: Recipe, env: DistEnv, *, dataset: Dataset | None = None, model: torch.nn.Module | None = None) -> None:
        cfg = self.cfg = recipe.train
        self.recipe, self.env = recipe, env
        torch.manual_seed(cfg.seed + env.rank)
        random.seed(cfg.seed + env.rank)
        if env.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32
        if dataset is None:
            self.facts: dict[str, Any] = {"num_classes": int(getattr(model, "num_classes", 0) or 0)}
        else:
            self.facts = data_facts(dataset)
        self.model = (model if model is not None else build_model(recipe, self.facts)).to(env.device)
        vae = self.facts.get("vae")
        if isinstance(vae, str) and vae.startswith((".", "/", "~")) and not Path(vae).expanduser().exists():
            raise RecipeError(f"the latent cache names the VAE folder '{vae}', which does not exist: the run could "
                              f"not decode its samples; restore the folder or cache the latents again")
        if self.facts["num_classes"] and not getattr(self.model, "num_classes", 0):
            # model.num_classes: 0 on labelled data: an unconditional model; the labels are not used
            self.facts = {**self.facts, "num_classes": 0, "class_names": None}
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_average_fn(cfg.ema_decay, cfg.ema_warmup), use_buffers=False)
        self.ema.requires_grad_(False)
        self.sharded = cfg.strategy == "fsdp" and env.distributed
        self.scaler = torch.amp.GradScaler("cuda", enabled=env.device.type == "cuda" and cfg.precision == "fp16")
        self.process = build_process(recipe)
        self.generator = torch.Generator(device=env.device).manual_seed(cfg.seed * 1_000_003 + env.rank)
        self.per_rank = self._per_rank_batch(dataset)
        self.data_sampler = self.loader = None
        if dataset is not None:
            self.data_sampler = ResumableSampler(len(dataset), self.per_rank, env.rank, env.world_size, seed=cfg.seed)
            self.loader = DataLoader(dataset, batch_size=self.per_rank, sampler=self.data_sampler,
                                     num_workers=cfg.num_workers, drop_last=True,
                                     pin_memory=env.device.type == "cuda",
                                     # its own generator: creating an iterator must not consume the
                                     # global RNG (label dropout draws from it), or a resume would diverge
                                     generator=torch.Generator().manual_seed(cfg.seed))
        self.sharded_blocks = None
        self.optimizer = self.scheduler = self.state = None
        self.train_model = self.sync_model = None

    def _per_rank_batch(self, dataset) -> int:
        cfg, world = self.cfg, self.env.world_size
        if cfg.batch_size % world:
            raise RecipeError(
                f"recipe error at train.batch_size: {cfg.batch_size} is not divisible by {world} "
                f"processes; choose a multiple of the process count"
            )
        per_rank = cfg.batch_size // world
        if per_rank % cfg.grad_accum_steps:
            raise RecipeError(
                f"recipe error at train.grad_accum_steps: {per_rank} images per process "
                f"(train.batch_size {cfg.batch_size} / {world} processes) do not split into "
                f"{cfg.grad_accum_steps} equal micro-batches; choose a divisor of {per_rank}"
            )
        if dataset is not None and len(dataset) < cfg.batch_size:
            raise RecipeError(
                f"recipe error at train.batch_size: {cfg.batch_size} is larger than the dataset ({len(dataset)} items)"
            )
        return per_rank

    def setup(self, weights: dict[str, torch.Tensor] | None = None) -> Trainer:
        """Start from ``weights`` (full model and EMA weights, e.g. ``--init-from``) if given, shard
        under FSDP (the model and its EMA alike, before the optimizer is built on the sharded
        parameters), build the optimizer and schedule, wrap for DDP and ``torch.compile``."""
        cfg, env, model = self.cfg, self.env, self.model
        if weights is not None:
            model.load_state_dict(weights)
            self.ema.module.load_state_dict(weights)
        if self.sharded:
            self.sharded_blocks = shard_model(model)
            shard_model(self.ema.module)
        self.optimizer, self.scheduler = build_optimizer(self.recipe, model)
        components = {"optimizer": OptimizerState(model, self.optimizer), "scheduler": self.scheduler,
                      "scaler": self.scaler, "ema_n_averaged": EmaCount(self.ema)}
        if self.data_sampler is not None:
            components["data"] = self.data_sampler
        own_rng = RandomState(self.generator)
        components.update(rng=own_rng, rng_ranks=RankRandomStates(own_rng, env))
        self.state = TrainState(components, optional=("rng_ranks",))
        self.train_model = model
        if self.sharded:
            self.sync_model = model  # the module whose gradient synchronisation micro-batches turn off
        elif env.distributed:
            self.train_model = self.sync_model = DistributedDataParallel(
                model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        return self

    @property
    def step(self) -> int:
        return self.state.step

    def load_checkpoint(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint read by [`load_checkpoint`][diffit_toolkit.runs.load_checkpoint]
        (full weights; each rank keeps its shard under FSDP)."""
        path = ckpt["path"]
        try:
            load_model_state(self.model, ckpt["model"])
            load_model_state(self.ema.module, ckpt["ema"])
            self.state.load_state_dict(ckpt["state"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint {path}: state.pt is malformed ({one_line(exc)}); "
                                  f"resume from another checkpoint with --resume") from None

    def train_step(self, x: torch.Tensor, y: torch.Tensor | None) -> StepStats:
        """One optimisation step on this process's share ``x``, ``y`` of the batch: micro-batched
        forward and backward, gradient clipping, then the optimizer, schedule and EMA updates, or
        none of them when the loss or gradient is not finite (fp16's scaler skips on its own)."""
        cfg, env, optimizer, scaler = self.cfg, self.env, self.optimizer, self.scaler
        optimizer.zero_grad(set_to_none=True)
        try:
            loss = accumulate_gradients(self.train_model, self.process, x, y, self.generator, cfg.grad_accum_steps,
                                        scaler, lambda: _autocast(env, cfg.precision), self.sync_model)
        except torch.OutOfMemoryError:
            raise TrainingError(
                f"out of {env.device.type.upper()} memory at step {self.step + 1} with "
                f"{self.per_rank // cfg.grad_accum_steps} images per process: lower train.batch_size or raise "
                f"train.grad_accum_steps, set model.grad_checkpointing: true, or use train.precision: bf16"
            ) from None
        scaler.unscale_(optimizer)
        # under FSDP the norm is a DTensor reduced over all shards, the same on every rank
        grad_norm = local(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf))
        value = loss.clone()
        if env.distributed:  # every rank sees the same mean loss and so agrees on a skip
            dist.all_reduce(value, op=dist.ReduceOp.AVG)
        loss_value = float(value)
        bad = not math.isfinite(loss_value) or (not scaler.is_enabled() and not math.isfinite(float(grad_norm)))
        self.state.step += 1
        if bad:  # weights never become non-finite
            optimizer.zero_grad(set_to_none=True)
            if scaler.is_enabled():
                scaler.update()
            return StepStats(loss_value, float(grad_norm), applied=False)
        scaler.step(optimizer)
        scaler.update()
        self.scheduler.step()
        self.ema.update_parameters(self.model)
        return StepStats(loss_value, float(grad_norm), applied=True)

    def batches(self):
        """This process's batches on the device, endlessly, in the resumable data order."""
        while True:
            for x, y in self.loader:
                self.data_sampler.advance()
                x, y = apply_to_collection((x, y), torch.Tensor, lambda t: t.to(self.env.device, non_blocking=True))
                yield x, (y if self.facts["num_classes"] else None)
            self.data_sampler.next_epoch()

    def weights_finite(self) -> bool:
        finite = torch.tensor([float(all(torch.isfinite(local(p)).all() for p in self.model.parameters()))],
                              device=self.env.device)
        if self.sharded:  # each rank sees its shards only
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def save_checkpoint(self, run_dir: Path, config: dict[str, Any]) -> Path | None:
        """Write the checkpoint of this step (collectives: every rank calls it; rank 0 writes and
        gets its path)."""
        if not self.weights_finite():
            raise TrainingError(f"weights are not finite at step {self.step}; not checkpointing them. "
                                f"Last good checkpoint: {latest_checkpoint(run_dir) or 'none yet'}")
        weights, ema_weights = full_model_state(self.model), full_model_state(self.ema.module)
        state = self.state.state_dict()
        path = None
        if self.env.is_main:
            path = save_checkpoint(run_dir, self.step, weights, ema_weights, state, config, self.cfg.keep_last)
        barrier(self.env)
        return path

    def sample_grid(self, path: Path) -> Path | None:
        """A grid of EMA samples written by rank 0. Under FSDP every rank samples (the same images:
        the sharded EMA gathers its weights from all ranks as it runs)."""
        if not (self.env.is_main or self.sharded):
            return None
        images, labels = sample_images(self.recipe, self.process, self.ema.module.eval(), self.facts, self.env.device)
        self.model.train()
        return save_sample_grid(images, labels, path) if self.env.is_main else None

    def fit(self, run_dir: Path, logger: RunLogger, config: dict[str, Any], stop_after: int | None = None) -> TrainResult:
        """Train to ``train.max_steps`` (or ``stop_after`` more steps, or a stop signal), with the
        recipe's logging, checkpoints and grids; the final checkpoint and, at the end, the grid."""
        cfg = self.cfg
        result = TrainResult(run_dir=run_dir, step=self.step, model=self.model, ema=self.ema.module)
        checkpointed_at = -1  # the same on every rank: only rank 0 gets a path back
        consecutive_bad = 0
        batches = self.batches()
        self.model.train()
        with stop_requests() as stop:
            while self.step < cfg.max_steps and (stop_after is None or self.step - result.step < stop_after):
                stats = self.train_step(*next(batches))
                step = self.step
                if stats.applied:
                    consecutive_bad = 0
                    result.losses.append(stats.loss)
                    logger.step(step, stats.loss, lr=self.scheduler.get_last_lr()[0], grad_norm=stats.grad_norm,
                                skipped=result.skipped_steps or None, log=step % cfg.log_every == 0)
                else:
                    result.skipped_steps += 1
                    consecutive_bad += 1
                    logger.message(f"step {step}: non-finite loss or gradient ({stats.loss}); step skipped "
                                   f"({result.skipped_steps} so far)")
                    if consecutive_bad >= cfg.max_bad_steps:
                        raise TrainingError(
                            f"{consecutive_bad} consecutive steps up to step {step} had a non-finite loss or "
                            f"gradient; stopping. Last good checkpoint: {latest_checkpoint(run_dir) or 'none yet'}. "
                            f"Lower train.lr, set train.grad_clip, or use bf16 instead of fp16")
                if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                    result.checkpoint, checkpointed_at = self.save_checkpoint(run_dir, config), step
                if cfg.sample_every and step % cfg.sample_every == 0:
                    self._logged_grid(run_dir / "samples" / f"step_{step:07d}.png", logger)
                result.stopped_by = _agreed_stop(stop["signal"], self.env)
                if result.stopped_by:
                    logger.message(f"{result.stopped_by} received: checkpointing at step {step} and stopping")
                    break
        ran = result.steps_run = self.step - result.step
        if ran and result.skipped_steps == ran and not result.stopped_by:  # shorter than max_bad_steps
            raise TrainingError(
                f"every step of this run ({ran}, up to step {self.step}) had a non-finite loss or gradient, so "
                f"nothing was learned; not checkpointing. Last good checkpoint: {latest_checkpoint(run_dir) or 'none yet'}. "
                f"Lower train.lr, set train.grad_clip, or check the data and the mechanism for inf/nan")
        if checkpointed_at != self.step:
            result.checkpoint = self.save_checkpoint(run_dir, config)
        result.step = self.step
        if self.step >= cfg.max_steps:
            result.grid = self._logged_grid(run_dir / "samples.png", logger)
            if self.env.is_main:
                result.loss_curve = save_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
                logger.message(f"samples: {result.grid}  loss curve: {result.loss_curve}")
        return result

    def _logged_grid(self, path: Path, logger: RunLogger) -> Path | None:
        grid = self.sample_grid(path)
        if grid is not None:
            logger.image("samples", grid, self.step)
        return grid


def _resume_point(trainer: Trainer, run_dir: Path, resume: str | Path | None, notes: list[str]) -> dict[str, Any] | None:
    """The checkpoint to continue from (``resume``, or the run folder's newest that verifies),
    checked against the model and the recipe; ``None`` for a new run."""
    cfg, env = trainer.cfg, trainer.env
    required = trainer.state.required_keys
    if resume is not None:  # the checkpoint asked for, or an error
        ckpt = load_checkpoint(resume, map_location=env.device)
    else:  # damaged ones are skipped with a warning
        ckpt = load_newest_verified(run_dir, map_location=env.device, warn=notes.append, required=required)
    if ckpt is None:
        return None
    path = ckpt["path"]
    try:
        check_state_dict(trainer.model, ckpt["model"], f"checkpoint {path}")
    except ValueError as exc:
        raise CheckpointError(f"{exc}; it was written by another model: use another output_dir or the matching recipe") from None
    step = check_train_state(ckpt["state"], path, required)
    recorded = ckpt["config"].get("recipe", {}).get("train", {}) if isinstance(ckpt["config"].get("recipe"), dict) else {}
    if isinstance(recorded, dict) and "seed" in recorded and recorded["seed"] != cfg.seed:
        notes.append(f"{path} was written with train.seed={recorded['seed']}; continuing that run (its random "
                     f"state), not a new one with seed {cfg.seed}: give another output_dir for a new run")
    if step > cfg.max_steps:
        raise CheckpointError(f"checkpoint {path} is at step {step}, beyond train.max_steps "
                              f"({cfg.max_steps}): raise train.max_steps to continue it, or give another output_dir")
    return ckpt


def train(
    recipe: Recipe,
    *,
    resume: str | Path | None = None,
    device: str | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    init_from: str | Path | None = None,
) -> TrainResult:
    """Train ``recipe``; resumes from ``resume`` or, when ``None``, from the run folder's newest
    checkpoint if there is one.

    Args:
        recipe: a validated recipe.
        resume: a checkpoint folder to continue from (default: the newest in the run folder).
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available).
        stop_after: stop (with a checkpoint) after this many steps of this invocation.
        progress: show the progress bar (rank 0, interactive terminals).
        init_from: start a new run from these weights (a run, step, exported folder or weights
            file; EMA weights where there are two) with a new optimizer; ignored when the run
            folder already has a checkpoint to resume.
    """
    start_time = time.perf_counter()
    env = setup_distributed(device)
    run_dir = recipe.run_dir
    held = contextlib.ExitStack()
    try:
        trainer = Trainer(recipe, env, dataset=build_dataset(recipe))
        if env.is_main:  # before anything is read from or written to the run folder
            check_run_dir(run_dir)
            held.enter_context(run_lock(run_dir))
        notes: list[str] = []
        trainer.setup()
        ckpt = _resume_point(trainer, run_dir, resume, notes)
        if ckpt is not None:
            trainer.load_checkpoint(ckpt)
        elif init_from is not None:
            _init_weights(trainer, init_from)
        environment = describe_environment(env.device, env.world_size, recipe.train.strategy)
        config = {"recipe": recipe.to_dict(), "model": trainer.model.config, "data": trainer.facts,
                  "environment": environment}
        logger = RunLogger(run_dir, total_steps=recipe.train.max_steps, start_step=trainer.step,
                           batch_size=recipe.train.batch_size, show_progress=progress, logging=recipe.logging,
                           config=config, name=recipe.name)
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / "recipe.yaml", recipe.to_yaml(), root=run_dir)
            record_environment(run_dir, environment, trainer.step)
            other_setup = exactness_differences(ckpt["config"].get("environment"), environment) if ckpt else []
            for line in _start_messages(trainer, notes, ckpt, other_setup):
                logger.message(line)
        result = trainer.fit(run_dir, logger, config, stop_after=stop_after)
        logger.close()
        barrier(env)  # every rank done before any leaves the process group: no rank exits under a peer's collective
        result.seconds = time.perf_counter() - start_time
        return result
    finally:
        held.close()
        cleanup_distributed()


def _init_weights(trainer: Trainer, path: str | Path) -> None:
    """Copy the weights at ``path`` into the model and its EMA; a mismatch names the keys."""
    from diffit_toolkit.interop.weights import read_weights

    try:
        state = read_weights(path)
        check_state_dict(trainer.model, state, f"--init-from {path}")
    except (ValueError, CheckpointError) as exc:
        raise RecipeError(f"{str(exc).strip().splitlines()[0]}; initialise from weights of the recipe's model") from None
    load_model_state(trainer.model, state)
    load_model_state(trainer.ema.module, state)


def busy_cpu_note(device: torch.device, threads: int, load: float | None = None, cores: int | None = None) -> str | None:
    """A warning when this CPU run asks for several threads on a machine whose cores are already
    busy (1-minute load average at least the core count): OpenMP threads that wait for each other on
    busy cores can make every step many times slower than one thread would be."""
    if device.type != "cpu" or threads <= 1:
        return None
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):  # not available on this platform
            return None
    cores = cores or os.cpu_count() or 1
    if load < cores:
        return None
    return (f"the machine is busy (load average {load:.1f} on {cores} cores) and this run uses {threads} threads; "
            f"threads waiting for each other on busy cores can make training many times slower: start it with "
            f"OMP_NUM_THREADS=1, or run fewer processes at once")


def _start_messages(trainer: Trainer, notes: list[str], ckpt: dict[str, Any] | None, other_setup: list[str]) -> list[str]:
    lines = [f"warning: {note}" for note in notes]
    busy = busy_cpu_note(trainer.env.device, torch.get_num_threads())
    if busy:
        lines.append(f"warning: {busy}")
    if trainer.sharded:
        model = trainer.model
        lines.append(f"FSDP over {trainer.env.world_size} processes: " + (
            f"{trainer.sharded_blocks} blocks sharded one by one, then the rest of the model" if trainer.sharded_blocks else
            f"backbone {model.config.get('backbone', type(model).__name__)} names no blocks (shard_units), "
            f"so the whole model is one unit, gathered at once"))
    if ckpt is not None:
        lines.append(f"resumed from {ckpt['path']} at step {trainer.step}")
    if other_setup:
        lines.append(f"resuming on a different setup ({', '.join(other_setup)}): the run continues "
                     f"correctly but is equal to an uninterrupted one only to float rounding, not bit for bit")
    return lines
