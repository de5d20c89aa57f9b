"""Triton fused attention with a relative position bias gathered inside the kernel.

Computes ``softmax(q k^T * scale + B) v`` FlashAttention-style (online softmax over key tiles,
fp32 accumulation, the ``N x M`` score matrix never stored) where ``B`` is either

* **gathered** (the fast path, :func:`relative_bias_attention`): ``B[b, h, i, j] =
  table[g(b), index[i, j], h]`` read from the per-head relative position table ``(T, H)`` (or a
  per-sample table ``(G, T, H)``, ``g(b) = b // windows``) through the Swin index ``(n, n)``
  inside the kernel, so no ``(B, H, n, n)`` bias tensor exists in memory; keys past the index's
  columns (extra tokens) get bias 0; or
* **dense** (the registered ``triton`` attention backend, :func:`attention_triton`): any float
  bias broadcastable to ``(B, H, N, M)``, read through its strides (broadcast dims stride 0).

Backward (FlashAttention-2 recomputation, see ``docs/performance.md``): ``delta = rowsum(dO *
O)`` in torch; one kernel per key tile produces ``dk``/``dv`` looping over query tiles; one kernel
per query tile produces ``dq`` and the bias gradient ``dS``. ``dS`` is *atomically added* into an
fp32 buffer of shape ``(G, H, n, n_cols)`` (G = table groups: 1 for a shared table, so the
reduction over the batch and the windows happens in the atomics) and the table gradient is the
scatter-add of that buffer over the index (``index_add_``, a second, tiny pass). In dense mode
``dS`` is atomically added into a buffer of the bias's own (un-broadcast) shape.

The kernels run on CUDA and, for tests, on CPU under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported). The backend has never run on a real GPU
in this repository's history, hence ``auto_priority=None``: it is opt-in by name.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from diffit_toolkit.hookspecs import hookimpl
from diffit_toolkit.nn.attention import AttentionBackend

try:  # triton is optional: on machines without it the backend reports itself unavailable
    import triton
    import triton.language as tl

    _TRITON_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install
    triton = None
    tl = None
    _TRITON_ERROR = f"triton does not import ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"

#: Head dims the kernels are tested at; any ``d <= MAX_HEAD_DIM`` works (padded to a power of 2).
MAX_HEAD_DIM = 256
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_mode() -> bool:
    """Whether Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_unavailable() -> str | None:
    """``None`` when the kernels can run on a CUDA device in this process, else the reason."""
    if _TRITON_ERROR is not None:
        return _TRITON_ERROR
    if not torch.cuda.is_available():
        return "needs a CUDA device (CPU runs only under TRITON_INTERPRET=1, for tests)"
    return None


if triton is not None:

    @triton.jit
    def _bias_tile(
        bias_ptr, table_ptr, index_ptr, b, h, offs_m, offs_n, mask_m, mask_n,
        stride_bb, stride_bh, stride_bm, stride_bn,
        stride_tg, stride_tt, stride_th, windows, n_cols,
        BIAS_MODE: tl.constexpr,
    ):
        """The (BLOCK_M, BLOCK_N) fp32 bias tile: 0 none, 1 dense via strides, 2 gathered."""
        if BIAS_MODE == 1:
            ptrs = bias_ptr + b * stride_bb + h * stride_bh + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn
            tile = tl.load(ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        else:
            cols = mask_m[:, None] & (offs_n[None, :] < n_cols)
            idx = tl.load(index_ptr + offs_m[:, None] * n_cols + offs_n[None, :], mask=cols, other=0)
            g = b // windows
            ptrs = table_ptr + g * stride_tg + idx * stride_tt + h * stride_th
            tile = tl.load(ptrs, mask=cols, other=0.0).to(tl.float32)
        return tile

    @triton.jit
    def _fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
        bias_ptr, table_ptr, index_ptr,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_bb, stride_bh, stride_bm, stride_bn,
        stride_tg, stride_tt, stride_th,
        H, N, M, D, windows, n_cols, scale,
        BIAS_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < N
        mask_d = offs_d < D
        q = tl.load(
            q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
            mask=mask_m[:, None] & mask_d[None, :], other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, M, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < M
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(
                k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0,
            )
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            if BIAS_MODE != 0:
                s += _bias_tile(bias_ptr, table_ptr, index_ptr, b, h, offs_m, offs_n, mask_m, mask_n,
                                stride_bb, stride_bh, stride_bm, stride_bn, stride_tg, stride_tt, stride_th,
                                windows, n_cols, BIAS_MODE)
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(
                v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(
            o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
            acc.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :],
        )
        tl.store(lse_ptr + bh * N + offs_m, m_i + tl.log(l_i), mask=mask_m)

    @triton.jit
    def _bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr,
        bias_ptr, table_ptr, index_ptr,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_bb, stride_bh, stride_bm, stride_bn,
        stride_tg, stride_tt, stride_th,
        H, N, M, D, windows, n_cols, scale,
        BIAS_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """dk, dv of one key tile (contiguous (B, H, M, D) outputs; dO uses the ``o`` strides)."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < M
        mask_d = offs_d < D
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < N
            q_mask = mask_m[:, None] & mask_d[None, :]
            q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                        mask=q_mask, other=0.0)
            do = tl.load(do_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                         mask=q_mask, other=0.0)
            lse = tl.load(lse_ptr + bh * N + offs_m, mask=mask_m, other=0.0)
            delta = tl.load(delta_ptr + bh * N + offs_m, mask=mask_m, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            if BIAS_MODE != 0:
                s += _bias_tile(bias_ptr, table_ptr, index_ptr, b, h, offs_m, offs_n, mask_m, mask_n,
                                stride_bb, stride_bh, stride_bm, stride_bn, stride_tg, stride_tt, stride_th,
                                windows, n_cols, BIAS_MODE)
            p = tl.exp(s - lse[:, None])
            p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        out = bh * M * D + offs_n[:, None] * D + offs_d[None, :]
        tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr,
        bias_ptr, table_ptr, index_ptr, dbias_ptr,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_bb, stride_bh, stride_bm, stride_bn,
        stride_tg, stride_tt, stride_th,
        stride_gb, stride_gh, stride_gm, stride_gn,
        H, N, M, D, windows, n_cols, scale,
        BIAS_MODE: tl.constexpr, BIAS_GRAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """dq of one query tile, and dS atomically added into the bias-gradient buffer."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < N
        mask_d = offs_d < D
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=q_mask, other=0.0)
        do = tl.load(do_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                     mask=q_mask, other=0.0)
        lse = tl.load(lse_ptr + bh * N + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + bh * N + offs_m, mask=mask_m, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # Bias-gradient buffer row of this entry: its table group (gathered) or its own strides (dense).
        if BIAS_MODE == 2:
            gb = b // windows
        else:
            gb = b
        for start_n in range(0, M, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < M
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            if BIAS_MODE != 0:
                s += _bias_tile(bias_ptr, table_ptr, index_ptr, b, h, offs_m, offs_n, mask_m, mask_n,
                                stride_bb, stride_bh, stride_bm, stride_bn, stride_tg, stride_tt, stride_th,
                                windows, n_cols, BIAS_MODE)
            p = tl.exp(s - lse[:, None])
            p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            if BIAS_GRAD:
                if BIAS_MODE == 2:
                    g_mask = mask_m[:, None] & (offs_n[None, :] < n_cols)
                else:
                    g_mask = mask_m[:, None] & mask_n[None, :]
                g_ptrs = dbias_ptr + gb * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn
                tl.atomic_add(g_ptrs, ds, mask=g_mask)
        tl.store(dq_ptr + bh * N * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
                 mask=q_mask)


# -- launch helpers ------------------------------------------------------------------------------


def _blocks(head_dim: int, device_type: str) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): head dim padded to a power of two (>= 16), smaller key tiles
    for wide heads so q/k/v tiles fit in shared memory (untuned: see docs/performance.md)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device_type != "cuda":  # interpreter: small tiles keep the numpy emulation fast
        return 16, 16, block_d
    return (64, 64, block_d) if block_d <= 128 else (64, 32, block_d)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _bias_args(bias: Tensor | None, B: int, H: int, N: int, M: int) -> tuple[Tensor | None, tuple[int, ...]]:
    """The dense bias and its (b, h, n, m) strides, 0 on broadcast dims."""
    if bias is None:
        return None, (0, 0, 0, 0)
    if bias.dim() > 4:
        raise ValueError(f"triton attention: bias must broadcast to (B, H, N, M), got shape {tuple(bias.shape)}")
    b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    try:
        expanded = b4.expand(B, H, N, M)
    except RuntimeError:
        raise ValueError(
            f"triton attention: bias of shape {tuple(bias.shape)} does not broadcast to ({B}, {H}, {N}, {M})"
        ) from None
    return expanded, tuple(expanded.stride())


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"triton attention: q, k, v must be (B, H, N, d), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"triton attention: q {tuple(q.shape)} and k/v {tuple(k.shape)}/{tuple(v.shape)} do not match")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"triton attention: q, k, v must share one of float32/float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"triton attention: head dim {q.shape[3]} > {MAX_HEAD_DIM} is not supported")


def _check_device(q: Tensor) -> None:
    if triton is None:
        raise RuntimeError(f"triton attention: {_TRITON_ERROR}")
    if q.device.type != "cuda" and not interpreter_mode():
        raise ValueError("triton attention runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1 set before importing triton)")


class _Layout:
    """Everything the three kernels need about one call, computed once in forward."""

    def __init__(self, q: Tensor, k: Tensor, mode: int, bias: Tensor | None, table: Tensor | None,
                 index: Tensor | None) -> None:
        self.B, self.H, self.N, self.D = q.shape
        self.M = k.shape[2]
        self.mode = mode
        self.bias, self.bias_strides = _bias_args(bias, self.B, self.H, self.N, self.M) if mode == 1 else (None, (0, 0, 0, 0))
        self.windows, self.n_cols, self.table_strides = 1, 0, (0, 0, 0)
        self.table, self.index = table, index
        if mode == 2:
            t3 = table if table.dim() == 3 else table[None]
            self.table = t3
            self.windows = self.B // t3.shape[0]
            self.n_cols = index.shape[1]
            self.table_strides = tuple(t3.stride())
        self.blocks = _blocks(self.D, q.device.type)
        self.precision = _precision(q.dtype)

    def pointers(self, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dummy = q  # never read when the mode does not use it
        return (self.bias if self.bias is not None else dummy,
                self.table if self.table is not None else dummy,
                self.index if self.index is not None else dummy)


def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _forward(q: Tensor, k: Tensor, v: Tensor, scale: float, lay: _Layout) -> tuple[Tensor, Tensor]:
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(lay.B * lay.H, lay.N, device=q.device, dtype=torch.float32)
    bm, bn, bd = lay.blocks
    grid = (triton.cdiv(lay.N, bm), lay.B * lay.H)
    bias_ptr, table_ptr, index_ptr = lay.pointers(q)
    _fwd_kernel[grid](
        q, k, v, out, lse, bias_ptr, table_ptr, index_ptr,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *lay.bias_strides, *lay.table_strides,
        lay.H, lay.N, lay.M, lay.D, lay.windows, lay.n_cols, float(scale),
        BIAS_MODE=lay.mode, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=lay.precision,
    )
    return out, lse


def _backward(q, k, v, out, lse, do, scale, lay: _Layout, bias_grad: bool):
    do = do.contiguous()
    delta = (do.float() * out.float()).sum(-1).reshape(lay.B * lay.H, lay.N)
    dq = torch.empty((lay.B, lay.H, lay.N, lay.D), device=q.device, dtype=q.dtype)
    dk = torch.empty((lay.B, lay.H, lay.M, lay.D), device=q.device, dtype=k.dtype)
    dv = torch.empty_like(dk, dtype=v.dtype)
    bm, bn, bd = lay.blocks
    bias_ptr, table_ptr, index_ptr = lay.pointers(q)
    common = (
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *lay.bias_strides, *lay.table_strides,
    )
    sizes = (lay.H, lay.N, lay.M, lay.D, lay.windows, lay.n_cols, float(scale))
    _bwd_dkdv_kernel[(triton.cdiv(lay.M, bn), lay.B * lay.H)](
        q, k, v, do, dk, dv, lse, delta, bias_ptr, table_ptr, index_ptr, *common, *sizes,
        BIAS_MODE=lay.mode, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=lay.precision,
    )
    dbias = None
    g_strides = (0, 0, 0, 0)
    if bias_grad and lay.mode == 1:
        # Buffer of the bias's un-broadcast shape (fp32); broadcast dims get stride 0 so every
        # entry that shares a bias element atomically adds into the same place.
        shape = [s if st != 0 else 1 for s, st in zip((lay.B, lay.H, lay.N, lay.M), lay.bias_strides)]
        dbias = torch.zeros(shape, device=q.device, dtype=torch.float32)
        g_strides = tuple(st if sz > 1 else 0 for st, sz in zip(dbias.stride(), shape))
    elif bias_grad and lay.mode == 2:
        # dS summed over the batch entries of one table group (all of them for a shared table).
        dbias = torch.zeros(lay.table.shape[0], lay.H, lay.N, lay.n_cols, device=q.device, dtype=torch.float32)
        g_strides = tuple(dbias.stride())
    _bwd_dq_kernel[(triton.cdiv(lay.N, bm), lay.B * lay.H)](
        q, k, v, do, dq, lse, delta, bias_ptr, table_ptr, index_ptr, dbias if dbias is not None else delta,
        *common, *g_strides, *sizes,
        BIAS_MODE=lay.mode, BIAS_GRAD=bool(bias_grad), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=lay.precision,
    )
    return dq, dk, dv, dbias


class _DenseBiasAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        lay = _Layout(q, k, 1 if bias is not None else 0, bias, None, None)
        out, lse = _forward(q, k, v, scale, lay)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.lay, ctx.scale = lay, scale
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        bias_grad = ctx.bias_shape is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = _backward(q, k, v, out, lse, do, ctx.scale, ctx.lay, bias_grad)
        if dbias is not None:
            dbias = dbias.reshape(ctx.bias_shape) if dbias.numel() == torch.Size(ctx.bias_shape).numel() else dbias.sum_to_size(ctx.bias_shape)
            dbias = dbias.to(ctx.bias_dtype)
        return dq, dk, dv, dbias, None


class _GatheredBiasAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, index, scale):
        lay = _Layout(q, k, 2, None, table, index)
        out, lse = _forward(q, k, v, scale, lay)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.lay, ctx.scale, ctx.table_shape = lay, scale, table.shape
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        lay = ctx.lay
        dq, dk, dv, dsum = _backward(q, k, v, out, lse, do, ctx.scale, lay, ctx.needs_input_grad[3])
        dtable = None
        if dsum is not None:
            # Second pass: scatter-add of the (G, H, n, n_cols) dS sums over the index -> (G, T, H).
            G, T = lay.table.shape[0], lay.table.shape[1]
            flat = dsum.permute(0, 2, 3, 1).reshape(G, -1, lay.H)  # (G, n*n_cols, H)
            dtable = torch.zeros(G, T, lay.H, device=dsum.device, dtype=torch.float32)
            dtable.index_add_(1, lay.index.reshape(-1).long(), flat)
            dtable = dtable.reshape(ctx.table_shape).to(lay.table.dtype)
        return dq, dk, dv, dtable, None, None


# -- public API ----------------------------------------------------------------------------------


def attention_triton(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """The ``triton`` backend (dense-bias interface of :data:`~diffit_toolkit.nn.attention.AttentionFn`).

    Args:
        q: (B, H, N, d) queries.
        k: (B, H, M, d) keys.
        v: (B, H, M, d) values.
        bias: float bias broadcastable to (B, H, N, M), or ``None``; differentiable.
        scale: logit scale.

    Returns:
        (B, H, N, d) in q's dtype.
    """
    _check_qkv(q, k, v)
    _check_device(q)
    return _DenseBiasAttention.apply(q, k, v, bias, float(scale))


def relative_bias_attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor, index: Tensor, scale: float) -> Tensor:
    """Fused attention with the relative position bias gathered inside the kernel.

    ``out = softmax(q k^T * scale + B) v`` with ``B[b, h, i, j] = table[g, index[i, j], h]``
    (``g = b // windows``) for ``j < index.shape[1]`` and 0 for later keys (extra tokens).
    Windows are just batch entries: ``q`` (B_samples * windows, H, n, d) in the order of
    :class:`~diffit_toolkit.nn.attention.Attention` (``(b nh nw)``, windows inner).

    Args:
        q: (B, H, n, d) queries (fp32, fp16 or bf16).
        k: (B, H, M, d) keys, ``M >= index.shape[1]``.
        v: (B, H, M, d) values.
        table: (T, H) relative position bias table shared by the batch, or (G, T, H) one per
            sample (e.g. table + a time-dependent offset), ``G`` dividing ``B``; differentiable.
        index: (n, n_cols) integer indices into the table's ``T`` rows (Swin's
            ``relative_position_index``).
        scale: logit scale.

    Returns:
        (B, H, n, d) in q's dtype; gradients flow to q, k, v and the table.
    """
    _check_qkv(q, k, v)
    B, H, N, _ = q.shape
    if table.dim() not in (2, 3) or table.shape[-1] != H:
        raise ValueError(f"relative_bias_attention: table must be (T, {H}) or (G, T, {H}), got {tuple(table.shape)}")
    if table.dim() == 3 and (table.shape[0] == 0 or B % table.shape[0]):
        raise ValueError(f"relative_bias_attention: {table.shape[0]} per-sample tables do not divide the batch of {B}")
    if index.dim() != 2 or index.shape[0] != N or index.shape[1] > k.shape[2]:
        raise ValueError(
            f"relative_bias_attention: index must be ({N}, n_cols <= {k.shape[2]}), got {tuple(index.shape)}"
        )
    if index.dtype.is_floating_point or index.device != q.device or table.device != q.device:
        raise ValueError("relative_bias_attention: index must be an integer tensor, and table and index on q's device")
    _check_device(q)
    return _GatheredBiasAttention.apply(q, k, v, table, index.to(torch.int32).contiguous(), float(scale))


# Forward-compatible hook for the fused-gather route through ``Attention`` (docs/performance.md):
# once ``AttentionBackend`` has a ``gathered_fn`` field, the module can hand this backend the
# table and index instead of a dense bias. Until then the backend takes the dense bias only.
_GATHERED = (
    {"gathered_fn": relative_bias_attention}
    if "gathered_fn" in getattr(AttentionBackend, "__dataclass_fields__", {})
    else {}
)

TRITON_BACKEND = AttentionBackend(
    **_GATHERED,
    name="triton",
    fn=attention_triton,
    devices=frozenset({"cuda"}),
    dtypes=frozenset(_DTYPES),
    supports_bias=True,
    auto_priority=None,
    availability=_triton_unavailable,
    max_head_dim=MAX_HEAD_DIM,
    description=(
        "Triton fused attention with dense or in-kernel gathered bias (CUDA; opt-in by name: "
        "not yet validated on a GPU, so not in auto)."
    ),
)


@hookimpl
def diffit_register(registrar):
    registrar.add("attention", "triton", TRITON_BACKEND)
