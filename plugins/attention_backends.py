"""Built-in attention backends: math (reference), sdpa, flex, xformers.

Each declares what it can take (devices, dtypes, bias, head dim); ``auto`` walks the usable
ones by priority at call time. ``math`` is the fp32 reference the others are tested against.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from diffit_toolkit.hookspecs import hookimpl
from diffit_toolkit.nn.attention import MATH_BACKEND, AttentionBackend
from diffit_toolkit.optional import missing


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``; flash/cuDNN without a bias, the
    memory-efficient kernel with one."""
    mask = None if bias is None else bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


SDPA_BACKEND = AttentionBackend(
    name="sdpa",
    fn=attention_sdpa,
    devices=frozenset({"cpu", "cuda", "mps", "xpu"}),
    auto_priority=10,
    description="torch scaled_dot_product_attention (flash/cuDNN without bias, memory-efficient with).",
)


def _flex_unavailable() -> str | None:
    # found, not imported: the import pulls in sympy and takes seconds
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:  # torch < 2.5
        return f"torch {torch.__version__} has no FlexAttention"
    return None


@functools.cache
def _flex_kernel(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=False)

    # Off CUDA the eager (unfused) path is kept: no C++ toolchain or compile time needed. It is a
    # correctness path, so torch's "called without torch.compile" warning is expected here.
    def eager(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(*args, **kwargs)

    return eager


def attention_flex(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """torch FlexAttention with the bias added in a ``score_mod``."""
    kernel = _flex_kernel(q.device.type)
    score_mod = None
    if bias is not None:
        dense = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + dense[b, h, q_idx, kv_idx]

    return kernel(q, k, v, score_mod=score_mod, scale=scale)


FLEX_BACKEND = AttentionBackend(
    name="flex",
    fn=attention_flex,
    availability=_flex_unavailable,
    backward_devices=frozenset({"cuda"}),  # torch has no FlexAttention backward on CPU
    description="torch FlexAttention, bias in a score_mod (compiled on CUDA, eager elsewhere).",
)


@functools.cache
def _xformers_unavailable() -> str | None:
    """xformers counts as available only if its kernel actually runs here (the PyPI wheel is
    built for one torch release and often fails to load its extensions)."""
    if (reason := missing("xformers")) is not None:
        return reason
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    try:
        import xformers.ops as xops

        x = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(x, x, x)
    except Exception as exc:  # ImportError, missing kernels, ABI mismatch, ...
        return f"its kernels do not load: {type(exc).__name__}"
    return None


def attention_xformers(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """xformers ``memory_efficient_attention`` (layout B, N, H, d)."""
    import xformers.ops as xops

    attn_bias = None
    if bias is not None:
        # xformers wants the bias's last dim padded to a multiple of 8 in memory.
        m = k.shape[2]
        padded = (m + 7) // 8 * 8
        storage = q.new_zeros(q.shape[0], q.shape[1], q.shape[2], padded)
        storage[..., :m] = bias.to(q.dtype)
        attn_bias = storage[..., :m]
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=attn_bias, scale=scale
    )
    return out.transpose(1, 2)


XFORMERS_BACKEND = AttentionBackend(
    name="xformers",
    fn=attention_xformers,
    devices=frozenset({"cuda"}),
    availability=_xformers_unavailable,
    auto_priority=5,
    description="xformers memory_efficient_attention (optional extra; CUDA only).",
)


@hookimpl
def diffit_register(registrar):
    registrar.add("attention", "math", MATH_BACKEND)
    registrar.add("attention", "sdpa", SDPA_BACKEND)
    registrar.add("attention", "flex", FLEX_BACKEND)
    registrar.add("attention", "xformers", XFORMERS_BACKEND)
