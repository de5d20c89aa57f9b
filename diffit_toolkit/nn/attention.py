"""Multi-head self-attention with optional Swin-style relative position bias and windows.

The module ([`Attention`][diffit_toolkit.nn.attention.Attention]) owns the weights; the kernel that computes
``softmax(q k^T * scale + bias) v`` is an
[`AttentionBackend`][diffit_toolkit.nn.attention.AttentionBackend] chosen by name from the
registry (``math``, ``sdpa``, ``flex``, ``xformers``, ``triton``, ``auto``). ``math`` below is
the fp32 reference every other backend is tested against.

A backend takes the bias in one of two forms. Every backend takes it **dense** (``fn``): a float
tensor broadcastable to ``(B, H, N, M)``, which [`Attention`][diffit_toolkit.nn.attention.Attention]
builds from its relative
position table. A backend that can look the bias up itself also declares ``gathered_fn``: it gets
the table, Swin's index and the per-sample table offset instead, so no ``(B, H, N, N)`` bias is
ever built (`GatheredAttentionFn`, reference
[`attention_gathered_math`][diffit_toolkit.nn.attention.attention_gathered_math]).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffit_toolkit.registry import attention_backends

#: ``fn(q, k, v, bias, scale) -> out`` with q (B, H, N, d), k/v (B, H, M, d), bias broadcastable
#: to (B, H, N, M) or None (float32; the backend casts it as it needs); the output has q's dtype.
AttentionFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None", float], Tensor]

#: ``gathered_fn(q, k, v, table, index, table_offset, scale) -> out``: attention with the relative
#: position bias ``bias[b, h, i, j] = (table + table_offset[b // windows])[index[i, j], h]`` looked
#: up by the backend. q (B', H, n, d) with ``B' = B * windows`` (windows inner, the order
#: [`Attention`][diffit_toolkit.nn.attention.Attention] produces); k/v (B', H, M, d) with ``M >= n``, keys ``j >= n`` (extra tokens)
#: get bias 0; table (T, H); index (n, n) integer, values in ``[0, T)``; table_offset (B, T, H) or
#: None. Gradients flow to q, k, v, table and table_offset; the output has q's dtype.
GatheredAttentionFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, "Tensor | None", float], Tensor]


def attention_math(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """Reference attention in fp32 (fp64 for fp64 inputs): ``softmax(q k^T * scale + bias) v``
    (DiffiT eq. 6)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    logits = torch.einsum("bhnd,bhmd->bhnm", q.to(compute), k.to(compute)) * scale  # (B, H, N, M)
    if bias is not None:
        logits = logits + bias.to(compute)
    out = torch.einsum("bhnm,bhmd->bhnd", logits.softmax(dim=-1), v.to(compute))
    return out.to(q.dtype)


def gather_relative_bias(
    table: Tensor, index: Tensor, table_offset: Tensor | None = None, windows: int = 1, num_keys: int | None = None
) -> Tensor:
    """The dense bias of a relative position table: ``(1 or B * windows, H, n, num_keys)``.

    ``bias[b, h, i, j] = (table + table_offset[b // windows])[index[i, j], h]`` for ``j < n`` and
    0 for the ``num_keys - n`` extra keys (default ``num_keys = n``). Shapes as in
    `GatheredAttentionFn`; the result is batch-broadcast (leading 1) without an offset.
    """
    full = table[None] if table_offset is None else table + table_offset  # (1|B, T, H)
    n = index.shape[0]
    bias = full[:, index.reshape(-1)]  # (1|B, n*n, H)
    bias = bias.reshape(bias.shape[0], n, n, table.shape[-1]).permute(0, 3, 1, 2)  # (1|B, H, n, n)
    if windows > 1 and bias.shape[0] > 1:
        bias = bias.repeat_interleave(windows, dim=0)  # (B*windows, H, n, n), windows inner
    if num_keys is not None and num_keys > n:
        bias = F.pad(bias, (0, num_keys - n))  # extra keys carry no position: zero bias
    return bias


def attention_gathered_math(
    q: Tensor, k: Tensor, v: Tensor, table: Tensor, index: Tensor, table_offset: Tensor | None, scale: float
) -> Tensor:
    """Reference of the `GatheredAttentionFn` contract: the dense gathered bias through
    [`attention_math`][diffit_toolkit.nn.attention.attention_math] (what a gathering backend must
    equal, without building the bias)."""
    windows = q.shape[0] // table_offset.shape[0] if table_offset is not None else 1
    return attention_math(q, k, v, gather_relative_bias(table, index, table_offset, windows, k.shape[2]), scale)


@dataclass(frozen=True)
class AttentionBackend:
    """A registered attention kernel and the calls it can take.

    Args:
        name: registry name.
        fn: the kernel, see `AttentionFn`.
        devices: device types it runs on (``"cpu"``, ``"cuda"``, ...).
        dtypes: input dtypes it accepts.
        supports_bias: whether it takes an additive float bias.
        auto_priority: rank for the ``auto`` choice (higher first); ``None`` keeps it out of auto.
        availability: returns ``None`` when usable in this process, else the reason it is not.
        max_head_dim: largest head dim it accepts (``None``: no limit).
        backward_devices: device types where it can also be differentiated (``None``: all of
            ``devices``).
        description: one line for listings.
        gathered_fn: optional kernel that looks the relative position bias up itself (see
            `GatheredAttentionFn`); [`Attention`][diffit_toolkit.nn.attention.Attention] then never
            builds a dense bias for
            this backend. ``None``: the backend gets the dense bias through ``fn``.
    """

    name: str
    fn: AttentionFn
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    dtypes: frozenset[torch.dtype] = frozenset({torch.float32, torch.float16, torch.bfloat16})
    supports_bias: bool = True
    auto_priority: int | None = None
    availability: Callable[[], str | None] = field(default=lambda: None)
    max_head_dim: int | None = None
    backward_devices: frozenset[str] | None = None
    description: str = ""
    gathered_fn: GatheredAttentionFn | None = None

    def supports(
        self, device_type: str, dtype: torch.dtype, has_bias: bool, head_dim: int, needs_grad: bool = False
    ) -> bool:
        """Whether a call with these properties can go to this backend."""
        return (
            device_type in self.devices
            and dtype in self.dtypes
            and (self.supports_bias or not has_bias)
            and (self.max_head_dim is None or head_dim <= self.max_head_dim)
            and (not needs_grad or self.backward_devices is None or device_type in self.backward_devices)
        )

    def unavailable_reason(self) -> str | None:
        return self.availability()


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@dataclass(frozen=True)
class BackendChoice:
    """The backend resolved when an [`Attention`][diffit_toolkit.nn.attention.Attention] module is built.

    ``fixed`` is the requested backend when it is usable in this process; otherwise the call-time
    choice walks ``auto_candidates`` (sorted by priority) and takes the first that supports the
    call. Both are plain data, so ``torch.compile`` specialises on them without graph breaks.
    """

    requested: str
    fixed: AttentionBackend | None
    auto_candidates: tuple[AttentionBackend, ...]

    def pick(
        self, device_type: str, dtype: torch.dtype, has_bias: bool, head_dim: int, needs_grad: bool = False
    ) -> AttentionBackend:
        call = (device_type, dtype, has_bias, head_dim, needs_grad)
        if self.fixed is not None and self.fixed.supports(*call):
            return self.fixed
        for backend in self.auto_candidates:
            if backend.supports(*call):
                if self.fixed is not None:
                    _warn_once(
                        f"attention backend '{self.requested}' cannot take this call "
                        f"({device_type}, {dtype}, bias={has_bias}, head_dim={head_dim}, "
                        f"backward={needs_grad}); using '{backend.name}'"
                    )
                return backend
        return MATH_BACKEND


#: The reference backend: any device, any float dtype; the last resort of ``auto``.
MATH_BACKEND = AttentionBackend(
    name="math",
    fn=attention_math,
    devices=frozenset({"cpu", "cuda", "mps", "xpu"}),
    dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64}),
    auto_priority=0,
    description="Reference: explicit softmax in fp32 (every backend is tested against it).",
)


def resolve_backend(name: str = "auto") -> BackendChoice:
    """Resolve a backend name once, at module build time.

    ``auto`` picks per call by device, dtype, bias and head dim. A named backend that is not
    usable in this process (e.g. ``xformers`` without loadable kernels) warns once and falls back
    to ``auto``; an unknown name is a one-line error with a "did you mean".
    """
    candidates = []
    for entry in attention_backends.entries():
        backend = entry.obj
        if backend.auto_priority is not None and backend.unavailable_reason() is None:
            candidates.append(backend)
    candidates.sort(key=lambda b: -b.auto_priority)
    auto = tuple(candidates)
    if name == "auto":
        return BackendChoice("auto", None, auto)
    backend = attention_backends.get(name)
    reason = backend.unavailable_reason()
    if reason is not None:
        _warn_once(f"attention backend '{name}' is unavailable ({reason}); falling back to 'auto'")
        return BackendChoice(name, None, auto)
    return BackendChoice(name, backend, auto)


def as_pair(value: int | tuple[int, int]) -> tuple[int, int]:
    """``(v, v)`` for an int, the pair itself otherwise."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def relative_position_index(window: tuple[int, int]) -> Tensor:
    """Swin's index of the bias table for every (query, key) pair of a ``wh x ww`` window.

    Returns a LongTensor (wh*ww, wh*ww) with values in ``[0, (2wh-1)(2ww-1))``.
    """
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (n, n, 2)
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def bias_table_rows(window: tuple[int, int] | None) -> int:
    """Rows of a Swin relative bias table over a ``wh x ww`` window, ``(2wh-1)(2ww-1)``; 0 for none."""
    if window is None:
        return 0
    wh, ww = window
    return (2 * wh - 1) * (2 * ww - 1)


def check_window(grid: tuple[int, int], window: tuple[int, int]) -> None:
    """One-line error when ``window`` does not tile ``grid``."""
    if grid[0] % window[0] or grid[1] % window[1]:
        raise ValueError(
            f"token grid {grid[0]}x{grid[1]} is not divisible by window {window[0]}x{window[1]}: "
            f"choose a window size that divides the grid (or no window for global attention)"
        )


class Attention(nn.Module):
    """Multi-head self-attention over a 2-D token grid (DiffiT eq. 6, Swin relative bias).

    Args:
        dim: token width; ``num_heads`` must divide it (head dims like 72 are fine).
        num_heads: number of heads.
        grid: token grid ``(H, W)`` (or an int for square). Needed for windows and the bias.
        window: attention inside non-overlapping ``window x window`` tiles; ``None`` is global.
        rel_pos_bias: learn a relative position bias table of ``(2w-1)^2`` entries per head,
            ``w`` the window (the whole grid when global).
        qkv_bias: bias in the qkv projection.
        backend: attention backend name (``auto``, ``math``, ``sdpa``, ``flex``, ``xformers`` or
            a registered one).

    Parameter names follow the released DiffiT code: ``qkv`` (output layout ``(3, heads,
    head_dim)``), ``proj``, ``relative_position_bias_table`` ``((2w-1)^2, heads)``,
    ``relative_position_index`` (buffer).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        grid: int | tuple[int, int] | None = None,
        window: int | tuple[int, int] | None = None,
        rel_pos_bias: bool = False,
        qkv_bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads: choose heads that divide the width")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.grid = as_pair(grid) if grid is not None else None
        self.window = as_pair(window) if window is not None else None
        if self.window is not None:
            if self.grid is None:
                raise ValueError("windowed attention needs the token grid: pass grid=(H, W)")
            check_window(self.grid, self.window)
            if self.window == self.grid:
                self.window = None  # one window covering the grid is global attention
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.bias_window: tuple[int, int] | None = None
        if rel_pos_bias:
            if self.grid is None:
                raise ValueError("a relative position bias needs the token grid: pass grid=(H, W)")
            self.bias_window = self.window or self.grid
            self.relative_position_bias_table = nn.Parameter(torch.zeros(bias_table_rows(self.bias_window), num_heads))
            self.register_buffer("relative_position_index", relative_position_index(self.bias_window))
        self.backend = resolve_backend(backend)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform linears with zero biases, bias table trunc-normal(0.02), as released."""
        for linear in (self.qkv, self.proj):
            nn.init.xavier_uniform_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        if self.bias_window is not None:
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    @property
    def bias_table_size(self) -> int:
        """Number of rows of the relative bias table (0 without a bias)."""
        return bias_table_rows(self.bias_window)

    def relative_bias(self, table_offset: Tensor | None = None) -> Tensor:
        """The dense bias ``(1 or B, heads, n, n)`` gathered from the table (plus a per-sample
        offset table ``(B, T, heads)`` when given), ``n`` the tokens of one window."""
        return gather_relative_bias(self.relative_position_bias_table, self.relative_position_index, table_offset)

    def forward(
        self,
        x: Tensor,
        *,
        qkv_offset: Tensor | None = None,
        bias_table_offset: Tensor | None = None,
        extra_tokens: Tensor | None = None,
        appended: int = 0,
    ) -> Tensor:
        """Attend over ``x`` (B, N + A, dim): N = H*W grid tokens in row-major order, then
        ``appended`` tokens that belong to no grid position (in-context conditioning tokens).

        Args:
            qkv_offset: (B, 1, 3*dim) added to the qkv projection of every token (TMSA).
            bias_table_offset: (B, T, heads) added to the relative bias table (time-dependent bias).
            extra_tokens: (B, M, dim) tokens projected with the same qkv weights and attended as
                extra keys/values (in every window), with zero position bias; they emit no output.
            appended: the last ``appended`` tokens of ``x`` are queries, keys and values like the
                grid tokens but with zero position bias: every grid query (in every window) also
                attends to them, and they attend to all tokens (globally, across windows).
        """
        B, L, C = x.shape
        N = L - appended
        if self.grid is not None and N != self.grid[0] * self.grid[1]:
            raise ValueError(
                f"attention built for a {self.grid[0]}x{self.grid[1]} grid got {N} tokens: "
                f"build the model for this input size"
            )
        qkv = self.qkv(x)  # (B, N + A, 3C), layout (3, heads, head_dim)
        if qkv_offset is not None:
            qkv = qkv + qkv_offset
        # Keys and values beyond the grid's own, with zero position bias: the appended tokens
        # (projected with the grid's, offset included), then the extra tokens.
        beyond = [qkv[:, N:]] if appended else []
        if extra_tokens is not None:
            beyond.append(F.linear(extra_tokens, self.qkv.weight, self.qkv.bias))  # (B, M, 3C)
        extra = torch.cat(beyond, dim=1) if beyond else None  # (B, A + M, 3C)
        if appended:  # the appended tokens' queries attend to every token, across windows
            q_app = rearrange(qkv[:, N:], "b a (three h d) -> three b h a d", three=3, h=self.num_heads)[0]
            _, k_all, v_all = rearrange(torch.cat([qkv[:, :N], extra], dim=1), "b m (three h d) -> three b h m d",
                                        three=3, h=self.num_heads)
            grad = torch.is_grad_enabled() and (q_app.requires_grad or k_all.requires_grad or v_all.requires_grad)
            backend = self.backend.pick(q_app.device.type, q_app.dtype, False, self.head_dim, grad)
            out_app = rearrange(backend.fn(q_app, k_all, v_all, None, self.scale), "b h a d -> b a (h d)")
            qkv = qkv[:, :N]
        windows = 1
        if self.window is not None:
            (gh, gw), (wh, ww) = self.grid, self.window
            qkv = rearrange(qkv, "b (nh wh nw ww) c -> (b nh nw) (wh ww) c", nh=gh // wh, wh=wh, nw=gw // ww, ww=ww)
            windows = (gh // wh) * (gw // ww)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)

        has_bias = self.bias_window is not None
        if bias_table_offset is not None and not has_bias:
            raise ValueError("a bias table offset needs rel_pos_bias=True on the attention")

        if extra is not None:
            _, ke, ve = rearrange(extra, "b m (three h d) -> three b h m d", three=3, h=self.num_heads)
            if windows > 1:
                ke, ve = ke.repeat_interleave(windows, dim=0), ve.repeat_interleave(windows, dim=0)
            k, v = torch.cat([k, ke], dim=2), torch.cat([v, ve], dim=2)  # extra keys after the window's

        needs_grad = torch.is_grad_enabled() and (
            q.requires_grad
            or k.requires_grad
            or v.requires_grad
            or (has_bias and self.relative_position_bias_table.requires_grad)
            or (bias_table_offset is not None and bias_table_offset.requires_grad)
        )
        backend = self.backend.pick(q.device.type, q.dtype, has_bias, self.head_dim, needs_grad)
        if has_bias and backend.gathered_fn is not None:
            # The backend looks the bias up itself: no (B', heads, n, M) tensor is built.
            out = backend.gathered_fn(
                q, k, v, self.relative_position_bias_table, self.relative_position_index, bias_table_offset, self.scale
            )
        else:
            bias = None
            if has_bias:
                bias = gather_relative_bias(
                    self.relative_position_bias_table, self.relative_position_index, bias_table_offset, windows, k.shape[2]
                )  # (1|B', heads, n, M)
            out = backend.fn(q, k, v, bias, self.scale)  # (B', heads, n, d)
        out = rearrange(out, "b h n d -> b n (h d)")
        if self.window is not None:
            (gh, gw), (wh, ww) = self.grid, self.window
            out = rearrange(out, "(b nh nw) (wh ww) c -> b (nh wh nw ww) c", nh=gh // wh, nw=gw // ww, wh=wh, ww=ww)
        if appended:
            out = torch.cat([out, out_app], dim=1)  # (B, N + A, C)
        return self.proj(out)


class CrossAttention(nn.Module):
    """Multi-head cross-attention of grid tokens to a short sequence of context tokens (DiT's
    cross-attention block, Sec. 3.2): ``proj(softmax(q(x) k(ctx)^T * scale) v(ctx))``, no
    position bias.

    Args:
        dim: width of the querying tokens; ``num_heads`` must divide it.
        num_heads: number of heads.
        context_dim: width of the context tokens.
        qkv_bias: bias in the q and k/v projections.
        backend: attention backend name, as for [`Attention`][diffit_toolkit.nn.attention.Attention].

    Parameters: ``q`` (dim -> dim), ``kv`` (context_dim -> 2 dim, layout ``(2, heads,
    head_dim)``), ``proj``; xavier-uniform with zero biases (DiT's init of every linear).
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int, *, qkv_bias: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads: choose heads that divide the width")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = resolve_backend(backend)
        for linear in (self.q, self.kv, self.proj):
            nn.init.xavier_uniform_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """``x`` (B, N, dim) attends to ``context`` (B, M, context_dim) -> (B, N, dim)."""
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(self.kv(context), "b m (two h d) -> two b h m d", two=2, h=self.num_heads)
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        backend = self.backend.pick(q.device.type, q.dtype, False, self.head_dim, grad)
        return self.proj(rearrange(backend.fn(q, k, v, None, self.scale), "b h n d -> b n (h d)"))
