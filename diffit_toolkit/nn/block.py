"""The DiffiT transformer block and its injection sites.

A block is pre-norm attention + MLP (DiffiT eq. 7-8):

```text
x = [x, sequence]                                   # only where x carries no appended tokens yet
x = x + gate_attn * Attention(modulate(LN(x), shift_attn, scale_attn), qkv, bias, extra tokens)
x = x + CrossAttention(LN(x), context)              # only in blocks built with a context width
x = x + gate_mlp  * MLP(modulate(LN(x), shift_mlp, scale_mlp) + mlp_in)
```

The time/class token ``c`` enters **only** through the fields of an
[`Injection`][diffit_toolkit.nn.block.Injection], which the
block's conditioning mechanism computes from ``c`` (or, if it asks for them, from the time and
class embeddings apart: [`Conditioning`][diffit_toolkit.nn.block.Conditioning]). Every field left
``None`` is a site the mechanism does not use, and the block then computes exactly the
unconditioned formula. The sites:

| site (Injection field) | effect | used by |
| --- | --- | --- |
| `tokens` | added to the block input `x` | `additive` |
| `shift_attn/scale_attn` | `LN(x) * (1 + scale) + shift` before attention | `adaln_zero` |
| `gate_attn` | multiplies the attention branch | `adaln_zero` |
| `qkv` | added to the q/k/v projection of every token | `tmsa` |
| `bias_table` | added to the relative position bias table (per sample) | `relative_bias` |
| `extra_tokens` | attended as extra keys/values, no output of their own | `separate_token` |
| `shift_mlp/scale_mlp` | modulation of the MLP's LayerNorm | `adaln_zero` |
| `mlp_in` | added to the MLP input | `mlp` |
| `gate_mlp` | multiplies the MLP branch | `adaln_zero` |
| `sequence` | appended to the token sequence, carried through the following blocks | `in_context` |
| `context` | attended by a cross-attention layer after the self-attention | `cross_attention` |
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, NamedTuple

import torch

from torch import Tensor, nn

from diffit_toolkit.nn.attention import Attention, CrossAttention, as_pair, bias_table_rows, check_window
from diffit_toolkit.registry import PluginError, conditioning


class Mlp(nn.Sequential):
    """The transformer MLP ``fc2(act(fc1(x)))`` (DiT's and timm's ``Mlp`` without dropout, same
    parameter names), defined here so that building a model does not import timm and torchvision."""

    def __init__(self, dim: int, hidden: int, act_layer: Any = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)


@dataclass(frozen=True)
class BlockSpec:
    """Everything a block (and a mechanism) needs to know about its shape.

    Args:
        dim: token width.
        num_heads: attention heads (must divide ``dim``).
        cond_dim: width of the conditioning token ``c``.
        grid: token grid ``(H, W)``; needed for windows and the relative bias.
        window: attention window ``(h, w)``; ``None`` is global attention.
        rel_pos_bias: learn a relative position bias table.
        mlp_ratio: MLP hidden width / ``dim``.
        qkv_bias: bias in the qkv projection.
        attention_backend: registered backend name or ``auto``.
        norm_eps: LayerNorm epsilon (1e-6 as released).
        norm_affine: learnable LayerNorm scale/shift (the released model has none).
        context_dim: width of the context tokens a cross-attention layer after the
            self-attention attends to (the ``context`` site); ``None``: no such layer.
    """

    dim: int
    num_heads: int
    cond_dim: int
    grid: tuple[int, int] | None = None
    window: tuple[int, int] | None = None
    rel_pos_bias: bool = False
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    attention_backend: str = "auto"
    norm_eps: float = 1e-6
    norm_affine: bool = False
    context_dim: int | None = None

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(
                f"width {self.dim} is not divisible by {self.num_heads} heads: choose heads that divide the width"
            )
        if self.grid is not None:
            object.__setattr__(self, "grid", as_pair(self.grid))
        if self.window is not None:
            object.__setattr__(self, "window", as_pair(self.window))
            if self.grid is None:
                raise ValueError("a window needs the token grid: set grid=(H, W)")
            check_window(self.grid, self.window)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def bias_window(self) -> tuple[int, int] | None:
        """The window the relative bias table spans (the grid for global attention)."""
        if not self.rel_pos_bias:
            return None
        return self.window or self.grid

    @property
    def bias_table_size(self) -> int:
        """Rows of the relative bias table, ``(2h-1)(2w-1)`` (0 without a bias)."""
        return bias_table_rows(self.bias_window)


@dataclass
class Injection:
    """What a conditioning mechanism puts into one block; every field is one injection site.

    Shapes (B the batch, D the width, T the bias table rows, H the heads, M extra tokens):
    ``tokens``, ``shift_*``, ``scale_*``, ``gate_*``, ``mlp_in``: (B, 1, D) (or (B, N, D));
    ``qkv``: (B, 1, 3D) in the ``(3, heads, head_dim)`` layout; ``bias_table``: (B, T, H);
    ``extra_tokens``, ``sequence``: (B, M, D); ``context``: (B, M, context_dim).
    """

    tokens: Tensor | None = None
    shift_attn: Tensor | None = None
    scale_attn: Tensor | None = None
    gate_attn: Tensor | None = None
    qkv: Tensor | None = None
    bias_table: Tensor | None = None
    extra_tokens: Tensor | None = None
    shift_mlp: Tensor | None = None
    scale_mlp: Tensor | None = None
    mlp_in: Tensor | None = None
    gate_mlp: Tensor | None = None
    sequence: Tensor | None = None
    context: Tensor | None = None


class Conditioning(NamedTuple):
    """The conditioning of one forward pass, computed once by the backbone and given to every block.

    Attributes:
        t: (B, C) time embedding.
        y: (B, C) class embedding, ``None`` for an unconditional model.
        shared: what the mechanism's shared module (``ConditioningMechanism.shared_module``)
            computed from ``c`` for all blocks; ``None`` when it declares none.
    """

    t: Tensor
    y: Tensor | None = None
    shared: Tensor | None = None

    @property
    def c(self) -> Tensor:
        """The conditioning token ``c = t + y`` (B, C) (DiT's, what most mechanisms read)."""
        return self.t if self.y is None else self.t + self.y

    @property
    def tokens(self) -> Tensor:
        """The embeddings as a sequence ``[t, y]`` (B, 2, C) (``[t]``, (B, 1, C), unconditional)."""
        return self.t[:, None] if self.y is None else torch.stack([self.t, self.y], dim=1)


class ConditioningMechanism(nn.Module, abc.ABC):
    """Base class of conditioning mechanisms: ``forward(c) -> Injection`` for one block.

    Subclass, create your parameters in ``__init__(spec, **options)`` (initialised the way your
    paper says), fill the sites you use in ``forward``, and register the class with
    [`diffit_toolkit.register_conditioning`][diffit_toolkit.register_conditioning]. Class attributes:

    * ``requires_rel_pos_bias``: the block must have a relative position bias.
    * ``configure_block(spec, **options)``: a classmethod that may adjust the block's spec before
      it is built (e.g. ``window_tmsa`` turns windows on, ``cross_attention`` sets a context width).
    * ``takes_parts``: ``forward`` receives the
      [`Conditioning`][diffit_toolkit.nn.block.Conditioning] (time and class embeddings apart, and
      the shared module's output) instead of the summed token ``c`` (B, cond_dim).
    * ``shared_module(spec, **options)``: a classmethod that may return a module the backbone
      builds once (beside its blocks) and runs once per forward on ``c``; its output reaches every
      block as ``Conditioning.shared`` (PixArt's adaLN-single). Default: none.

    Declarations that the conformance kit ([`diffit_toolkit.testing`][diffit_toolkit.testing]) checks and the
    backbones read; the defaults suit most mechanisms:

    * ``identity_at_init``: a freshly built block is exactly the identity (adaLN-Zero's zero gates).
    * ``unused_parameters``: names of parameters (relative to the mechanism) that are allowed to
      receive no gradient; every other parameter must get a non-zero one in a fresh block.
    * ``compile_fullgraph``: the block compiles with ``torch.compile(fullgraph=True)`` (no graph
      breaks); ``False`` still requires it to compile, with breaks allowed.
    * ``final_layer``: the output layer a latent backbone pairs with this mechanism when its
      config leaves ``final_layer`` unset (``"adaln"`` for adaLN-Zero, as in DiT); ``None``: the
      plain layer.
    """

    requires_rel_pos_bias: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = False
    unused_parameters: ClassVar[frozenset[str]] = frozenset()
    compile_fullgraph: ClassVar[bool] = True
    final_layer: ClassVar[str | None] = None
    takes_parts: ClassVar[bool] = False

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.spec = spec

    @classmethod
    def configure_block(cls, spec: BlockSpec, **options: Any) -> BlockSpec:
        """Return the spec the block should be built with (default: unchanged)."""
        return spec

    @classmethod
    def shared_module(cls, spec: BlockSpec, **options: Any) -> nn.Module | None:
        """The module shared by all blocks of a backbone, ``c`` (B, cond_dim) -> anything the
        blocks read from ``Conditioning.shared`` (default: none)."""
        return None

    @abc.abstractmethod
    def forward(self, c: Tensor) -> Injection:
        """Map the conditioning token ``c`` (B, cond_dim) to this block's injections (with
        ``takes_parts``: the [`Conditioning`][diffit_toolkit.nn.block.Conditioning])."""


SITE_SHAPES: dict[str, str] = {
    "tokens": "(B, 1 or N, D)",
    "shift_attn": "(B, 1 or N, D)",
    "scale_attn": "(B, 1 or N, D)",
    "gate_attn": "(B, 1 or N, D)",
    "qkv": "(B, 1 or N, 3D)",
    "bias_table": "(B, T, heads)",
    "extra_tokens": "(B, M, D)",
    "shift_mlp": "(B, 1 or N, D)",
    "scale_mlp": "(B, 1 or N, D)",
    "mlp_in": "(B, 1 or N, D)",
    "gate_mlp": "(B, 1 or N, D)",
    "sequence": "(B, M, D)",
    "context": "(B, M, context_dim)",
}
"""The shape each injection site takes (B the batch, N the block's tokens, D its width, M extra
tokens, T the bias table rows): the conformance kit checks them in full, every forward checks the
rank and the width. A new site adds its row here."""

#: The last dimension of each shape in `SITE_SHAPES`, for a block's spec.
_LAST_DIM: dict[str, Callable[[BlockSpec], int | None]] = {
    "D)": lambda spec: spec.dim, "3D)": lambda spec: 3 * spec.dim, "heads)": lambda spec: spec.num_heads,
    "context_dim)": lambda spec: spec.context_dim,
}


def check_injection(inj: Any, spec: BlockSpec, mechanism: str) -> None:
    """One-line [`PluginError`][diffit_toolkit.registry.PluginError] unless ``inj`` is an
    [`Injection`][diffit_toolkit.nn.block.Injection] whose tensors are 3-D with the width of their
    site (`SITE_SHAPES`): a mechanism's mistake is named here, not as a broadcasting error deep
    inside torch."""
    if not isinstance(inj, Injection):
        raise PluginError(f"conditioning mechanism '{mechanism}': forward(c) returned {type(inj).__name__}, not an "
                          f"Injection (return Injection(<site>=tensor, ...))")
    for site, shape in SITE_SHAPES.items():
        value = getattr(inj, site)
        if value is None:
            continue
        width = _LAST_DIM[shape.rsplit(" ", 1)[1]](spec)
        if not isinstance(value, Tensor) or value.ndim != 3 or (width is not None and value.shape[-1] != width):
            shown = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise PluginError(f"conditioning mechanism '{mechanism}': injection site '{site}' has shape {shown}, "
                              f"expected {shape} with D = {spec.dim}")


def modulate(x: Tensor, shift: Tensor | None, scale: Tensor | None) -> Tensor:
    """``x * (1 + scale) + shift`` (DiT's adaLN), each term skipped when ``None``."""
    if scale is not None:
        x = x * (1 + scale)
    if shift is not None:
        x = x + shift
    return x


def _gated(branch: Tensor, gate: Tensor | None) -> Tensor:
    return branch if gate is None else gate * branch


def resolve_mechanism(mechanism: str | type[ConditioningMechanism]) -> tuple[str, type[ConditioningMechanism]]:
    """A mechanism's registered name and class, from either."""
    if isinstance(mechanism, str):
        return mechanism, conditioning.get(mechanism)
    if isinstance(mechanism, type) and issubclass(mechanism, ConditioningMechanism):
        return getattr(mechanism, "name", mechanism.__name__), mechanism
    raise PluginError(f"conditioning mechanism must be a registered name or a ConditioningMechanism class, got {mechanism!r}")


class DiffiTBlock(nn.Module):
    """Pre-norm transformer block whose conditioning goes only through injection sites.

    Args:
        spec: the block's shape ([`BlockSpec`][diffit_toolkit.nn.block.BlockSpec]).
        mechanism: registered mechanism name (``tmsa``, ``adaln_zero``, ...) or class.
        mechanism_options: keyword options for the mechanism (recipe ``mechanism_options``).

    Submodules: ``norm1``, ``attn`` ([`Attention`][diffit_toolkit.nn.attention.Attention]),
    ``norm2``, ``mlp`` (``fc1``/``fc2``,
    GELU tanh), ``cond`` (the mechanism); with ``spec.context_dim`` also ``norm_cross`` and
    ``cross_attn`` ([`CrossAttention`][diffit_toolkit.nn.attention.CrossAttention]).
    """

    def __init__(
        self,
        spec: BlockSpec,
        mechanism: str | type[ConditioningMechanism] = "tmsa",
        mechanism_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        name, cls = resolve_mechanism(mechanism)
        options = dict(mechanism_options or {})
        spec = cls.configure_block(spec, **options)
        if cls.requires_rel_pos_bias and not spec.rel_pos_bias:
            raise PluginError(
                f"conditioning mechanism '{name}' acts on the relative position bias: build the block "
                f"with rel_pos_bias=True"
            )
        self.spec = spec
        self.mechanism_name = name
        self.norm1 = nn.LayerNorm(spec.dim, eps=spec.norm_eps, elementwise_affine=spec.norm_affine)
        self.attn = Attention(
            spec.dim,
            spec.num_heads,
            grid=spec.grid,
            window=spec.window,
            rel_pos_bias=spec.rel_pos_bias,
            qkv_bias=spec.qkv_bias,
            backend=spec.attention_backend,
        )
        self.norm_cross = self.cross_attn = None
        if spec.context_dim is not None:
            self.norm_cross = nn.LayerNorm(spec.dim, eps=spec.norm_eps, elementwise_affine=spec.norm_affine)
            self.cross_attn = CrossAttention(spec.dim, spec.num_heads, spec.context_dim, qkv_bias=spec.qkv_bias,
                                             backend=spec.attention_backend)
        self.norm2 = nn.LayerNorm(spec.dim, eps=spec.norm_eps, elementwise_affine=spec.norm_affine)
        self.mlp = Mlp(spec.dim, int(spec.dim * spec.mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        for linear in (self.mlp.fc1, self.mlp.fc2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        if isinstance(mechanism, str):
            self.cond = conditioning.build(mechanism, spec, **options)
        else:
            self.cond = cls(spec, **options)

    def injection(self, c: Tensor | Conditioning) -> Injection:
        """The mechanism's injections for ``c``: the summed token (B, cond_dim), or the
        [`Conditioning`][diffit_toolkit.nn.block.Conditioning] for a mechanism that ``takes_parts``."""
        cond = c if isinstance(c, Conditioning) else Conditioning(c)
        inj = self.cond(cond if self.cond.takes_parts else cond.c)
        check_injection(inj, self.spec, self.mechanism_name)
        return inj

    def forward(self, x: Tensor, c: Tensor | Conditioning) -> Tensor:
        """``x`` (B, N, D) tokens in row-major grid order, ``c`` (B, cond_dim) or a
        [`Conditioning`][diffit_toolkit.nn.block.Conditioning] -> (B, N, D).

        A mechanism that fills the ``sequence`` site makes it (B, N + M, D): the M tokens are
        appended where ``x`` has only its N grid tokens, and carried as they are by the next
        blocks (which find N + M tokens); the caller drops them after its last block (``[:, :N]``).
        """
        inj: Injection = self.injection(c)
        if inj.tokens is not None:
            x = x + inj.tokens
        appended = 0
        if inj.sequence is not None:
            if self.spec.grid is None:
                raise ValueError("tokens appended to the sequence need the token grid: set grid=(H, W) in the BlockSpec")
            if x.shape[1] == self.spec.grid[0] * self.spec.grid[1]:
                x = torch.cat([x, inj.sequence], dim=1)  # (B, N + M, D)
            appended = x.shape[1] - self.spec.grid[0] * self.spec.grid[1]
        h = modulate(self.norm1(x), inj.shift_attn, inj.scale_attn)
        h = self.attn(h, qkv_offset=inj.qkv, bias_table_offset=inj.bias_table, extra_tokens=inj.extra_tokens,
                      appended=appended)
        x = x + _gated(h, inj.gate_attn)
        if self.cross_attn is not None:
            if inj.context is None:
                raise ValueError(f"this block attends to context tokens, but mechanism '{self.mechanism_name}' "
                                 f"gave none: fill the context site")
            x = x + self.cross_attn(self.norm_cross(x), inj.context)
        elif inj.context is not None:
            raise ValueError("context tokens need a cross-attention layer: build the block with "
                             "BlockSpec.context_dim (a mechanism's configure_block sets it)")
        h = modulate(self.norm2(x), inj.shift_mlp, inj.scale_mlp)
        if inj.mlp_in is not None:
            h = h + inj.mlp_in
        return x + _gated(self.mlp(h), inj.gate_mlp)
