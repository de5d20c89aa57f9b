"""U-shaped image-space DiffiT (SPEC 3): presets, shapes, windows, mechanisms, options."""

from __future__ import annotations

import pytest
import torch

from diffit_toolkit.backbones import IMAGE_PRESETS, build_backbone, image_diffit
from diffit_toolkit.backbones.image import DiffiTResBlock


def tiny(**options):
    """A small U-Net: 16 px, channels 32/64/64, one block per stage, window 4."""
    base = dict(input_size=16, channels=(32, 64, 64), num_blocks=(1, 1, 1), head_dim=16, time_dim=32, norm_groups=8)
    return image_diffit(None, **{**base, **options})


def perturb(model, scale=0.05):
    """Move every weight off its init so zero-initialised paths carry signal."""
    for p in model.parameters():
        p.data.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("preset", ["cifar10", "ffhq64"])
def test_presets_shapes_and_zero_output(preset):
    torch.manual_seed(0)
    model = image_diffit(preset).eval()
    size = IMAGE_PRESETS[preset]["input_size"]
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size), torch.rand(1))
    assert out.shape == (1, 3, size, size)
    assert torch.count_nonzero(out) == 0  # zero-initialised head


def test_cifar10_layout():
    with torch.device("meta"):
        model = image_diffit("cifar10")
    grids = [stage.blocks[0].block.spec.grid for stage in model.encoder]
    assert grids == [(32, 32), (16, 16), (8, 8)]
    assert [len(stage.blocks) for stage in model.encoder] == [2, 2, 2]
    assert [stage.blocks[0].block.spec.dim for stage in model.encoder] == [128, 256, 256]  # growth 1 -> 2 only
    for stage in model.encoder:
        attn = stage.blocks[0].block.attn
        assert attn.window == (4, 4) and attn.relative_position_bias_table.shape == (7 * 7, attn.num_heads)
        assert stage.blocks[0].block.mechanism_name == "window_tmsa"
    assert len(model.decoder) == 2 and [len(s.blocks) for s in model.decoder] == [2, 2]
    assert model.decoder[-1].blocks[0].block.spec.grid == (32, 32)
    assert model.tokenizer.kernel_size == (3, 3)


def test_ffhq64_layout():
    with torch.device("meta"):
        model = image_diffit("ffhq64")
    assert [len(stage.blocks) for stage in model.encoder] == [1, 2, 2, 2]
    assert [stage.blocks[0].block.spec.grid[0] for stage in model.encoder] == [64, 32, 16, 8]
    assert all(stage.blocks[0].block.attn.bias_window == (8, 8) for stage in model.encoder)
    # the bottleneck's 8x8 grid is one window: global attention there
    assert model.encoder[-1].blocks[0].block.attn.window is None


def test_resblock_follows_eq_9_10():
    torch.manual_seed(0)
    model = tiny()
    perturb(model)
    rb: DiffiTResBlock = model.encoder[0].blocks[0]
    x, c = torch.randn(2, 32, 16, 16), torch.randn(2, 32)
    h = rb.conv(torch.nn.functional.silu(rb.norm(x)))
    tokens = rb.block(h.flatten(2).transpose(1, 2), c)
    expected = tokens.transpose(1, 2).reshape(2, 32, 16, 16) + x
    torch.testing.assert_close(rb(x, c), expected)


def test_windows_do_not_mix_regions():
    """With window attention, a token's block output ignores tokens of other windows."""
    torch.manual_seed(0)
    model = tiny()
    perturb(model)
    block = model.encoder[0].blocks[0].block  # 16x16 grid, 4x4 windows
    x, c = torch.randn(1, 256, 32), torch.randn(1, 32)
    y = x.clone()
    y[0, 255] += 1.0  # bottom-right window only
    diff = (block(x, c) - block(y, c)).abs().sum(-1).reshape(16, 16)
    assert diff[12:, 12:].sum() > 0 and diff[:12].sum() == 0 and diff[:, :12].sum() == 0


@pytest.mark.parametrize("mechanism", ["window_tmsa", "tmsa", "mlp", "relative_bias", "separate_token", "additive", "adaln_zero"])
def test_every_mechanism_plugs_in(mechanism):
    torch.manual_seed(0)
    model = tiny(mechanism=mechanism)
    perturb(model)
    out = model(torch.randn(2, 3, 16, 16), torch.rand(2))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    out.square().mean().backward()
    cond = model.encoder[1].blocks[0].block.cond
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cond.parameters())


@pytest.mark.parametrize("resample,skip", [("bilinear", "concat"), ("conv", "add"), ("bilinear", "add")])
def test_resample_and_skip_options(resample, skip):
    torch.manual_seed(0)
    model = tiny(resample=resample, skip=skip, learn_sigma=True)
    perturb(model)
    out = model(torch.randn(2, 3, 16, 16), torch.rand(2))
    assert out.shape == (2, 6, 16, 16) and torch.isfinite(out).all()
    assert (model.decoder[0].merge is None) == (skip == "add")


def test_skip_connections_reach_the_output():
    """Every encoder resolution feeds the decoder: perturbing a skip changes the output."""
    torch.manual_seed(0)
    model = tiny().eval()
    perturb(model)
    x, t = torch.randn(1, 3, 16, 16), torch.rand(1)
    captured = []
    handles = [s.merge.register_forward_hook(lambda m, i, o: captured.append(i[0].shape)) for s in model.decoder]
    reference = model(x, t)
    for h in handles:
        h.remove()
    assert captured == [(1, 128, 8, 8), (1, 64, 16, 16)]  # concat of upsampled + skip at 8 and 16 px
    # the 16 px skip is the first encoder stage's output: changing that stage changes the output
    model.encoder[0].blocks[0].block.mlp.fc2.bias.data.add_(1.0)
    assert not torch.allclose(model(x, t), reference)


def test_class_conditional_image_model():
    torch.manual_seed(0)
    model = tiny(num_classes=10).eval()
    perturb(model)
    assert model.null_class == 10
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    a, b = model(x, t, torch.tensor([1, 1])), model(x, t, torch.tensor([2, 2]))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(model(x, t, None), model(x, t, torch.tensor([10, 10])))


def test_config_round_trip_and_errors():
    model = tiny(resample="bilinear")
    assert model.config["backbone"] == "image_diffit" and model.config["channels"] == [32, 64, 64]
    assert build_backbone(model.config).config == model.config
    with pytest.raises(ValueError, match="window 3 does not divide the 16x16 token grid of stage 1"):
        tiny(window=3)
    with pytest.raises(ValueError, match="unknown image preset 'cifar'; did you mean 'cifar10'"):
        image_diffit("cifar")
    with pytest.raises(ValueError, match="one entry per stage"):
        tiny(num_blocks=(1, 1))
    with pytest.raises(ValueError, match="not divisible by 8"):
        image_diffit("ffhq64", input_size=36)
    with pytest.raises(ValueError, match="unknown resample mode"):
        tiny(resample="pixelshuffle")
    with pytest.raises(ValueError, match="model built for 16x16 images got 32x32"):
        tiny()(torch.randn(1, 3, 32, 32), torch.rand(1))


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    model = tiny(channels=(32, 64), num_blocks=(1, 1))
    perturb(model)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)

    def grads():
        model.zero_grad()
        model(x, t).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    for a, b in zip(grads(), plain):
        torch.testing.assert_close(a, b)
