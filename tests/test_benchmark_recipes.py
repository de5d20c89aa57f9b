"""The mechanism benchmark on the digits canvas: one recipe per built-in mechanism, each differing
from the base only in its mechanism, and the suites that run them."""

from __future__ import annotations

import pytest
import yaml

from diffit_toolkit.build import load_recipe
from diffit_toolkit.eval.ablation import is_suite_file, load_suite
from diffit_toolkit.recipe import RECIPES_DIR, load_raw
from diffit_toolkit.registry import conditioning

BENCHMARK = RECIPES_DIR / "benchmark"
RECIPES = sorted(p for p in BENCHMARK.glob("*.yaml") if not is_suite_file(p) and p.name != "base.yaml")


def test_one_recipe_per_built_in_mechanism_differing_from_the_base_only_in_it():
    base = load_raw(BENCHMARK / "base.yaml")
    mechanisms = set()
    for path in RECIPES:
        raw = load_raw(path)
        mechanisms.add(raw["model"]["mechanism"])
        assert {k: v for k, v in raw.items() if k not in ("name", "model")} == {
            k: v for k, v in base.items() if k not in ("name", "model")}
        free = {"mechanism", "mechanism_options"}
        assert {k: v for k, v in raw["model"].items() if k not in free} == {
            k: v for k, v in base["model"].items() if k not in free}
    # window TMSA is TMSA in this backbone (every mechanism attends in its windows): no recipe of its own
    built_in = {"tmsa", "relative_bias", "mlp", "separate_token", "adaln_zero", "additive",
                "cross_attention", "in_context", "adaln", "adaln_single"}
    assert mechanisms == built_in and built_in <= set(conditioning.names())


def test_the_base_is_the_unconditional_digits_canvas_with_windows_over_at_least_64_tokens():
    from diffit_toolkit.backbones.image import image_config

    recipe = load_recipe(BENCHMARK / "base.yaml")
    assert recipe.data["kind"] == "digits_canvas" and recipe.data["conditional"] is False
    assert recipe.model["num_classes"] == 0 and recipe.model["mechanism"] == "tmsa"
    options = {k: v for k, v in recipe.model.items() if k not in ("backbone", "preset")}
    config = image_config(None, **options)
    grids = [config.stage_grid(s) for s in range(config.num_stages)]
    assert grids[0] ** 2 >= 64 and config.block_spec(0).window == (4, 4) != (grids[0], grids[0])
    assert recipe.train.max_steps % recipe.train.ckpt_every == 0


@pytest.mark.parametrize("name", ["suite.yaml", "curve.yaml", "dit_designs.yaml"])
def test_suites_list_existing_recipes_and_score_at_most_the_floor_set(name):
    from diffit_toolkit.data.canvas import make_canvases

    suite = load_suite(BENCHMARK / name)
    assert suite.recipes and all(p.is_file() for p in suite.recipes)
    assert 2 <= suite.num_images <= len(make_canvases("floor")[0])  # the judge scores at most its floor set
    for path in suite.recipes:
        recipe = load_recipe(path, suite.overrides)
        every = suite.eval_every or recipe.train.max_steps
        assert recipe.train.max_steps % every == 0
    assert yaml.safe_load((BENCHMARK / name).read_text())["recipes"]
