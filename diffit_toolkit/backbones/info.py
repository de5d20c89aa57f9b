"""Model facts on demand: parameter counts and forward-pass compute.

Compute is counted with ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device
(shapes only, no memory, no arithmetic), batch 1. It counts matrix products and convolutions
(linears, patch/conv layers, the attention's ``q k^T`` and ``attn v``), not normalisations,
softmax or activations, i.e. the same operations as DiT's fvcore count. ``macs`` are
multiply-accumulates (what DiT's paper calls "Gflops": 118.6 for DiT-XL/2); ``flops`` = 2 x MACs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from diffit_toolkit.registry import backbones


@dataclass(frozen=True)
class ModelFacts:
    """Parameter count and forward compute of one model at batch 1."""

    name: str
    mechanism: str | None
    params: int
    trainable_params: int
    macs: int
    flops: int

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all of them, including DiT's frozen ``pos_embed``, by default)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def example_inputs(model: nn.Module, batch_size: int = 1, device: torch.device | str | None = None) -> tuple:
    """``(x, t, y)`` of the right shapes for ``model(x, t, y)``."""
    device = device or next(model.parameters()).device
    size = model.input_size
    x = torch.zeros(batch_size, model.in_channels, size, size, device=device)
    t = torch.zeros(batch_size, device=device)
    y = torch.zeros(batch_size, dtype=torch.long, device=device) if model.num_classes > 0 else None
    return x, t, y


def meta_copy(model: nn.Module) -> nn.Module:
    """The same architecture on the ``meta`` device (rebuilt from ``model.config`` when it has one)."""
    config = getattr(model, "config", None)
    if isinstance(config, dict) and "backbone" in config:
        from diffit_toolkit.backbones import build_backbone

        with torch.device("meta"):
            return build_backbone(config)
    return copy.deepcopy(model).to("meta")


def count_flops(model: nn.Module, batch_size: int = 1) -> int:
    """FLOPs (2 x MACs) of one forward pass of ``model`` at ``batch_size`` (eval mode).

    Counted on a ``meta`` copy: there attention runs the reference ``math`` backend, whose matrix
    products the counter sees (fused CPU kernels such as SDPA's are invisible to it).
    """
    if next(model.parameters()).device.type != "meta":
        model = meta_copy(model)
    was_training = model.training
    model.eval()
    try:
        inputs = example_inputs(model, batch_size)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def model_facts(
    backbone: str | Callable[..., nn.Module], preset: str | None = None, name: str | None = None, **options: Any
) -> ModelFacts:
    """Build ``backbone`` (a registry name or a factory) on the ``meta`` device and measure it.

    Args:
        backbone: registered backbone name (``latent_diffit``, ``dit``, ``image_diffit``) or factory.
        preset: the backbone's preset name.
        name: label of the result (default ``backbone:preset``).
        **options: backbone options (``mechanism``, ``input_size``, ``num_classes``, ...).
    """
    with torch.device("meta"):
        if isinstance(backbone, str):
            model = backbones.build(backbone, preset, **options)
        else:
            model = backbone(preset, **options)
    flops = count_flops(model)
    label = name or f"{backbone if isinstance(backbone, str) else backbone.__name__}:{preset}"
    return ModelFacts(
        name=label,
        mechanism=getattr(model, "config", {}).get("mechanism"),
        params=count_parameters(model),
        trainable_params=count_parameters(model, trainable_only=True),
        macs=flops // 2,
        flops=flops,
    )
