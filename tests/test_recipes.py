"""Recipes: composition, overrides, and a table of bad recipes with their one-line messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffit_toolkit.backbones import IMAGE_PRESETS
from diffit_toolkit.build import build_model, load_recipe, validate_recipe
from diffit_toolkit.recipe import RECIPES_DIR, RecipeError, apply_overrides, load_raw

def _is_recipe(path: Path) -> bool:
    """Recipes, not the ablation suite files (which list recipes under ``recipes:``)."""
    return "recipes" not in (yaml.safe_load(path.read_text()) or {})


SHIPPED = sorted(p for p in RECIPES_DIR.rglob("*.yaml") if _is_recipe(p))
TINY_MODEL = {"backbone": "latent_diffit", "preset": None, "input_size": 8, "in_channels": 1, "patch_size": 1,
              "hidden_size": 32, "depth": 1, "num_heads": 2, "num_classes": 10}
DIGITS = {"kind": "digits"}


def write(tmp_path: Path, name: str, data: dict | str) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.model["backbone"] in {"latent_diffit", "dit", "image_diffit"}


def test_ablation_recipes_differ_from_their_base_only_in_the_mechanism():
    base = load_raw(RECIPES_DIR / "ablation" / "base.yaml")
    mechanisms = set()
    for path in sorted((RECIPES_DIR / "ablation").glob("*.yaml")):
        if path.name == "base.yaml" or not _is_recipe(path):
            continue
        raw = load_raw(path)
        mechanisms.add(raw["model"]["mechanism"])
        assert {k: v for k, v in raw.items() if k not in ("name", "model")} == {
            k: v for k, v in base.items() if k not in ("name", "model")}
        # the mechanism and its options; the parameter-matched variant also changes the width
        free = {"mechanism", "mechanism_options"} | ({"hidden_size"} if path.stem.endswith("_matched") else set())
        assert {k: v for k, v in raw["model"].items() if k not in free} == {
            k: v for k, v in base["model"].items() if k not in free}
    assert mechanisms == {"tmsa", "window_tmsa", "relative_bias", "mlp", "separate_token", "adaln_zero", "additive",
                          "cross_attention", "in_context", "adaln", "adaln_single"}


def test_extends_merges_sections_key_by_key_and_set_overrides(tmp_path):
    write(tmp_path, "base.yaml", {"model": TINY_MODEL, "data": DIGITS, "train": {"lr": 0.1, "max_steps": 5}})
    child = write(tmp_path, "child.yaml", {"extends": "base.yaml", "train": {"max_steps": 7}})
    recipe = load_recipe(child, ["train.lr=3e-4", "model.depth=2", "sample.guided_channels=null"])
    assert recipe.train.max_steps == 7 and recipe.train.lr == pytest.approx(3e-4)
    assert recipe.model["depth"] == 2 and recipe.model["hidden_size"] == 32
    assert recipe.sample.guided_channels is None


def test_resolved_recipe_round_trips_through_yaml(tmp_path):
    recipe = load_recipe(RECIPES_DIR / "quickstart.yaml")
    again = validate_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


def test_shipped_recipe_found_by_name():
    assert load_recipe("quickstart").name == "quickstart"


BAD = [
    ({"train": {"bach_size": 3}}, "recipe error at train.bach_size: unknown key; did you mean 'batch_size'?"),
    ({"modle": {}}, "recipe error at modle: unknown key; did you mean 'model'?"),
    ({"train": {"lr": "fast"}}, "recipe error at train.lr: input should be a valid number"),
    ({"train": {"batch_size": 0}}, "recipe error at train.batch_size: input should be greater than 0"),
    ({"train": {"precision": "fp8"}}, "recipe error at train.precision: input should be 'fp32', 'bf16' or 'fp16'"),
    ({"train": {"strategy": "zero3"}}, "recipe error at train.strategy: input should be 'ddp' or 'fsdp'"),
    ({"diffusion": {"process": "ddpm"}}, "recipe error at diffusion.process: unknown diffusion process 'ddpm' (available: edm, flow, gaussian)"),
    ({"diffusion": {"process": "edn"}}, "unknown diffusion process 'edn'; did you mean 'edm'?"),
    ({"sample": {"sampler": "heun"}}, "recipe error at sample.sampler: sampler 'heun' does not sample the gaussian process (valid: ddim, ddpm"),
    ({"model": {**TINY_MODEL, "hidden_size": 30, "num_heads": 4}}, "width 30 is not divisible by 4 heads"),
    ({"model": {**TINY_MODEL, "window": 3}}, "token grid 8x8 is not divisible by window 3x3"),
    ({"model": {**TINY_MODEL, "mechanism": "tmas"}}, "unknown conditioning mechanism 'tmas'; did you mean 'tmsa'?"),
    ({"model": {**TINY_MODEL, "backbone": "latnet_diffit"}}, "unknown backbone 'latnet_diffit'; did you mean 'latent_diffit'?"),
    ({"model": {**TINY_MODEL, "windw": 4}}, "did you mean 'window'?"),
    ({"model": {**TINY_MODEL, "input_size": 9, "patch_size": 2}}, "input size 9 is not divisible by patch size 2"),
    ({"model": {**TINY_MODEL, "mechanism": "relative_bias", "rel_pos_bias": False}}, "'relative_bias' acts on the relative position bias"),
    ({"diffusion": {"learn_sigma": True, "prediction": "v"}}, "recipe error at diffusion.learn_sigma"),
    ({"diffusion": {"process": "edm"}, "model": {**TINY_MODEL, "learn_sigma": True}, "sample": {"sampler": "heun"}}, "recipe error at model.learn_sigma"),
    ({"data": {"knd": "digits"}}, "recipe error at data.knd: unknown key; did you mean 'kind'?"),
]


@pytest.mark.parametrize(("patch", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_recipes_give_one_line_errors(patch, message):
    data = {"model": TINY_MODEL, "data": DIGITS, **patch}
    with pytest.raises(RecipeError) as err:
        validate_recipe(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("recipe error")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: {lr: 1\n", "YAML syntax error"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("extends: self.yaml\n", "recipe extends itself in a cycle"),
        ("extends: missing.yaml\n", "does not exist"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, text, message):
    path = write(tmp_path, "self.yaml", text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_overrides(tmp_path):
    with pytest.raises(RecipeError, match="not of the form key.path=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(RecipeError, match="train.lr is a value, not a section"):
        apply_overrides({"train": {"lr": 1}}, ["train.lr.x=2"])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_every_shipped_recipe_model_builds_at_reduced_size(path):
    """The recipe's model with depth/width cut down (same mechanism, windows, grid) runs a forward."""
    import torch

    recipe = load_recipe(path)
    small = dict(recipe.model)
    if small["backbone"] == "image_diffit":
        stages = len(small.get("channels") or IMAGE_PRESETS[small["preset"]]["channels"])
        small.update(channels=[32] * stages, head_dim=16, time_dim=32, norm_groups=8)
    else:
        small.update(depth=1, hidden_size=32, num_heads=2)
    reduced = validate_recipe({**recipe.to_dict(), "model": small, "data": {}})
    model = build_model(reduced)
    size = model.config["input_size"]
    x = torch.randn(1, model.config["in_channels"], size, size)
    y = torch.zeros(1, dtype=torch.long) if model.config["num_classes"] else None
    out = model(x, torch.tensor([10]), y)
    assert out.shape[-2:] == (size, size)


def test_tuning_variants_pin_what_their_comparison_is_about():
    """The tuning variants extend the quickstart; each must keep its own process and sampler when
    the quickstart's defaults change."""
    gauss = load_recipe(RECIPES_DIR / "tuning" / "gauss_eps.yaml")
    assert (gauss.diffusion.process, gauss.diffusion.schedule, gauss.diffusion.prediction) == ("gaussian", "cosine", "eps")
    assert (gauss.sample.sampler, gauss.sample.steps, gauss.sample.guidance_interval) == ("ddim", 50, None)
    edm = load_recipe(RECIPES_DIR / "tuning" / "edm.yaml")
    assert (edm.diffusion.process, edm.sample.sampler, edm.train.max_steps) == ("edm", "heun", 1200)
    assert gauss.train.max_steps == edm.train.max_steps and gauss.model == edm.model
