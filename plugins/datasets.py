"""Built-in dataset kinds: the embedded digits and shapes (plain and on a canvas), image folders, ``.npz`` arrays, cached latents."""

from __future__ import annotations

from pathlib import Path

from diffit_toolkit.data import DatasetKind, DigitsDataset, ImageFolderDataset, LatentDataset, NpzDataset
from diffit_toolkit.data.canvas import CANVAS_SPLITS, DigitsCanvasDataset
from diffit_toolkit.data.digits import DIGITS_SPLITS
from diffit_toolkit.data.shapes import ShapesDataset
from diffit_toolkit.data.shapes_canvas import SHAPES_CANVAS_SPLITS, ShapesCanvasDataset
from diffit_toolkit.eval.canvas import JUDGE_FILE as CANVAS_JUDGE_FILE
from diffit_toolkit.eval.shapes_canvas import JUDGE_FILE as SHAPES_CANVAS_JUDGE_FILE
from diffit_toolkit.hookspecs import hookimpl


class Digits(DatasetKind):
    """scikit-learn's 8x8 handwritten digits, embedded (fixed stratified train/test split)."""

    splits = DIGITS_SPLITS
    judge_file = "classifier.pt"

    @classmethod
    def judge(cls, path: Path):
        from diffit_toolkit.eval.digits import DigitsMetric
        from diffit_toolkit.eval.sweep import digits_judge

        return digits_judge(path), DigitsMetric(seed=0, cache=path).test_accuracy()

    @classmethod
    def build(cls, config):
        return DigitsDataset(split=config.split or "train", interpolation=config.interpolation, **config.common_options())


class Shapes(DatasetKind):
    """Procedurally generated 32x32 RGB shapes in 10 balanced classes, embedded (deterministic)."""

    judge_file = "shapes_classifier.pt"

    @classmethod
    def judge(cls, path: Path):
        from diffit_toolkit.eval.shapes import ShapesMetric
        from diffit_toolkit.eval.sweep import shapes_judge

        return shapes_judge(path), ShapesMetric(cache=path).test_accuracy()

    @classmethod
    def build(cls, config):
        return ShapesDataset(**config.common_options())


class DigitsCanvas(DatasetKind):
    """Real 8x8 digits at random offsets on a 16x16 canvas, embedded (deterministic; the benchmark testbed)."""

    splits = CANVAS_SPLITS
    judge_file = CANVAS_JUDGE_FILE

    @classmethod
    def judge(cls, path: Path):
        from diffit_toolkit.eval.canvas import CanvasMetric
        from diffit_toolkit.eval.sweep import canvas_judge

        return canvas_judge(path), CanvasMetric(cache=path).test_accuracy()

    @classmethod
    def build(cls, config):
        return DigitsCanvasDataset(split=config.split or "train", **config.common_options())


class ShapesCanvas(DatasetKind):
    """White shapes of random size, place and rotation on a black 16x16 canvas, embedded
    (deterministic; the benchmark testbed)."""

    splits = SHAPES_CANVAS_SPLITS
    judge_file = SHAPES_CANVAS_JUDGE_FILE

    @classmethod
    def check(cls, config):
        if config.resolution not in (None, 16):
            raise ValueError(f"kind='shapes_canvas' is drawn at 16x16 only, got resolution={config.resolution}; "
                             "leave resolution out")

    @classmethod
    def judge(cls, path: Path):
        from diffit_toolkit.eval.shapes_canvas import ShapesCanvasMetric
        from diffit_toolkit.eval.sweep import shapes_canvas_judge

        return shapes_canvas_judge(path), ShapesCanvasMetric(cache=path).test_accuracy()

    @classmethod
    def build(cls, config):
        return ShapesCanvasDataset(split=config.split or "train", **config.common_options())


class ImageFolder(DatasetKind):
    """A folder of images, one subfolder per class (or flat and unconditional)."""

    path = "a folder of images"

    @classmethod
    def check(cls, config):
        if config.resolution is None:
            raise ValueError("kind='image_folder' needs resolution (images are center-cropped and resized to it), e.g. resolution=64")

    @classmethod
    def build(cls, config):
        return ImageFolderDataset(config.local_path(), on_bad_file=config.on_bad_file, verify=config.verify,
                                  **config.common_options())


class Npz(DatasetKind):
    """Images in an ``.npz`` file (uint8 NHWC under ``arr_0``, labels under ``arr_1``)."""

    path = "an .npz file"

    @classmethod
    def build(cls, config):
        return NpzDataset(config.local_path(), **config.common_options())


class Latents(DatasetKind):
    """A latent cache folder made by ``diffit-toolkit cache-latents`` (scaled VAE latents)."""

    path = "a latent cache folder made by `diffit-toolkit cache-latents`"
    image_channels = False

    @classmethod
    def build(cls, config):
        return LatentDataset(config.local_path(), **config.common_options())


@hookimpl
def diffit_register(registrar):
    registrar.add("dataset", "digits", Digits)
    registrar.add("dataset", "shapes", Shapes)
    registrar.add("dataset", "digits_canvas", DigitsCanvas)
    registrar.add("dataset", "shapes_canvas", ShapesCanvas)
    registrar.add("dataset", "image_folder", ImageFolder)
    registrar.add("dataset", "npz", Npz)
    registrar.add("dataset", "latents", Latents)
