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

from diffit_toolkit.nn.attention import Attention, resolve_backend
from diffit_toolkit.registry import attention_backends

HERE = Path(__file__).parent
CHECK = HERE / "_triton_interpreter_check.py"
CASES = [
    "global_n16_d64",  # global attention, N 16, head dim 64
    "global_n20_d72",  # N 16 queries + 4 extra keys (zero bias), head dim 72 padded to 128
    "per_sample_windows_d72",  # per-sample table offsets (G=2) and 2 windows per sample, N 9
    "windows_shared_d128",  # one shared table over 3 windows, head dim 128
    "dense_broadcast_d72",  # the registered dense-bias interface, bias broadcast over the batch
    "dense_full_no_bias",  # dense per-entry bias with M != N, and no bias at all
]

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def interpreter_run() -> str:
    """Output of every interpreter case (one subprocess, ~20 s on 2 cores)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: the interpreter-mode kernel checks need it")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(CHECK), "all"], env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    if "took" not in proc.stdout:
        pytest.fail(f"interpreter check crashed (rc {proc.returncode}):\n{output[-3000:]}")
    return output


@pytest.mark.parametrize("case", CASES)
def test_interpreter_matches_math(interpreter_run: str, case: str) -> None:
    """Forward output and dq, dk, dv and the table (or dense bias) gradient within 1e-4 of math."""
    assert f"{case} took" in interpreter_run, interpreter_run[-2000:]
    checks = [line for line in interpreter_run.splitlines() if "max_err=" in line]
    prefix = {"dense_full_no_bias": ("dense_full_d64", "no_bias_d64")}.get(case, (case,))
    mine = [line for line in checks if line.split(" ")[0] in prefix]
    keys = {line.split(" ")[1] for line in mine}
    assert {"out", "dq", "dk", "dv"} <= keys, mine
    if "no_bias" not in case:
        assert keys & {"d_table", "d_bias"}, mine
    assert mine and all(line.endswith(" ok") for line in mine), "\n".join(mine)


def test_reference_gather_is_the_modules_bias() -> None:
    """The checker's dense reference equals Attention.relative_bias (windows and per-sample offsets)."""
    sys.path.insert(0, str(HERE))
    try:
        from _triton_interpreter_check import dense_bias
    finally:
        sys.path.remove(str(HERE))
    attn = Attention(32, 2, grid=4, window=2, rel_pos_bias=True, backend="math")
    offset = torch.randn(3, attn.bias_table_size, 2)
    want = attn.relative_bias(offset).repeat_interleave(4, dim=0)  # (3 samples * 4 windows, H, n, n)
    got = dense_bias(attn.relative_position_bias_table + offset, attn.relative_position_index, 4, 4)
    torch.testing.assert_close(got, want)
    shared = dense_bias(attn.relative_position_bias_table, attn.relative_position_index, 4, 6)
    torch.testing.assert_close(shared[..., :4], attn.relative_bias())
    assert shared[..., 4:].abs().max() == 0  # extra keys: zero bias


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


def test_registered_opt_in_and_unavailable_without_cuda() -> None:
    backend = attention_backends.get("triton")
    assert backend.devices == frozenset({"cuda"})
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
    from diffit_plugins.triton_attention import attention_triton, relative_bias_attention

    q = torch.randn(1, 2, 16, 64)
    index = torch.zeros(16, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="must be \\(B, H, N, d\\)"):
        attention_triton(q[0], q, q, None, 0.1)
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
