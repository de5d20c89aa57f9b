"""Min-SNR-gamma loss weighting: whatever the model predicts (epsilon, x0 or v), a step's weighted
loss is ``min(SNR, gamma) * |x0 - x0_hat|^2``; checked through the process a recipe builds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffit_toolkit.build import build_process, load_recipe
from diffit_toolkit.diffusion import min_snr_weight
from diffit_toolkit.recipe import RecipeError


def _process(prediction: str, gamma: float | None, learn_sigma: bool = False):
    overrides = ["diffusion.process=gaussian", "sample.sampler=ddim", "diffusion.schedule=cosine",
                 f"diffusion.prediction={prediction}", f"diffusion.learn_sigma={str(learn_sigma).lower()}"]
    if gamma is not None:
        overrides.append(f"diffusion.min_snr_gamma={gamma}")
    return build_process(load_recipe("recipes/quickstart.yaml", overrides))


@settings(max_examples=25, deadline=None)
@given(prediction=st.sampled_from(["eps", "x0", "v"]), gamma=st.floats(0.1, 50), seed=st.integers(0, 2**16))
def test_weighted_loss_is_the_clipped_snr_times_the_x0_error_for_every_prediction(prediction, gamma, seed):
    process = _process(prediction, gamma)
    g = process.gaussian
    x0 = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    delta = 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    seen = {}

    def model(x_t, t, y):  # predicts what the estimate x0 + delta implies, in the model's parametrisation
        seen["t"] = t
        abar = g.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0_hat = x0 + delta
        eps_hat = (x_t - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
        return {"eps": eps_hat, "x0": x0_hat, "v": abar.sqrt() * eps_hat - (1 - abar).sqrt() * x0_hat}[prediction]

    loss = process.loss(model, x0, None, torch.Generator().manual_seed(seed + 2))
    abar = g.alphas_cumprod[seen["t"]]
    expected = (abar / (1 - abar)).clamp(max=gamma) * delta.pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-9)


def test_without_gamma_the_loss_is_unweighted_and_epsilon_weights_never_exceed_one():
    x0 = torch.randn(4, 1, 8, 8, dtype=torch.float64)

    def model(x_t, t, y):
        return torch.zeros_like(x_t)

    plain = _process("eps", None).loss(model, x0, None, torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain, _process("eps", 1e6).loss(model, x0, None, torch.Generator().manual_seed(0)))
    abar = _process("eps", None).gaussian.alphas_cumprod
    weights = min_snr_weight(abar, 5.0, "epsilon")
    snr = abar / (1 - abar)
    assert (weights <= 1).all() and (weights[snr <= 5] == 1).all() and (weights[snr > 5] < 1).all()


def test_with_a_learned_variance_only_the_mean_term_is_weighted():
    process, plain = _process("eps", 2.0, learn_sigma=True), _process("eps", None, learn_sigma=True)
    x0 = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    seen = {}

    def model(x_t, t, y):
        seen["t"] = t
        return torch.cat([torch.zeros_like(x_t), torch.zeros_like(x_t)], dim=1)

    terms = plain.gaussian.training_losses(model, x0, torch.tensor([5, 100, 500, 900]),
                                           None, generator=torch.Generator().manual_seed(0))
    weighted = process.gaussian.training_losses(model, x0, torch.tensor([5, 100, 500, 900]),
                                                None, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(terms["vb"], weighted["vb"])  # the process weights; the diffusion does not
    loss = process.loss(model, x0, None, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)  # replay: the same timesteps, then the same noise
    t = plain.gaussian.sample_timesteps(4, gen, x0.device)
    assert torch.equal(t, seen["t"])
    again = plain.gaussian.training_losses(model, x0, t, None, generator=gen)
    w = min_snr_weight(plain.gaussian.alphas_cumprod, 2.0, "epsilon")[seen["t"]]
    torch.testing.assert_close(loss, w * again["mse"] + again["vb"])


@pytest.mark.parametrize("process, valid", [("edm", "precond, sigma_data"), ("flow", "none")])
def test_min_snr_under_edm_or_flow_is_one_line(process, valid):
    with pytest.raises(RecipeError, match=rf"^recipe error at diffusion.min_snr_gamma: the {process} process takes no "
                                          rf"option 'min_snr_gamma' \(its options: {valid}\); remove it$"):
        load_recipe("recipes/quickstart.yaml", [f"diffusion.process={process}", "diffusion.min_snr_gamma=5"])
