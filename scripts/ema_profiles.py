"""Measure EMA length in one training run: track power-function EMAs beside the recipe's own.

EDM2's power-function EMA updates with ``decay = (1 - 1/n)^(gamma + 1)`` after ``n`` updates, so
its averaging window grows with the run (relative width ``sigma_rel``). This script trains a
digits recipe once while keeping one such average per ``gamma``, then scores every average (and
the recipe's own EMA) with the offline digits judge at the given guidance scales::

    python scripts/ema_profiles.py train recipes/quickstart.yaml runs/ema_profiles
    python scripts/ema_profiles.py score runs/ema_profiles --scales 1 --num 1000

The extra averages are saved to ``OUT/ema_profiles.pt`` (one state dict per ``gamma``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

GAMMAS = (2.0, 4.0, 8.0, 16.0, 32.0)


def sigma_rel(gamma: float) -> float:
    """EDM2's relative standard deviation of a power-function EMA profile with exponent ``gamma``."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


class _WithProfiles(AveragedModel):
    """The trainer's EMA plus one power-function average per ``gamma`` (updated in the same step)."""

    last: "_WithProfiles | None" = None

    def __init__(self, model: torch.nn.Module, *args, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        self.profiles = {g: [p.detach().clone() for p in model.parameters()] for g in GAMMAS}
        _WithProfiles.last = self

    def update_parameters(self, model: torch.nn.Module) -> None:
        super().update_parameters(model)
        n = int(self.n_averaged)
        params = [p.detach() for p in model.parameters()]
        for gamma, average in self.profiles.items():
            decay = (1 - 1 / n) ** (gamma + 1) if n > 1 else 0.0
            torch._foreach_lerp_(average, params, 1 - decay)


def train_with_profiles(recipe_path: str, out: Path, overrides: list[str]) -> None:
    import diffit_toolkit.train.trainer as trainer
    from diffit_toolkit.build import load_recipe

    trainer.AveragedModel = _WithProfiles  # the trainer builds its EMA through this name
    recipe = load_recipe(recipe_path, [*overrides, f"output_dir={out}", "train.keep_last=1"])
    result = trainer.train(recipe, device="cpu", progress=False)
    names = [name for name, _ in result.model.named_parameters()]
    averages = _WithProfiles.last.profiles
    torch.save({g: dict(zip(names, ps)) for g, ps in averages.items()}, out / "ema_profiles.pt")
    print(f"trained {result.step} steps; wrote {out / 'ema_profiles.pt'}")


def score_profiles(out: Path, scales: list[float], num: int) -> None:
    from diffit_toolkit.eval.digits import DigitsMetric
    from diffit_toolkit.inference.pipeline import load_pipeline

    gen = load_pipeline(out, device="cpu")
    metric = DigitsMetric(cache=out / "classifier.pt")
    own = {k: v.clone() for k, v in gen.model.state_dict().items()}
    profiles = torch.load(out / "ema_profiles.pt", weights_only=True)
    print("| EMA | sigma_rel | guidance | accuracy | FD | FD / floor |\n|---|---|---|---|---|---|")
    for label, gamma in [("recipe's own", None), *((f"power {g:g}", g) for g in sorted(profiles))]:
        gen.model.load_state_dict({**own, **(profiles[gamma] if gamma is not None else {})})
        for scale in scales:
            sample = gen.recipe.sample.model_copy(update={"guidance_scale": scale})
            images, labels = gen.sample(num, sample, seed=1)
            s = metric.score(images, labels)
            width = "" if gamma is None else f"{sigma_rel(gamma):.3f}"
            print(f"| {label} | {width} | {scale:g} | {100 * s.accuracy:.1f} % | {s.fd:.3f} | {s.fd / s.floor:.2f} |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a digits recipe with the extra averages")
    t.add_argument("recipe")
    t.add_argument("out", type=Path)
    t.add_argument("overrides", nargs="*", help="recipe overrides, e.g. model.hidden_size=64")
    s = sub.add_parser("score", help="score every average of a run made by 'train'")
    s.add_argument("out", type=Path)
    s.add_argument("--scales", default="1", help="comma-separated guidance scales")
    s.add_argument("--num", type=int, default=1000)
    args = parser.parse_args()
    if args.command == "train":
        train_with_profiles(args.recipe, args.out, args.overrides)
    else:
        score_profiles(args.out, [float(v) for v in args.scales.split(",")], args.num)


if __name__ == "__main__":
    main()
