"""Run under TRITON_INTERPRET=1 (by tests/perf/test_triton_attention.py): checks the Triton
kernels on CPU against ``attention_math`` and prints one line per case; exits 1 on a mismatch."""

from __future__ import annotations

import os
import sys
import time

import torch

from diffit_toolkit.nn.attention import attention_math, relative_position_index

TOL = 1e-4


def dense_bias(table: torch.Tensor, index: torch.Tensor, windows: int, m: int) -> torch.Tensor:
    """The reference gather: (1|B, H, n, M) from (T, H) or (G, T, H), extra keys get 0."""
    t3 = table if table.dim() == 3 else table[None]
    n, cols = index.shape
    bias = t3[:, index.reshape(-1)].reshape(t3.shape[0], n, cols, t3.shape[-1]).permute(0, 3, 1, 2)
    if windows > 1 and t3.shape[0] > 1:
        bias = bias.repeat_interleave(windows, dim=0)
    return torch.nn.functional.pad(bias, (0, m - cols))


def compare(name: str, got: dict, want: dict) -> bool:
    ok = True
    for key in want:
        err = (got[key].float() - want[key].float()).abs().max().item()
        scale = max(1.0, want[key].abs().max().item())
        good = err <= TOL * scale
        ok &= good
        print(f"{name} {key} max_err={err:.2e} {'ok' if good else 'FAIL'}", flush=True)
    return ok


def run_gathered(name: str, B: int, H: int, grid: int, d: int, per_sample: int = 0, windows: int = 1, extra: int = 0) -> bool:
    g = torch.Generator().manual_seed(hash(name) % 1000)
    n = grid * grid
    index = relative_position_index((grid, grid))
    T = (2 * grid - 1) ** 2
    Bt = B * windows
    q, k, v = (torch.randn(Bt, H, n + (extra if i else 0), d, generator=g) for i in range(3))
    base = torch.randn(T, H, generator=g) * 0.5
    offset = torch.randn(per_sample, T, H, generator=g) * 0.5 if per_sample else None
    do = torch.randn(Bt, H, n, d, generator=g)
    scale = d**-0.5
    from diffit_plugins.triton_attention import relative_bias_attention

    results = []
    for fused in (True, False):
        qq, kk, vv, tb = (t.clone().requires_grad_(True) for t in (q, k, v, base))
        table = tb + offset if offset is not None else tb
        if fused:
            out = relative_bias_attention(qq, kk, vv, table, index, scale)
        else:
            out = attention_math(qq, kk, vv, dense_bias(table, index, windows, kk.shape[2]), scale)
        out.backward(do)
        results.append(dict(out=out.detach(), dq=qq.grad, dk=kk.grad, dv=vv.grad, d_table=tb.grad))
    return compare(name, results[0], results[1])


def run_dense(name: str, B: int, H: int, N: int, M: int, d: int, bias_shape: tuple | None) -> bool:
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, N, d, generator=g)
    k, v = torch.randn(B, H, M, d, generator=g), torch.randn(B, H, M, d, generator=g)
    bias = torch.randn(*bias_shape, generator=g) if bias_shape else None
    do = torch.randn(B, H, N, d, generator=g)
    from diffit_plugins.triton_attention import attention_triton

    results = []
    for fn in (attention_triton, attention_math):
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (q, k, v, bias)]
        out = fn(*leaves, d**-0.5)
        out.backward(do)
        res = dict(out=out.detach(), dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)
        if bias is not None:
            res["d_bias"] = leaves[3].grad
        results.append(res)
    return compare(name, results[0], results[1])


def main(which: str) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 before importing triton", file=sys.stderr)
        return 2
    cases = {
        "global_n16_d64": lambda: run_gathered("global_n16_d64", B=2, H=2, grid=4, d=64),
        "global_n20_d72": lambda: run_gathered("global_n20_d72", B=2, H=2, grid=4, d=72, extra=4),
        "per_sample_windows_d72": lambda: run_gathered("per_sample_windows_d72", B=2, H=2, grid=3, d=72, per_sample=2, windows=2),
        "windows_shared_d128": lambda: run_gathered("windows_shared_d128", B=1, H=1, grid=2, d=128, windows=3),
        "dense_broadcast_d72": lambda: run_dense("dense_broadcast_d72", B=2, H=2, N=20, M=20, d=72, bias_shape=(1, 2, 20, 20)),
        "dense_full_no_bias": lambda: (run_dense("dense_full_d64", 2, 1, 17, 23, 64, (2, 1, 17, 23))
                                       and run_dense("no_bias_d64", 1, 2, 16, 16, 64, None)),
    }
    names = list(cases) if which == "all" else which.split(",")
    ok = True
    for case in names:
        start = time.perf_counter()
        ok &= bool(cases[case]())
        print(f"{case} took {time.perf_counter() - start:.1f}s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "all"))
