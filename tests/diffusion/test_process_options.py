"""The diffusion section is validated against the chosen process's own options."""

from __future__ import annotations

import textwrap

import pytest
import torch

from diffit_toolkit.build import build_process, load_recipe
from diffit_toolkit.recipe import RecipeError, parse_recipe

QUICKSTART = "recipes/quickstart.yaml"

USER_PROCESS = textwrap.dedent('''
    """A user's process with an option of its own: the noise scale of a toy VE-style loss."""
    import torch
    from pydantic import Field

    from diffit_toolkit.process import Process
    from diffit_toolkit.recipe import ProcessOptions
    from diffit_toolkit.registry import register_process


    class ScaledOptions(ProcessOptions):
        noise_scale: float = Field(1.0, gt=0, le=100)


    @register_process("scaled_noise_for_test")
    class ScaledNoise(Process):
        Options = ScaledOptions

        def loss(self, model, x0, y, generator):
            t = torch.rand(x0.shape[0], generator=generator, device=x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device) * self.config.noise_scale
            return ((model(x0 + t.view(-1, 1, 1, 1) * noise, t, y) - noise) ** 2).flatten(1).mean(1)

        def noise_level(self, t):
            return t.to(torch.float64)
''')


@pytest.fixture
def user_process(tmp_path, monkeypatch, plugin_system):
    """The plugin file loaded as ``-p`` loads it, into a plugin system discarded after the test."""
    import sys

    from diffit_toolkit.registry import PLUGINS_ENV, load_plugin_modules, samplers

    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    path = tmp_path / "scaled_noise_probe.py"
    path.write_text(USER_PROCESS)
    load_plugin_modules([str(path)])
    samplers.register("scaled_noise_for_test.euler", lambda *a: None)
    yield "scaled_noise_for_test"
    sys.modules.pop("scaled_noise_probe", None)


def test_a_user_process_declares_an_option_that_a_recipe_sets_and_the_process_reads(user_process):
    overrides = [f"diffusion.process={user_process}", "diffusion.noise_scale=2.5", "sample.sampler=euler"]
    recipe = load_recipe(QUICKSTART, overrides)  # the quickstart's precond: edm is dropped (see below)
    assert recipe.diffusion.noise_scale == 2.5 and recipe.to_dict()["diffusion"] == {"process": user_process,
                                                                                      "noise_scale": 2.5}
    process = build_process(recipe)
    assert process.config.noise_scale == 2.5
    loss = process.loss(lambda x, t, y: torch.zeros_like(x), torch.zeros(2, 1, 4, 4), None, torch.Generator().manual_seed(0))
    assert loss.shape == (2,) and bool((loss > 1).all())  # the noise's variance is 2.5 ** 2
    with pytest.raises(RecipeError, match=rf"^recipe error at diffusion.noise_scale: input should be less than or "
                                          rf"equal to 100 \(got 1000\)$"):
        load_recipe(QUICKSTART, [*overrides[:1], "diffusion.noise_scale=1000", overrides[2]])
    with pytest.raises(RecipeError, match=rf"^recipe error at diffusion.noise_scal: the {user_process} process takes no "
                                          rf"option 'noise_scal'; did you mean 'noise_scale'\? \(its options: "
                                          rf"noise_scale\); remove it$"):
        load_recipe(QUICKSTART, [*overrides[:1], "diffusion.noise_scal=2", overrides[2]])


@pytest.mark.parametrize("process, key, value, valid", [
    ("flow", "schedule", "cosine", "none"),
    ("flow", "prediction", "v", "none"),
    ("flow", "precond", "ve", "none"),
    ("edm", "schedule", "cosine", "precond, sigma_data"),
    ("gaussian", "sigma_data", 1.0, "schedule, num_timesteps, prediction, learn_sigma, min_snr_gamma"),
])
def test_a_key_the_process_does_not_take_is_one_line_naming_its_options(process, key, value, valid):
    with pytest.raises(RecipeError, match=rf"^recipe error at diffusion.{key}: the {process} process takes no option "
                                          rf"'{key}' \(its options: {valid}\); remove it$"):
        load_recipe(QUICKSTART, [f"diffusion.process={process}", f"diffusion.{key}={value}"]
                    + (["sample.sampler=heun"] if process == "flow" else []))


def test_a_recipe_saved_before_processes_declared_options_still_reads():
    """Every saved recipe used to list all the keys of every process, at their defaults."""
    saved = {"name": "old", "model": {"backbone": "latent_diffit", "preset": "S/2"},
             "diffusion": {"process": "edm", "schedule": "linear", "num_timesteps": 1000, "prediction": "eps",
                           "learn_sigma": True, "precond": "vp", "sigma_data": 0.5, "min_snr_gamma": None},
             "sample": {"sampler": "heun"}}
    recipe = parse_recipe(saved)
    assert recipe.to_dict()["diffusion"] == {"process": "edm", "precond": "vp", "sigma_data": 0.5}
    saved["diffusion"]["schedule"] = "cosine"  # not the old default: this edm recipe asked for something it never had
    with pytest.raises(RecipeError, match="the edm process takes no option 'schedule'"):
        parse_recipe(saved)


def test_a_combination_the_options_refuse_is_one_line():
    with pytest.raises(RecipeError, match=r"^recipe error at diffusion.learn_sigma: the learned variance is trained "
                                          r"with epsilon prediction; set diffusion.prediction: eps"):
        parse_recipe({"diffusion": {"process": "gaussian", "prediction": "v", "learn_sigma": True}})


def test_an_unknown_process_is_one_line_with_a_suggestion():
    with pytest.raises(RecipeError, match=r"^recipe error at diffusion.process: .*'gausian'.*did you mean 'gaussian'"):
        parse_recipe({"diffusion": {"process": "gausian"}})
