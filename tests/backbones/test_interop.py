"""Import of released DiffiT / DiT state dicts, checked against a plain reference forward written
here from SPEC 2 (torch ops only, independent of the toolkit's modules); toolkit checkpoints; CLI."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

from diffit_toolkit.backbones import latent_diffit
from diffit_toolkit.cli import app
from diffit_toolkit.runs.model_file import load_model_file, read_config, read_state_dict, save_model_file
from diffit_toolkit.interop.released import detect_layout, load_released

# A tiny config in both layouts: 8x8 latents, patch 2 (4x4 grid), width 72, 4 heads, 2 blocks.
C, SIZE, P, D, HEADS, DEPTH, CLASSES, FREQ = 4, 8, 2, 72, 4, 2, 10, 256
GRID = SIZE // P


# ---------------------------------------------------------------- released-layout state dicts
def swin_index(w: int) -> torch.Tensor:
    """Relative position index of a w x w window, written out with loops (Swin convention)."""
    n = w * w
    index = torch.empty(n, n, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            dy, dx = i // w - j // w, i % w - j % w
            index[i, j] = (dy + w - 1) * (2 * w - 1) + (dx + w - 1)
    return index


def released_state_dict(layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the key names of SPEC 2 (``diffit``) or DiT's models.py (``dit``)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    sd = {
        "x_embedder.proj.weight": r(D, C, P, P),
        "x_embedder.proj.bias": r(D),
        "pos_embed": r(1, GRID * GRID, D, std=1.0),
        "t_embedder.mlp.0.weight": r(D, FREQ, std=0.1),
        "t_embedder.mlp.0.bias": r(D),
        "t_embedder.mlp.2.weight": r(D, D, std=0.1),
        "t_embedder.mlp.2.bias": r(D),
        "y_embedder.embedding_table.weight": r(CLASSES + 1, D, std=0.5),
        "final_layer.linear.weight": r(P * P * 2 * C, D),
        "final_layer.linear.bias": r(P * P * 2 * C),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd |= {
            b + "attn.qkv.weight": r(3 * D, D, std=0.1),
            b + "attn.qkv.bias": r(3 * D),
            b + "attn.proj.weight": r(D, D, std=0.1),
            b + "attn.proj.bias": r(D),
            b + "mlp.fc1.weight": r(4 * D, D, std=0.1),
            b + "mlp.fc1.bias": r(4 * D),
            b + "mlp.fc2.weight": r(D, 4 * D, std=0.05),
            b + "mlp.fc2.bias": r(D),
        }
        if layout == "diffit":
            sd |= {
                b + "attn.qkv_temb.weight": r(3 * D, D, std=0.1),
                b + "attn.qkv_temb.bias": r(3 * D),
                b + "attn.relative_position_bias_table": r((2 * GRID - 1) ** 2, HEADS, std=0.5),
                b + "attn.relative_position_index": swin_index(GRID),
            }
        else:
            sd |= {b + "adaLN_modulation.1.weight": r(6 * D, D, std=0.1), b + "adaLN_modulation.1.bias": r(6 * D)}
    if layout == "dit":
        sd |= {"final_layer.adaLN_modulation.1.weight": r(2 * D, D, std=0.1), "final_layer.adaLN_modulation.1.bias": r(2 * D)}
    return sd


# ---------------------------------------------------------------- the reference forward (SPEC 2)
def ref_timestep(t, sd):
    half = FREQ // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos half first
    h = F.silu(F.linear(emb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"]))
    return F.linear(h, sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])


def ref_attention(x, c, sd, b, layout):
    B, N, _ = x.shape
    hd = D // HEADS
    qkv = F.linear(x, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
    if layout == "diffit":  # TMSA: qkv = Linear(x) + Linear(c), broadcast over tokens
        qkv = qkv + F.linear(c, sd[b + "attn.qkv_temb.weight"], sd[b + "attn.qkv_temb.bias"])[:, None]
    q, k, v = qkv.reshape(B, N, 3, HEADS, hd).permute(2, 0, 3, 1, 4)  # (3, heads, head_dim) layout
    logits = q @ k.transpose(-2, -1) / math.sqrt(hd)
    if layout == "diffit":
        table = sd[b + "attn.relative_position_bias_table"]  # ((2w-1)^2, heads)
        bias = table[swin_index(GRID).reshape(-1)].reshape(N, N, HEADS).permute(2, 0, 1)
        logits = logits + bias[None]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
    return F.linear(out, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])


def ref_mlp(x, sd, b):
    h = F.gelu(F.linear(x, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]), approximate="tanh")
    return F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])


def ln(x):
    return F.layer_norm(x, (D,), eps=1e-6)  # no affine


def reference_forward(sd, layout, x, t, y):
    B = x.shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=P)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (B, T, D)
    c = ref_timestep(t, sd) + sd["y_embedder.embedding_table.weight"][y]
    for i in range(DEPTH):
        b = f"blocks.{i}."
        if layout == "diffit":
            h = h + ref_attention(ln(h), c, sd, b, layout)
            h = h + ref_mlp(ln(h), sd, b)
        else:  # DiT adaLN-Zero block
            mod = F.linear(F.silu(c), sd[b + "adaLN_modulation.1.weight"], sd[b + "adaLN_modulation.1.bias"])
            sh_a, sc_a, g_a, sh_m, sc_m, g_m = (m[:, None] for m in mod.chunk(6, dim=1))
            h = h + g_a * ref_attention(ln(h) * (1 + sc_a) + sh_a, c, sd, b, layout)
            h = h + g_m * ref_mlp(ln(h) * (1 + sc_m) + sh_m, sd, b)
    if layout == "diffit":  # LN -> SiLU -> Linear
        h = F.linear(F.silu(ln(h)), sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    else:
        mod = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"])
        shift, scale = (m[:, None] for m in mod.chunk(2, dim=1))
        h = F.linear(ln(h) * (1 + scale) + shift, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    h = h.reshape(B, GRID, GRID, P, P, 2 * C).permute(0, 5, 1, 3, 2, 4)  # (B, C', h, p, w, p)
    return h.reshape(B, 2 * C, SIZE, SIZE)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, C, SIZE, SIZE, generator=g), torch.tensor([0, 250, 999]), torch.tensor([0, 7, CLASSES])


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("layout", ["diffit", "dit"])
@pytest.mark.parametrize("fmt", ["pt", "pt-ema", "safetensors"])
def test_imported_model_equals_reference_forward(layout, fmt, tmp_path):
    sd = released_state_dict(layout)
    path = tmp_path / f"ckpt.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"ema": sd, "model": {}} if fmt == "pt-ema" else sd, path)
    # DiT checkpoints do not store the head count; width 72 matches no DiT preset, so it is given
    model = load_released(path, **({"num_heads": HEADS} if layout == "dit" else {})).eval()
    expected_backbone = {"diffit": "latent_diffit", "dit": "dit"}[layout]
    assert model.config["backbone"] == expected_backbone
    assert model.config["mechanism"] == {"diffit": "tmsa", "dit": "adaln_zero"}[layout]
    assert (model.cfg.hidden_size, model.cfg.depth, model.cfg.num_heads, model.input_size) == (D, DEPTH, HEADS, SIZE)
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y)
        ref = reference_forward(sd, layout, x, t, y)
    assert out.shape == (3, 2 * C, SIZE, SIZE)
    assert ref.abs().mean() > 0.1  # the comparison is not between zeros
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_dit_head_count_comes_from_the_preset_width():
    from diffit_toolkit.backbones import dit

    source = dit("S/2", input_size=4, depth=1)  # width 384 -> DiT-S: 6 heads
    sd = {k.replace(".cond.", "."): v for k, v in source.state_dict().items()}
    assert detect_layout(sd) == "dit" and detect_layout(released_state_dict("diffit")) == "diffit"
    model = load_released(sd)
    assert model.cfg.num_heads == 6 and model.config["backbone"] == "dit"
    assert load_released(sd, num_heads=12).cfg.num_heads == 12


def test_dit_of_unknown_width_needs_num_heads():
    sd = released_state_dict("dit")
    # width 72 matches no DiT preset (384/768/1024/1152): without num_heads the import says so
    with pytest.raises(ValueError, match="head count of a width-72 DiT is unknown: pass num_heads="):
        load_released(sd)


def test_wrong_file_names_missing_unexpected_and_misshaped_keys(tmp_path):
    sd = released_state_dict("diffit")
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(D)
    sd["blocks.0.attn.proj.weight"] = torch.zeros(D, D + 1)
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError) as info:
        load_released(path)
    message = str(info.value)
    assert "\n" not in message
    assert "broken.pt" in message
    assert "1 missing key(s) [blocks.1.mlp.fc2.bias]" in message
    assert "1 unexpected key(s) [blocks.0.attn.q_norm.weight]" in message
    assert "1 mis-shaped key(s) [blocks.0.attn.proj.weight (72, 73) in file vs (72, 72) in model]" in message


def test_many_missing_keys_are_counted_not_all_listed():
    sd = {k: v for k, v in released_state_dict("diffit").items() if ".mlp.fc" not in k}  # 2 blocks x fc1/fc2 x weight/bias
    with pytest.raises(ValueError, match=r"8 missing key\(s\) \[.*, \.\.\. 4 more\]"):
        load_released(sd)


def test_not_a_latent_checkpoint(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ValueError, match="cannot tell the checkpoint layout"):
        load_released(path)
    with pytest.raises(ValueError, match="missing key.*x_embedder.proj.weight"):
        load_released(path, layout="diffit")
    pickled = tmp_path / "pickled.pt"
    # DiT's training checkpoints store an argparse Namespace next to the weights
    torch.save({"model": released_state_dict("dit"), "args": argparse.Namespace(model="DiT-XL/2")}, pickled)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        read_state_dict(pickled)


def test_wrong_relative_index_buffer_is_rejected():
    sd = released_state_dict("diffit")
    sd["blocks.0.attn.relative_position_index"] = sd["blocks.0.attn.relative_position_index"].flip(0)
    with pytest.raises(ValueError, match="relative_position_index"):
        load_released(sd)
    del sd["blocks.0.attn.relative_position_index"]  # derived buffers may be absent
    assert load_released(sd).cfg.depth == DEPTH


def test_toolkit_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = latent_diffit(None, input_size=8, hidden_size=64, num_heads=4, depth=2, num_classes=10, mechanism="mlp")
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(0.1 * torch.randn_like(p))
    path = save_model_file(model, tmp_path / "model")
    assert path.suffix == ".safetensors"
    assert read_config(path) == model.config
    loaded = load_model_file(path).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 4]), torch.tensor([1, 2])
    torch.testing.assert_close(loaded(x, t, y), model.eval()(x, t, y), atol=0, rtol=0)
    with pytest.raises(ValueError, match="not a diffit-toolkit checkpoint"):
        plain = tmp_path / "plain.safetensors"
        save_file({"a": torch.zeros(1)}, str(plain))
        read_config(plain)


def test_cli_convert_then_load(tmp_path):
    sd = released_state_dict("diffit")
    src, dst = tmp_path / "DiffiT-tiny.pt", tmp_path / "converted.safetensors"
    torch.save(sd, src)
    result = CliRunner().invoke(app, ["convert", str(src), str(dst)])
    assert result.exit_code == 0, result.output
    assert "latent_diffit (tmsa)" in result.output
    model = load_model_file(dst).eval()
    x, t, y = inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference_forward(sd, "diffit", x, t, y), atol=1e-5, rtol=0)
    bad = CliRunner().invoke(app, ["convert", str(tmp_path / "missing.pt"), str(dst)])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    del sd["blocks.1.mlp.fc2.bias"]
    torch.save(sd, src)
    broken = CliRunner().invoke(app, ["convert", str(src), str(dst)])
    assert broken.exit_code == 2 and "1 missing key(s) [blocks.1.mlp.fc2.bias]" in broken.output


def test_cli_model_info_prints_params_and_compute():
    result = CliRunner().invoke(app, ["model-info", "-b", "latent_diffit", "-b", "dit", "-p", "XL/2"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "DiffiT-XL/2" in result.output and "561.33" in result.output
    assert "DiT-XL/2" in result.output and "675.13" in result.output and "118.62" in result.output
    bad = CliRunner().invoke(app, ["model-info", "-p", "XXL/2"])
    assert bad.exit_code == 2 and "valid:" in bad.output


def test_no_null_class_keeps_every_row_a_class_and_refuses_guidance():
    from types import SimpleNamespace

    from diffit_toolkit.inference.pipeline import Pipeline

    sd = released_state_dict("dit")
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    assumed = load_released(dict(sd), num_heads=HEADS)
    assert assumed.num_classes == rows - 1  # default: the last row is the null class
    model = load_released(dict(sd), null_class=False, num_heads=HEADS)
    assert model.num_classes == rows and model.config["class_dropout_prob"] == 0
    x, t, _ = inputs()
    y = torch.tensor([0, 7, rows - 1])  # the last row is a real class now
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference_forward(sd, "dit", x, t, y), atol=1e-5, rtol=0)
    gen = Pipeline(model, None, None, {"num_classes": rows}, torch.device("cpu"))
    with pytest.raises(ValueError, match="guidance-scale 1"):
        gen.check_guidance(SimpleNamespace(guidance_scale=4.0))
    gen.check_guidance(SimpleNamespace(guidance_scale=1.0))


def test_cli_convert_never_overwrites_its_source(tmp_path):
    sd = released_state_dict("diffit")
    src = tmp_path / "DiffiT-tiny.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(src))
    before = src.read_bytes()
    link = tmp_path / "same.safetensors"
    link.symlink_to(src)
    for output in (src, link):
        result = CliRunner().invoke(app, ["convert", str(src), str(output)], env={"COLUMNS": "300"})
        assert result.exit_code == 2 and "is the source itself" in result.output, result.output
    assert src.read_bytes() == before


def test_model_info_lists_a_plugin_backbones_own_presets():
    from diffit_toolkit.backbones.latent import dit
    from diffit_toolkit.registry import PluginSystem, backbones, use_plugin_system

    def tiny_dit(preset=None, **options):
        sizes = {"T1": {"hidden_size": 32, "depth": 1}, "T2": {"hidden_size": 32, "depth": 2}}[preset]
        return dit(None, **{"input_size": 8, "in_channels": 4, "patch_size": 2, "num_heads": 2, **sizes, **options})

    tiny_dit.presets, tiny_dit.model_name = ("T1", "T2"), "TinyDiT"
    with use_plugin_system(PluginSystem()):
        backbones.register("tiny_dit", tiny_dit)
        result = CliRunner().invoke(app, ["model-info", "-b", "tiny_dit"], env={"COLUMNS": "120"})
        assert result.exit_code == 0, result.output
        assert "TinyDiT-T1" in result.output and "TinyDiT-T2" in result.output
        everything = CliRunner().invoke(app, ["model-info", "-p", "T2"], env={"COLUMNS": "120"})
        assert everything.exit_code == 0 and "TinyDiT-T2" in everything.output and "XL" not in everything.output
