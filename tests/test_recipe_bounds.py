"""Unbounded recipe input: alias bombs, huge files, absurd sizes, non-finite numbers, and error
messages that must not echo what a file holds. Each case is one line, quickly (no hang)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from diffit_toolkit.cli import app
from diffit_toolkit.build import load_recipe
from diffit_toolkit.recipe import MAX_RECIPE_BYTES, RECIPES_DIR, RecipeError

QUICKSTART = RECIPES_DIR / "quickstart.yaml"


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"extends: {QUICKSTART}\n{text}")
    return path


def one_line_error(path: Path, overrides: list[str] = (), seconds: float = 10.0) -> str:
    start = time.perf_counter()
    with pytest.raises(RecipeError) as err:
        load_recipe(path, list(overrides))
    assert time.perf_counter() - start < seconds
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    # protection: _RecipeLoader.compose_node refuses aliases
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    lines += ["model:", "  mechanism_options:", "    bomb: *i"]
    message = one_line_error(write(tmp_path, "\n".join(lines) + "\n"), seconds=2)
    assert "aliases (*name) are not allowed" in message and "line 3" in message


def test_a_huge_recipe_is_refused_before_parsing(tmp_path):
    # protection: MAX_RECIPE_BYTES read limit in _read_yaml
    path = write(tmp_path, "".join(f"k{i}: {i}\n" for i in range(MAX_RECIPE_BYTES // 8)))
    assert path.stat().st_size > MAX_RECIPE_BYTES
    assert "is larger than 256 KiB" in one_line_error(path, seconds=2)


@pytest.mark.parametrize("override, where", [
    ("model.depth=100000000", "model.depth: 100000000 is beyond the limit of 1024"),
    ("model.hidden_size=10000000", "model.hidden_size"),
    ("diffusion.sigma_data=1.0e+12", "diffusion.sigma_data: input should be less than or equal to 1000000"),
    ("train.seed=1e23", "train.seed"),
    ("train.seed=100000000000000000000000", "train.seed: input should be less than 4294967296"),
    ("train.betas=[2,-1]", "train.betas: each AdamW beta must be in [0, 1)"),
    ("train.lr=.inf", "train.lr: input should be a finite number (got inf)"),
    ("train.grad_clip=.nan", "train.grad_clip: input should be a finite number"),
    ("sample.guidance_scale=.inf", "sample.guidance_scale: input should be a finite number"),
    ("model.mlp_ratio=.nan", "model.mlp_ratio: nan is not a finite number"),
    ("model.mechanism_options={scale: .inf}", "model.mechanism_options.scale: inf is not a finite number"),
    ("model.mechanism_options={n: 100000000000}", "model.mechanism_options.n: 100000000000 is beyond the limit"),
])
def test_absurd_and_non_finite_values_are_one_line_errors(tmp_path, override, where):
    # protection: Field bounds, allow_inf_nan=False, _check_options, the betas validator
    message = one_line_error(QUICKSTART, [override])
    assert message.startswith(f"recipe error at {where.split(':')[0]}") and where in message, message


def test_image_backbone_block_counts_are_bounded():
    message = one_line_error(QUICKSTART, ["model.backbone=image_diffit", "model.num_blocks=[600, 600]"])
    assert "model.num_blocks" in message and "beyond the limit" in message


def test_a_duplicate_key_is_refused_and_never_echoes_the_file_it_names(tmp_path):
    # protection: _RecipeLoader.construct_mapping refuses duplicate keys; 'extends' of a non-recipe
    secret = tmp_path / "credentials"
    secret.write_text("api_token: sk-live-0123456789abcdef\n")
    path = write(tmp_path, f"extends: {secret}\n")
    message = one_line_error(path)
    assert "duplicate key 'extends'" in message and "line 2" in message
    assert "sk-live" not in message and "api_token" not in message
    direct = tmp_path / "direct.yaml"
    direct.write_text(f"extends: {secret}\n")
    message = one_line_error(direct)
    assert "is not a recipe" in message and "sk-live" not in message and "api_token" not in message


def test_a_binary_file_as_recipe_is_one_line(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    assert "is not UTF-8 text" in one_line_error(path)


def test_long_values_are_cut_short_in_messages(tmp_path):
    message = one_line_error(QUICKSTART, ["train.precision=" + "x" * 500])
    assert "train.precision" in message and len(message) < 300


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["train.lr", "train.weight_decay", "train.ema_decay", "train.grad_clip", "sample.eta",
                        "sample.guidance_scale", "sample.guidance_power", "diffusion.sigma_data", "model.mlp_ratio",
                        "model.class_dropout_prob", "train.betas", "sample.guidance_interval"]),
       st.sampled_from([math.inf, -math.inf, math.nan]), st.booleans())
def test_no_recipe_number_can_be_non_finite(key, value, as_pair):
    # every float of every section: allow_inf_nan=False on the typed sections, _check_options on the free ones
    text = {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")
    raw = f"[0.5, {text}]" if as_pair or key in ("train.betas", "sample.guidance_interval") else text
    with pytest.raises(RecipeError) as err:
        load_recipe(QUICKSTART, [f"{key}={raw}"])
    assert "\n" not in str(err.value) and str(err.value).startswith("recipe error at " + key.split(".")[0])


def test_cli_guidance_scale_must_be_finite(tmp_path):
    # protection: sample's option check; before: inf wrote black images and exited 0, nan named no field
    runner = CliRunner()
    for value in ("inf", "nan", "-inf"):
        result = runner.invoke(app, ["sample", str(tmp_path), "--guidance-scale", value, "--device", "cpu"],
                               env={"COLUMNS": "300"})
        assert result.exit_code == 2, result.output
        assert "--guidance-scale" in result.output and "finite" in result.output, result.output


def _int_fields():
    from diffit_plugins.processes import GaussianOptions
    from diffit_toolkit.recipe import LoggingSection, SampleSection, TrainSection, _takes_int

    # the diffusion keys are the gaussian process's (the test switches the quickstart to it)
    for section, cls in (("train", TrainSection), ("sample", SampleSection), ("diffusion", GaussianOptions),
                         ("logging", LoggingSection)):
        for name, info in cls.model_fields.items():
            if _takes_int(info.annotation):
                yield f"{section}.{name}"


@pytest.mark.parametrize("key", sorted(_int_fields()))
@pytest.mark.parametrize("value", ["true", "false", "yes", "no"])
def test_a_yaml_boolean_is_never_read_as_a_whole_number(key, value):
    from diffit_toolkit.recipe import RecipeError, read_recipe

    process = ["diffusion.process=gaussian"] if key.startswith("diffusion.") else []
    with pytest.raises(RecipeError, match=f"recipe error at {key}: expected a whole number, not a boolean"):
        read_recipe(QUICKSTART, [*process, f"{key}={value}"])


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", ".", "x\\y", " "])
def test_a_recipe_name_is_never_a_path(name):
    from diffit_toolkit.recipe import RecipeError, parse_recipe

    with pytest.raises(RecipeError, match="recipe error at name: must be one plain folder name"):
        parse_recipe({"name": name})
    assert parse_recipe({"name": "ok-name_1.2"}).run_dir.parts == ("runs", "ok-name_1.2")


def test_an_extends_fan_out_or_a_deep_chain_is_refused_at_once(tmp_path):
    from diffit_toolkit.recipe import MAX_EXTENDS_DEPTH, MAX_EXTENDS_FILES, RecipeError, read_recipe

    for i in range(8):  # 2^8 reads of one file
        (tmp_path / f"f{i}.yaml").write_text(f"extends: [f{i + 1}.yaml, f{i + 1}.yaml]\n")
    (tmp_path / "f8.yaml").write_text(f"extends: {QUICKSTART}\n")
    start = time.perf_counter()
    with pytest.raises(RecipeError, match=f"read more than {MAX_EXTENDS_FILES} recipe files"):
        read_recipe(tmp_path / "f0.yaml")
    for i in range(MAX_EXTENDS_DEPTH + 1):
        (tmp_path / f"c{i}.yaml").write_text(f"extends: c{i + 1}.yaml\n")
    (tmp_path / f"c{MAX_EXTENDS_DEPTH + 1}.yaml").write_text(f"extends: {QUICKSTART}\n")
    with pytest.raises(RecipeError, match=f"more than {MAX_EXTENDS_DEPTH} files deep"):
        read_recipe(tmp_path / "c0.yaml")
    assert time.perf_counter() - start < 5
    (tmp_path / "ok.yaml").write_text("extends: c10.yaml\n")  # a chain within the limit still loads
    assert read_recipe(tmp_path / "ok.yaml").name == "quickstart"


def test_values_nested_too_deeply_are_one_line(tmp_path):
    path = write(tmp_path, "model:\n  mechanism_options: " + "[" * 5000 + "]" * 5000 + "\n")
    from diffit_toolkit.recipe import read_recipe

    with pytest.raises(RecipeError, match="nested too deeply"):
        read_recipe(path)


@pytest.mark.parametrize("command", ["model-info", "convert"])
def test_yaml_tags_in_set_are_a_usage_error(tmp_path, command):
    marker = tmp_path / "ran"
    value = f'depth=!!python/object/apply:pathlib.Path.touch [{marker}]'
    args = ["model-info", "-b", "dit", "-p", "S/8"] if command == "model-info" else \
        ["convert", str(tmp_path / "x.pt"), str(tmp_path / "y.safetensors")]
    result = CliRunner().invoke(app, [*args, "--set", value], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "is not plain YAML" in result.output and not marker.exists(), result.output


@pytest.mark.parametrize("command", ["model-info", "convert"])
def test_sizes_in_set_of_model_info_and_convert_are_bounded(tmp_path, command):
    args = ["model-info", "-b", "dit", "-p", "S/8"] if command == "model-info" else \
        ["convert", str(tmp_path / "x.pt"), str(tmp_path / "y.safetensors")]
    start = time.perf_counter()
    result = CliRunner().invoke(app, [*args, "--set", "depth=100000000"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "model.depth: 100000000 is beyond the limit of 1024" in result.output, result.output
    assert time.perf_counter() - start < 10
