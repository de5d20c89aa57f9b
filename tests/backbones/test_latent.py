"""Latent DiffiT / DiT: parameter counts, SPEC 2 init, shapes at 256/512 px, conditioning, options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffit_toolkit.backbones import LATENT_MODELS, LATENT_PRESETS, build_backbone, dit, latent_diffit
from diffit_toolkit.backbones.info import count_parameters
from diffit_toolkit.registry import PluginBuildError, backbones

# Released facts (SPEC 2): DiffiT-XL/2 561 M, DiT-XL/2 675 M parameters at 1000 classes, learned
# sigma, the frozen pos_embed counted like DiT does (it is an nn.Parameter with requires_grad=False).
DIFFIT_XL2_PARAMS = 561_330_144
DIT_XL2_PARAMS = 675_129_632
TOLERANCE = 0.5e6


def tiny(**options):
    """A small latent DiffiT (width 64, 4 heads, 2 blocks, 8x8 latents: a 4x4 patch grid)."""
    base = dict(input_size=8, hidden_size=64, num_heads=4, depth=2, num_classes=10)
    return latent_diffit(None, **{**base, **options})


@pytest.fixture(scope="module")
def xl_models():
    with torch.device("meta"):
        return latent_diffit("XL/2"), dit("XL/2")


def test_xl2_parameter_counts_match_the_releases(xl_models):
    diffit_xl, dit_xl = xl_models
    n_diffit, n_dit = count_parameters(diffit_xl), count_parameters(dit_xl)
    assert abs(n_diffit - 561.3e6) < TOLERANCE and n_diffit == DIFFIT_XL2_PARAMS
    assert abs(n_dit - 675.1e6) < TOLERANCE and n_dit == DIT_XL2_PARAMS
    # pos_embed is frozen: 256 tokens x 1152
    assert n_diffit - count_parameters(diffit_xl, trainable_only=True) == 256 * 1152


def test_xl2_layout_is_the_released_one(xl_models):
    diffit_xl, dit_xl = xl_models
    cfg = diffit_xl.cfg
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (28, 1152, 16, 2)
    block = diffit_xl.blocks[0]
    assert block.attn.head_dim == 72
    assert block.cond.qkv_temb.weight.shape == (3 * 1152, 1152)
    assert block.attn.relative_position_bias_table.shape == ((2 * 16 - 1) ** 2, 16)  # global window 16
    assert not block.norm1.elementwise_affine and block.norm1.eps == 1e-6
    assert diffit_xl.y_embedder.embedding_table.weight.shape == (1001, 1152)  # null class row
    assert diffit_xl.final_layer.linear.weight.shape == (2 * 2 * 8, 1152)  # p*p*2C
    assert not hasattr(dit_xl.blocks[0].attn, "relative_position_bias_table")
    assert dit_xl.final_layer.adaLN_modulation[1].weight.shape == (2 * 1152, 1152)


def test_512px_latents_get_a_window_32_bias_table():
    with torch.device("meta"):
        model = latent_diffit("XL/2", input_size=64)
    assert model.blocks[0].attn.relative_position_bias_table.shape == ((2 * 32 - 1) ** 2, 16)
    assert model.pos_embed.shape == (1, 32 * 32, 1152)


@pytest.mark.parametrize("input_size,window", [(32, 16), (64, 32)])
def test_forward_shapes_at_256_and_512_px(input_size, window):
    torch.manual_seed(0)
    model = latent_diffit(None, input_size=input_size, hidden_size=32, num_heads=2, depth=1, num_classes=10)
    assert model.blocks[0].attn.bias_window == (window, window)
    x = torch.randn(2, 4, input_size, input_size)
    out = model(x, torch.tensor([1, 999]), torch.tensor([3, 7]))
    assert out.shape == (2, 8, input_size, input_size)  # learned sigma: 2C channels
    no_sigma = latent_diffit(None, input_size=input_size, hidden_size=32, num_heads=2, depth=1, learn_sigma=False)
    assert no_sigma(x, torch.tensor([1, 2]), torch.tensor([0, 1])).shape == (2, 4, input_size, input_size)


def dit_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """DiT's get_2d_sincos_pos_embed (numpy, as in DiT's models.py)."""

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_init_follows_spec_2():
    torch.manual_seed(0)
    model = latent_diffit(None, input_size=32, hidden_size=192, num_heads=4, depth=2, num_classes=100)
    expected = torch.from_numpy(dit_pos_embed(192, 16)).float()
    assert torch.equal(model.pos_embed[0], expected)
    assert not model.pos_embed.requires_grad
    assert torch.count_nonzero(model.x_embedder.proj.bias) == 0
    # patch conv: xavier-uniform on the flattened (D, C*p*p) weight -> bound sqrt(6 / (fan_in + fan_out))
    bound = (6 / (4 * 2 * 2 + 192)) ** 0.5
    w = model.x_embedder.proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.002
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    assert torch.count_nonzero(model.final_layer.linear.bias) == 0
    attn = model.blocks[0].attn
    assert torch.count_nonzero(attn.qkv.bias) == 0
    # trunc_normal_(std=0.02) with the default absolute cut at +-2 (as timm/Swin): ~normal(0.02)
    assert abs(attn.relative_position_bias_table.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("factory", [latent_diffit, dit])
def test_fresh_model_predicts_zero(factory):
    torch.manual_seed(0)
    model = factory(None, input_size=8, hidden_size=64, num_heads=4, depth=2, num_classes=10)
    out = model(torch.randn(3, 4, 8, 8), torch.tensor([0, 10, 999]), torch.tensor([1, 2, 3]))
    assert torch.count_nonzero(out) == 0


def test_fresh_dit_blocks_are_the_identity():
    torch.manual_seed(0)
    model = dit(None, input_size=8, hidden_size=64, num_heads=4, depth=2, num_classes=10)
    x = torch.randn(2, 16, 64)
    c = model.condition(torch.tensor([5, 50]), torch.tensor([1, 2]))
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    assert torch.count_nonzero(model.final_layer.adaLN_modulation[1].weight) == 0


def test_conditioning_token_is_time_plus_label():
    torch.manual_seed(0)
    model = tiny().eval()
    t, y = torch.tensor([3, 400]), torch.tensor([1, 9])
    expected = model.t_embedder(t) + model.y_embedder.embedding_table.weight[y]
    torch.testing.assert_close(model.condition(t, y), expected)
    assert model.num_classes == 10 and model.null_class == 10
    null = model.condition(t, None)  # no labels: the null class
    torch.testing.assert_close(null, model.t_embedder(t) + model.y_embedder.embedding_table.weight[10].expand(2, -1))


def test_label_dropout_only_in_training():
    torch.manual_seed(0)
    model = tiny(class_dropout_prob=0.5)
    labels = torch.zeros(4000, dtype=torch.long)
    dropped = model.y_embedder.token_drop(labels)
    assert 0.45 < (dropped == model.null_class).float().mean() < 0.55
    model.eval()
    table = model.y_embedder.embedding_table.weight
    assert torch.equal(model.y_embedder(labels[:8], model.training), table[labels[:8]])
    forced = model.y_embedder(torch.tensor([1, 2]), False, torch.tensor([True, False]))
    assert torch.equal(forced, table[torch.tensor([10, 2])])


def test_unconditional_model_has_no_label_table():
    model = tiny(num_classes=0)
    assert model.y_embedder is None and model.null_class is None
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]))
    assert out.shape == (2, 8, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))


@pytest.mark.parametrize("mechanism", ["tmsa", "adaln_zero", "mlp", "additive", "separate_token", "relative_bias"])
def test_every_mechanism_plugs_in(mechanism):
    torch.manual_seed(0)
    model = tiny(mechanism=mechanism)
    for p in model.parameters():  # leave the zero init, so the mechanism's path is exercised
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    t = torch.tensor([10, 900])
    out = model(torch.randn(2, 4, 8, 8), t, torch.tensor([0, 1]))
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
    assert model.blocks[0].mechanism_name == mechanism
    expected_final = "adaln" if mechanism == "adaln_zero" else "plain"
    assert model.config["final_layer"] == expected_final
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.blocks[0].cond.parameters())


def test_config_rebuilds_the_same_model():
    model = tiny(mechanism="mlp", window=2, time_features="fourier", time_feature_options={"scale": 0.01})
    config = model.config
    assert config["backbone"] == "latent_diffit" and config["window"] == 2
    rebuilt = build_backbone(config)
    assert rebuilt.config == config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    by_registry = backbones.build("dit", "S/8", input_size=16)
    assert by_registry.config["backbone"] == "dit" and by_registry.config["mechanism"] == "adaln_zero"
    assert build_backbone(by_registry.config).config == by_registry.config


def test_presets_and_named_models():
    assert set(LATENT_PRESETS) == {f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    with torch.device("meta"):
        model = LATENT_MODELS["DiT-B/4"]()
    assert (model.cfg.hidden_size, model.cfg.depth, model.cfg.num_heads, model.patch_size) == (768, 12, 12, 4)
    assert model.config["backbone"] == "dit"


def test_one_line_errors():
    with pytest.raises(ValueError, match=r"unknown latent preset 'XL/3'; did you mean 'XL/.'\? \(valid: S/2") as info:
        latent_diffit("XL/3")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        latent_diffit("S/4", input_size=30)
    with pytest.raises(ValueError, match=r"unknown latent backbone option\(s\) 'hiden_size'; did you mean 'hidden_size'"):
        latent_diffit("S/2", hiden_size=10)
    with pytest.raises(ValueError, match=r"class_dropout_prob must be in \[0, 1\), got 1.5"):
        tiny(class_dropout_prob=1.5)
    with pytest.raises(ValueError, match="unknown final layer"):
        tiny(final_layer="fancy")
    with pytest.raises(PluginBuildError, match="latent_diffit"):
        backbones.build("latent_diffit", "S/2", depth=-1)
    model = tiny()
    with pytest.raises(ValueError, match="model built for 8x8 inputs got 16x16"):
        model(torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.tensor([1]))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny(depth=3)
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([2, 3])
    model.eval()  # no label dropout: both passes see the same labels

    def grads():
        model.zero_grad()
        out = model(x, t, y)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    out_plain, g_plain = grads()
    model.set_grad_checkpointing(True)
    calls = []
    handle = model.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    out_ckpt, g_ckpt = grads()
    handle.remove()
    assert len(calls) == 2  # recomputed in the backward pass
    torch.testing.assert_close(out_ckpt, out_plain)
    for a, b in zip(g_ckpt, g_plain):
        torch.testing.assert_close(a, b)
    assert tiny(grad_checkpointing=True).grad_checkpointing


def test_final_layer_follows_the_mechanisms_declaration_and_an_explicit_option_wins(plugin_system):
    """The core names no mechanism: a class that declares ``final_layer = "adaln"`` gets DiT's
    output layer, like ``adaln_zero``; an explicit ``final_layer`` overrides either way."""
    from diffit_toolkit import register_conditioning
    from diffit_toolkit.registry import conditioning

    tmsa = conditioning.get("tmsa")

    class TMSAWithAdaLNOutput(tmsa):
        final_layer = "adaln"

    register_conditioning("tmsa_adaln_out", TMSAWithAdaLNOutput)
    assert tiny(mechanism="tmsa_adaln_out").config["final_layer"] == "adaln"
    assert hasattr(tiny(mechanism="tmsa_adaln_out").final_layer, "adaLN_modulation")
    assert tiny(mechanism="tmsa_adaln_out", final_layer="plain").config["final_layer"] == "plain"
    assert tiny(mechanism="adaln_zero", final_layer="plain").config["final_layer"] == "plain"
    assert tiny(mechanism="tmsa", final_layer="adaln").config["final_layer"] == "adaln"
    assert tiny(mechanism="adaln_zero").config["final_layer"] == "adaln"
    assert tiny(mechanism="mlp").config["final_layer"] == "plain"
