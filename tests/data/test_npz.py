"""``.npz`` arrays: ADM layout and named keys, errors for wrong dtype, shape, resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffit_toolkit.data import build_dataset


def test_adm_layout_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 4])
    np.savez(tmp_path / "batch.npz", images, labels)  # arr_0, arr_1
    data = build_dataset("npz", path=str(tmp_path / "batch.npz"), resolution=8)
    x, y = data[5]
    assert (len(data), data.channels, data.resolution, data.num_classes) == (6, 3, 8, 5)
    assert y.item() == 4 and y.dtype == torch.int64
    back = ((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(back, images[5])


def test_named_keys_grayscale_unconditional_and_channel_conversion(tmp_path):
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    np.savez(tmp_path / "gray.npz", images=images)
    data = build_dataset("npz", path=str(tmp_path / "gray.npz"), channels=3)
    x, y = data[1]
    assert data.num_classes == 0 and y.item() == 0 and x.shape == (3, 4, 4)
    assert torch.equal(x[0], x[1])


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"arr_0": np.zeros((2, 4, 4, 3), np.float32)}, "must be uint8"),
        ({"arr_0": np.zeros((2, 4, 5, 3), np.uint8)}, "H = W"),
        ({"arr_0": np.zeros((2, 4, 4, 3), np.uint8), "arr_1": np.zeros(3, np.int64)}, "labels must be integers of shape"),
        ({"other": np.zeros((2, 4, 4, 3), np.uint8)}, "no image array"),
    ],
)
def test_bad_arrays_are_one_line_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message) as info:
        build_dataset("npz", path=str(tmp_path / "bad.npz"))
    assert "\n" not in str(info.value)


def test_resolution_mismatch_names_the_fix(tmp_path):
    np.savez(tmp_path / "b.npz", np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="holds 4x4 images but resolution=8 \\(set resolution=4"):
        build_dataset("npz", path=str(tmp_path / "b.npz"), resolution=8)
