"""Time embeddings: feature maps of the timestep, followed by the small SiLU MLP of DiffiT/DiT.

The feature map is a registered plugin (kind ``time_embedding``): ``positional`` (sinusoidal,
the released convention) and ``fourier`` (random Fourier features) ship built in; the paper's
Table 8 compares them (positional 1.95 vs Fourier 2.02 FID on CIFAR-10).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffit_toolkit.registry import time_embeddings

#: Number of sinusoidal frequencies fed to the time MLP in the released models.
DEFAULT_FREQUENCY_DIM = 256


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal features of ``t`` (B,) -> (B, dim): cos half first, then sin (as the released DiffiT and DiT).

    Frequencies are ``exp(-ln(max_period) * i / (dim // 2 - freq_shift))`` for ``i < dim // 2``;
    DiT uses ``freq_shift = 0``, diffusers' ``DiTTransformer2DModel`` ``1`` (its
    ``downscale_freq_shift``).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class PositionalFeatures(nn.Module):
    """Sinusoidal (transformer positional) features of the timestep, no parameters."""

    def __init__(self, dim: int = DEFAULT_FREQUENCY_DIM, max_period: float = 10000.0, freq_shift: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.max_period = max_period
        self.freq_shift = freq_shift

    def forward(self, t: Tensor) -> Tensor:
        return sinusoidal_embedding(t, self.dim, self.max_period, self.freq_shift)


class FourierFeatures(nn.Module):
    """Random Fourier features ``[cos(2 pi f t), sin(2 pi f t)]``, ``f ~ N(0, scale^2)`` fixed
    (Tancik et al. 2020; NCSN++ / EDM's ``FourierEmbedding``, scale 16).

    Meant for a continuous noise input of moderate range (EDM's ``c_noise``, e.g. ``ln(sigma)/4``);
    for integer timesteps 0..999 lower ``scale`` (e.g. 0.01) or use ``positional``.
    """

    def __init__(self, dim: int = DEFAULT_FREQUENCY_DIM, scale: float = 16.0, seed: int = 0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"Fourier features need an even dim, got {dim}")
        self.dim = dim
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(dim // 2, generator=generator) * scale)

    def forward(self, t: Tensor) -> Tensor:
        args = 2 * math.pi * t.float()[:, None] * self.freqs[None]  # (B, dim/2)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Timestep -> conditioning token: features -> Linear -> SiLU -> Linear (DiffiT 3.2, DiT).

    Args:
        hidden_dim: width of the produced token.
        features: registered time-embedding name (``positional`` or ``fourier``).
        frequency_dim: width of the feature map (256 in the released models).
        **feature_options: passed to the feature map (e.g. ``scale`` for Fourier).

    The MLP is ``mlp.0`` / ``mlp.2`` like the released checkpoints; weights normal(0.02), biases 0.
    """

    def __init__(
        self,
        hidden_dim: int,
        features: str = "positional",
        frequency_dim: int = DEFAULT_FREQUENCY_DIM,
        **feature_options: float,
    ) -> None:
        super().__init__()
        self.features = time_embeddings.build(features, frequency_dim, **feature_options)
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: Tensor) -> Tensor:
        """``t`` (B,) timesteps (integer or float) -> (B, hidden_dim)."""
        return self.mlp(self.features(t).to(self.mlp[0].weight.dtype))
