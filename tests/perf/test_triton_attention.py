"""The Triton fused attention: interpreter-mode correctness on CPU, registration, errors, GPU.

The kernels are checked on CPU through Triton's interpreter, which has to be switched on before
triton is imported, so the checks run in one subprocess (``_triton_interpreter_check.py``) and the
tests below read its per-case lines. Shapes are tiny: the interpreter emulates every tile in numpy.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffit_toolkit.nn.attention import Attention, resolve_backend
from diffit_toolkit.registry import attention_backends

HERE = Path(__file__).parent
CHECK = HERE / "_triton_interpreter_check.py"
KERNEL = {"out", "dq", "dk", "dv"}
BLOCK = {"out", "x", "c", "attn.relative_position_bias_table", "attn.qkv.weight", "backend"}
#: case -> (the line prefixes it prints, the tensors/checks that must be among its lines)
CASES = {
    "global_n16_d64": (("global_n16_d64",), KERNEL | {"d_table"}),  # global attention, N 16
    "global_n20_d72": (("global_n20_d72",), KERNEL | {"d_table"}),  # + 4 extra keys (zero bias), d 72 = 64 + 16
    "per_sample_windows_d72": (("per_sample_windows_d72",), KERNEL | {"d_table"}),  # G=2 tables, 2 windows each
    "windows_shared_d128": (("windows_shared_d128",), KERNEL | {"d_table"}),  # one table over 3 windows
    "global_split_d48_d96": (("global_d48", "global_d96"), KERNEL | {"d_table"}),  # 32 + 16 and 64 + 32 columns
    "dense_broadcast_d72": (("dense_broadcast_d72",), KERNEL | {"d_bias"}),  # dense bias broadcast over the batch
    "dense_full_no_bias": (("dense_full_d64", "no_bias_d64"), KERNEL | {"d_bias"}),  # M != N, and no bias
    "dense_expanded_d72": (("dense_expanded_d72",), KERNEL | {"d_bias"}),  # a caller-expanded (stride 0) bias
    # Attention in a DiffiTBlock, triton vs math, every parameter's gradient (d 72, 2 heads, 4x4 grid):
    "block_tmsa": (("block_tmsa",), BLOCK | {"cond.qkv_temb.weight"}),
    "block_window_tmsa": (("block_window_tmsa",), BLOCK | {"cond.qkv_temb.weight"}),  # 2x2 windows
    "block_relative_bias": (("block_relative_bias",), BLOCK | {"cond.bias_temb.weight"}),  # per-sample table
    "block_relative_bias_windows": (("block_relative_bias_windows",), BLOCK | {"cond.bias_temb.weight"}),
    "block_separate_token": (("block_separate_token",), BLOCK | {"cond.token_temb.weight"}),  # extra key
    "block_separate_token_windows": (("block_separate_token_windows",), BLOCK | {"cond.token_temb.weight"}),
    # the same under fp16 autocast (fp16 q/k/v, fp32 table), within 1.5e-2 of math fed the same inputs
    "block_relative_bias_windows_fp16": (("block_relative_bias_windows_fp16",), BLOCK - {"backend"}),
    "no_dense_bias": (("no_dense_bias",), {"no_bias_tensor", "fused_op_called", "dense_path_seen"}),
    "opcheck": (("opcheck",), {"opcheck_none", "opcheck_dense", "opcheck_table", "opcheck_bwd"}),
    "compile_aot_eager": (("compile_aot_eager",), {"one_graph_with_fused_op", "out", "x", "bias_table_offset",
                                                   "extra_tokens", "relative_position_bias_table"}),
}
LINE = re.compile(r"^(\S+) (\S+) max_err=(\S+) (ok|FAIL)\b")

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def run_checker(which: str) -> str:
    """Output of the interpreter checker for ``which`` (``all``, or case names joined by commas)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: the interpreter-mode kernel checks need it")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(CHECK), which], env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    if "took" not in proc.stdout:
        pytest.fail(f"interpreter check crashed (rc {proc.returncode}):\n{output[-3000:]}")
    return output


def check_case(output: str, case: str, prefixes: tuple[str, ...], required: set[str]) -> None:
    assert f"{case} took" in output, output[-3000:]
    mine = [m for m in map(LINE.match, output.splitlines()) if m and m.group(1) in prefixes]
    found = {m.group(2) for m in mine}
    assert required <= found, f"missing {sorted(required - found)} in:\n" + "\n".join(m.string for m in mine)
    failed = [m.string for m in mine if m.group(4) != "ok"]
    assert not failed, "\n".join(failed)


def test_interpreter_matches_math() -> None:
    """Every case of CASES within 1e-4 of math (fp32): forward output and the gradients of q, k,
    v and the table or dense bias; for blocks, the output and the gradients of x, c and every
    parameter. One subprocess (about 1.5 min on 2 cores), one test, so that parallel workers do
    not each run it; the failures of all cases are reported together."""
    output = run_checker("all")
    failures = []
    for case, (prefixes, required) in CASES.items():
        try:
            check_case(output, case, prefixes, required)
        except AssertionError as exc:
            failures.append(f"[{case}] {exc}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_compiled_with_inductor_matches_eager() -> None:
    """torch.compile(fullgraph=True) with inductor (a C++ build of the graph around the fused
    op; about a minute on 2 cores): one graph, output and every gradient equal eager's."""
    check_case(run_checker("compile_inductor"), "compile_inductor", ("compile_inductor",),
               {"one_graph_with_fused_op", "out", "x", "bias_table_offset", "relative_position_bias_table"})


@pytest.mark.slow
@needs_triton
def test_kernels_compile_for_an_h100_without_spills() -> None:
    """The three kernels at the CUDA launch configuration for head dim 72 (64 + 16 columns, gather
    mode, bf16, table gradient on) compile for sm_90 with Triton's bundled ptxas (no GPU needed):
    the real code generator accepts the split head dim, no register spills, and the shared
    memory fits an H100's 227 KB."""
    sys.path.insert(0, str(HERE))
    try:
        from _triton_sm90_resources import resources
    finally:
        sys.path.remove(str(HERE))
    from diffit_plugins.triton_attention import CUDA_WARPS_STAGES, _blocks

    block_m, block_n, d0, d1 = _blocks(72, "cuda")
    assert (d0, d1) == (64, 16)
    for kernel, (warps, stages) in CUDA_WARPS_STAGES.items():
        row = resources(kernel, d0, d1, block_m, block_n, warps, stages)
        assert "error" not in row, row
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0 and row["shared"] <= 227 * 1024, row


def test_interpreter_check_detects_a_wrong_kernel() -> None:
    """The comparison can fail: a perturbed result is reported as FAIL."""
    sys.path.insert(0, str(HERE))
    try:
        from _triton_interpreter_check import compare
    finally:
        sys.path.remove(str(HERE))
    want = {"out": torch.ones(4)}
    assert compare("x", {"out": torch.ones(4)}, want)
    assert not compare("x", {"out": torch.ones(4) + 1e-3}, want)


def test_case_check_flags_failures_and_missing_lines() -> None:
    """The reading of the checker's output can fail: a FAIL line, a missing tensor, a crash."""
    output = "x out max_err=1.00e-07 ok\nx backend max_err=0.00e+00 ok triton\nx took 0.1s"
    check_case(output, "x", ("x",), {"out", "backend"})
    with pytest.raises(AssertionError, match="FAIL"):
        check_case(output.replace("e-07 ok", "e-02 FAIL"), "x", ("x",), {"out"})
    with pytest.raises(AssertionError, match="missing \\['dq'\\]"):
        check_case(output, "x", ("x",), {"out", "dq"})
    with pytest.raises(AssertionError):
        check_case("x out max_err=1.00e-07 ok", "x", ("x",), {"out"})  # no "took": the case did not finish


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="under TRITON_INTERPRET=1 the backend declares the CPU (for running the suites through it)")
def test_registered_opt_in_and_unavailable_without_cuda() -> None:
    backend = attention_backends.get("triton")
    assert backend.devices == frozenset({"cuda"})
    assert backend.gathered_fn is not None  # Attention hands it the table, never a dense bias
    assert backend.auto_priority is None  # never validated on a GPU: opt-in by name
    assert backend.supports_bias and torch.bfloat16 in backend.dtypes
    auto = resolve_backend("auto")
    assert "triton" not in {b.name for b in auto.auto_candidates}
    if not torch.cuda.is_available():
        reason = backend.unavailable_reason()
        assert reason and ("CUDA" in reason or "triton" in reason)
        with pytest.warns(RuntimeWarning, match="'triton' is unavailable"):
            attn = Attention(64, 1, grid=4, rel_pos_bias=True, backend="triton")
        out = attn(torch.randn(2, 16, 64))  # falls back, still works
        assert out.shape == (2, 16, 64)


@needs_triton
def test_bad_inputs_are_one_line_errors() -> None:
    from diffit_plugins.triton_attention import attention_triton, gathered_attention_triton, relative_bias_attention

    q = torch.randn(1, 2, 16, 64)
    index = torch.zeros(16, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="must be \\(B, H, N, d\\)"):
        attention_triton(q[0], q, q, None, 0.1)
    with pytest.raises(ValueError, match="does not broadcast to \\(1, 2, 16, 16\\)"):
        attention_triton(q, q, q, torch.zeros(3, 16, 16), 0.1)
    with pytest.raises(ValueError, match="table offset must be \\(B, 49, 2\\)"):
        gathered_attention_triton(q, q, q, torch.zeros(49, 2), index, torch.zeros(1, 48, 2), 0.1)
    with pytest.raises(ValueError, match="table must be"):
        relative_bias_attention(q, q, q, torch.zeros(49, 3), index, 0.1)
    with pytest.raises(ValueError, match="index must be"):
        relative_bias_attention(q, q, q, torch.zeros(49, 2), index[:8], 0.1)
    with pytest.raises(ValueError, match="do not divide the batch"):
        relative_bias_attention(q.expand(3, -1, -1, -1), q.expand(3, -1, -1, -1), q.expand(3, -1, -1, -1),
                                torch.zeros(2, 49, 2), index, 0.1)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="runs on CUDA tensors"):
            relative_bias_attention(q, q, q, torch.zeros(49, 2), index, 0.1)


@given(st.integers(1, 256))
def test_head_dim_blocks_cover_the_head_dim_without_full_padding(head_dim: int) -> None:
    """Two power-of-two column blocks (>= 16, what tl.dot takes) covering d, used only when they
    are narrower than d padded to a power of two."""
    from diffit_plugins.triton_attention import head_dim_blocks

    d0, d1 = head_dim_blocks(head_dim)
    padded = max(16, 1 << (head_dim - 1).bit_length())
    assert d0 >= 16 and d0 & (d0 - 1) == 0 and d0 + d1 >= head_dim
    if d1:
        assert d1 >= 16 and d1 & (d1 - 1) == 0 and d0 < head_dim and d0 + d1 < padded
    else:
        assert d0 == padded


def test_head_dim_72_runs_as_64_plus_16() -> None:
    from diffit_plugins.triton_attention import head_dim_blocks

    assert head_dim_blocks(72) == (64, 16)  # 80 columns of work instead of 128
    assert [head_dim_blocks(d) for d in (64, 96, 48, 100, 128, 8)] == [(64, 0), (64, 32), (32, 16), (128, 0),
                                                                        (128, 0), (16, 0)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (full-size bf16 check)")
@pytest.mark.parametrize("head_dim", [64, 72, 128])
def test_gpu_full_size_bf16(head_dim: int) -> None:
    """B 64, H 16, N 256 (16x16 global grid), bf16: fused gather and dense bias vs fp32 math."""
    from diffit_plugins.triton_attention import attention_triton, relative_bias_attention
    from diffit_toolkit.nn.attention import attention_math, relative_position_index

    torch.manual_seed(0)
    B, H, grid = 64, 16, 16
    N = grid * grid
    q, k, v = (torch.randn(B, H, N, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    table = (torch.randn((2 * grid - 1) ** 2, H, device="cuda") * 0.5).requires_grad_(True)
    index = relative_position_index((grid, grid)).cuda()
    do = torch.randn(B, H, N, head_dim, device="cuda", dtype=torch.bfloat16)
    scale = head_dim**-0.5

    def dense(t):
        return t[index.reshape(-1)].reshape(N, N, H).permute(2, 0, 1)[None]

    ref = attention_math(*(t.detach().float().requires_grad_(True) for t in (q, k, v)), dense(table.detach()), scale)
    out = relative_bias_attention(q, k, v, table, index, scale)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    out.backward(do)
    grads = [t.grad.float() for t in (q, k, v, table)]
    leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v, table)]
    attention_math(*leaves[:3], dense(leaves[3]), scale).backward(do.float())
    for got, want in zip(grads, [t.grad for t in leaves]):
        err = (got - want).abs().max().item()
        assert err <= 3e-2 * max(1.0, want.abs().max().item()), err
    out2 = attention_triton(q.detach(), k.detach(), v.detach(), dense(table.detach()), scale)
    torch.testing.assert_close(out2.float(), out.detach().float(), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (module-level bf16 check)")
@pytest.mark.parametrize("window", [None, 8])
def test_gpu_attention_module_through_the_fused_gather(window: int | None) -> None:
    """XL attention (width 1152, 16 heads of 72, 16x16 grid) with a per-sample table offset and an
    extra key, backend triton in bf16 vs math in fp32: output and the table gradient."""
    torch.manual_seed(0)
    kwargs = dict(grid=16, window=window, rel_pos_bias=True)
    ref = Attention(1152, 16, backend="math", **kwargs).cuda()
    fused = Attention(1152, 16, backend="triton", **kwargs).cuda()
    with torch.no_grad():
        ref.relative_position_bias_table.normal_(0, 0.5)
    fused.load_state_dict(ref.state_dict())
    assert fused.backend.pick("cuda", torch.bfloat16, True, 72, True).gathered_fn is not None
    x = torch.randn(8, 256, 1152, device="cuda")
    offset = torch.randn(8, ref.bias_table_size, 16, device="cuda") * 0.3
    extra = torch.randn(8, 1, 1152, device="cuda")
    want = ref(x, bias_table_offset=offset, extra_tokens=extra)
    want.square().mean().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = fused(x, bias_table_offset=offset, extra_tokens=extra)
    got.float().square().mean().backward()
    scale = want.abs().max().item()
    assert (got.float() - want).abs().max().item() <= 3e-2 * max(1.0, scale)
    g_want, g_got = ref.relative_position_bias_table.grad, fused.relative_position_bias_table.grad
    assert (g_got - g_want).abs().max().item() <= 3e-2 * max(1e-3, g_want.abs().max().item())
