"""The block and the built-in mechanisms: the equivalences the math promises, as property tests."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from diffit_toolkit import BlockSpec, DiffiTBlock, PluginError
from diffit_toolkit.registry import conditioning


@pytest.fixture(autouse=True, scope="module")
def float64():
    """Blocks and inputs in float64, so the references written here compare to 1e-9 whatever
    the magnitude of the activations (float32 round-off grows with width)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


TOL = dict(atol=1e-9, rtol=1e-9)

#: The mechanisms this package ships (defined in its plugins/ folder, installed as diffit_plugins).
BUILTINS = [e.name for e in conditioning.entries() if e.obj.__module__.startswith("diffit_plugins.")]


@st.composite
def specs(draw, window=True):
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([4, 8, 72]))
    win = draw(st.sampled_from([None, 2])) if window else None
    grid = (draw(st.sampled_from([2, 4])), draw(st.sampled_from([2, 4])))
    return BlockSpec(
        dim=heads * head_dim,
        num_heads=heads,
        cond_dim=draw(st.sampled_from([4, 16])),
        grid=grid,
        window=win,
        rel_pos_bias=draw(st.booleans()),
        attention_backend="math",
    )


def inputs(spec: BlockSpec, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = spec.grid[0] * spec.grid[1]
    return torch.randn(batch, n, spec.dim, generator=g), torch.randn(batch, spec.cond_dim, generator=g)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter random non-zero values (zero-inits would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def reference_tmsa_block(block: DiffiTBlock, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """DiffiT eq. 3-8 with TMSA in its concatenation form: q, k, v are ONE linear map of
    ``[x_s, x_t]`` (weights ``[W_s | W_t]``), written from the paper, global attention."""
    attn, spec = block.attn, block.spec
    B, N, D = x.shape
    heads, d = spec.num_heads, spec.head_dim
    W = torch.cat([attn.qkv.weight, block.cond.qkv_temb.weight], dim=1)  # (3D, D + cond_dim)
    b = attn.qkv.bias + block.cond.qkv_temb.bias

    h = F.layer_norm(x, (D,), eps=spec.norm_eps)
    xs_xt = torch.cat([h, c[:, None].expand(B, N, -1)], dim=-1)  # (B, N, D + cond_dim)
    q, k, v = (xs_xt @ W.T + b).view(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)  # each (B, heads, N, d)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    if attn.bias_window is not None:
        logits = logits + attn.relative_position_bias_table[attn.relative_position_index].permute(2, 0, 1)
    a = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
    x = x + a @ attn.proj.weight.T + attn.proj.bias
    h = F.layer_norm(x, (D,), eps=spec.norm_eps)
    mlp = block.mlp
    return x + F.gelu(h @ mlp.fc1.weight.T + mlp.fc1.bias, approximate="tanh") @ mlp.fc2.weight.T + mlp.fc2.bias


@given(specs(window=False), st.integers(1, 3), st.integers(0, 2**16))
def test_tmsa_equals_its_concatenation_form(spec, batch, seed):
    block = DiffiTBlock(spec, "tmsa")
    randomize_(block, seed)
    x, c = inputs(spec, batch, seed)
    torch.testing.assert_close(block(x, c), reference_tmsa_block(block, x, c), **TOL)


@given(specs(), st.integers(0, 2**16))
def test_tmsa_with_zero_temporal_weights_is_plain_attention_with_the_same_bias(spec, seed):
    block = DiffiTBlock(spec, "tmsa")
    randomize_(block, seed)
    with torch.no_grad():
        block.cond.qkv_temb.weight.zero_()
        block.cond.qkv_temb.bias.zero_()
    x, c = inputs(spec, 2, seed)
    expected = x + block.attn(block.norm1(x))  # the attention module alone: no time anywhere
    expected = expected + block.mlp(block.norm2(expected))
    torch.testing.assert_close(block(x, c), expected, **TOL)
    other_c = torch.randn_like(c)
    torch.testing.assert_close(block(x, other_c), block(x, c))


@given(specs(window=False), st.integers(0, 2**16))
def test_window_tmsa_with_the_whole_grid_as_window_is_global_tmsa(spec, seed):
    windowed = DiffiTBlock(spec, "window_tmsa", {"window": spec.grid})
    global_ = DiffiTBlock(spec, "tmsa")
    randomize_(global_, seed)
    windowed.load_state_dict(global_.state_dict())
    x, c = inputs(spec, 2, seed)
    torch.testing.assert_close(windowed(x, c), global_(x, c))


@settings(max_examples=15)
@given(st.sampled_from([(4, 4), (4, 8), (8, 4)]), st.sampled_from([1, 2, 4]), st.booleans(), st.integers(0, 2**16))
def test_window_tmsa_equals_a_plain_per_window_loop(grid, window, bias, seed):
    """Each window of the grid, cut out and run through a *global* TMSA block of the window's
    size, gives exactly that window of the windowed block's output."""
    spec = BlockSpec(dim=16, num_heads=2, cond_dim=8, grid=grid, rel_pos_bias=bias, attention_backend="math")
    block = DiffiTBlock(spec, "window_tmsa", {"window": window})
    randomize_(block, seed)
    one_window = DiffiTBlock(BlockSpec(dim=16, num_heads=2, cond_dim=8, grid=(window, window), rel_pos_bias=bias), "tmsa")
    one_window.load_state_dict(block.state_dict())  # same shapes: the bias table spans one window
    x, c = inputs(spec, 2, seed)
    out = block(x, c).view(2, *grid, 16)
    xg = x.view(2, *grid, 16)
    for i in range(0, grid[0], window):
        for j in range(0, grid[1], window):
            tile = xg[:, i : i + window, j : j + window].reshape(2, window * window, 16)
            expected = one_window(tile, c).view(2, window, window, 16)
            torch.testing.assert_close(out[:, i : i + window, j : j + window], expected, **TOL)


def test_window_tmsa_defaults_to_window_4_and_checks_the_grid():
    spec = BlockSpec(dim=16, num_heads=2, cond_dim=8, grid=(8, 8), rel_pos_bias=True)
    assert DiffiTBlock(spec, "window_tmsa").attn.window == (4, 4)
    assert DiffiTBlock(spec, "window_tmsa").attn.relative_position_bias_table.shape == (49, 2)
    with pytest.raises(ValueError, match="8x8 is not divisible by window 3x3"):
        DiffiTBlock(spec, "window_tmsa", {"window": 3})


@given(specs(), st.integers(1, 3), st.integers(0, 2**16))
def test_adaln_zero_block_is_the_identity_at_initialisation(spec, batch, seed):
    block = DiffiTBlock(spec, "adaln_zero")
    x, c = inputs(spec, batch, seed)
    torch.testing.assert_close(block(x, c), x, atol=0, rtol=0)


@given(specs(), st.integers(0, 2**16))
def test_adaln_zero_modulates_like_dit(spec, seed):
    block = DiffiTBlock(spec, "adaln_zero")
    randomize_(block, seed)
    x, c = inputs(spec, 2, seed)
    mods = block.cond.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
    expected = x + gate_a * block.attn(block.norm1(x) * (1 + scale_a) + shift_a)
    expected = expected + gate_m * block.mlp(block.norm2(expected) * (1 + scale_m) + shift_m)
    torch.testing.assert_close(block(x, c), expected, **TOL)


def bias_spec(window) -> BlockSpec:
    return BlockSpec(dim=16, num_heads=2, cond_dim=8, grid=(4, 4), window=window, rel_pos_bias=True, attention_backend="math")


@given(st.sampled_from([None, 2]), st.integers(0, 2**16))
def test_relative_bias_mechanism_changes_the_output_with_time(window, seed):
    block = DiffiTBlock(bias_spec(window), "relative_bias")
    x, c = inputs(block.spec, 2, seed)
    torch.testing.assert_close(block(x, c), block(x, torch.randn_like(c)))  # zero-init: no effect yet
    randomize_(block.cond, seed)
    assert (block(x, c) - block(x, c + 1)).abs().max() > 1e-4


@given(st.sampled_from([None, 2]), st.integers(0, 2**16))
def test_relative_bias_offset_constant_along_keys_changes_nothing(window, seed):
    """An offset that is the same for every table row is constant along the key axis: softmax
    ignores it (SPEC 4); the mechanism's per-row offsets are what make it work."""
    block = DiffiTBlock(bias_spec(window), "relative_bias")
    randomize_(block, seed)
    x, _ = inputs(block.spec, 2, seed)
    h = block.norm1(x)
    T, H = block.attn.bias_table_size, block.spec.num_heads
    constant = torch.randn(2, 1, H).expand(2, T, H) * 10
    torch.testing.assert_close(block.attn(h, bias_table_offset=constant), block.attn(h), **TOL)
    varying = torch.randn(2, T, H) * 10
    assert (block.attn(h, bias_table_offset=varying) - block.attn(h)).abs().max() > 1e-3


def test_relative_bias_needs_a_bias_table():
    with pytest.raises(PluginError, match="'relative_bias' acts on the relative position bias"):
        DiffiTBlock(BlockSpec(dim=16, num_heads=2, cond_dim=8, grid=(4, 4)), "relative_bias")


@given(st.integers(0, 2**16))
def test_mlp_injection_leaves_attention_time_independent(seed):
    spec = bias_spec(None)
    block = DiffiTBlock(spec, "mlp")
    randomize_(block, seed)
    x, c = inputs(spec, 2, seed)
    a = x + block.attn(block.norm1(x))
    expected = a + block.mlp(block.norm2(a) + block.cond.mlp_temb(c)[:, None])
    torch.testing.assert_close(block(x, c), expected, **TOL)


@given(st.sampled_from([None, 2]), st.integers(0, 2**16))
def test_separate_token_is_an_extra_key_value_with_zero_bias(window, seed):
    """Reference: per window, keys/values are the window's tokens plus the projected time token;
    queries are spatial only (the token is not mixed into the spatial q/k/v)."""
    spec = bias_spec(window)
    block = DiffiTBlock(spec, "separate_token")
    randomize_(block, seed)
    x, c = inputs(spec, 2, seed)
    attn, heads, d = block.attn, spec.num_heads, spec.head_dim
    w = window or 4
    h = block.norm1(x).view(2, 4, 4, 16)
    tok = block.cond.token_temb(c)  # (B, D)
    _, kt, vt = attn.qkv(tok).view(2, 3, heads, d).unbind(1)  # each (B, heads, d)
    out = torch.zeros(2, 4, 4, 16)
    table = attn.relative_position_bias_table[attn.relative_position_index].permute(2, 0, 1)  # (heads, n, n)
    for i in range(0, 4, w):
        for j in range(0, 4, w):
            tile = h[:, i : i + w, j : j + w].reshape(2, w * w, 16)
            q, k, v = attn.qkv(tile).view(2, w * w, 3, heads, d).permute(2, 0, 3, 1, 4)
            k = torch.cat([k, kt[:, :, None]], dim=2)
            v = torch.cat([v, vt[:, :, None]], dim=2)
            logits = q @ k.transpose(-1, -2) / math.sqrt(d) + F.pad(table, (0, 1))
            o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, w, w, 16)
            out[:, i : i + w, j : j + w] = o
    a = x + attn.proj(out.view(2, 16, 16))
    expected = a + block.mlp(block.norm2(a))
    torch.testing.assert_close(block(x, c), expected, **TOL)


@given(st.integers(0, 2**16))
def test_additive_adds_the_scaled_projection_to_the_tokens(seed):
    spec = bias_spec(2)
    block = DiffiTBlock(spec, "additive")
    randomize_(block, seed)
    x, c = inputs(spec, 2, seed)
    y = x + block.cond.gamma * block.cond.add_temb(c)[:, None]
    y = y + block.attn(block.norm1(y))
    expected = y + block.mlp(block.norm2(y))
    torch.testing.assert_close(block(x, c), expected, **TOL)


# Batch independence, gradients reaching every mechanism parameter, shapes, dtypes, compile and
# adaLN-Zero's identity run for EVERY registered mechanism through the conformance kit
# (diffit_toolkit.testing, tests/test_conformance.py).


@pytest.mark.parametrize("mechanism", BUILTINS)
def test_every_builtin_mechanism_documents_its_paper_source(mechanism):
    doc = conditioning.get(mechanism).__doc__
    assert doc and len(doc.split()) > 30
    assert "DiffiT" in doc or "DiT" in doc
