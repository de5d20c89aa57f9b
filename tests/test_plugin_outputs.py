"""A user plugin that returns the wrong thing is named in one line, through the command a user runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAULTY_PLUGINS = '''
import torch
from torch import nn

from diffit_toolkit import ConditioningMechanism, Injection, register_conditioning
from diffit_toolkit.registry import register_backbone, register_sampler


@register_conditioning("wrong_width_probe")
class WrongWidth(ConditioningMechanism):
    def __init__(self, spec):
        super().__init__(spec)
        self.proj = nn.Linear(spec.cond_dim, 2 * spec.dim)  # the author's bug: twice the width

    def forward(self, c):
        return Injection(shift_attn=self.proj(c)[:, None])


@register_conditioning("not_an_injection_probe")
class NotAnInjection(ConditioningMechanism):
    def __init__(self, spec):
        super().__init__(spec)
        self.proj = nn.Linear(spec.cond_dim, spec.dim)

    def forward(self, c):
        return {"shift_attn": self.proj(c)[:, None]}


@register_backbone("dict_backbone_probe")
def dict_backbone(preset=None, **options):
    return {"not": "a module"}


@register_sampler("edm.raising_probe")
def raising(process, model, noise, y, settings, generator):
    raise RuntimeError("the sampler author's bug")


@register_sampler("edm.wrong_shape_probe")
def wrong_shape(process, model, noise, y, settings, generator):
    return noise[:, :, :2]
'''


def _cli(tmp_path: Path, *args: str) -> tuple[int, str]:
    plugin = tmp_path / "faulty_outputs_probe.py"
    plugin.write_text(FAULTY_PLUGINS)
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFIT_TOOLKIT_TRACEBACK", "DIFFIT_TOOLKIT_PLUGINS")}
    env["COLUMNS"] = "400"
    proc = subprocess.run([sys.executable, "-m", "diffit_toolkit.cli", "-p", str(plugin), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    return proc.returncode, errors[0]


def _train(tmp_path: Path, *overrides: str) -> tuple[int, str]:
    sets = [arg for o in ("train.max_steps=1", "train.ckpt_every=0", "train.log_every=1", "sample.num_images=2",
                          "sample.steps=2", f"output_dir={tmp_path / 'run'}", *overrides) for arg in ("--set", o)]
    return _cli(tmp_path, "train", "recipes/quickstart.yaml", "--device", "cpu", "--no-progress", *sets)


@pytest.mark.parametrize("mechanism, expected", [
    ("wrong_width_probe", "conditioning mechanism 'wrong_width_probe': injection site 'shift_attn' has shape (2, 1, 192), "
                          "expected (B, 1 or N, D) with D = 96"),
    ("not_an_injection_probe", "conditioning mechanism 'not_an_injection_probe': forward(c) returned dict, not an "
                               "Injection"),
])
def test_a_mechanism_returning_the_wrong_thing_stops_before_training_in_one_line(tmp_path, mechanism, expected):
    code, error = _train(tmp_path, f"model.mechanism={mechanism}", "train.batch_size=2")
    assert code == 2 and expected in error, error
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_backbone_factory_returning_a_non_module_is_one_line_at_validation(tmp_path):
    code, error = _cli(tmp_path, "recipe", "validate", "recipes/quickstart.yaml", "--set", "model.backbone=dict_backbone_probe")
    assert code == 2
    assert "backbone 'dict_backbone_probe' (from " in error and "returned a dict, not a torch.nn.Module" in error


@pytest.mark.parametrize("sampler, expected", [
    ("raising_probe", "sampler 'edm.raising_probe' (from '"),
    ("wrong_shape_probe", "sampler 'edm.wrong_shape_probe' (from '"),
])
def test_a_sampler_that_raises_or_returns_the_wrong_shape_is_one_line(tmp_path, sampler, expected):
    code, error = _train(tmp_path, f"sample.sampler={sampler}")
    assert code == 2 and expected in error, error
    if sampler == "raising_probe":
        assert "failed: RuntimeError: the sampler author's bug" in error
    else:
        assert "returned (2, 1, 2, 8) for noise of shape (2, 1, 8, 8)" in error

