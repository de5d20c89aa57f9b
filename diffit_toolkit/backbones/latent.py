"""Latent DiffiT / DiT: the isotropic transformer denoiser over VAE latent patches.

Readable top to bottom like DiT's ``models.py``:

```text
x (B, C, H, W) --patchify--> (B, T, D) + fixed 2-D sin-cos positions
c = t_embedder(t) + y_embedder(y)                       # (B, D), computed once
x = block(x, c) for each of the N blocks                # the mechanism decides where c enters
x = final_layer(x[:, :T], c) --unpatchify--> (B, C_out, H, W)  # C_out = 2C with learned variance
```

The blocks get ``c`` with its parts (a ``Conditioning``: the mechanism may read ``t_emb`` and
``y_emb`` apart, and the output of a module it shares across blocks, built here as
``shared_conditioning`` only when it declares one). Tokens a mechanism appends to the sequence
(in-context conditioning) are carried through the blocks and dropped before the final layer.

The conditioning mechanism is a registered plugin (``tmsa``, ``adaln_zero``, ...). With ``tmsa``,
a global relative position bias and the plain final layer, ``XL/2`` is the released DiffiT-XL/2
(key names, init and parameter count of the release); with ``adaln_zero``, no relative bias and
the adaLN final layer, it is DiT-XL/2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from diffit_toolkit.backbones.conditioning import (
    DEFAULT_CLASS_DROPOUT,
    ConditionedBackbone,
    check_conditioning_options,
    preferred_final_layer,
)
from diffit_toolkit.backbones.config import check_positive, config_dict, config_from_options, unknown_name_error
from diffit_toolkit.backbones.layers import FINAL_LAYERS, PatchEmbed, sincos_2d, unpatchify
from diffit_toolkit.backbones.pretrained import PretrainedMixin
from diffit_toolkit.nn.block import BlockSpec, DiffiTBlock
from diffit_toolkit.nn.embeddings import DEFAULT_FREQUENCY_DIM

#: Model sizes in DiT naming: depth, width and heads (DiT Table 1). XL: head dim 72.
LATENT_SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
#: Patch sizes of the presets (``XL/2`` = size XL, patch 2).
LATENT_PATCH_SIZES: tuple[int, ...] = (2, 4, 8)
#: Preset name -> size fields, e.g. ``"XL/2"``.
LATENT_PRESETS: dict[str, dict[str, int]] = {
    f"{size}/{patch}": dict(**fields, patch_size=patch)
    for size, fields in LATENT_SIZES.items()
    for patch in LATENT_PATCH_SIZES
}


@dataclass
class LatentDiffiTConfig:
    """Everything that defines a latent DiffiT / DiT model; recorded as ``model.config``.

    Args:
        input_size: latent side (32 for 256 px images, 64 for 512 px with the SD VAE).
        in_channels: latent channels (4 for the SD VAE).
        patch_size: patch side ``p``; the token grid is ``input_size / p``.
        hidden_size: token width ``D``.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / ``D``.
        num_classes: class labels (0: unconditional, no label table).
        class_dropout_prob: label dropout to the null class during training (0.1, DiT's value:
            `DEFAULT_CLASS_DROPOUT`).
        learn_sigma: output ``2C`` channels (epsilon and the learned variance interpolation).
        mechanism: registered conditioning mechanism (``tmsa``, ``adaln_zero``, ...).
        mechanism_options: keyword options of the mechanism.
        rel_pos_bias: learned relative position bias in every block.
        window: attention window (``None``: global attention over the whole patch grid, and a
            bias table spanning it: 16 at 256 px / patch 2, 32 at 512 px, as released).
        final_layer: ``"plain"`` (released DiffiT: LN -> SiLU -> Linear) or ``"adaln"`` (DiT);
            ``None`` takes the one the mechanism class declares (its ``final_layer`` attribute:
            ``"adaln"`` for ``adaln_zero``), else ``"plain"``.
        attention_backend: registered attention backend or ``auto``.
        time_features: registered time-embedding feature map (``positional`` or ``fourier``).
        frequency_dim: width of the time features (256 as released).
        time_feature_options: options of the feature map (e.g. Fourier ``scale``).
        grad_checkpointing: recompute each block in the backward pass to save memory.
    """

    input_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = DEFAULT_CLASS_DROPOUT
    learn_sigma: bool = True
    mechanism: str = "tmsa"
    mechanism_options: dict[str, Any] = field(default_factory=dict)
    rel_pos_bias: bool = True
    window: int | None = None
    final_layer: str | None = None
    attention_backend: str = "auto"
    time_features: str = "positional"
    frequency_dim: int = DEFAULT_FREQUENCY_DIM
    time_feature_options: dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_positive("latent backbone", input_size=self.input_size, in_channels=self.in_channels,
                       patch_size=self.patch_size, hidden_size=self.hidden_size, depth=self.depth,
                       num_heads=self.num_heads, frequency_dim=self.frequency_dim)
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input size {self.input_size} is not divisible by patch size {self.patch_size}: "
                f"choose a patch size that divides it"
            )
        check_conditioning_options(self.num_classes, self.class_dropout_prob)
        self.final_layer = preferred_final_layer(self.mechanism, self.final_layer)
        if self.final_layer not in FINAL_LAYERS:
            raise unknown_name_error("final layer", self.final_layer, list(FINAL_LAYERS))
        self.mechanism_options = dict(self.mechanism_options)
        self.time_feature_options = dict(self.time_feature_options)

    @property
    def grid_size(self) -> int:
        """Patch grid side ``input_size / patch_size``."""
        return self.input_size // self.patch_size

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def block_spec(self) -> BlockSpec:
        """The shape every block of this model is built with."""
        return BlockSpec(
            dim=self.hidden_size,
            num_heads=self.num_heads,
            cond_dim=self.hidden_size,
            grid=(self.grid_size, self.grid_size),
            window=self.window,
            rel_pos_bias=self.rel_pos_bias,
            mlp_ratio=self.mlp_ratio,
            attention_backend=self.attention_backend,
        )

    def build(self, backbone: str = "latent_diffit") -> LatentDiffiT:
        """The model (``backbone`` is the registry name recorded in ``model.config``)."""
        return LatentDiffiT(self, backbone=backbone)


class LatentDiffiT(PretrainedMixin, ConditionedBackbone):
    """Isotropic latent diffusion transformer: DiffiT (TMSA) or DiT (adaLN-Zero) or any mechanism.

    Call as ``model(x, t, y)``: ``x`` (B, C, H, W) latents, ``t`` (B,) timesteps, ``y`` (B,) class
    labels (``None``: the null class; must be ``None`` for unconditional models) ->
    (B, C_out, H, W). Label dropout is active in training mode.

    Attributes:
        config: the constructor config as a JSON-ready dict (with the registry name under
            ``backbone``); ``build_backbone(config)`` rebuilds the model.
        num_classes: class labels (0: unconditional).
        null_class: label index of the null class (``num_classes``), ``None`` if unconditional.
    """

    def __init__(self, config: LatentDiffiTConfig, backbone: str = "latent_diffit") -> None:
        super().__init__()
        self.cfg = config
        self.config: dict[str, Any] = {"backbone": backbone, **config_dict(config)}
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.input_size = config.input_size
        self.learn_sigma = config.learn_sigma
        self.grad_checkpointing = config.grad_checkpointing
        D = config.hidden_size

        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, D)
        self.build_conditioning(  # t_embedder, y_embedder (released key names)
            D, num_classes=config.num_classes, class_dropout_prob=config.class_dropout_prob,
            time_features=config.time_features, frequency_dim=config.frequency_dim,
            time_feature_options=config.time_feature_options,
        )
        # Fixed (not trained) sin-cos positions; a frozen parameter as in DiT, so it is counted by
        # ``parameters()`` and stored under the released key ``pos_embed``.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, D), requires_grad=False)

        spec = config.block_spec()
        # A module the mechanism shares across blocks (adaLN-single's); an attribute only when declared.
        shared = self.build_shared(spec, config.mechanism, config.mechanism_options)
        if shared is not None:
            self.shared_conditioning = shared
        self.blocks = nn.ModuleList(
            [DiffiTBlock(spec, config.mechanism, config.mechanism_options) for _ in range(config.depth)]
        )
        self.final_layer = FINAL_LAYERS[config.final_layer](D, config.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Init of the released DiffiT / DiT. Blocks and mechanisms initialise themselves
        when built (xavier linears, zero biases, trunc-normal(0.02) bias table, adaLN-Zero's zero
        modulation), so only the layers owned here are set."""
        # Fixed 2-D sin-cos position embedding over the patch grid.
        pos = sincos_2d(self.pos_embed.shape[-1], self.x_embedder.grid_size)  # (T, D), float64
        self.pos_embed.data.copy_(pos.float()[None])

        # Patch embedding like a Linear: xavier-uniform on the flattened (D, C*p*p) weight, zero bias.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        # Label table normal(0.02). (The time MLP's normal(0.02) init is TimestepEmbedder's own.)
        self.init_conditioning()

        # Output layer zero-initialised: a fresh model predicts 0 (DiT; released DiffiT).
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        modulation = getattr(self.final_layer, "adaLN_modulation", None)
        if modulation is not None:  # DiT's adaLN final layer: zero shift and scale
            nn.init.zeros_(modulation[-1].weight)
            nn.init.zeros_(modulation[-1].bias)

    def shard_units(self) -> list[nn.Module]:
        """The transformer blocks (FSDP shards each on its own)."""
        return list(self.blocks)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``x`` (B, C, H, W), ``t`` (B,), ``y`` (B,) or ``None`` -> (B, C_out, H, W)."""
        x = self.x_embedder(x) + self.pos_embed  # (B, T, D), T = (H/p)(W/p)
        T = x.shape[1]
        cond = self.share(getattr(self, "shared_conditioning", None), self.conditioning(t, y))  # c = cond.c (B, D)
        for block in self.blocks:
            x = self.run_block(block, x, cond)  # (B, T, D) (+ appended tokens, carried)
        x = self.final_layer(x[:, :T], cond.c)  # (B, T, p*p*C_out)
        return unpatchify(x, self.patch_size, self.out_channels)  # (B, C_out, H, W)


def latent_config(preset: str | None = "XL/2", **options: Any) -> LatentDiffiTConfig:
    """The config of preset ``preset`` (``S/2`` ... ``XL/8``; ``None``: the dataclass defaults)
    with ``options`` overriding any field of
    [`LatentDiffiTConfig`][diffit_toolkit.backbones.latent.LatentDiffiTConfig]."""
    if preset is None:
        base: dict[str, Any] = {}
    elif preset in LATENT_PRESETS:
        base = dict(LATENT_PRESETS[preset])
    else:
        raise unknown_name_error("latent preset", preset, list(LATENT_PRESETS))
    return config_from_options(LatentDiffiTConfig, base, options, "latent backbone")


#: DiT's defaults over DiffiT's: adaLN-Zero blocks, no relative bias, the adaLN final layer.
DIT_DEFAULTS: dict[str, Any] = dict(mechanism="adaln_zero", rel_pos_bias=False, final_layer="adaln")


def latent_diffit(preset: str | None = "XL/2", **options: Any) -> LatentDiffiT:
    """Latent DiffiT (released layout: TMSA, global relative bias, plain final layer).

    Args:
        preset: size preset in DiT naming (``S/2`` ... ``XL/8``), or ``None`` for the defaults.
        **options: any [`LatentDiffiTConfig`][diffit_toolkit.backbones.latent.LatentDiffiTConfig]
            field (``input_size``, ``mechanism``, ...).
    """
    return latent_config(preset, **options).build("latent_diffit")


def dit(preset: str | None = "XL/2", **options: Any) -> LatentDiffiT:
    """DiT (Peebles & Xie 2023): the latent backbone with adaLN-Zero blocks and DiT's final layer.

    Args:
        preset: size preset (``S/2`` ... ``XL/8``), or ``None`` for the defaults.
        **options: any [`LatentDiffiTConfig`][diffit_toolkit.backbones.latent.LatentDiffiTConfig]
            field; defaults are `DIT_DEFAULTS`.
    """
    return latent_config(preset, **{**DIT_DEFAULTS, **options}).build("dit")


# Named models as one-line factories, DiT style: ``LATENT_MODELS["DiffiT-XL/2"](input_size=64)``.
LATENT_MODELS: dict[str, Any] = {
    **{f"DiffiT-{p}": (lambda p=p, **kw: latent_diffit(p, **kw)) for p in LATENT_PRESETS},
    **{f"DiT-{p}": (lambda p=p, **kw: dit(p, **kw)) for p in LATENT_PRESETS},
}


# What `diffit-toolkit model-info` lists for these factories (any registered factory may declare them).
latent_diffit.presets, latent_diffit.model_name = tuple(LATENT_PRESETS), "DiffiT"
dit.presets, dit.model_name = tuple(LATENT_PRESETS), "DiT"

#: What the conformance kit (``diffit_toolkit.testing``) builds: two blocks of width 16 over a 4x4
#: token grid, class-conditional. Each factory also declares the zero-initialised output layer's
#: promise (a fresh model outputs 0), which the kit checks.
LATENT_TOY_OPTIONS: dict[str, Any] = dict(input_size=8, in_channels=2, hidden_size=16, depth=2, num_heads=2,
                                          num_classes=3)
latent_diffit.toy_options, latent_diffit.zero_output_at_init = LATENT_TOY_OPTIONS, True
dit.toy_options, dit.zero_output_at_init = LATENT_TOY_OPTIONS, True
