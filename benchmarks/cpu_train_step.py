"""CPU cost of the trainer's own step for a recipe, eager against ``torch.compile``.

Usage:  python benchmarks/cpu_train_step.py recipes/quickstart.yaml recipes/benchmark/base.yaml \\
            [--steps 60] [--warmup 15] [--rounds 3] [--threads 1]

Times ``Trainer.train_step`` (what ``train`` runs: forward, backward, clipping, AdamW, EMA) on
batches of the recipe's own data, in CPU-seconds of this process per step (``time.process_time``)
and in wall seconds. Eager and compiled steps alternate in rounds, so that load from other
processes falls on both alike; compilation shows in the wall time of the warm-up steps (the
compiler's C++ builds run in worker processes, outside this process's CPU time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def measure(path: str, compiled: bool, steps: int, warmup: int) -> tuple[float, float, float]:
    """``(wall seconds of the warm-up steps (compilation included), CPU-seconds per step, wall
    seconds per step)``."""
    from diffit_toolkit.build import build_dataset, load_recipe
    from diffit_toolkit.train.distributed import DistEnv
    from diffit_toolkit.train.trainer import Trainer

    recipe = load_recipe(path, overrides=[f"train.compile={str(compiled).lower()}"])
    dataset = build_dataset(recipe)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = Trainer(recipe, env, dataset=dataset).setup()
    batch = recipe.train.batch_size
    gen = torch.Generator().manual_seed(0)
    index = torch.randint(0, len(dataset), (batch * (steps + warmup),), generator=gen)
    items = [dataset[int(i)] for i in index]
    xs = torch.stack([x for x, _ in items]).view(steps + warmup, batch, *items[0][0].shape)
    ys = torch.stack([y for _, y in items]).view(steps + warmup, batch)
    start = time.perf_counter()
    for i in range(warmup):
        trainer.train_step(xs[i], ys[i] if trainer.facts["num_classes"] else None)
    first = time.perf_counter() - start
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(warmup, warmup + steps):
        trainer.train_step(xs[i], ys[i] if trainer.facts["num_classes"] else None)
    return first, (time.process_time() - cpu) / steps, (time.perf_counter() - wall) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} timed steps after {args.warmup}, "
          f"{args.rounds} alternating rounds")
    print("| recipe | torch.compile | warm-up steps (wall s) | CPU-s / step | wall s / step | speed-up (CPU) |")
    print("|---|---|---|---|---|---|")
    for path in args.recipes:
        runs: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
        for _ in range(args.rounds):
            for compiled in (False, True):
                runs[compiled].append(measure(path, compiled, args.steps, args.warmup))
        eager = statistics.median(r[1] for r in runs[False])
        for compiled in (False, True):
            first = statistics.median(r[0] for r in runs[compiled])
            cpu = statistics.median(r[1] for r in runs[compiled])
            wall = statistics.median(r[2] for r in runs[compiled])
            print(f"| {path} | {'on' if compiled else 'off'} | {first:.1f} | {cpu:.4f} | {wall:.4f} | "
                  f"{eager / cpu:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
