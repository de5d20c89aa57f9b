"""Blocks and backbones compile without graph breaks; parameter and compute counts."""

from __future__ import annotations

import pytest
import torch

from diffit_toolkit.backbones import image_diffit, latent_diffit
from diffit_toolkit.backbones.info import count_flops, count_parameters, model_facts
from diffit_toolkit.nn.block import BlockSpec, DiffiTBlock
from diffit_toolkit.registry import conditioning

BUILTIN_MECHANISMS = ["adaln_zero", "additive", "mlp", "relative_bias", "separate_token", "tmsa", "window_tmsa"]


def test_builtin_mechanisms_are_registered():
    assert set(BUILTIN_MECHANISMS) <= set(conditioning.names())


@pytest.mark.parametrize("mechanism", ["tmsa", "adaln_zero"])
def test_released_global_blocks_compile_without_graph_breaks(mechanism):
    """``fullgraph=True`` raises on any graph break; the ``eager`` backend keeps it fast on CPU.
    Every registered mechanism compiles with windows in the conformance kit
    (tests/test_conformance.py); here the two released latent blocks, global attention."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    spec = BlockSpec(dim=32, num_heads=4, cond_dim=16, grid=(4, 4), window=None, rel_pos_bias=True)
    block = DiffiTBlock(spec, mechanism)
    x, c = torch.randn(2, 16, 32), torch.randn(2, 16)
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, c), block(x, c))


@pytest.mark.parametrize("build", [
    lambda: latent_diffit(None, input_size=8, hidden_size=32, num_heads=2, depth=2, num_classes=10),
    lambda: image_diffit(None, input_size=16, channels=(32, 64), num_blocks=(1, 1), head_dim=16, time_dim=32, norm_groups=8),
], ids=["latent", "image"])
def test_whole_backbone_compiles_without_graph_breaks(build):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build().eval()
    size = model.input_size
    x, t = torch.randn(2, model.in_channels, size, size), torch.tensor([1.0, 500.0])
    y = torch.tensor([1, 2]) if model.num_classes else None
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), model(x, t, y))


def test_dit_xl2_compute_matches_dit_paper():
    """DiT reports 118.6 "Gflops" for DiT-XL/2 at 256 px: multiply-accumulates (fvcore)."""
    facts = model_facts("dit", "XL/2")
    assert abs(facts.gmacs - 118.6) < 0.1
    assert facts.flops == 2 * facts.macs
    assert facts.params == 675_129_632 and facts.mechanism == "adaln_zero"


def test_diffit_xl2_compute():
    """DiffiT-XL/2: 118.5 GMACs measured; the paper's 114 equals the linear layers alone
    (12 d^2 per token and block: 12 * 1152^2 * 256 * 28 = 114.1 G), i.e. without the attention
    matrix products (2 N^2 d per block: 4.2 G)."""
    facts = model_facts("latent_diffit", "XL/2")
    assert abs(facts.gmacs - 118.5) < 0.1
    linears = 12 * 1152**2 * 256 * 28
    attention = 2 * 256**2 * 1152 * 28
    assert abs(facts.macs - linears - attention) / facts.macs < 0.01


def test_flops_scale_with_batch_and_count_every_matmul():
    torch.manual_seed(0)
    model = latent_diffit(None, input_size=8, hidden_size=32, num_heads=2, depth=1, num_classes=0, learn_sigma=False)
    one, two = count_flops(model, 1), count_flops(model, 2)
    assert two == 2 * one
    # hand count at batch 1: T = 16 tokens, D = 32, patch 2, C = 4, one block (TMSA), 256 time features
    T, D = 16, 32
    macs = (
        T * D * 4 * 2 * 2  # patch conv
        + 256 * D + D * D  # time MLP
        + D * 3 * D  # qkv_temb on c
        + T * D * 3 * D + 2 * T * T * D + T * D * D  # qkv, q k^T and attn v, proj
        + T * D * 8 * D  # MLP
        + T * D * 2 * 2 * 4  # final linear
    )
    assert one == 2 * macs


@pytest.mark.parametrize("preset,params", [("cifar10", 15_147_939), ("ffhq64", 22_475_823)])
def test_image_preset_facts(preset, params):
    facts = model_facts("image_diffit", preset)
    assert facts.params == params and facts.macs > 0
    with torch.device("meta"):
        assert count_parameters(image_diffit(preset)) == params


def test_per_block_compile_with_gradient_checkpointing():
    """The training setup the docs recommend: checkpointing on, each block compiled."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = latent_diffit(None, input_size=8, hidden_size=32, num_heads=2, depth=1, num_classes=10).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)  # let gradients reach the blocks
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([1, 2])
    model(x, t, y).square().sum().backward()
    expected = [p.grad.clone() for p in model.blocks.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    for block in model.blocks:
        block.compile(backend="aot_eager", fullgraph=True)
    model(x, t, y).square().sum().backward()
    for p, g in zip(model.blocks.parameters(), expected):
        torch.testing.assert_close(p.grad, g)
