"""The learning-rate schedule: linear warm-up, then constant or a cosine / linear decay to a floor."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings, strategies as st

from diffit_toolkit.build import load_recipe, lr_factor
from diffit_toolkit.recipe import TrainSection
from diffit_toolkit.train import train


@settings(max_examples=200, deadline=None)
@given(warmup=st.integers(0, 50), extra=st.integers(1, 500), floor=st.floats(0, 1),
       schedule=st.sampled_from(["constant", "cosine", "linear"]))
def test_warmup_then_monotone_decay_to_the_floor(warmup, extra, floor, schedule):
    cfg = TrainSection(warmup_steps=warmup, max_steps=warmup + extra, lr_schedule=schedule, min_lr_ratio=floor)
    values = [lr_factor(cfg, s) for s in range(cfg.max_steps + 1)]
    assert values[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    after = values[warmup:]
    assert after[0] == pytest.approx(1.0)
    if schedule == "constant":
        assert after == pytest.approx([1.0] * len(after))
    else:
        assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
        assert after[-1] == pytest.approx(floor)
        middle = lr_factor(cfg, warmup + extra / 2) if extra % 2 == 0 else None
        if middle is not None:  # both decays are halfway at the middle of the span
            assert middle == pytest.approx(floor + (1 - floor) * 0.5)


def test_cosine_shape_at_a_quarter():
    cfg = TrainSection(warmup_steps=0, max_steps=400, lr_schedule="cosine")
    assert lr_factor(cfg, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_trainer_follows_the_schedule_and_resumes_on_it(tmp_path, tiny_recipe):
    path = tiny_recipe(tmp_path, "run", max_steps=8, lr_schedule="cosine", min_lr_ratio=0.1, warmup_steps=2)
    first = train(load_recipe(path), device="cpu", progress=False, stop_after=5)
    assert first.step == 5
    train(load_recipe(path), device="cpu", progress=False)  # resumes at step 5, on the same schedule
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in lines if "lr" in r}
    cfg = load_recipe(path).train
    assert sorted(logged) == list(range(1, 9))
    for step, lr in logged.items():  # the rate logged at step n is the one of the next optimizer step
        assert lr == pytest.approx(1e-3 * lr_factor(cfg, step)), step


def test_unknown_schedule_is_a_recipe_error(tmp_path, tiny_recipe):
    with pytest.raises(Exception, match="lr_schedule"):
        load_recipe(tiny_recipe(tmp_path, "bad", lr_schedule="cosin"))
