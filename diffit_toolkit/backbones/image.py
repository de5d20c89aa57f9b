"""Image-space DiffiT: the U-shaped encoder-decoder of DiffiT ResBlocks (paper Sec. 3.2).

There is no released code; the layout follows the paper (Fig. 4, Tables S.2/S.3, Sec. I):

```text
x (B, 3, H, W) -> tokenizer Conv3x3 -> C_1 channels
encoder, stage s = 1..S at resolution H / 2^(s-1):  L_s DiffiT ResBlocks, then (s < S) a
    downsampler to stage s+1 (the last stage is the bottleneck)
decoder, stage s = S-1..1:  upsampler from stage s+1, merge with the encoder skip of the same
    resolution, L_s DiffiT ResBlocks
head: GroupNorm -> SiLU -> Conv3x3 -> (B, C_out, H, W)
```

DiffiT ResBlock (eq. 9-10): ``h = Conv3x3(SiLU(GN(x)))``, ``x = DiffiTBlock(h, c) + x``, the
block attending inside ``w x w`` windows with a relative position bias (window TMSA).

Choices the paper leaves open, made here and recorded in the config:

* skip merge ``skip="concat"`` (default): concatenate the upsampled features with the encoder
  skip and match channels with a Conv1x1 (the paper: "a convolutional layer is employed to match
  the number of feature maps" at the start of each path); ``"add"`` sums them instead.
* ``resample="conv"`` (default): Conv3x3 stride 2 down, nearest x2 + Conv3x3 up;
  ``"bilinear"``: bilinear resize (+ Conv1x1 where channels change); the paper reports similar
  results for both.
* heads: ``channels / head_dim`` (head dim 64); GroupNorm with 32 groups.
* init: convs xavier-uniform with zero bias (like the transformer's linears); the head's conv is
  zero-initialised so a fresh model outputs 0 (as DiT's and EDM's output layers).
* conditioning: ``c = t_emb (+ y_emb)`` of width ``time_dim`` (512, paper Table 3) is computed
  once and given to every block (with its parts, for mechanisms that read them). A module a
  mechanism shares across blocks is built once per stage (``shared``), since widths differ
  between stages; tokens a mechanism appends to a block's sequence are dropped after that block
  (the ResBlock's convolution acts on the grid alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffit_toolkit.backbones.conditioning import DEFAULT_CLASS_DROPOUT, ConditionedBackbone, check_conditioning_options
from diffit_toolkit.backbones.config import check_positive, config_dict, config_from_options, unknown_name_error
from diffit_toolkit.backbones.pretrained import PretrainedMixin
from diffit_toolkit.nn.block import BlockSpec, Conditioning, DiffiTBlock
from diffit_toolkit.nn.embeddings import DEFAULT_FREQUENCY_DIM

#: Resolution factor between consecutive stages (the paper halves the resolution).
STAGE_FACTOR = 2
RESAMPLE_MODES = ("conv", "bilinear")
SKIP_MODES = ("concat", "add")

#: Paper presets. Channels grow only from stage 1 to stage 2; token width 128 -> 256.
IMAGE_PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": dict(input_size=32, channels=(128, 256, 256), num_blocks=(2, 2, 2), window=4),
    "ffhq64": dict(input_size=64, channels=(128, 256, 256, 256), num_blocks=(1, 2, 2, 2), window=8),
}


@dataclass
class ImageDiffiTConfig:
    """Everything that defines an image-space DiffiT; recorded as ``model.config``.

    Args:
        input_size: image side in pixels.
        in_channels: image channels.
        channels: width of each stage (one entry per resolution).
        num_blocks: DiffiT ResBlocks per stage (encoder; the decoder mirrors it).
        window: attention window side; clipped to a stage's grid when larger (global there),
            and must divide every stage's grid.
        head_dim: channels per attention head.
        time_dim: width of the time (and class) token ``c``.
        mlp_ratio: MLP hidden width / stage width.
        num_classes: class labels (0: unconditional, the paper's setting).
        class_dropout_prob: label dropout to the null class during training (0.1, DiT's value:
            `DEFAULT_CLASS_DROPOUT`).
        learn_sigma: output ``2C`` channels.
        mechanism: registered conditioning mechanism (default ``window_tmsa``).
        mechanism_options: keyword options of the mechanism.
        rel_pos_bias: learned relative position bias in every block.
        resample: ``"conv"`` or ``"bilinear"`` down/upsampling.
        skip: ``"concat"`` (+ Conv1x1) or ``"add"`` skip merge.
        norm_groups: GroupNorm groups in the ResBlocks and the head.
        attention_backend: registered attention backend or ``auto``.
        time_features: registered time-embedding feature map.
        frequency_dim: width of the time features.
        time_feature_options: options of the feature map.
        grad_checkpointing: recompute each ResBlock in the backward pass.
    """

    input_size: int = 32
    in_channels: int = 3
    channels: tuple[int, ...] = (128, 256, 256)
    num_blocks: tuple[int, ...] = (2, 2, 2)
    window: int = 4
    head_dim: int = 64
    time_dim: int = 512
    mlp_ratio: float = 4.0
    num_classes: int = 0
    class_dropout_prob: float = DEFAULT_CLASS_DROPOUT
    learn_sigma: bool = False
    mechanism: str = "window_tmsa"
    mechanism_options: dict[str, Any] = field(default_factory=dict)
    rel_pos_bias: bool = True
    resample: str = "conv"
    skip: str = "concat"
    norm_groups: int = 32
    attention_backend: str = "auto"
    time_features: str = "positional"
    frequency_dim: int = DEFAULT_FREQUENCY_DIM
    time_feature_options: dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.num_blocks = tuple(int(n) for n in self.num_blocks)
        self.mechanism_options = dict(self.mechanism_options)
        self.time_feature_options = dict(self.time_feature_options)
        check_positive("image backbone", input_size=self.input_size, in_channels=self.in_channels,
                       window=self.window, head_dim=self.head_dim, time_dim=self.time_dim,
                       norm_groups=self.norm_groups, frequency_dim=self.frequency_dim)
        if not self.channels or len(self.channels) != len(self.num_blocks):
            raise ValueError(
                f"channels {list(self.channels)} and num_blocks {list(self.num_blocks)} need one entry per stage"
            )
        if min(self.num_blocks) < 1 or min(self.channels) < 1:
            raise ValueError("every stage needs at least one block and one channel")
        check_conditioning_options(self.num_classes, self.class_dropout_prob)
        if self.resample not in RESAMPLE_MODES:
            raise unknown_name_error("resample mode", self.resample, list(RESAMPLE_MODES))
        if self.skip not in SKIP_MODES:
            raise unknown_name_error("skip mode", self.skip, list(SKIP_MODES))
        factor = STAGE_FACTOR ** (len(self.channels) - 1)
        if self.input_size % factor:
            raise ValueError(
                f"image size {self.input_size} is not divisible by {factor} ({len(self.channels)} stages "
                f"halving the resolution): choose fewer stages or another size"
            )
        for c in self.channels:
            if c % self.head_dim or c % self.norm_groups:
                raise ValueError(
                    f"stage width {c} must be divisible by head_dim {self.head_dim} and norm_groups {self.norm_groups}"
                )
        for s in range(len(self.channels)):
            grid, w = self.stage_grid(s), self.stage_window(s)
            if grid % w:
                raise ValueError(
                    f"window {self.window} does not divide the {grid}x{grid} token grid of stage {s + 1}: "
                    f"choose a window that divides every stage's grid"
                )

    @property
    def num_stages(self) -> int:
        return len(self.channels)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def stage_grid(self, stage: int) -> int:
        """Token grid side of ``stage`` (0-based)."""
        return self.input_size // STAGE_FACTOR**stage

    def stage_window(self, stage: int) -> int:
        """Attention window of ``stage``: the configured window, at most the stage's grid."""
        return min(self.window, self.stage_grid(stage))

    def block_spec(self, stage: int) -> BlockSpec:
        """The shape of the DiffiT blocks of ``stage``."""
        dim, grid = self.channels[stage], self.stage_grid(stage)
        return BlockSpec(
            dim=dim,
            num_heads=dim // self.head_dim,
            cond_dim=self.time_dim,
            grid=(grid, grid),
            window=self.stage_window(stage),
            rel_pos_bias=self.rel_pos_bias,
            mlp_ratio=self.mlp_ratio,
            attention_backend=self.attention_backend,
        )

    def build(self, backbone: str = "image_diffit") -> ImageDiffiT:
        """The model (``backbone`` is the registry name recorded in ``model.config``)."""
        return ImageDiffiT(self, backbone=backbone)


class DiffiTResBlock(nn.Module):
    """DiffiT ResBlock (eq. 9-10): ``h = Conv3x3(SiLU(GN(x)))``; ``x = DiffiTBlock(h, c) + x``."""

    def __init__(self, spec: BlockSpec, mechanism: str, mechanism_options: dict[str, Any], norm_groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, spec.dim, eps=1e-6)
        self.act = nn.SiLU()
        self.conv = nn.Conv2d(spec.dim, spec.dim, kernel_size=3, padding=1)
        self.block = DiffiTBlock(spec, mechanism, mechanism_options)

    def forward(self, x: Tensor, c: Tensor | Conditioning) -> Tensor:
        B, C, H, W = x.shape
        h = self.conv(self.act(self.norm(x)))  # (B, C, H, W), eq. 9
        tokens = h.flatten(2).transpose(1, 2)  # (B, H*W, C), row-major grid order
        tokens = self.block(tokens, c)[:, : H * W]  # (B, H*W, C), window TMSA block (appended tokens dropped)
        return x + tokens.transpose(1, 2).reshape(B, C, H, W)  # eq. 10


class Downsample(nn.Module):
    """Halve the resolution: Conv3x3 stride 2 (``conv``) or bilinear resize + Conv1x1 (``bilinear``)."""

    def __init__(self, in_channels: int, out_channels: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode == "conv":
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=STAGE_FACTOR, padding=1)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "bilinear":
            x = F.interpolate(x, scale_factor=1 / STAGE_FACTOR, mode="bilinear", align_corners=False)
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest x2 + Conv3x3 (``conv``) or bilinear x2 + Conv1x1 (``bilinear``)."""

    def __init__(self, in_channels: int, out_channels: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode == "conv":
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        interp = "nearest" if self.mode == "conv" else "bilinear"
        kwargs = {} if interp == "nearest" else {"align_corners": False}
        return self.conv(F.interpolate(x, scale_factor=STAGE_FACTOR, mode=interp, **kwargs))


class EncoderStage(nn.Module):
    """``L_s`` ResBlocks at one resolution, then (except at the bottleneck) a downsampler."""

    def __init__(self, config: ImageDiffiTConfig, stage: int) -> None:
        super().__init__()
        spec = config.block_spec(stage)
        self.shared = ConditionedBackbone.build_shared(spec, config.mechanism, config.mechanism_options)
        self.blocks = nn.ModuleList(
            [DiffiTResBlock(spec, config.mechanism, config.mechanism_options, config.norm_groups)
             for _ in range(config.num_blocks[stage])]
        )
        last = stage == config.num_stages - 1
        self.down = None if last else Downsample(config.channels[stage], config.channels[stage + 1], config.resample)


class DecoderStage(nn.Module):
    """An upsampler from the stage below, the skip merge, then ``L_s`` ResBlocks."""

    def __init__(self, config: ImageDiffiTConfig, stage: int) -> None:
        super().__init__()
        C = config.channels[stage]
        self.up = Upsample(config.channels[stage + 1], C, config.resample)
        self.merge = nn.Conv2d(2 * C, C, 1) if config.skip == "concat" else None
        spec = config.block_spec(stage)
        self.shared = ConditionedBackbone.build_shared(spec, config.mechanism, config.mechanism_options)
        self.blocks = nn.ModuleList(
            [DiffiTResBlock(spec, config.mechanism, config.mechanism_options, config.norm_groups)
             for _ in range(config.num_blocks[stage])]
        )

    def join(self, x: Tensor, skip: Tensor) -> Tensor:
        """Upsample ``x`` and merge the encoder's ``skip`` of the same resolution -> (B, C, H, W)."""
        x = self.up(x)
        return self.merge(torch.cat([x, skip], dim=1)) if self.merge is not None else x + skip


class ImageDiffiT(PretrainedMixin, ConditionedBackbone):
    """U-shaped image-space DiffiT; any registered mechanism conditions its blocks.

    Call as ``model(x, t, y)``: ``x`` (B, C, H, W) images, ``t`` (B,) noise levels (e.g. EDM's
    ``c_noise``) or timesteps, ``y`` (B,) labels or ``None`` -> (B, C_out, H, W).

    Attributes:
        config: the constructor config as a JSON-ready dict (registry name under ``backbone``).
        num_classes: class labels (0: unconditional).
        null_class: label index of the null class, ``None`` if unconditional.
    """

    def __init__(self, config: ImageDiffiTConfig, backbone: str = "image_diffit") -> None:
        super().__init__()
        self.cfg = config
        self.config: dict[str, Any] = {"backbone": backbone, **config_dict(config)}
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.input_size = config.input_size
        self.learn_sigma = config.learn_sigma
        self.grad_checkpointing = config.grad_checkpointing
        C0 = config.channels[0]

        self.build_conditioning(  # t_embedder, y_embedder: c of width time_dim
            config.time_dim, num_classes=config.num_classes, class_dropout_prob=config.class_dropout_prob,
            time_features=config.time_features, frequency_dim=config.frequency_dim,
            time_feature_options=config.time_feature_options,
        )
        self.tokenizer = nn.Conv2d(config.in_channels, C0, kernel_size=3, padding=1)
        self.encoder = nn.ModuleList([EncoderStage(config, s) for s in range(config.num_stages)])
        # Decoder from the resolution above the bottleneck up to the input resolution.
        self.decoder = nn.ModuleList([DecoderStage(config, s) for s in reversed(range(config.num_stages - 1))])
        self.head = nn.Sequential(
            nn.GroupNorm(config.norm_groups, C0, eps=1e-6),
            nn.SiLU(),
            nn.Conv2d(C0, config.out_channels, kernel_size=3, padding=1),
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Init of the layers owned here; the DiffiT blocks and mechanisms initialise themselves."""
        # Convolutions (tokenizer, ResBlock convs, resamplers, merges): xavier-uniform, zero bias.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Class table normal(0.02), as in the latent model.
        self.init_conditioning()
        # Head conv zero-initialised: a fresh model outputs 0.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def shard_units(self) -> list[nn.Module]:
        """The ResBlocks of every encoder and decoder stage (FSDP shards each on its own)."""
        return [block for stage in (*self.encoder, *self.decoder) for block in stage.blocks]

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``x`` (B, C, H, W), ``t`` (B,), ``y`` (B,) or ``None`` -> (B, C_out, H, W)."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"model built for {self.input_size}x{self.input_size} images got {x.shape[-2]}x{x.shape[-1]}: "
                f"build it with input_size={x.shape[-1]}"
            )
        cond = self.conditioning(t, y)  # c = cond.c (B, time_dim)
        h = self.tokenizer(x)  # (B, C_1, H, W)
        skips = []
        for stage in self.encoder:
            c = self.share(stage.shared, cond)
            for block in stage.blocks:
                h = self.run_block(block, h, c)
            if stage.down is not None:
                skips.append(h)  # (B, C_s, H_s, W_s)
                h = stage.down(h)  # (B, C_{s+1}, H_s / 2, W_s / 2)
        for stage in self.decoder:
            h = stage.join(h, skips.pop())  # (B, C_s, H_s, W_s)
            c = self.share(stage.shared, cond)
            for block in stage.blocks:
                h = self.run_block(block, h, c)
        return self.head(h)  # (B, C_out, H, W)


def image_config(preset: str | None = "cifar10", **options: Any) -> ImageDiffiTConfig:
    """The config of preset ``preset`` (``cifar10``, ``ffhq64``; ``None``: the dataclass
    defaults) with ``options`` overriding any field of
    [`ImageDiffiTConfig`][diffit_toolkit.backbones.image.ImageDiffiTConfig]."""
    if preset is None:
        base: dict[str, Any] = {}
    elif preset in IMAGE_PRESETS:
        base = dict(IMAGE_PRESETS[preset])
    else:
        raise unknown_name_error("image preset", preset, list(IMAGE_PRESETS))
    return config_from_options(ImageDiffiTConfig, base, options, "image backbone")


def image_diffit(preset: str | None = "cifar10", **options: Any) -> ImageDiffiT:
    """U-shaped image-space DiffiT.

    Args:
        preset: ``cifar10`` (3 stages 32/16/8, 2 blocks each, window 4) or ``ffhq64`` (4 stages,
            1/2/2/2 blocks, window 8), or ``None`` for the defaults.
        **options: any [`ImageDiffiTConfig`][diffit_toolkit.backbones.image.ImageDiffiTConfig] field
            (``mechanism``, ``num_classes``, ...).
    """
    return image_config(preset, **options).build("image_diffit")


# What `diffit-toolkit model-info` lists for this factory (any registered factory may declare them).
image_diffit.presets, image_diffit.model_name = tuple(IMAGE_PRESETS), "DiffiT"

#: What the conformance kit (``diffit_toolkit.testing``) builds: two stages (8x8 and 4x4 grids) of
#: one block each, window 2, class-conditional; and the zero-initialised head's promise (a fresh
#: model outputs 0), which the kit checks.
IMAGE_TOY_OPTIONS: dict[str, Any] = dict(input_size=8, in_channels=3, channels=(16, 32), num_blocks=(1, 1), window=2,
                                         head_dim=8, time_dim=16, norm_groups=4, num_classes=3)
image_diffit.toy_options, image_diffit.zero_output_at_init = IMAGE_TOY_OPTIONS, True
