"""The model card (``README.md``) every ``export`` writes: the metadata block the Hugging Face hub
reads, what was trained and how long, the run's evaluation figures, how it samples and the
command that trains it again."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: The card's file name (the hub shows it as the model's page).
CARD_NAME = "README.md"
#: The training recipe an export keeps beside its card, as the run resolved it.
RECIPE_NAME = "training_recipe.yaml"
#: The evaluation file a scored run holds (``benchmark`` / ``ablation`` jobs write it).
RUN_RESULT = "result.json"
#: The figures of an evaluation row shown on the card, in this order, with their headings.
_FIGURES = {"fid": "FID", "fd": "FD", "is_mean": "IS", "precision": "precision", "recall": "recall",
            "accuracy": "accuracy", "floor": "FD floor", "num_images": "images"}


@dataclass
class CardFacts:
    """What a card says about one export.

    Attributes:
        kind: ``toolkit`` (config.json + model.safetensors), ``diffusers-transformer`` or
            ``diffusers-pipeline``.
        recipe: the run's resolved recipe (a plain dict, as its checkpoint records it).
        facts: the data facts (resolution, channels, classes, latent scale, VAE).
        model_config: the backbone's config.
        parameters: the number of parameters.
        step: the training step of the exported checkpoint (``None``: unknown).
        weights: ``ema`` or ``model``.
        license: the hub license id.
        evaluation: rows of evaluation figures (``result.json`` of a scored run), may be empty.
        differences: where another library samples the export differently, one sentence each.
        scheduler: the diffusers scheduler of a pipeline export.
    """

    kind: str
    recipe: dict[str, Any]
    facts: dict[str, Any]
    model_config: dict[str, Any]
    parameters: int
    step: int | None = None
    weights: str = "ema"
    license: str = "other"
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    scheduler: str | None = None


def read_evaluation(run: Path) -> list[dict[str, Any]]:
    """The evaluation rows of a run folder's ``result.json`` (empty when it has none or it is unreadable)."""
    path = run / RUN_RESULT
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    rows = data.get("rows") if isinstance(data, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _metadata(card: CardFacts) -> str:
    pipeline = card.kind.startswith("diffusers")
    name = str(card.recipe.get("name") or "model")
    model = card.recipe.get("model", {})
    tags = ["diffit-toolkit", "diffusion", str(model.get("backbone", "model")), str(card.recipe.get("diffusion", {}).get("process", ""))]
    tags += ["class-conditional"] if card.facts.get("num_classes") else ["unconditional"]
    tags += ["latent-diffusion"] if card.facts.get("latent_scale") is not None else []
    tags += ["DiTPipeline"] if card.kind == "diffusers-pipeline" else []
    block = {
        "library_name": "diffusers" if pipeline else "diffit-toolkit",
        "pipeline_tag": "unconditional-image-generation",  # the hub's task for image generation without a prompt
        "license": card.license,
        "tags": [t for t in dict.fromkeys(tags) if t],
        "model_name": name,
    }
    return "---\n" + yaml.safe_dump(block, sort_keys=False) + "---\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _evaluation(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["No evaluation figures were recorded in the run folder (`diffit-toolkit eval RUN --json FILE` "
                "scores a run)."]
    keys = [k for k in _FIGURES if any(k in r for r in rows)]
    head = ["step", "guidance scale", *(_FIGURES[k] for k in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for row in rows:
        cells = [row.get("step", ""), row.get("guidance_scale", ""), *(row.get(k, "") for k in keys)]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return ["Figures from the run folder's `result.json`:", "", *lines]


def _usage(card: CardFacts) -> list[str]:
    sample = card.recipe.get("sample", {})
    steps, scale = sample.get("steps", 250), float(sample.get("guidance_scale", 1.0))
    classes = int(card.facts.get("num_classes") or 0)
    if card.kind == "diffusers-pipeline":
        from diffit_toolkit.interop.diffusers_pipeline import DITPIPELINE_NULL_CLASS

        pipe_scale = scale if classes == DITPIPELINE_NULL_CLASS else 1.0  # guidance fails on other class counts
        return ["```python", "from diffusers import DiTPipeline", "",
                "pipe = DiTPipeline.from_pretrained(\"PATH\")",
                f"image = pipe(class_labels=[0], num_inference_steps={steps}, guidance_scale={pipe_scale:g}).images[0]",
                "```", "",
                "With diffit-toolkit: `diffit-toolkit sample PATH/transformer --vae PATH/vae --recipe PATH/training_recipe.yaml`."]
    if card.kind == "diffusers-transformer":
        return ["```python", "from diffusers import DiTTransformer2DModel", "",
                "transformer = DiTTransformer2DModel.from_pretrained(\"PATH\")", "```", "",
                "With diffit-toolkit: `diffit-toolkit sample PATH --recipe PATH/training_recipe.yaml"
                + (" --vae VAE`." if card.facts.get("latent_scale") is not None else "`.")]
    return ["```", "diffit-toolkit sample PATH --num 16 --out grid.png", "```", "",
            "The folder carries its sampling settings (`sampling.json`); "
            "`diffit_toolkit.backbones.from_pretrained(\"PATH\")` loads the model alone."]


def model_card(card: CardFacts) -> str:
    """The card's text: the metadata block, then the model, its training, evaluation and use."""
    recipe, facts, cfg = card.recipe, card.facts, card.model_config
    model, diffusion, sample, train = (recipe.get(k, {}) for k in ("model", "diffusion", "sample", "train"))
    name = str(recipe.get("name") or "model")
    lines = [_metadata(card), f"# {name}", ""]
    if recipe.get("description"):
        lines += [str(recipe["description"]), ""]
    what = {"toolkit": "diffit-toolkit pretrained folder", "diffusers-transformer": "diffusers DiTTransformer2DModel",
            "diffusers-pipeline": "diffusers DiTPipeline"}[card.kind]
    lines += [f"A {what}, exported by diffit-toolkit from a training run ({card.weights} weights).", ""]
    classes = int(facts.get("num_classes") or 0)
    data = f"{facts.get('resolution')}x{facts.get('resolution')}, {facts.get('channels')} channels"
    if facts.get("latent_scale") is not None:
        data += f" (latents of the VAE {facts.get('vae')}, scale {facts['latent_scale']:g})"
    lines += ["## Model", "",
              f"- backbone: {cfg.get('backbone', model.get('backbone'))}, mechanism {cfg.get('mechanism', '-')}, "
              f"hidden size {cfg.get('hidden_size', '-')}, depth {cfg.get('depth', '-')}, "
              f"{card.parameters:,} parameters",
              f"- data: {recipe.get('data', {}).get('kind', '?')}, {data}, "
              + (f"{classes} classes" if classes else "unconditional"),
              f"- diffusion: {diffusion.get('process')} process, {diffusion.get('schedule', '-')} schedule, "
              f"{diffusion.get('num_timesteps', '-')} steps, {diffusion.get('prediction', '-')} prediction, "
              f"learned variance {'yes' if diffusion.get('learn_sigma') else 'no'}",
              f"- sampling: {sample.get('sampler')} {sample.get('steps')} steps, guidance scale "
              f"{sample.get('guidance_scale')} ({sample.get('guidance_schedule')}), guided channels "
              f"{sample.get('guided_channels') or 'all'}, clipping {'on' if sample.get('clip_denoised') else 'off'}"]
    if card.scheduler:
        lines.append(f"- diffusers scheduler: {card.scheduler}")
    step = "unknown" if card.step is None else f"{card.step:,}"
    lines += ["", "## Training", "",
              f"Trained for {step} steps of {train.get('max_steps', '?')} (batch {train.get('batch_size', '?')}, "
              f"learning rate {train.get('lr', '?')}, EMA decay {train.get('ema_decay', '?')}, "
              f"precision {train.get('precision', '?')}).", "",
              f"The run's resolved recipe is `{RECIPE_NAME}` beside this card. To train it again (set `output_dir` "
              f"and the data path for your machine):", "",
              "```", f"diffit-toolkit train {RECIPE_NAME}", "diffit-toolkit export RUN_FOLDER OUT"
              + {"toolkit": "", "diffusers-transformer": " --diffusers",
                 "diffusers-pipeline": " --diffusers-pipeline"}[card.kind], "```", "",
              "## Evaluation", "", *_evaluation(card.evaluation), "", "## Use", "", *_usage(card)]
    if card.differences:
        lines += ["", "## Where DiTPipeline and diffit-toolkit sample differ", ""]
        lines += [f"- {d}" for d in card.differences]
    return "\n".join(lines) + "\n"


def write_card(folder: Path, card: CardFacts) -> None:
    """Write ``README.md`` and the resolved ``training_recipe.yaml`` into ``folder``."""
    (folder / CARD_NAME).write_text(model_card(card))
    (folder / RECIPE_NAME).write_text(yaml.safe_dump(card.recipe, sort_keys=False))
