"""Triton fused attention with a relative position bias gathered inside the kernel.

Computes ``softmax(q k^T * scale + B) v`` FlashAttention-style (online softmax over key tiles,
fp32 accumulation, the ``N x M`` score matrix never stored) where ``B`` is either

* **gathered** (the fast path: the backend's ``gathered_fn``, `gathered_attention_triton`,
  and `relative_bias_attention`): ``B[b, h, i, j] = table[g(b), index[i, j], h]`` read from
  the per-head relative position table ``(T, H)`` (or a per-sample table ``(G, T, H)``,
  ``g(b) = b // windows``) through the Swin index ``(n, n)`` inside the kernel, so no
  ``(B, H, n, n)`` bias tensor exists in memory; keys past the index's columns (extra tokens) get
  bias 0; or
* **dense** (the backend's ``fn``, `attention_triton`): any float bias broadcastable to
  ``(B, H, N, M)``, read through its strides (broadcast dims stride 0).

Head dims that are not a power of two are split into two column blocks instead of being padded:
72 runs as 64 + 16 (80 columns of work, not 128), 96 as 64 + 32 (`head_dim_blocks`).

Backward (FlashAttention-2 recomputation, see ``docs/performance.md``): ``delta = rowsum(dO *
O)`` in torch; one kernel per key tile produces ``dk``/``dv`` looping over query tiles; one kernel
per query tile produces ``dq`` and the bias gradient ``dS``. ``dS`` is *atomically added* into an
fp32 buffer of shape ``(G, H, n, n_cols)`` (G = table groups: 1 for a shared table, so the
reduction over the batch and the windows happens in the atomics) and the table gradient is the
scatter-add of that buffer over the index (``index_add_``, a second, tiny pass). In dense mode
``dS`` is atomically added into a buffer of the bias's own (un-broadcast) shape.

Forward and backward are two ``torch.library`` custom ops (``diffit::triton_attention_fwd`` and
``diffit::triton_attention_bwd``) with fake (meta) implementations and a registered autograd
formula, so ``torch.compile(fullgraph=True)`` treats the attention as one opaque op without graph
breaks.

The kernels run on CUDA and, for tests, on CPU under Triton's interpreter (``TRITON_INTERPRET=1``
set before triton is imported; the backend then declares the CPU as its device).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from diffit_toolkit.hookspecs import hookimpl
from diffit_toolkit.nn.attention import AttentionBackend
from diffit_toolkit.optional import missing

# triton is optional: on machines without it the backend reports itself unavailable
_TRITON_ERROR: str | None = missing("triton")
triton = tl = None
if _TRITON_ERROR is None:
    try:
        import triton
        import triton.language as tl
    except Exception as exc:  # a broken install
        _TRITON_ERROR = f"triton does not import ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"

#: Largest head dim the kernels take.
MAX_HEAD_DIM = 256
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Whether Triton runs kernels on the CPU through its interpreter. Triton reads the variable when
#: it is imported, so it is read once here too (and not at call time, which ``torch.compile``
#: would have to guard on).
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_unavailable() -> str | None:
    """``None`` when the kernels can run in this process, else the reason."""
    if _TRITON_ERROR is not None:
        return _TRITON_ERROR
    if INTERPRETER:
        return None  # CPU tensors through the interpreter (slow; for tests)
    if not torch.cuda.is_available():
        return "needs a CUDA device (CPU runs only under TRITON_INTERPRET=1, for tests)"
    return None


if triton is not None:

    @triton.jit
    def _tile(ptr, base, offs_r, stride_r, mask_r, offs_d, stride_d, D):
        """Rows ``offs_r`` x head-dim columns ``offs_d`` (masked to ``< D``) of one (b, h) slice."""
        return tl.load(ptr + base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d,
                       mask=mask_r[:, None] & (offs_d[None, :] < D), other=0.0)

    @triton.jit
    def _store_tile(ptr, base, offs_r, stride_r, mask_r, offs_d, D, value):
        """Store a (rows, columns) tile of a contiguous-in-d output slice."""
        tl.store(ptr + base + offs_r[:, None] * stride_r + offs_d[None, :], value.to(ptr.dtype.element_ty),
                 mask=mask_r[:, None] & (offs_d[None, :] < D))

    @triton.jit
    def _bias_tile(
        bias_ptr, table_ptr, index_ptr, b, h, offs_m, offs_n, mask_m, mask_n,
        stride_bb, stride_bh, stride_bm, stride_bn,
        stride_tg, stride_tt, stride_th, windows, n_cols,
        BIAS_MODE: tl.constexpr,
    ):
        """The (BLOCK_M, BLOCK_N) fp32 bias tile: 1 dense via strides, 2 gathered."""
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
        stride_bb, stride_bh, stride_bm, stride_bn,
        stride_tg, stride_tt, stride_th,
        H, N, M, D, windows, n_cols, scale,
        BIAS_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Output rows of one query tile (contiguous (B, H, N, D) output) and their log-sum-exp.

        The head dim runs as two column blocks, ``[0, BLOCK_D0)`` and, when ``BLOCK_D1 > 0``,
        ``[BLOCK_D0, BLOCK_D0 + BLOCK_D1)``; every product over d is the sum of the two."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q_base = b * stride_qb + h * stride_qh
        k_base = b * stride_kb + h * stride_kh
        v_base = b * stride_vb + h * stride_vh
        offs_d0 = tl.arange(0, BLOCK_D0)
        q0 = _tile(q_ptr, q_base, offs_m, stride_qn, mask_m, offs_d0, stride_qd, D)
        acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
        if BLOCK_D1 > 0:
            offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
            q1 = _tile(q_ptr, q_base, offs_m, stride_qn, mask_m, offs_d1, stride_qd, D)
            acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(0, M, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < M
            k0 = _tile(k_ptr, k_base, offs_n, stride_kn, mask_n, offs_d0, stride_kd, D)
            s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
            if BLOCK_D1 > 0:
                k1 = _tile(k_ptr, k_base, offs_n, stride_kn, mask_n, offs_d1, stride_kd, D)
                s += tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
            s = s * scale
            if BIAS_MODE != 0:
                s += _bias_tile(bias_ptr, table_ptr, index_ptr, b, h, offs_m, offs_n, mask_m, mask_n,
                                stride_bb, stride_bh, stride_bm, stride_bn, stride_tg, stride_tt, stride_th,
                                windows, n_cols, BIAS_MODE)
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p_v = p.to(v_ptr.dtype.element_ty)
            v0 = _tile(v_ptr, v_base, offs_n, stride_vn, mask_n, offs_d0, stride_vd, D)
            acc0 = acc0 * alpha[:, None] + tl.dot(p_v, v0, input_precision=PRECISION)
            if BLOCK_D1 > 0:
                v1 = _tile(v_ptr, v_base, offs_n, stride_vn, mask_n, offs_d1, stride_vd, D)
                acc1 = acc1 * alpha[:, None] + tl.dot(p_v, v1, input_precision=PRECISION)
            m_i = m_new
        o_base = bh * N * D
        _store_tile(o_ptr, o_base, offs_m, D, mask_m, offs_d0, D, acc0 / l_i[:, None])
        if BLOCK_D1 > 0:
            _store_tile(o_ptr, o_base, offs_m, D, mask_m, offs_d1, D, acc1 / l_i[:, None])
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
        BIAS_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """dk, dv of one key tile (contiguous (B, H, M, D) outputs; dO uses the ``o`` strides)."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < M
        q_base = b * stride_qb + h * stride_qh
        k_base = b * stride_kb + h * stride_kh
        v_base = b * stride_vb + h * stride_vh
        o_base = b * stride_ob + h * stride_oh
        offs_d0 = tl.arange(0, BLOCK_D0)
        k0 = _tile(k_ptr, k_base, offs_n, stride_kn, mask_n, offs_d0, stride_kd, D)
        v0 = _tile(v_ptr, v_base, offs_n, stride_vn, mask_n, offs_d0, stride_vd, D)
        dk0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
        dv0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
        if BLOCK_D1 > 0:
            offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
            k1 = _tile(k_ptr, k_base, offs_n, stride_kn, mask_n, offs_d1, stride_kd, D)
            v1 = _tile(v_ptr, v_base, offs_n, stride_vn, mask_n, offs_d1, stride_vd, D)
            dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
            dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < N
            q0 = _tile(q_ptr, q_base, offs_m, stride_qn, mask_m, offs_d0, stride_qd, D)
            do0 = _tile(do_ptr, o_base, offs_m, stride_on, mask_m, offs_d0, stride_od, D)
            s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
            if BLOCK_D1 > 0:
                q1 = _tile(q_ptr, q_base, offs_m, stride_qn, mask_m, offs_d1, stride_qd, D)
                do1 = _tile(do_ptr, o_base, offs_m, stride_on, mask_m, offs_d1, stride_od, D)
                s += tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
            s = s * scale
            lse = tl.load(lse_ptr + bh * N + offs_m, mask=mask_m, other=0.0)
            delta = tl.load(delta_ptr + bh * N + offs_m, mask=mask_m, other=0.0)
            if BIAS_MODE != 0:
                s += _bias_tile(bias_ptr, table_ptr, index_ptr, b, h, offs_m, offs_n, mask_m, mask_n,
                                stride_bb, stride_bh, stride_bm, stride_bn, stride_tg, stride_tt, stride_th,
                                windows, n_cols, BIAS_MODE)
            p = tl.exp(s - lse[:, None])
            p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
            p_t = tl.trans(p.to(do_ptr.dtype.element_ty))
            dv0 += tl.dot(p_t, do0, input_precision=PRECISION)
            dp = tl.dot(do0, tl.trans(v0), input_precision=PRECISION)
            if BLOCK_D1 > 0:
                dv1 += tl.dot(p_t, do1, input_precision=PRECISION)
                dp += tl.dot(do1, tl.trans(v1), input_precision=PRECISION)
            ds_t = tl.trans((p * (dp - delta[:, None])).to(q_ptr.dtype.element_ty))
            dk0 += tl.dot(ds_t, q0, input_precision=PRECISION)
            if BLOCK_D1 > 0:
                dk1 += tl.dot(ds_t, q1, input_precision=PRECISION)
        out_base = bh * M * D
        _store_tile(dk_ptr, out_base, offs_n, D, mask_n, offs_d0, D, dk0 * scale)
        _store_tile(dv_ptr, out_base, offs_n, D, mask_n, offs_d0, D, dv0)
        if BLOCK_D1 > 0:
            _store_tile(dk_ptr, out_base, offs_n, D, mask_n, offs_d1, D, dk1 * scale)
            _store_tile(dv_ptr, out_base, offs_n, D, mask_n, offs_d1, D, dv1)

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
        BIAS_MODE: tl.constexpr, BIAS_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """dq of one query tile, and dS atomically added into the bias-gradient buffer."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q_base = b * stride_qb + h * stride_qh
        k_base = b * stride_kb + h * stride_kh
        v_base = b * stride_vb + h * stride_vh
        o_base = b * stride_ob + h * stride_oh
        offs_d0 = tl.arange(0, BLOCK_D0)
        q0 = _tile(q_ptr, q_base, offs_m, stride_qn, mask_m, offs_d0, stride_qd, D)
        do0 = _tile(do_ptr, o_base, offs_m, stride_on, mask_m, offs_d0, stride_od, D)
        dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
        if BLOCK_D1 > 0:
            offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
            q1 = _tile(q_ptr, q_base, offs_m, stride_qn, mask_m, offs_d1, stride_qd, D)
            do1 = _tile(do_ptr, o_base, offs_m, stride_on, mask_m, offs_d1, stride_od, D)
            dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
        lse = tl.load(lse_ptr + bh * N + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + bh * N + offs_m, mask=mask_m, other=0.0)
        # Bias-gradient buffer row of this entry: its table group (gathered) or its own strides (dense).
        if BIAS_MODE == 2:
            gb = b // windows
        else:
            gb = b
        for start_n in range(0, M, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < M
            k0 = _tile(k_ptr, k_base, offs_n, stride_kn, mask_n, offs_d0, stride_kd, D)
            v0 = _tile(v_ptr, v_base, offs_n, stride_vn, mask_n, offs_d0, stride_vd, D)
            s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
            dp = tl.dot(do0, tl.trans(v0), input_precision=PRECISION)
            if BLOCK_D1 > 0:
                k1 = _tile(k_ptr, k_base, offs_n, stride_kn, mask_n, offs_d1, stride_kd, D)
                v1 = _tile(v_ptr, v_base, offs_n, stride_vn, mask_n, offs_d1, stride_vd, D)
                s += tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
                dp += tl.dot(do1, tl.trans(v1), input_precision=PRECISION)
            s = s * scale
            if BIAS_MODE != 0:
                s += _bias_tile(bias_ptr, table_ptr, index_ptr, b, h, offs_m, offs_n, mask_m, mask_n,
                                stride_bb, stride_bh, stride_bm, stride_bn, stride_tg, stride_tt, stride_th,
                                windows, n_cols, BIAS_MODE)
            p = tl.exp(s - lse[:, None])
            p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
            ds = p * (dp - delta[:, None])
            ds_k = ds.to(k_ptr.dtype.element_ty)
            dq0 += tl.dot(ds_k, k0, input_precision=PRECISION)
            if BLOCK_D1 > 0:
                dq1 += tl.dot(ds_k, k1, input_precision=PRECISION)
            if BIAS_GRAD:
                if BIAS_MODE == 2:
                    g_mask = mask_m[:, None] & (offs_n[None, :] < n_cols)
                else:
                    g_mask = mask_m[:, None] & mask_n[None, :]
                g_ptrs = dbias_ptr + gb * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn
                tl.atomic_add(g_ptrs, ds, mask=g_mask)
        out_base = bh * N * D
        _store_tile(dq_ptr, out_base, offs_m, D, mask_m, offs_d0, D, dq0 * scale)
        if BLOCK_D1 > 0:
            _store_tile(dq_ptr, out_base, offs_m, D, mask_m, offs_d1, D, dq1 * scale)


# -- launch helpers ------------------------------------------------------------------------------


def head_dim_blocks(head_dim: int) -> tuple[int, int]:
    """The head dim's two column blocks ``(BLOCK_D0, BLOCK_D1)``; ``BLOCK_D1 = 0`` is one block.

    Each block is a power of two >= 16 (what ``tl.dot`` takes). A head dim that is a power of two
    is one block; otherwise the largest power of two below it plus the rest rounded up, when
    that is narrower than padding to the next power of two: 72 -> (64, 16), 96 -> (64, 32),
    48 -> (32, 16), 100 -> (128, 0).
    """
    full = max(16, 1 << (head_dim - 1).bit_length())
    first = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - first
    if rest <= 0:
        return full, 0
    second = max(16, 1 << (rest - 1).bit_length())
    return (first, second) if first + second < full else (full, 0)


#: (num_warps, num_stages) of each kernel on CUDA: at head dim 72 (64 + 16) with 64 x 64 tiles,
#: the configurations that compile for sm_90 without register spills (the dq kernel spills 344
#: bytes with 4 warps); see tests/perf/_triton_sm90_resources.py. Not yet tuned by timing.
CUDA_WARPS_STAGES = {"fwd": (4, 3), "dkdv": (4, 3), "dq": (8, 3)}


def _blocks(head_dim: int, device_type: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1): query/key tile sizes and the head-dim blocks.

    On GPUs 64 x 64 tiles, 64 x 32 above 128 head-dim columns so q/k/v tiles fit in shared
    memory (not yet tuned by timing, see docs/performance.md). The interpreter gets 16 x 16
    tiles, which keep its numpy emulation fast."""
    d0, d1 = head_dim_blocks(head_dim)
    if device_type != "cuda":
        return 16, 16, d0, d1
    return (64, 64, d0, d1) if d0 + d1 <= 128 else (64, 32, d0, d1)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _bias_shape4(bias: Tensor) -> tuple[int, ...]:
    """The bias's shape with leading 1s up to 4 dims (its un-broadcast shape, which its gradient has)."""
    return (1,) * (4 - bias.dim()) + tuple(bias.shape)


def _check_bias(bias: Tensor, B: int, H: int, N: int, M: int) -> None:
    shape = _bias_shape4(bias) if bias.dim() <= 4 else None
    if shape is None or any(s not in (1, t) for s, t in zip(shape, (B, H, N, M))):
        raise ValueError(f"triton attention: bias of shape {tuple(bias.shape)} does not broadcast to ({B}, {H}, {N}, {M})")
    if not bias.dtype.is_floating_point:
        raise ValueError(f"triton attention: the bias must be a float tensor, got {bias.dtype}")


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
    if q.device.type != "cuda" and not INTERPRETER:
        raise ValueError("triton attention runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1 set before importing triton)")


class _Layout:
    """Everything the three kernels need about one call, derived from the op's inputs.

    Mode 0: no bias; 1: dense ``bias``; 2: ``table`` (2-D or 3-D) gathered through ``index``."""

    def __init__(self, q: Tensor, k: Tensor, bias: Tensor | None, table: Tensor | None, index: Tensor | None) -> None:
        self.B, self.H, self.N, self.D = q.shape
        self.M = k.shape[2]
        self.mode = 1 if bias is not None else 2 if table is not None else 0
        self.bias, self.bias_strides = None, (0, 0, 0, 0)
        self.windows, self.n_cols, self.table_strides = 1, 0, (0, 0, 0)
        self.table, self.index = None, index
        self.bias_shape4: tuple[int, ...] = ()
        if self.mode == 1:
            self.bias_shape4 = _bias_shape4(bias)
            self.bias = bias.reshape(self.bias_shape4).expand(self.B, self.H, self.N, self.M)
            self.bias_strides = tuple(self.bias.stride())
        elif self.mode == 2:
            self.table = table if table.dim() == 3 else table[None]  # (G, T, H)
            self.windows = self.B // self.table.shape[0]
            self.n_cols = index.shape[1]
            self.table_strides = tuple(self.table.stride())
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
    out = torch.empty((lay.B, lay.H, lay.N, lay.D), device=q.device, dtype=q.dtype)
    lse = torch.empty(lay.B * lay.H, lay.N, device=q.device, dtype=torch.float32)
    bm, bn, d0, d1 = lay.blocks
    grid = (triton.cdiv(lay.N, bm), lay.B * lay.H)
    bias_ptr, table_ptr, index_ptr = lay.pointers(q)
    _fwd_kernel[grid](
        q, k, v, out, lse, bias_ptr, table_ptr, index_ptr,
        *_strides(q), *_strides(k), *_strides(v), *lay.bias_strides, *lay.table_strides,
        lay.H, lay.N, lay.M, lay.D, lay.windows, lay.n_cols, float(scale),
        BIAS_MODE=lay.mode, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D0=d0, BLOCK_D1=d1, PRECISION=lay.precision,
        **_launch("fwd"),
    )
    return out, lse


def _launch(kernel: str) -> dict[str, int]:
    warps, stages = CUDA_WARPS_STAGES[kernel]
    return dict(num_warps=warps, num_stages=stages)


def _backward(q, k, v, out, lse, do, scale, lay: _Layout, bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """dq, dk, dv and (when ``bias_grad``) the fp32 gradient of the bias (its un-broadcast 4-D
    shape) or of the table (``(G, T, H)``)."""
    do = do.contiguous()
    delta = (do.float() * out.float()).sum(-1).reshape(lay.B * lay.H, lay.N)
    dq = torch.empty((lay.B, lay.H, lay.N, lay.D), device=q.device, dtype=q.dtype)
    dk = torch.empty((lay.B, lay.H, lay.M, lay.D), device=q.device, dtype=k.dtype)
    dv = torch.empty((lay.B, lay.H, lay.M, lay.D), device=q.device, dtype=v.dtype)
    bm, bn, d0, d1 = lay.blocks
    bias_ptr, table_ptr, index_ptr = lay.pointers(q)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), *lay.bias_strides, *lay.table_strides)
    sizes = (lay.H, lay.N, lay.M, lay.D, lay.windows, lay.n_cols, float(scale))
    blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D0=d0, BLOCK_D1=d1, PRECISION=lay.precision)
    _bwd_dkdv_kernel[(triton.cdiv(lay.M, bn), lay.B * lay.H)](
        q, k, v, do, dk, dv, lse, delta, bias_ptr, table_ptr, index_ptr, *common, *sizes,
        BIAS_MODE=lay.mode, **blocks, **_launch("dkdv"),
    )
    buffer = None
    g_strides = (0, 0, 0, 0)
    if bias_grad and lay.mode == 1:
        # Buffer of the bias's own shape (fp32); the dims the kernel broadcasts get stride 0, so
        # every entry that shares a bias element atomically adds into the same place. (A bias the
        # caller expanded keeps its full shape here: autograd sums over its expansion.)
        buffer = torch.zeros(lay.bias_shape4, device=q.device, dtype=torch.float32)
        g_strides = tuple(st if sz > 1 else 0 for st, sz in zip(buffer.stride(), lay.bias_shape4))
    elif bias_grad and lay.mode == 2:
        # dS summed over the batch entries of one table group (all of them for a shared table).
        buffer = torch.zeros(lay.table.shape[0], lay.H, lay.N, lay.n_cols, device=q.device, dtype=torch.float32)
        g_strides = tuple(buffer.stride())
    _bwd_dq_kernel[(triton.cdiv(lay.N, bm), lay.B * lay.H)](
        q, k, v, do, dq, lse, delta, bias_ptr, table_ptr, index_ptr, buffer if buffer is not None else delta,
        *common, *g_strides, *sizes,
        BIAS_MODE=lay.mode, BIAS_GRAD=bool(bias_grad), **blocks, **_launch("dq"),
    )
    if buffer is None:
        return dq, dk, dv, None
    if lay.mode == 1:
        return dq, dk, dv, buffer
    # Second pass: scatter-add of the (G, H, n, n_cols) dS sums over the index -> (G, T, H).
    G, T = lay.table.shape[0], lay.table.shape[1]
    flat = buffer.permute(0, 2, 3, 1).reshape(G, -1, lay.H)  # (G, n*n_cols, H)
    dtable = torch.zeros(G, T, lay.H, device=q.device, dtype=torch.float32)
    dtable.index_add_(1, lay.index.reshape(-1).long(), flat)
    return dq, dk, dv, dtable


# -- torch.library custom ops --------------------------------------------------------------------
# One forward and one backward op cover the three modes (no bias, dense bias, gathered table).
# torch.compile sees them as opaque ops with known output shapes (the fake implementations), so a
# compiled model calls the Triton kernels without a graph break.


@torch.library.custom_op("diffit::triton_attention_fwd", mutates_args=())
def _attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, table: Tensor | None, index: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """(out (B, H, N, d) contiguous, row log-sum-exp (B*H, N) fp32)."""
    return _forward(q, k, v, scale, _Layout(q, k, bias, table, index))


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, bias, table, index, scale):
    B, H, N, D = q.shape
    return q.new_empty((B, H, N, D)), q.new_empty((B * H, N), dtype=torch.float32)


@torch.library.custom_op("diffit::triton_attention_bwd", mutates_args=())
def _attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    bias: Tensor | None, table: Tensor | None, index: Tensor | None, scale: float, side_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d_side): d_side the fp32 gradient of the bias (its un-broadcast 4-D shape) or
    of the table (``(G, T, H)``) when ``side_grad``, else an empty tensor."""
    dq, dk, dv, dside = _backward(q, k, v, out, lse, do, scale, _Layout(q, k, bias, table, index), side_grad)
    return dq, dk, dv, dside if dside is not None else q.new_empty((0,), dtype=torch.float32)


@_attention_bwd.register_fake
def _attention_bwd_fake(do, q, k, v, out, lse, bias, table, index, scale, side_grad):
    if not side_grad:
        side = (0,)
    elif bias is not None:
        side = _bias_shape4(bias)
    else:
        side = tuple(table.shape) if table.dim() == 3 else (1, *table.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), q.new_empty(side, dtype=torch.float32)


def _attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, bias, table, index, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, table, index)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, d_out, d_lse):
    q, k, v, out, lse, bias, table, index = ctx.saved_tensors
    want_bias = bias is not None and ctx.needs_input_grad[3]
    want_table = table is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dside = torch.ops.diffit.triton_attention_bwd(
        d_out, q, k, v, out, lse, bias, table, index, ctx.scale, want_bias or want_table
    )
    dbias = dside.reshape(bias.shape).to(bias.dtype) if want_bias else None
    dtable = dside.reshape(table.shape).to(table.dtype) if want_table else None
    return dq, dk, dv, dbias, dtable, None, None


torch.library.register_autograd(
    "diffit::triton_attention_fwd", _attention_backward, setup_context=_attention_setup_context
)


# -- public API ----------------------------------------------------------------------------------


def attention_triton(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """The ``triton`` backend's dense-bias interface (`AttentionFn`).

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
    if bias is not None:
        _check_bias(bias, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    _check_device(q)
    out, _ = torch.ops.diffit.triton_attention_fwd(q, k, v, bias, None, None, float(scale))
    return out


def relative_bias_attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor, index: Tensor, scale: float) -> Tensor:
    """Fused attention with the relative position bias gathered inside the kernel.

    ``out = softmax(q k^T * scale + B) v`` with ``B[b, h, i, j] = table[g, index[i, j], h]``
    (``g = b // windows``) for ``j < index.shape[1]`` and 0 for later keys (extra tokens).
    Windows are just batch entries: ``q`` (B_samples * windows, H, n, d) in the order of
    [`Attention`][diffit_toolkit.nn.attention.Attention] (``(b nh nw)``, windows inner).

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
    out, _ = torch.ops.diffit.triton_attention_fwd(
        q, k, v, None, table, index.to(torch.int32).contiguous(), float(scale)
    )
    return out


def gathered_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, table: Tensor, index: Tensor, table_offset: Tensor | None, scale: float
) -> Tensor:
    """The ``triton`` backend's ``gathered_fn``
    (`GatheredAttentionFn`): the per-sample offset is added to
    the table (``(B, T, H)``, tiny next to a bias) and the sum gathered inside the kernel."""
    if table_offset is not None:
        if table_offset.dim() != 3 or tuple(table_offset.shape[1:]) != tuple(table.shape):
            raise ValueError(
                f"triton attention: table offset must be (B, {table.shape[0]}, {table.shape[1]}), "
                f"got {tuple(table_offset.shape)}"
            )
        table = table + table_offset  # (B, T, H): batch entry b reads sample b // windows
    return relative_bias_attention(q, k, v, table, index, scale)


TRITON_BACKEND = AttentionBackend(
    name="triton",
    fn=attention_triton,
    gathered_fn=gathered_attention_triton,
    devices=frozenset({"cpu"}) if INTERPRETER else frozenset({"cuda"}),
    # Triton's interpreter computes tl.dot of bf16 operands wrongly: bf16 only on a GPU.
    dtypes=frozenset({torch.float32, torch.float16}) if INTERPRETER else frozenset(_DTYPES),
    supports_bias=True,
    auto_priority=None,
    availability=_triton_unavailable,
    max_head_dim=MAX_HEAD_DIM,
    description=(
        "Triton fused attention, relative bias gathered in the kernel (CUDA; opt-in by name: "
        "not yet measured on a GPU, so not in auto)."
    ),
)


@hookimpl
def diffit_register(registrar):
    registrar.add("attention", "triton", TRITON_BACKEND)
