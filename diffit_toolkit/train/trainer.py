"""The training loop: recipe -> data, model, process -> AdamW steps with EMA -> checkpoints, grids.

Runs unchanged in one process, under ``torchrun`` (DDP or FSDP2 over NCCL, or gloo on the CPU)
and under SLURM. Rank 0 alone logs and writes files; checkpoints hold full (unsharded) states, so
a run can go on under another strategy or process count. Everything a step depends on (weights, EMA,
optimizer, scheduler, RNG states, the position in the data) is in the checkpoint, so a resumed
run continues exactly where the stopped one was.
"""

from __future__ import annotations

import contextlib
import math
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
from torch.utils.data import DataLoader

from diffit_toolkit.errors import one_line
from diffit_toolkit.build import build_dataset, build_model, build_optimizer, build_process, data_facts
from diffit_toolkit.generate import Generator, save_sample_grid
from diffit_toolkit.recipe import Recipe, RecipeError
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
    full_optimizer_state,
    load_model_state,
    load_optimizer_state,
    local,
    no_gradient_sync,
    setup_distributed,
    shard_model,
)
from diffit_toolkit.train.logging import RunLogger


class TrainingError(RuntimeError):
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


def ema_average_fn(decay: float, warmup: bool):
    """``AveragedModel``'s multi-tensor update: ``ema <- d * ema + (1 - d) * param`` with
    ``d = decay``, or ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates when warming up."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        torch._foreach_lerp_(ema_params, params, 1 - d)

    return update


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _rng_states(generator: torch.Generator, env: DistEnv) -> dict[str, Any]:
    """The random state for the checkpoint: rank 0's under ``rng``, every rank's under
    ``rng_ranks`` when there are several (each rank draws its own label dropout and noise)."""
    state = _rng_state(generator)
    if not env.distributed:
        return {"rng": state}
    ranks: list[Any] = [None] * env.world_size
    dist.all_gather_object(ranks, state)
    return {"rng": ranks[0], "rng_ranks": ranks}


def _own_rng_state(state: dict[str, Any], env: DistEnv) -> dict[str, Any]:
    """This rank's random state from a checkpoint: its own when written by as many processes,
    else rank 0's (another process count continues the run, only to rounding)."""
    ranks = state.get("rng_ranks")
    return ranks[env.rank] if isinstance(ranks, list) and len(ranks) == env.world_size else state["rng"]


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


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
    return Generator(model, process, recipe, facts, device).sample(n, recipe.sample, batch_size=n, seed=recipe.sample.seed)


def _init_weights(model: torch.nn.Module, ema: AveragedModel, path: str | Path) -> None:
    """Copy the weights at ``path`` into ``model`` and its EMA; a mismatch names the keys."""
    from diffit_toolkit.generate import read_weights

    try:
        state = read_weights(path)
        check_state_dict(model, state, f"--init-from {path}")
    except (ValueError, CheckpointError) as exc:
        raise RecipeError(f"{str(exc).strip().splitlines()[0]}; initialise from weights of the recipe's model") from None
    model.load_state_dict(state)
    ema.module.load_state_dict(state)


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
    cfg = recipe.train
    run_dir = recipe.run_dir
    held = contextlib.ExitStack()
    try:
        torch.manual_seed(cfg.seed + env.rank)
        random.seed(cfg.seed + env.rank)
        if env.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32

        dataset = build_dataset(recipe)
        facts = data_facts(dataset)
        model = build_model(recipe, facts).to(env.device)
        ema = AveragedModel(model, multi_avg_fn=ema_average_fn(cfg.ema_decay, cfg.ema_warmup), use_buffers=False)
        ema.requires_grad_(False)
        sharded = cfg.strategy == "fsdp" and env.distributed
        scaler = torch.amp.GradScaler("cuda", enabled=env.device.type == "cuda" and cfg.precision == "fp16")
        process = build_process(recipe)
        generator = torch.Generator(device=env.device).manual_seed(cfg.seed * 1_000_003 + env.rank)

        if cfg.batch_size % env.world_size:
            raise RecipeError(
                f"recipe error at train.batch_size: {cfg.batch_size} is not divisible by {env.world_size} "
                f"processes; choose a multiple of the process count"
            )
        per_rank = cfg.batch_size // env.world_size
        if per_rank % cfg.grad_accum_steps:
            raise RecipeError(
                f"recipe error at train.grad_accum_steps: {per_rank} images per process "
                f"(train.batch_size {cfg.batch_size} / {env.world_size} processes) do not split into "
                f"{cfg.grad_accum_steps} equal micro-batches; choose a divisor of {per_rank}"
            )
        if len(dataset) < cfg.batch_size:
            raise RecipeError(
                f"recipe error at train.batch_size: {cfg.batch_size} is larger than the dataset ({len(dataset)} items)"
            )
        sampler = ResumableSampler(len(dataset), per_rank, env.rank, env.world_size, seed=cfg.seed)
        loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=cfg.num_workers,
                            drop_last=True, pin_memory=env.device.type == "cuda",
                            # its own generator: creating an iterator must not consume the global
                            # RNG (label dropout draws from it), or a resume would diverge
                            generator=torch.Generator().manual_seed(cfg.seed))

        if env.is_main:  # before anything is read from or written to the run folder
            check_run_dir(run_dir)
            held.enter_context(run_lock(run_dir))
        step = 0
        environment = describe_environment(env.device, env.world_size, cfg.strategy)
        resumed_on_other_setup: list[str] = []
        skipped_notes: list[str] = []
        if resume is not None:  # the checkpoint asked for, or an error
            ckpt = load_checkpoint(resume, map_location=env.device)
        else:  # the newest checkpoint that verifies; damaged ones are skipped with a warning
            ckpt = load_newest_verified(run_dir, map_location=env.device, warn=skipped_notes.append)
        checkpoint_path = None if ckpt is None else ckpt["path"]
        if ckpt is not None:
            try:
                check_state_dict(model, ckpt["model"], f"checkpoint {checkpoint_path}")
            except ValueError as exc:
                raise CheckpointError(f"{exc}; it was written by another model: use another output_dir or the matching recipe") from None
            step = check_train_state(ckpt["state"], checkpoint_path)
            recorded = ckpt["config"].get("recipe", {}).get("train", {}) if isinstance(ckpt["config"].get("recipe"), dict) else {}
            if isinstance(recorded, dict) and "seed" in recorded and recorded["seed"] != cfg.seed:
                skipped_notes.append(f"{checkpoint_path} was written with train.seed={recorded['seed']}; continuing "
                                     f"that run (its random state), not a new one with seed {cfg.seed}: give another "
                                     f"output_dir for a new run")
            if step > cfg.max_steps:
                raise CheckpointError(f"checkpoint {checkpoint_path} is at step {step}, beyond train.max_steps "
                                      f"({cfg.max_steps}): raise train.max_steps to continue it, or give another output_dir")
            resumed_on_other_setup = exactness_differences(ckpt["config"].get("environment"), environment)
        elif init_from is not None:
            _init_weights(model, ema, init_from)

        # FSDP2: shard the model and its EMA alike (the EMA update then runs on each rank's shards)
        # before the optimizer is built on the sharded parameters; a checkpoint's full states are
        # loaded after, each rank keeping its shard.
        sharded_blocks = shard_model(model) if sharded else 0
        if sharded:
            shard_model(ema.module)
        optimizer, scheduler = build_optimizer(recipe, model)
        if ckpt is not None:
            try:
                load_model_state(model, ckpt["model"])
                load_model_state(ema.module, ckpt["ema"])
                state = ckpt["state"]
                ema.n_averaged.fill_(int(state["ema_n_averaged"]))
                load_optimizer_state(model, optimizer, state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                scaler.load_state_dict(state["scaler"])
                sampler.load_state_dict(state["data"])
                _set_rng_state(_own_rng_state(state, env), generator)
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
                raise CheckpointError(f"checkpoint {checkpoint_path}: state.pt is malformed ({one_line(exc)}); "
                                      f"resume from another checkpoint with --resume") from None

        train_model: torch.nn.Module = model
        sync_model = None  # the module whose gradient synchronisation micro-batches turn off
        if sharded:
            sync_model = model
        elif env.distributed:
            train_model = sync_model = DistributedDataParallel(
                model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
        if cfg.compile:
            train_model = torch.compile(train_model)

        config = {"recipe": recipe.to_dict(), "model": model.config, "data": facts, "environment": environment}
        logger = RunLogger(run_dir, total_steps=cfg.max_steps, start_step=step, batch_size=cfg.batch_size,
                           show_progress=progress, logging=recipe.logging, config=config, name=recipe.name)
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
            record_environment(run_dir, environment, step)
            for note in skipped_notes:
                logger.message(f"warning: {note}")
            if sharded:
                logger.message(f"FSDP over {env.world_size} processes: " + (
                    f"{sharded_blocks} blocks sharded one by one, then the rest of the model" if sharded_blocks else
                    f"backbone {model.config.get('backbone', type(model).__name__)} names no blocks (shard_units), "
                    f"so the whole model is one unit, gathered at once"))
            if checkpoint_path is not None:
                logger.message(f"resumed from {checkpoint_path} at step {step}")
            if resumed_on_other_setup:
                logger.message(
                    f"resuming on a different setup ({', '.join(resumed_on_other_setup)}): the run continues "
                    f"correctly but is equal to an uninterrupted one only to float rounding, not bit for bit"
                )

        def weights_finite() -> bool:
            finite = torch.tensor([float(all(torch.isfinite(local(p)).all() for p in model.parameters()))],
                                  device=env.device)
            if sharded:  # each rank sees its shards only
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            return bool(finite.item())

        def checkpoint_now() -> Path | None:
            path = None
            if not weights_finite():
                raise TrainingError(f"weights are not finite at step {step}; not checkpointing them. "
                                    f"Last good checkpoint: {latest_checkpoint(run_dir) or 'none yet'}")
            # collectives under FSDP (every rank gathers, rank 0 receives the full states)
            weights, ema_weights = full_model_state(model), full_model_state(ema.module)
            optimizer_state = full_optimizer_state(model, optimizer)
            rng = _rng_states(generator, env)
            if env.is_main:
                state = {
                    "step": step,
                    "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "ema_n_averaged": int(ema.n_averaged.item()),
                    "data": sampler.state_dict(),
                    **rng,
                }
                path = save_checkpoint(run_dir, step, weights, ema_weights, state, config, cfg.keep_last)
            barrier(env)
            return path

        def grid_now(path: Path) -> Path | None:
            """A grid of EMA samples written by rank 0. Under FSDP every rank samples (the same
            images: the sharded EMA gathers its weights from all ranks as it runs)."""
            if not (env.is_main or sharded):
                return None
            images, labels = sample_images(recipe, process, ema.module.eval(), facts, env.device)
            model.train()
            if not env.is_main:
                return None
            grid = save_sample_grid(images, labels, path)
            logger.image("samples", grid, step)
            return grid

        losses: list[float] = []
        last_checkpoint = None
        # the step of the newest checkpoint, the same on every rank (only rank 0 gets a path back),
        # so that every rank decides alike whether the run still needs its final checkpoint
        checkpointed_at = -1
        steps_this_run = 0
        skipped = consecutive_bad = 0
        stopped_by = None
        batches = iter(loader)
        model.train()
        with stop_requests() as stop:
            while step < cfg.max_steps and (stop_after is None or steps_this_run < stop_after):
                try:
                    x, y = next(batches)
                except StopIteration:
                    sampler.next_epoch()
                    batches = iter(loader)
                    x, y = next(batches)
                sampler.advance()
                x, y = apply_to_collection((x, y), torch.Tensor, lambda t: t.to(env.device, non_blocking=True))
                y = y if facts["num_classes"] else None
                try:
                    optimizer.zero_grad(set_to_none=True)
                    loss = accumulate_gradients(train_model, process, x, y, generator, cfg.grad_accum_steps, scaler,
                                                lambda: _autocast(env, cfg.precision), sync_model)
                except torch.OutOfMemoryError:
                    raise TrainingError(
                        f"out of {env.device.type.upper()} memory at step {step + 1} with "
                        f"{per_rank // cfg.grad_accum_steps} images per process: lower train.batch_size or raise "
                        f"train.grad_accum_steps, set model.grad_checkpointing: true, or use train.precision: bf16"
                    ) from None
                scaler.unscale_(optimizer)
                # under FSDP the norm is a DTensor reduced over all shards, the same on every rank
                grad_norm = local(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf))
                value = loss.clone()
                if env.distributed:  # every rank sees the same mean loss and so agrees on a skip
                    dist.all_reduce(value, op=dist.ReduceOp.AVG)
                loss_value = float(value)
                # fp16's gradient scaler skips overflowing steps itself; any other non-finite
                # loss or gradient skips the update here, so weights never become NaN.
                bad = not math.isfinite(loss_value) or (not scaler.is_enabled() and not math.isfinite(float(grad_norm)))
                step += 1
                steps_this_run += 1
                if bad:
                    optimizer.zero_grad(set_to_none=True)
                    if scaler.is_enabled():
                        scaler.update()
                    skipped += 1
                    consecutive_bad += 1
                    logger.message(f"step {step}: non-finite loss or gradient ({loss_value}); step skipped ({skipped} so far)")
                    if consecutive_bad >= cfg.max_bad_steps:
                        good = latest_checkpoint(run_dir)
                        raise TrainingError(
                            f"{consecutive_bad} consecutive steps up to step {step} had a non-finite loss or "
                            f"gradient; stopping. Last good checkpoint: {good or 'none yet'}. Lower train.lr, "
                            f"set train.grad_clip, or use bf16 instead of fp16"
                        )
                else:
                    consecutive_bad = 0
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    ema.update_parameters(model)
                    losses.append(loss_value)
                    logger.step(step, loss_value, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                                skipped=skipped or None, log=step % cfg.log_every == 0)
                if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                    last_checkpoint, checkpointed_at = checkpoint_now(), step
                if cfg.sample_every and step % cfg.sample_every == 0:
                    grid_now(run_dir / "samples" / f"step_{step:07d}.png")
                requested = _agreed_stop(stop["signal"], env)
                if requested:
                    stopped_by = requested
                    logger.message(f"{requested} received: checkpointing at step {step} and stopping")
                    break

        if checkpointed_at != step:
            last_checkpoint = checkpoint_now()
        result = TrainResult(run_dir=run_dir, step=step, losses=losses, checkpoint=last_checkpoint,
                             model=model, ema=ema.module, stopped_by=stopped_by, skipped_steps=skipped)
        if step >= cfg.max_steps:
            result.grid = grid_now(run_dir / "samples.png")
        if env.is_main and step >= cfg.max_steps:
            result.loss_curve = save_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
            logger.message(f"samples: {result.grid}  loss curve: {result.loss_curve}")
        logger.close()
        result.seconds = time.perf_counter() - start_time
        return result
    finally:
        held.close()
        cleanup_distributed()
