"""Closed forms of the Gaussian diffusion against formulas written here, and respacing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffit_toolkit.diffusion import (
    GaussianDiffusion,
    create_gaussian_diffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    normal_kl,
    space_timesteps,
)

T = 1000


def test_linear_schedule_endpoints_and_cosine_formula() -> None:
    lin = get_named_beta_schedule("linear", T)
    assert lin.shape == (T,)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    cos = get_named_beta_schedule("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731  (Nichol & Dhariwal eq. 17)
    abar = torch.cumprod(1 - cos, 0)
    for t in (0, 10, 500, 900):
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    # Linear at 250 steps is the 1000-step schedule rescaled (ADM).
    assert get_named_beta_schedule("linear", 250)[0].item() == pytest.approx(4e-4)


def test_unknown_schedule_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="linear, cosine"):
        get_named_beta_schedule("sqrt", T)


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion.from_schedule("linear", T, model_var_type="fixed_large")


def test_q_sample_and_q_mean_variance(diffusion: GaussianDiffusion) -> None:
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    a = abar[t].reshape(-1, 1, 1, 1)
    expected = a.sqrt() * x0 + (1 - a).sqrt() * eps  # Ho et al. eq. 4
    torch.testing.assert_close(diffusion.q_sample(x0, t, eps), expected)
    mean, var, logvar = diffusion.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, a.sqrt() * x0)
    torch.testing.assert_close(var, (1 - a).expand_as(x0))
    torch.testing.assert_close(logvar, torch.log(1 - a).expand_as(x0))


def test_posterior_mean_variance(diffusion: GaussianDiffusion) -> None:
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    xt = torch.randn(3, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 300, 999])
    ab, ab_prev, b = abar[t, None], abar[t - 1, None], betas[t, None]
    # Ho et al. eq. 7
    mean_expected = ab_prev.sqrt() * b / (1 - ab) * x0 + (1 - b).sqrt() * (1 - ab_prev) / (1 - ab) * xt
    var_expected = (1 - ab_prev) / (1 - ab) * b
    mean, var, logvar = diffusion.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(mean, mean_expected)
    torch.testing.assert_close(var, var_expected.expand_as(xt))
    torch.testing.assert_close(logvar, torch.log(var_expected).expand_as(xt))
    # At t = 0 the posterior is a point mass; the log variance is clipped to the t = 1 value.
    _, var0, logvar0 = diffusion.q_posterior_mean_variance(x0, xt, torch.zeros(3, dtype=torch.long))
    assert (var0 == 0).all()
    torch.testing.assert_close(logvar0[0, 0], torch.log(betas[1] * (1 - abar[0]) / (1 - abar[1])))


def test_normal_kl_and_discretized_likelihood_formulas() -> None:
    m1, lv1, m2, lv2 = torch.tensor(0.3), torch.tensor(-1.0), torch.tensor(-0.2), torch.tensor(0.5)
    v1, v2 = math.exp(-1.0), math.exp(0.5)
    expected = math.log(math.sqrt(v2) / math.sqrt(v1)) + (v1 + 0.5**2) / (2 * v2) - 0.5
    assert normal_kl(m1, lv1, m2, lv2).item() == pytest.approx(expected, rel=1e-6)
    # Interior bin: Phi((x + 1/255 - mu) / s) - Phi((x - 1/255 - mu) / s), exact CDF via erf.
    x, mu, s = torch.tensor([0.1]), torch.tensor([0.05]), 0.05
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    exact = math.log(phi((0.1 + 1 / 255 - 0.05) / s) - phi((0.1 - 1 / 255 - 0.05) / s))
    got = discretized_gaussian_log_likelihood(x, mu, torch.tensor([math.log(s)])).item()
    assert got == pytest.approx(exact, abs=2e-3)  # ADM's tanh CDF approximation
    # Edge bin x = 1 integrates to +infinity.
    mu_edge = torch.tensor([0.97])
    edge = discretized_gaussian_log_likelihood(torch.tensor([1.0]), mu_edge, torch.tensor([math.log(s)])).item()
    assert edge == pytest.approx(math.log(1 - phi((1 - 1 / 255 - 0.97) / s)), abs=2e-3)


def _constant_model(out: torch.Tensor):
    return lambda x, t, y: out


def test_vb_terms_match_kl_and_decoder_formulas() -> None:
    dif = GaussianDiffusion.from_schedule("linear", T, model_mean_type="x0", model_var_type="learned_range")
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(2, 3, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    xt = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    pred = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64) * 0.5
    v = torch.rand(2, 3, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    model = _constant_model(torch.cat([pred, v], dim=1))
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    t = torch.tensor([400, 0])
    out = dif.vb_terms_bpd(model, x0, xt, t)["output"]
    # t = 400: KL between the true posterior and the model's Gaussian, in bits (Ho et al. eq. 5).
    i = 400
    c1 = abar[i - 1].sqrt() * betas[i] / (1 - abar[i])
    c2 = (1 - betas[i]).sqrt() * (1 - abar[i - 1]) / (1 - abar[i])
    post_var = betas[i] * (1 - abar[i - 1]) / (1 - abar[i])
    log_var_p = (v[0] + 1) / 2 * torch.log(betas[i]) + (1 - (v[0] + 1) / 2) * torch.log(post_var)
    mu_q, mu_p = c1 * x0[0] + c2 * xt[0], c1 * pred[0] + c2 * xt[0]
    kl = 0.5 * (log_var_p - torch.log(post_var) + post_var / log_var_p.exp() + (mu_q - mu_p) ** 2 / log_var_p.exp() - 1)
    assert out[0].item() == pytest.approx((kl.mean() / math.log(2)).item(), rel=1e-9)
    # t = 0: decoder NLL of x0 under N(model mean, model variance), discretised.
    mean0 = dif.p_mean_variance(model, xt, torch.zeros(2, dtype=torch.long))
    nll = -discretized_gaussian_log_likelihood(x0[1], mean0["mean"][1], 0.5 * mean0["log_variance"][1]).mean() / math.log(2)
    assert out[1].item() == pytest.approx(nll.item(), rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(count=st.integers(min_value=1, max_value=T), schedule=st.sampled_from(["linear", "cosine"]))
def test_respacing_keeps_alphas_cumprod(count: int, schedule: str) -> None:
    base = GaussianDiffusion.from_schedule(schedule, T)
    spaced = base.respace(count)
    kept = spaced.timestep_map
    assert spaced.num_timesteps == count == len(kept)
    # float64: 1 - beta of a near-1 beta is exact to ~1e-16 absolute (cosine ends at abar ~ 2e-9).
    torch.testing.assert_close(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-10, atol=1e-15)


def test_respacing_variants_and_model_sees_original_timesteps() -> None:
    base = GaussianDiffusion.from_schedule("linear", T)
    assert space_timesteps(T, "ddim50") == list(range(0, T, 20))
    assert base.respace("logsnr20").num_timesteps == 20
    d250 = create_gaussian_diffusion(250)
    assert d250.num_timesteps == 250 and int(d250.timestep_map[-1]) == T - 1 and int(d250.timestep_map[0]) == 0
    seen: list[torch.Tensor] = []

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)

    d250.p_mean_variance(model, torch.zeros(2, 4, 1, 1), torch.tensor([249, 1]))
    assert seen[0].tolist() == [999, int(d250.timestep_map[1])]


def test_bad_respacing_and_bad_output_channels_raise() -> None:
    base = GaussianDiffusion.from_schedule("linear", T)
    with pytest.raises(ValueError, match="request fewer steps"):
        base.respace(T + 1)
    with pytest.raises(ValueError, match="DDIM"):
        base.respace("ddim2000")
    with pytest.raises(ValueError, match="valid values are epsilon, x0, v"):
        GaussianDiffusion.from_schedule("linear", T, model_mean_type="score")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2\\*C = 8"):
        base.p_mean_variance(lambda x, t, y: x, torch.zeros(1, 4, 1, 1), torch.tensor([3]))


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_one_respaced_step_samples_the_model_prediction(var_type):
    # one step from pure noise to data: the variance table has a single entry, and the sample is
    # the model's x0 prediction (no noise is added at the last step)
    from diffit_toolkit.sampling.gaussian_samplers import ddpm_sample

    one = GaussianDiffusion.from_schedule("linear", 1000, model_var_type=var_type).respace(1)
    assert one.num_timesteps == 1
    target = torch.full((2, 1, 4, 4), 0.25)
    zero = torch.zeros(2, dtype=torch.long)

    def model(x, t, y):  # a perfect epsilon model for the data point `target`
        return one.predict_eps_from_xstart(x, zero, target)

    x = ddpm_sample(one, model, torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(x, target, atol=1e-4)
