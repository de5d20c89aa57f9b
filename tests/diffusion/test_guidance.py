"""Classifier-free guidance: batching, scale 1, unguided channels, schedules, interval."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffit_toolkit.sampling import ClassifierFreeGuidance, GuidanceConfig, power_cosine_scale

NULL = 10
C_OUT = 8  # 4 epsilon + 4 learned-variance channels, as DiT's latent model


class LabelModel(torch.nn.Module):
    """A deterministic label-dependent toy network that records its calls."""

    null_class = NULL

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append((x, t, y))
        emb = torch.sin(y.to(x.dtype)[:, None, None, None] * torch.arange(1, C_OUT + 1, dtype=x.dtype)[None, :, None, None])
        return x.repeat(1, 2, 1, 1) * 0.7 + emb + 0.001 * t.to(x.dtype)[:, None, None, None]  # (B, 8, H, W)


def _inputs(b: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, 2, 2, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    y = torch.randint(0, NULL, (b,), generator=g)
    return x, t, y


def test_one_batched_forward_of_cond_then_uncond() -> None:
    model = LabelModel()
    x, t, y = _inputs()
    ClassifierFreeGuidance(model, GuidanceConfig(scale=4.0))(x, t, y)
    assert len(model.calls) == 1
    xin, tin, yin = model.calls[0]
    assert torch.equal(xin, torch.cat([x, x])) and torch.equal(tin, torch.cat([t, t]))
    assert torch.equal(yin[:5], y) and (yin[5:] == NULL).all()


@pytest.mark.parametrize("schedule", ["constant", "power_cosine"])
@pytest.mark.parametrize("channels", [3, None])
def test_scale_one_equals_conditional_prediction(schedule: str, channels: int | None) -> None:
    model = LabelModel()
    x, t, y = _inputs()
    guided = ClassifierFreeGuidance(model, GuidanceConfig(scale=1.0, schedule=schedule, guided_channels=channels))(x, t, y)
    assert torch.equal(guided, model(x, t, y))


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(min_value=-2.0, max_value=12.0), k=st.integers(min_value=1, max_value=C_OUT - 1))
def test_unguided_channels_are_untouched_by_any_scale(scale: float, k: int) -> None:
    model = LabelModel()
    x, t, y = _inputs()
    guided = ClassifierFreeGuidance(model, GuidanceConfig(scale=scale, guided_channels=k))(x, t, y)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    assert torch.equal(guided[:, k:], cond[:, k:])
    torch.testing.assert_close(guided[:, :k], uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k]))


def test_default_guides_three_channels_and_reads_null_class_from_model() -> None:
    model = LabelModel()
    x, t, y = _inputs()
    cfg = GuidanceConfig(scale=4.0)
    assert cfg.guided_channels == 3
    guided = ClassifierFreeGuidance(model, cfg)(x, t, y)
    explicit = ClassifierFreeGuidance(lambda *a: model(*a), cfg, null_class=NULL)(x, t, y)
    assert torch.equal(guided, explicit)
    assert not torch.equal(guided[:, :3], model(x, t, y)[:, :3])


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(min_value=0, max_value=999),
    scale=st.floats(min_value=0.0, max_value=20.0),
    power=st.floats(min_value=0.5, max_value=8.0),
)
def test_power_cosine_schedule_equals_formula(t: int, scale: float, power: float) -> None:
    expected = (scale - 1) * 0.5 * (1 - math.cos(math.pi * (1 - t / 1000) ** power)) + 1
    got = GuidanceConfig(scale=scale, schedule="power_cosine", power=power).scale_at(torch.tensor([t]))
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert power_cosine_scale(scale, torch.tensor(float(t)), power).item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_power_cosine_guided_output_uses_per_sample_scale() -> None:
    model = LabelModel()
    x, t, y = _inputs()
    guided = ClassifierFreeGuidance(model, GuidanceConfig(scale=4.0, schedule="power_cosine", guided_channels=None))(x, t, y)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    s = power_cosine_scale(4.0, t).to(torch.float32)[:, None, None, None]
    torch.testing.assert_close(guided, uncond + s * (cond - uncond))


def test_guidance_interval_gives_scale_one_outside() -> None:
    cfg = GuidanceConfig(scale=5.0, interval=(200.0, 700.0))
    s = cfg.scale_at(torch.tensor([0, 199, 200, 500, 700, 701, 999]))
    assert s.tolist() == [1.0, 1.0, 5.0, 5.0, 5.0, 1.0, 1.0]
    model = LabelModel()
    x, _, y = _inputs(2)
    t = torch.tensor([100, 500])
    guided = ClassifierFreeGuidance(model, cfg)(x, t, y)
    assert torch.equal(guided[0], model(x, t, y)[0])
    assert not torch.equal(guided[1], model(x, t, y)[1])


def test_bad_guidance_arguments_raise() -> None:
    with pytest.raises(ValueError, match="constant, power_cosine"):
        GuidanceConfig(schedule="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="t_lo <= t_hi"):
        GuidanceConfig(interval=(5.0, 1.0))
    with pytest.raises(ValueError, match="null_class"):
        ClassifierFreeGuidance(lambda x, t, y: x, GuidanceConfig())
    with pytest.raises(ValueError, match="exceeds"):
        x, t, y = _inputs()
        ClassifierFreeGuidance(LabelModel(), GuidanceConfig(guided_channels=9))(x, t, y)
