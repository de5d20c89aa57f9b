"""Image preprocessing shared by the datasets and the latent cache: crop, scale to [-1, 1], channels."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

#: The 8-bit pixel range maps onto [-1, 1] as ``x / PIXEL_HALF_RANGE - 1``.
PIXEL_HALF_RANGE = 127.5

#: PIL modes for the supported channel counts.
PIL_MODES: dict[int, str] = {1: "L", 3: "RGB"}


def center_crop_arr(image: Image.Image, resolution: int) -> Image.Image:
    """ADM's center crop (as in guided-diffusion and DiT): box-downsample, bicubic-resize, crop.

    The short side is halved with a box filter while it is at least twice ``resolution``, resized
    bicubically so that it equals ``resolution``, and the centre ``resolution`` square is kept.

    Args:
        image: A PIL image of any size.
        resolution: The output side.

    Returns:
        A ``resolution x resolution`` PIL image in the input's mode.
    """
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.Resampling.BICUBIC)
    left, top = (image.size[0] - resolution) // 2, (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_model_range(pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 pixels (..., C, H, W) in [0, 255] -> float32 in [-1, 1]."""
    return torch.as_tensor(pixels).to(torch.float32) / PIXEL_HALF_RANGE - 1.0


def to_8bit(image: Image.Image) -> Image.Image:
    """A high-bit-depth integer image scaled to 8-bit ``L`` (PIL's own ``convert`` clips them:
    a 16-bit PNG would become almost all white); other modes are returned as they are.

    ``I;16*`` modes are 16-bit; ``I`` (32-bit signed) holds 16-bit data when every value is in
    0..65535 (16-bit PNGs open so in some PIL versions), else it is scaled over the full 32-bit
    range.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        if image.mode.startswith("I;16") or (values.size and values.min() >= 0 and values.max() <= 65535):
            scaled = values / 65535.0 * 255.0
        else:
            scaled = (values + 2.0**31) / (2.0**32 - 1) * 255.0
        return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), mode="L")
    return image


def pil_to_model(image: Image.Image, resolution: int, channels: int = 3) -> torch.Tensor:
    """Convert (RGB or L), ADM-center-crop and scale a PIL image.

    Args:
        image: Any-mode PIL image (palette, CMYK, RGBA ... are converted by PIL; 16- and 32-bit
            integer images are scaled to 8 bits by [`to_8bit`][diffit_toolkit.data.transforms.to_8bit]).
        resolution: Output side.
        channels: 3 (RGB) or 1 (L).

    Returns:
        float32 tensor (channels, resolution, resolution) in [-1, 1].
    """
    image = center_crop_arr(to_8bit(image).convert(PIL_MODES[channels]), resolution)
    import torchvision.transforms.v2.functional as TF  # torchvision imports slowly: on first use

    return to_model_range(TF.pil_to_tensor(image))  # (C, H, W)


def match_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Replicate grayscale to RGB or reduce RGB to luma (torchvision weights); ``None`` keeps ``x``.

    Args:
        x: Images (..., C, H, W) with C in {1, 3}.
        channels: Wanted channel count (1 or 3) or ``None``.
    """
    if channels is None or x.shape[-3] == channels:
        return x
    import torchvision.transforms.v2.functional as TF

    return TF.grayscale_to_rgb(x) if channels == 3 else TF.rgb_to_grayscale(x, num_output_channels=1)


def resize_images(x: torch.Tensor, resolution: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize float images (..., C, H, W) to ``resolution`` (no-op at the same size).

    Args:
        x: Images (..., C, H, W).
        resolution: Output side.
        interpolation: A ``torchvision.transforms.InterpolationMode`` name (``bilinear``, ``nearest``, ``bicubic``).
    """
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    import torchvision.transforms.v2.functional as TF

    mode = TF.InterpolationMode(interpolation.lower())
    return TF.resize(x, [resolution, resolution], interpolation=mode, antialias=True)

