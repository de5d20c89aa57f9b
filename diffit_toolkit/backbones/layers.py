"""Small layers shared by the backbones: patchify, fixed sin-cos positions, the label embedder,
the final layers and unpatchify (DiT's ``models.py`` conventions and key names)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffit_toolkit.nn.block import modulate

#: Base of the sin-cos position frequencies (``1 / 10000^(i / (D/4))``), as in MAE / DiT.
POS_EMBED_MAX_PERIOD = 10000.0


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """1-D sin-cos features of ``positions`` (M,) -> (M, dim): sin half first, then cos (DiT)."""
    if dim % 2:
        raise ValueError(f"sin-cos position features need an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / POS_EMBED_MAX_PERIOD**omega  # (dim/2,)
    out = positions.to(torch.float64).reshape(-1)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding over a ``grid x grid`` patch grid -> (grid*grid, dim).

    Exactly DiT's ``get_2d_sincos_pos_embed`` (computed in float64): the first half of the width
    encodes the column index, the second half the row index; tokens in row-major order.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")  # (grid, grid)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, H/p * W/p, D) with a ``p x p`` stride-``p`` conv.

    The conv is ``proj`` (key ``x_embedder.proj.*`` in the released checkpoints).
    """

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(
                f"input size {input_size} is not divisible by patch size {patch_size}: choose a patch size that divides it"
            )
        self.input_size = input_size
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"model built for {self.input_size}x{self.input_size} inputs got "
                f"{x.shape[-2]}x{x.shape[-1]}: build it with input_size={x.shape[-1]}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


class LabelEmbedder(nn.Module):
    """Class labels -> (B, D), with label dropout to the null class for classifier-free guidance.

    The table has ``num_classes + 1`` rows; the last (index ``num_classes``) is the null class
    (key ``y_embedder.embedding_table.weight``). During training each label is replaced by the
    null class with probability ``dropout_prob`` (DiT / DiffiT: 0.1).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.null_class = num_classes  # the extra, last row of the table
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def token_drop(self, labels: Tensor, force_drop: Tensor | None = None) -> Tensor:
        """Replace dropped labels by the null class; ``force_drop`` (B,) bool forces the choice."""
        if force_drop is None:
            force_drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(force_drop, torch.full_like(labels, self.null_class), labels)

    def forward(self, labels: Tensor, train: bool, force_drop: Tensor | None = None) -> Tensor:
        if (train and self.dropout_prob > 0) or force_drop is not None:
            labels = self.token_drop(labels, force_drop)
        return self.embedding_table(labels)  # (B, D)


class FinalLayer(nn.Module):
    """Released DiffiT output layer: LayerNorm (no affine) -> SiLU -> Linear(D, p*p*C_out).

    ``linear`` is zero-initialised by the backbone, so a fresh model predicts zero.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.act = nn.SiLU()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.linear(self.act(self.norm_final(x)))  # (B, T, p*p*C_out); c unused


class AdaLNFinalLayer(nn.Module):
    """DiT's output layer: LayerNorm (no affine) modulated by ``adaLN_modulation`` = SiLU ->
    Linear(D, 2D) (shift, scale), then Linear(D, p*p*C_out). Both linears are zero-initialised
    by the backbone (keys ``final_layer.adaLN_modulation.1.*``, ``final_layer.linear.*``)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C_out)


#: Final layer classes by the backbone option ``final_layer``.
FINAL_LAYERS: dict[str, type[nn.Module]] = {"plain": FinalLayer, "adaln": AdaLNFinalLayer}


def unpatchify(x: Tensor, patch_size: int, channels: int) -> Tensor:
    """Tokens (B, T, p*p*C) in ``(p, p, C)`` layout -> images (B, C, H, W) (DiT's unpatchify)."""
    B, T, _ = x.shape
    p = patch_size
    h = w = int(round(T**0.5))
    if h * w != T:
        raise ValueError(f"cannot unpatchify {T} tokens: not a square grid")
    x = x.reshape(B, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, h * p, w * p)
