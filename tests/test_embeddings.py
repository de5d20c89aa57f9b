"""Time embeddings: the released sinusoidal convention and Fourier features, both selectable."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffit_toolkit import TimestepEmbedder, UnknownPluginError
from diffit_toolkit.nn.embeddings import FourierFeatures, sinusoidal_embedding


@given(st.lists(st.floats(0, 999), min_size=1, max_size=4), st.sampled_from([256, 64, 7]))
def test_sinusoidal_embedding_is_cos_half_then_sin_half(ts, dim):
    t = torch.tensor(ts)
    emb = sinusoidal_embedding(t, dim)
    half = dim // 2
    assert emb.shape == (len(ts), dim)
    for b, tv in enumerate(ts):
        for i in range(half):
            freq = math.exp(-math.log(10000) * i / half)
            assert emb[b, i].item() == pytest.approx(math.cos(tv * freq), abs=2e-4)
            assert emb[b, half + i].item() == pytest.approx(math.sin(tv * freq), abs=2e-4)
    if dim % 2:
        assert (emb[:, -1] == 0).all()


def test_timestep_embedder_has_the_released_layout_and_init():
    emb = TimestepEmbedder(1152)
    assert {k: tuple(v.shape) for k, v in emb.state_dict().items()} == {
        "mlp.0.weight": (1152, 256),
        "mlp.0.bias": (1152,),
        "mlp.2.weight": (1152, 1152),
        "mlp.2.bias": (1152,),
    }
    assert emb.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert emb.mlp[0].bias.abs().max() == 0
    assert emb(torch.tensor([0, 999])).shape == (2, 1152)


def test_fourier_features_formula_and_selection():
    feats = FourierFeatures(8, scale=2.0, seed=3)
    t = torch.tensor([0.25, -1.5])
    args = 2 * math.pi * t[:, None] * feats.freqs[None]
    torch.testing.assert_close(feats(t), torch.cat([args.cos(), args.sin()], dim=-1))
    emb = TimestepEmbedder(32, features="fourier", frequency_dim=8, scale=2.0)
    assert isinstance(emb.features, FourierFeatures)
    assert emb(t).shape == (2, 32)
    # the fixed frequencies are a buffer: saved with the model, not trained
    assert "features.freqs" in emb.state_dict() and "features.freqs" not in dict(emb.named_parameters())


def test_unknown_time_embedding_is_named():
    with pytest.raises(UnknownPluginError, match="unknown time embedding 'fourrier'; did you mean 'fourier'"):
        TimestepEmbedder(32, features="fourrier")
