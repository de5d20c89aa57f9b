"""Run under TRITON_INTERPRET=1 (by tests/perf/test_triton_attention.py): checks the Triton
kernels on CPU against ``attention_math`` and prints one line per compared tensor
(``<case> <tensor> max_err=<e> ok|FAIL``) and ``<case> took <s>s`` per case; exits 1 on a mismatch.

Cases: the kernels' two entry points (gathered table, dense bias); ``Attention`` inside a
``DiffiTBlock`` for every mechanism that touches the bias, with the ``triton`` backend against
``math`` (forward and every gradient); that no ``(B, H, n, M)`` tensor exists on the gathered
path; ``torch.library.opcheck`` of the custom ops; and ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from diffit_toolkit.nn.attention import attention_math, gather_relative_bias, relative_position_index

TOL = 1e-4


def compare(name: str, got: dict, want: dict, tol: float = TOL) -> bool:
    ok = True
    for key in want:
        err = (got[key].float() - want[key].float()).abs().max().item()
        scale = max(1.0, want[key].abs().max().item())
        good = err <= tol * scale
        ok &= good
        print(f"{name} {key} max_err={err:.2e} {'ok' if good else 'FAIL'}", flush=True)
    return ok


def report(name: str, key: str, good: bool, detail: str = "") -> bool:
    """One line for a yes/no check, in the same format (``max_err`` 0 when it holds)."""
    print(f"{name} {key} max_err={0.0 if good else 1.0:.2e} {'ok' if good else 'FAIL'} {detail}".rstrip(), flush=True)
    return good


# -- the kernels' entry points -------------------------------------------------------------------


def run_gathered(name: str, B: int, H: int, grid: int, d: int, per_sample: int = 0, windows: int = 1, extra: int = 0) -> bool:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
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
            out = attention_math(qq, kk, vv, gather_relative_bias(tb, index, offset, windows, kk.shape[2]), scale)
        out.backward(do)
        results.append(dict(out=out.detach(), dq=qq.grad, dk=kk.grad, dv=vv.grad, d_table=tb.grad))
    return compare(name, results[0], results[1])


def run_dense(name: str, B: int, H: int, N: int, M: int, d: int, bias_shape: tuple | None, expand: bool = False) -> bool:
    """The dense interface; ``expand``: the caller passes its bias expanded to the full shape
    (stride 0), whose gradient must still be the per-entry one."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, N, d, generator=g)
    k, v = torch.randn(B, H, M, d, generator=g), torch.randn(B, H, M, d, generator=g)
    bias = torch.randn(*bias_shape, generator=g) if bias_shape else None
    do = torch.randn(B, H, N, d, generator=g)
    from diffit_plugins.triton_attention import attention_triton

    results = []
    for fn in (attention_triton, attention_math):
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (q, k, v, bias)]
        b = leaves[3].expand(B, H, N, M) if expand else leaves[3]
        out = fn(*leaves[:3], b, d**-0.5)
        out.backward(do)
        res = dict(out=out.detach(), dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)
        if bias is not None:
            res["d_bias"] = leaves[3].grad
        results.append(res)
    return compare(name, results[0], results[1])


# -- Attention inside a block, per mechanism -----------------------------------------------------


def build_pair(mechanism: str, window: int | None, head_dim: int = 72, heads: int = 2, grid: int = 4):
    """The same randomised block twice: ``triton`` and ``math`` attention backends."""
    from diffit_toolkit import BlockSpec, DiffiTBlock

    blocks = []
    for backend in ("triton", "math"):
        spec = BlockSpec(dim=heads * head_dim, num_heads=heads, cond_dim=16, grid=(grid, grid), window=window,
                         rel_pos_bias=True, attention_backend=backend)
        blocks.append(DiffiTBlock(spec, mechanism))
    g = torch.Generator().manual_seed(sum(map(ord, mechanism)) + (window or 0))
    with torch.no_grad():  # random non-zero values everywhere: zero inits (relative_bias) would hide bugs
        for p in blocks[1].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    blocks[0].load_state_dict(blocks[1].state_dict())
    return blocks, g


def block_grads(block, x, c, call=None) -> dict:
    """Output and the gradients of x, c and every parameter; ``call`` runs the block (e.g. compiled)."""
    block.zero_grad()
    xi, ci = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
    out = (call if call is not None else block)(xi, ci)
    out.square().mean().backward()
    found = {"out": out.detach(), "x": xi.grad, "c": ci.grad}
    found.update({n: p.grad for n, p in block.named_parameters()})
    return found


def run_block(name: str, mechanism: str, window: int | None) -> bool:
    (fused, ref), g = build_pair(mechanism, window)
    backend = fused.attn.backend.pick("cpu", torch.float32, True, fused.spec.head_dim, True)
    ok = report(name, "backend", backend.name == "triton" and backend.gathered_fn is not None, backend.name)
    x = torch.randn(2, 16, fused.spec.dim, generator=g)
    c = torch.randn(2, 16, generator=g)
    return compare(name, block_grads(fused, x, c), block_grads(ref, x, c)) and ok


def run_block_fp16(name: str, mechanism: str, window: int | None) -> bool:
    """The block under fp16 autocast (fp16 q, k, v; fp32 table; the offset from an fp16 linear),
    both backends fed the same fp16 inputs: within 1.5e-2. (bf16 cannot be checked here: the
    interpreter's ``tl.dot`` returns garbage for bf16 operands; it is checked on a GPU.)"""
    (fused, ref), g = build_pair(mechanism, window)
    x = torch.randn(2, 16, fused.spec.dim, generator=g)
    c = torch.randn(2, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.float16):
        got, want = block_grads(fused, x, c), block_grads(ref, x, c)
    return compare(name, got, want, tol=1.5e-2)


def run_no_dense_bias(name: str) -> bool:
    """Forward + backward of a windowed relative_bias block with extra keys never creates a
    tensor whose last two dims are (n, M) or (n, n) outside the fused op (the dense path does)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list[tuple[str, tuple[int, ...]]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.seen.append((str(func), tuple(t.shape)))
            return out

    ok = True
    for backend in ("triton", "math"):
        from diffit_toolkit import BlockSpec, DiffiTBlock

        spec = BlockSpec(dim=2 * 24, num_heads=2, cond_dim=8, grid=(4, 4), window=2, rel_pos_bias=True,
                         attention_backend=backend)
        torch.manual_seed(0)
        attn = DiffiTBlock(spec, "relative_bias").attn
        x = torch.randn(3, 16, spec.dim, requires_grad=True)
        offset = torch.randn(3, spec.bias_table_size, 2, requires_grad=True)
        extra = torch.randn(3, 1, spec.dim, requires_grad=True)
        with Shapes() as mode:
            attn(x, bias_table_offset=offset, extra_tokens=extra).sum().backward()
        biases = [s for s in mode.seen if len(s[1]) == 4 and s[1][-2:] in ((4, 5), (4, 4))]
        fused_calls = [s for s in mode.seen if "triton_attention" in s[0]]
        if backend == "triton":
            ok &= report(name, "no_bias_tensor", not biases, str(biases[:3]))
            ok &= report(name, "fused_op_called", len(fused_calls) >= 2, str({s[0] for s in fused_calls}))
        else:  # the check can fail: the dense path does build the bias
            ok &= report(name, "dense_path_seen", bool(biases), str(biases[:1]))
    return ok


# -- torch.library custom ops and torch.compile --------------------------------------------------


def run_opcheck(name: str) -> bool:
    """``torch.library.opcheck`` (schema, fake tensor, autograd registration, AOT dispatch) of the
    forward op in its three modes and of the backward op."""
    import diffit_plugins.triton_attention  # noqa: F401  (registers the ops)

    g = torch.Generator().manual_seed(3)

    def rnd(*shape, grad=True):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    index = relative_position_index((2, 2)).to(torch.int32)
    fwd, bwd = torch.ops.diffit.triton_attention_fwd, torch.ops.diffit.triton_attention_bwd
    calls = {
        "opcheck_none": (fwd, (rnd(2, 2, 4, 72), rnd(2, 2, 4, 72), rnd(2, 2, 4, 72), None, None, None, 0.2)),
        "opcheck_dense": (fwd, (rnd(2, 2, 4, 24), rnd(2, 2, 5, 24), rnd(2, 2, 5, 24), rnd(1, 2, 4, 5), None, None, 0.2)),
        "opcheck_table": (fwd, (rnd(4, 2, 4, 72), rnd(4, 2, 5, 72), rnd(4, 2, 5, 72), None, rnd(2, 9, 2), index, 0.2)),
    }
    q, k, v, _, table, _, scale = calls["opcheck_table"][1]
    out, lse = fwd(q.detach(), k.detach(), v.detach(), None, table.detach(), index, scale)
    calls["opcheck_bwd"] = (bwd, (rnd(4, 2, 4, 72, grad=False), q.detach(), k.detach(), v.detach(), out, lse, None,
                                  table.detach(), index, scale, True))
    ok = True
    for key, (op, args) in calls.items():
        # test_aot_dispatch_dynamic compiles (~7 s each here): once, on the path the model takes
        utils = None if key == "opcheck_table" else ("test_schema", "test_autograd_registration", "test_faketensor")
        try:
            torch.library.opcheck(op, args, **({"test_utils": utils} if utils else {}))
            ok &= report(name, key, True)
        except Exception as exc:  # the failure is the result: print it on the line
            ok &= report(name, key, False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    return ok


def run_compile(name: str, backend: str) -> bool:
    """Windowed attention with every bias input at once (qkv offset, per-sample table offset, an
    extra key) compiled with ``fullgraph=True`` (a graph break is an error): the output and every
    gradient equal eager's."""
    import torch._dynamo

    from diffit_toolkit.nn.attention import Attention

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(11)
    attn = Attention(2 * 72, 2, grid=4, window=2, rel_pos_bias=True, backend="triton")
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(0, 0.3, generator=g)
    inputs = dict(x=torch.randn(2, 16, 144, generator=g), qkv_offset=torch.randn(2, 1, 432, generator=g),
                  bias_table_offset=torch.randn(2, attn.bias_table_size, 2, generator=g) * 0.3,
                  extra_tokens=torch.randn(2, 1, 144, generator=g))

    def grads(call) -> dict:
        attn.zero_grad()
        leaves = {key: t.clone().requires_grad_(True) for key, t in inputs.items()}
        x = leaves.pop("x")
        out = call(x, **leaves)
        out.square().mean().backward()
        found = {"out": out.detach(), "x": x.grad, **{key: t.grad for key, t in leaves.items()}}
        found.update({n: p.grad for n, p in attn.named_parameters()})
        return found

    graphs: list[set[str]] = []

    def recording(gm, example_inputs):  # the ops of each captured graph, then the real backend
        graphs.append({str(node.target) for node in gm.graph.nodes})
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    want = grads(attn)
    try:
        got = grads(torch.compile(attn, backend=recording, fullgraph=True))
    except Exception as exc:  # a graph break or a failed lowering is the result: print it
        return report(name, "compiled", False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    ok = report(name, "one_graph_with_fused_op",
                len(graphs) == 1 and any("diffit.triton_attention_fwd" in t for t in graphs[0]),
                f"{len(graphs)} graph(s)")
    return compare(name, got, want) and ok


def main(which: str) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 before importing triton", file=sys.stderr)
        return 2
    cases = {
        "global_n16_d64": lambda: run_gathered("global_n16_d64", B=2, H=2, grid=4, d=64),
        "global_n20_d72": lambda: run_gathered("global_n20_d72", B=2, H=2, grid=4, d=72, extra=4),
        "per_sample_windows_d72": lambda: run_gathered("per_sample_windows_d72", B=2, H=2, grid=3, d=72, per_sample=2, windows=2),
        "windows_shared_d128": lambda: run_gathered("windows_shared_d128", B=1, H=1, grid=2, d=128, windows=3),
        "global_split_d48_d96": lambda: (run_gathered("global_d48", B=1, H=2, grid=3, d=48, extra=1)
                                         and run_gathered("global_d96", B=1, H=1, grid=3, d=96, per_sample=1)),
        "dense_broadcast_d72": lambda: run_dense("dense_broadcast_d72", B=2, H=2, N=20, M=20, d=72, bias_shape=(1, 2, 20, 20)),
        "dense_full_no_bias": lambda: (run_dense("dense_full_d64", 2, 1, 17, 23, 64, (2, 1, 17, 23))
                                       and run_dense("no_bias_d64", 1, 2, 16, 16, 64, None)),
        "dense_expanded_d72": lambda: run_dense("dense_expanded_d72", 2, 2, 9, 10, 72, (1, 2, 9, 10), expand=True),
        "block_tmsa": lambda: run_block("block_tmsa", "tmsa", None),
        "block_window_tmsa": lambda: run_block("block_window_tmsa", "window_tmsa", 2),
        "block_relative_bias": lambda: run_block("block_relative_bias", "relative_bias", None),
        "block_relative_bias_windows": lambda: run_block("block_relative_bias_windows", "relative_bias", 2),
        "block_separate_token": lambda: run_block("block_separate_token", "separate_token", None),
        "block_separate_token_windows": lambda: run_block("block_separate_token_windows", "separate_token", 2),
        "block_relative_bias_windows_fp16": lambda: run_block_fp16("block_relative_bias_windows_fp16", "relative_bias", 2),
        "no_dense_bias": lambda: run_no_dense_bias("no_dense_bias"),
        "opcheck": lambda: run_opcheck("opcheck"),
        "compile_aot_eager": lambda: run_compile("compile_aot_eager", "aot_eager"),
        "compile_inductor": lambda: run_compile("compile_inductor", "inductor"),
    }
    slow = {"compile_inductor"}  # a C++ build of the compiled graph: run by name (its own slow test)
    names = [c for c in cases if c not in slow] if which == "all" else which.split(",")
    ok = True
    for case in names:
        start = time.perf_counter()
        ok &= bool(cases[case]())
        print(f"{case} took {time.perf_counter() - start:.1f}s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "all"))
