"""Import the released latent DiffiT and the DiT reference checkpoints.

Both layouts share DiT's names for the patch embedding, positions, time and label embedders,
attention, MLP and final layer; they differ only in where the conditioning weights live, which
the toolkit keeps in each block's mechanism (``blocks.{i}.cond``):

| released key | toolkit key |
| --- | --- |
| `blocks.{i}.attn.qkv_temb.*` (DiffiT, TMSA) | `blocks.{i}.cond.qkv_temb.*` (`tmsa`) |
| `blocks.{i}.adaLN_modulation.1.*` (DiT) | `blocks.{i}.cond.adaLN_modulation.1.*` (`adaln_zero`) |

Everything else (``x_embedder.proj``, ``pos_embed``, ``t_embedder.mlp.{0,2}``,
``y_embedder.embedding_table``, ``attn.qkv`` in the ``(3, heads, head_dim)`` layout,
``attn.relative_position_bias_table`` ``((2w-1)^2, heads)``, ``attn.proj``, ``mlp.fc1/fc2``,
``final_layer.linear``, DiT's ``final_layer.adaLN_modulation.1``) keeps its name and layout.
The model's shape (width, depth, patch, input size, classes, learned variance, heads, bias
window) is read from the tensors themselves; DiT's head count is not stored, so it comes from
the DiT preset of the same width (or ``num_heads=``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffit_toolkit.backbones.latent import DIT_DEFAULTS, LATENT_SIZES, LatentDiffiT, latent_config
from diffit_toolkit.runs.model_file import load_weights, read_state_dict

#: Released-key -> toolkit-key renames per layout (regex, replacement).
RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "diffit": ((r"^blocks\.(\d+)\.attn\.qkv_temb\.", r"blocks.\1.cond.qkv_temb."),),
    "dit": ((r"^blocks\.(\d+)\.adaLN_modulation\.", r"blocks.\1.cond.adaLN_modulation."),),
}
#: Backbone registry name and defaults that each layout maps onto.
LAYOUT_BACKBONES: dict[str, tuple[str, dict[str, Any]]] = {
    "diffit": ("latent_diffit", dict(mechanism="tmsa", rel_pos_bias=True, final_layer="plain")),
    "dit": ("dit", dict(DIT_DEFAULTS)),
}
#: Buffers that are derived from the shape, so a file may leave them out.
DERIVED_KEYS = ("relative_position_index",)
#: Keys the shape is read from.
_SHAPE_KEYS = ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight")


def detect_layout(state: Mapping[str, Tensor]) -> str:
    """``"diffit"`` (TMSA ``attn.qkv_temb``) or ``"dit"`` (``adaLN_modulation`` in the blocks)."""
    if any(re.match(r"^blocks\.\d+\.attn\.qkv_temb\.", k) for k in state):
        return "diffit"
    if any(re.match(r"^blocks\.\d+\.adaLN_modulation\.", k) for k in state):
        return "dit"
    raise ValueError(
        "cannot tell the checkpoint layout: no 'blocks.N.attn.qkv_temb' (DiffiT), "
        "'blocks.N.adaLN_modulation' (DiT) nor 'transformer_blocks.N.norm1.linear' (diffusers DiT) keys; "
        "pass layout='diffit' or 'dit'"
    )


def convert_state_dict(state: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """Rename a released state dict (``layout`` ``diffit`` or ``dit``) to the toolkit's keys."""
    if layout not in RENAMES:
        raise ValueError(f"unknown checkpoint layout '{layout}' (valid: {', '.join(RENAMES)})")
    out = {}
    for key, value in state.items():
        for pattern, replacement in RENAMES[layout]:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def infer_options(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The latent backbone options that match the tensors of a released state dict."""
    absent = [k for k in _SHAPE_KEYS if k not in state]
    if absent:
        raise ValueError(
            f"not a latent DiffiT/DiT state dict: missing key(s) {', '.join(absent)} needed to read its shape"
        )
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    tokens = state["pos_embed"].shape[-2]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"pos_embed has {tokens} positions: not a square patch grid")
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise ValueError("not a latent DiffiT/DiT state dict: no 'blocks.N.*' keys")
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    table = state.get("y_embedder.embedding_table.weight")
    options: dict[str, Any] = dict(
        input_size=grid * patch,
        in_channels=in_channels,
        patch_size=patch,
        hidden_size=hidden,
        depth=depth,
        num_classes=table.shape[0] - 1 if table is not None else 0,
        learn_sigma=out_channels == 2 * in_channels,
    )
    if "blocks.0.mlp.fc1.weight" in state:
        options["mlp_ratio"] = state["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    if "t_embedder.mlp.0.weight" in state:
        options["frequency_dim"] = state["t_embedder.mlp.0.weight"].shape[1]
    bias = state.get("blocks.0.attn.relative_position_bias_table")
    if bias is not None:
        rows, options["num_heads"] = bias.shape
        window = (math.isqrt(rows) + 1) // 2  # rows = (2w - 1)^2
        options["rel_pos_bias"] = True
        options["window"] = None if window == grid else window
    else:
        options["rel_pos_bias"] = False
        sizes = [s for s in LATENT_SIZES.values() if s["hidden_size"] == hidden]
        if sizes:  # DiT does not store its head count: the preset of this width gives it
            options["num_heads"] = sizes[0]["num_heads"]
    return options


def load_released(
    source: str | Path | Mapping[str, Tensor], layout: str = "auto", null_class: bool = True, **overrides: Any
) -> LatentDiffiT:
    """A toolkit model holding a released DiffiT or DiT checkpoint.

    Args:
        source: a ``.pt``/``.pth`` (read with ``weights_only=True``) or ``.safetensors`` file, a
            diffusers ``DiTTransformer2DModel`` folder or state dict (see
            [`diffusers_dit`][diffit_toolkit.interop.diffusers_dit]), or a state dict.
        layout: ``"diffit"``, ``"dit"`` or ``"auto"`` (detected from the keys).
        null_class: whether the label table's last row is the null class (trained with label
            dropout, as DiT and DiffiT were). ``False`` for checkpoints trained with class dropout
            0: every row is a real class, a zero null row is appended and the model gets
            ``class_dropout_prob=0``, so sampling refuses classifier-free guidance.
        **overrides: backbone options that the tensors do not determine (e.g. ``num_heads`` for a
            DiT of non-preset width, ``attention_backend``, ``class_dropout_prob``).

    Returns:
        ``latent_diffit`` (``tmsa``) for DiffiT weights, ``dit`` (``adaln_zero``) for DiT weights,
        whose forward equals the source model's. Wrong files raise one ValueError line naming the
        missing, unexpected and mis-shaped keys.
    """
    from diffit_toolkit.interop.diffusers_dit import diffusers_to_dit, is_diffusers_dit, read_diffusers_dit

    name = f"'{source}'" if isinstance(source, (str, Path)) else "state dict"
    if isinstance(source, (str, Path)) and Path(source).is_dir():  # a diffusers DiTTransformer2DModel folder
        state, from_config = read_diffusers_dit(source)
        overrides = {**from_config, **overrides}
        layout = "dit"
    else:
        state = read_state_dict(source) if isinstance(source, (str, Path)) else dict(source)
        if is_diffusers_dit(state):
            from diffit_toolkit.interop.diffusers_dit import DIFFUSERS_TIME_OPTIONS

            state = diffusers_to_dit(state, overrides.get("input_size"))
            overrides = {"time_feature_options": dict(DIFFUSERS_TIME_OPTIONS), **overrides}
            layout = "dit"
    layout = detect_layout(state) if layout == "auto" else layout
    if layout not in LAYOUT_BACKBONES:
        raise ValueError(f"unknown checkpoint layout '{layout}' (valid: auto, {', '.join(LAYOUT_BACKBONES)})")
    backbone, defaults = LAYOUT_BACKBONES[layout]
    table_key = "y_embedder.embedding_table.weight"
    if not null_class and table_key in state:
        table = state[table_key]
        state = {**state, table_key: torch.cat([table, torch.zeros_like(table[:1])])}
        overrides = {"class_dropout_prob": 0.0, **overrides}
    options = {**defaults, **infer_options(state), **overrides}
    if "num_heads" not in options:
        raise ValueError(f"{name}: the head count of a width-{options['hidden_size']} DiT is unknown: pass num_heads=")
    model = latent_config(None, **options).build(backbone)
    return load_weights(model, convert_state_dict(state, layout), f"{name} ({layout} layout)", DERIVED_KEYS)
