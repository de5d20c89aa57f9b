"""Attention: relative position bias, windows, and every backend against the fp32 ``math`` reference."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffit_toolkit.nn.attention import (
    Attention,
    AttentionBackend,
    BackendChoice,
    attention_gathered_math,
    attention_math,
    gather_relative_bias,
    relative_position_index,
)
from diffit_toolkit.registry import attention_backends

# Absolute tolerance of each dtype against the fp32 reference (outputs are O(1)).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def usable_backends() -> list[str]:
    return [e.name for e in attention_backends.entries() if e.obj.unavailable_reason() is None]


def reference_attention(module: Attention, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Windowed attention with the relative bias, written plainly: loop over windows and heads."""
    B, N, C = x.shape
    H, W = grid
    wh, ww = module.window or grid
    heads, d = module.num_heads, module.head_dim
    qkv = x.double() @ module.qkv.weight.double().T + module.qkv.bias.double()  # (B, N, 3C)
    qkv = qkv.view(B, H, W, 3, heads, d)
    out = torch.zeros(B, H, W, heads, d, dtype=torch.float64)
    for b in range(B):
        for i0 in range(0, H, wh):
            for j0 in range(0, W, ww):
                win = qkv[b, i0 : i0 + wh, j0 : j0 + ww].reshape(wh * ww, 3, heads, d)
                for h in range(heads):
                    q, k, v = win[:, 0, h], win[:, 1, h], win[:, 2, h]
                    logits = q @ k.T * d**-0.5
                    if module.bias_window is not None:
                        for a in range(wh * ww):
                            for c in range(wh * ww):
                                dy = a // ww - c // ww + wh - 1
                                dx = a % ww - c % ww + ww - 1
                                logits[a, c] += module.relative_position_bias_table[dy * (2 * ww - 1) + dx, h].double()
                    o = logits.softmax(-1) @ v
                    out[b, i0 : i0 + wh, j0 : j0 + ww, h] = o.view(wh, ww, d)
    out = out.reshape(B, N, C)
    return (out @ module.proj.weight.double().T + module.proj.bias.double()).float()


@st.composite
def attention_cases(draw):
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([4, 8, 72]))
    window = draw(st.sampled_from([None, 1, 2, 4]))
    mult = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    base = window or draw(st.integers(2, 4))
    grid = (base * mult[0], base * mult[1])
    return dict(heads=heads, head_dim=head_dim, window=window, grid=grid, bias=draw(st.booleans()),
                batch=draw(st.integers(1, 3)), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=20)
@given(attention_cases())
def test_window_attention_equals_a_plain_per_window_loop(case):
    torch.manual_seed(case["seed"])
    dim = case["heads"] * case["head_dim"]
    module = Attention(dim, case["heads"], grid=case["grid"], window=case["window"], rel_pos_bias=case["bias"], backend="math")
    x = torch.randn(case["batch"], case["grid"][0] * case["grid"][1], dim)
    torch.testing.assert_close(module(x), reference_attention(module, x, case["grid"]), atol=2e-5, rtol=1e-4)


def test_relative_position_index_is_swins_formula():
    index = relative_position_index((3, 5))
    for a in range(15):
        for c in range(15):
            expected = (a // 5 - c // 5 + 2) * 9 + (a % 5 - c % 5 + 4)
            assert index[a, c] == expected
    assert int(index.max()) == 5 * 9 - 1


def test_bias_table_has_swin_shape_for_global_and_windowed():
    assert Attention(64, 4, grid=16, rel_pos_bias=True).relative_position_bias_table.shape == (31 * 31, 4)
    assert Attention(64, 4, grid=32, window=8, rel_pos_bias=True).relative_position_bias_table.shape == (15 * 15, 4)


@pytest.mark.parametrize(("grid", "window"), [((6, 6), 4), ((8, 6), 4), ((5, 5), 2)])
def test_grid_not_divisible_by_window_is_a_clear_error(grid, window):
    with pytest.raises(ValueError) as err:
        Attention(16, 2, grid=grid, window=window)
    assert "\n" not in str(err.value)
    assert f"{grid[0]}x{grid[1]} is not divisible by window {window}x{window}" in str(err.value)


def test_heads_not_dividing_width_is_a_clear_error():
    with pytest.raises(ValueError, match="width 30 is not divisible by 4 heads"):
        Attention(30, 4)


def test_wrong_token_count_is_a_clear_error():
    module = Attention(16, 2, grid=(4, 4))
    with pytest.raises(ValueError, match="built for a 4x4 grid got 9 tokens"):
        module(torch.randn(1, 9, 16))


@st.composite
def backend_cases(draw):
    backend = draw(st.sampled_from(usable_backends()))
    declared = attention_backends.get(backend).dtypes
    return dict(
        backend=backend,
        dtype=draw(st.sampled_from([d for d in (torch.float32, torch.bfloat16, torch.float16) if d in declared])),
        bias=draw(st.booleans()),
        window=draw(st.sampled_from([None, 2])),
        extra=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=30)
@given(backend_cases())
def test_every_backend_equals_math_at_head_dim_72(case):
    """Forward outputs and, where the backend has a backward here, all gradients (input, weights,
    bias table) match the reference."""
    torch.manual_seed(case["seed"])
    heads, grid = 2, (4, 4)
    dim = heads * 72
    kwargs = dict(grid=grid, window=case["window"], rel_pos_bias=case["bias"])
    ref = Attention(dim, heads, backend="math", **kwargs)
    fast = Attention(dim, heads, backend=case["backend"], **kwargs).to(case["dtype"])
    fast.load_state_dict(ref.state_dict())
    backend = attention_backends.get(case["backend"])
    assert fast.backend.pick("cpu", case["dtype"], case["bias"], 72) is backend  # no silent fallback
    x = torch.randn(2, 16, dim)
    extra = torch.randn(2, 1, dim) if case["extra"] else None
    offset = torch.randn(2, ref.bias_table_size, heads) if case["bias"] else None

    def run(module, dtype):
        xi = x.detach().clone().to(dtype)
        ei = None if extra is None else extra.to(dtype)
        return module(xi, extra_tokens=ei, bias_table_offset=offset).float()

    with torch.no_grad():
        ref_out, out = run(ref, torch.float32), run(fast, case["dtype"])
    tol = TOLERANCE[case["dtype"]] * max(1.0, ref_out.abs().max().item())
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=0)

    if case["dtype"] != torch.float32 or not backend.supports("cpu", torch.float32, case["bias"], 72, needs_grad=True):
        return

    def grads(module):
        module.zero_grad()
        xi = x.detach().clone().requires_grad_()
        ei = None if extra is None else extra.detach().clone().requires_grad_()
        module(xi, extra_tokens=ei, bias_table_offset=offset).square().sum().backward()
        found = {n: p.grad for n, p in module.named_parameters()}
        found["x"] = xi.grad
        if ei is not None:
            found["extra"] = ei.grad
        return found

    ref_grads, fast_grads = grads(ref), grads(fast)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)


@settings(max_examples=25)
@given(st.integers(1, 3), st.integers(2, 9), st.integers(0, 2**16))
def test_a_bias_constant_along_keys_changes_nothing(heads, n, seed):
    """softmax is invariant to a per-row constant: a time-dependent bias that does not vary across
    key positions has no effect (the SPEC 4 pitfall); one that varies does."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, n, 8, generator=g) for _ in range(3))
    per_row = torch.randn(2, heads, n, 1, generator=g) * 5  # depends on sample, head, query only
    plain = attention_math(q, k, v, None, 8**-0.5)
    torch.testing.assert_close(attention_math(q, k, v, per_row.expand(-1, -1, -1, n), 8**-0.5), plain)
    varying = torch.randn(2, heads, n, n, generator=g) * 5
    assert (attention_math(q, k, v, varying, 8**-0.5) - plain).abs().max() > 1e-3


def test_unavailable_backend_warns_once_and_falls_back():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = Attention(16, 2, grid=4, rel_pos_bias=True, backend="xformers")
        Attention(16, 2, grid=4, backend="xformers")
    messages = [str(w.message) for w in caught if "xformers" in str(w.message)]
    if attention_backends.get("xformers").unavailable_reason() is None:
        pytest.skip("xformers kernels load on this machine")
    assert len(messages) == 1 and "falling back to 'auto'" in messages[0]
    ref = Attention(16, 2, grid=4, rel_pos_bias=True, backend="math")
    ref.load_state_dict(first.state_dict())
    x = torch.randn(2, 16, 16)
    torch.testing.assert_close(first(x), ref(x), atol=1e-5, rtol=1e-5)


def test_auto_picks_sdpa_on_cpu_and_math_for_float64():
    choice = Attention(16, 2).backend
    assert choice.pick("cpu", torch.float32, True, 8).name == "sdpa"
    assert choice.pick("cpu", torch.float64, True, 8).name == "math"


@settings(max_examples=20)
@given(st.integers(1, 3), st.sampled_from([(2, 2), (2, 3), (3, 3)]), st.integers(1, 4), st.booleans(),
       st.integers(0, 2), st.integers(0, 2**16))
def test_gather_relative_bias_is_the_table_looked_up_per_pair(heads, window, windows, per_sample, extra, seed):
    """bias[b*windows + w, h, i, j] = (table + offset[b])[index[i, j], h] for j < n, 0 for extra keys."""
    g = torch.Generator().manual_seed(seed)
    index = relative_position_index(window)
    n, T = index.shape[0], (2 * window[0] - 1) * (2 * window[1] - 1)
    table = torch.randn(T, heads, generator=g)
    offset = torch.randn(2, T, heads, generator=g) if per_sample else None
    bias = gather_relative_bias(table, index, offset, windows, n + extra)
    samples = 2 if per_sample else 1
    assert bias.shape == (samples * windows if per_sample else 1, heads, n, n + extra)
    for entry in range(bias.shape[0]):
        full = table + (offset[entry // windows] if per_sample else 0)
        for h in range(heads):
            for i in range(n):
                for j in range(n + extra):
                    want = full[index[i, j], h] if j < n else 0.0
                    assert bias[entry, h, i, j] == want


def gathering_spy(calls: list[str]) -> AttentionBackend:
    """A backend with a gathered_fn (the reference, :func:`attention_gathered_math`) whose dense
    ``fn`` refuses a bias: a call that builds a dense bias fails."""

    def dense(q, k, v, bias, scale):
        assert bias is None, "a dense bias was built although the backend gathers"
        calls.append("dense")
        return attention_math(q, k, v, None, scale)

    def gathered(q, k, v, table, index, table_offset, scale):
        calls.append("gathered")
        return attention_gathered_math(q, k, v, table, index, table_offset, scale)

    return AttentionBackend(name="spy", fn=dense, gathered_fn=gathered, devices=frozenset({"cpu"}))


@settings(max_examples=15)
@given(st.sampled_from([None, 2]), st.booleans(), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_a_gathering_backend_gets_the_table_not_a_dense_bias(window, bias, offset, extra, seed):
    """Attention routes the relative bias to gathered_fn (table, index, per-sample offset, extra
    keys) and gets the math backend's output and gradients; no bias: the plain fn."""
    torch.manual_seed(seed)
    heads, dim = 2, 16
    ref = Attention(dim, heads, grid=4, window=window, rel_pos_bias=bias, backend="math")
    spy = Attention(dim, heads, grid=4, window=window, rel_pos_bias=bias, backend="math")
    spy.load_state_dict(ref.state_dict())
    calls: list[str] = []
    spy.backend = BackendChoice("spy", gathering_spy(calls), ())
    x = torch.randn(3, 16, dim)
    table_offset = torch.randn(3, ref.bias_table_size, heads) if bias and offset else None
    tokens = torch.randn(3, 2, dim) if extra else None

    def run(module):
        module.zero_grad()
        leaves = [None if t is None else t.clone().requires_grad_(True) for t in (x, table_offset, tokens)]
        out = module(leaves[0], bias_table_offset=leaves[1], extra_tokens=leaves[2])
        out.square().sum().backward()
        found = {n: p.grad for n, p in module.named_parameters()}
        found.update({name: t.grad for name, t in zip(("x", "offset", "extra"), leaves) if t is not None})
        return out.detach(), found

    (want, want_grads), (got, got_grads) = run(ref), run(spy)
    assert calls == ["gathered" if bias else "dense"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
