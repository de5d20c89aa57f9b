"""Gaussian noise from one generator or from one generator per image.

A list of generators (one per batch item, as diffusers' ``randn_tensor`` takes them) gives every
image its own random stream, so an image depends on its own seed only, not on the batch it was
drawn in.
"""

from __future__ import annotations

import torch

#: One generator, one per batch item, or ``None`` (the global RNG).
Generators = torch.Generator | list[torch.Generator] | None


def randn(shape: torch.Size | tuple[int, ...], generator: Generators, device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...); row ``b`` from ``generator[b]`` when a list."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: give one per image")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
