"""Image folders: class mapping, flat mode, crop/resize, unreadable files skipped and counted or stopping."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from diffit_toolkit.data import BadImageError, ImageFolderDataset, build_dataset


def test_class_subfolders_map_to_sorted_labels(class_folder):
    data = build_dataset("image_folder", path=str(class_folder), resolution=8)
    assert data.class_names == ["cats", "dogs"] and data.num_classes == 2 and len(data) == 5
    assert [y for _, y in data.samples] == [0, 0, 0, 1, 1]
    assert data.samples[-1][0].name == "d1.png"  # nested files belong to their class folder
    x, y = data[3]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y.item() == 1 and y.dtype == torch.int64
    assert -1 <= x.min() and x.max() <= 1 and data.skipped == []
    assert [int(y) for _, y in data] == [0, 0, 0, 1, 1]  # a plain loop ends after the last image
    assert torch.equal(data[-1][0], data[4][0])


def test_flat_mode_is_recursive_and_unconditional(class_folder):
    data = build_dataset("image_folder", path=str(class_folder), resolution=16, conditional=False, channels=1)
    assert len(data) == 5 and data.num_classes == 0 and data.class_names is None
    x, y = data[0]
    assert x.shape == (1, 16, 16) and y.item() == 0


def test_pixels_survive_at_native_size_and_crop_keeps_the_centre(tmp_path, png):
    pixels = png(tmp_path / "a" / "x.png", seed=3)
    x, _ = build_dataset("image_folder", path=str(tmp_path), resolution=16)[0]
    assert torch.equal(((x + 1) * 127.5).round().to(torch.uint8), torch.from_numpy(pixels).permute(2, 0, 1))
    wide = Image.new("RGB", (48, 16), "black")
    wide.paste(Image.new("RGB", (16, 16), "white"), (16, 0))
    wide.save(tmp_path / "a" / "x.png")
    x, _ = build_dataset("image_folder", path=str(tmp_path), resolution=16)[0]
    assert torch.all(x == 1)  # only the white centre square is kept


def test_other_modes_are_converted(tmp_path, png):
    png(tmp_path / "k" / "gray.png", seed=1, mode="L")
    png(tmp_path / "k" / "palette.png", seed=2, mode="P")
    Image.new("CMYK", (16, 16)).save(tmp_path / "k" / "cmyk.jpg")
    data = build_dataset("image_folder", path=str(tmp_path), resolution=16)
    assert len(data) == 3 and all(data[i][0].shape == (3, 16, 16) for i in range(3))


def _corrupt(folder):
    """A garbage 'PNG' and a truncated PNG in class 'cats'."""
    (folder / "cats" / "garbage.png").write_bytes(b"definitely not a png")
    good = (folder / "cats" / "c0.png").read_bytes()
    (folder / "cats" / "truncated.png").write_bytes(good[: len(good) // 2])


def test_corrupted_and_truncated_files_are_skipped_counted_and_named(class_folder):
    _corrupt(class_folder)
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\).*garbage\.png.*truncated\.png"):
        data = build_dataset("image_folder", path=str(class_folder), resolution=8)
    assert len(data) == 5 and sorted(p.rsplit("/", 1)[-1] for p in data.skipped) == ["garbage.png", "truncated.png"]


def test_on_bad_file_stop_names_the_file(class_folder):
    _corrupt(class_folder)
    with pytest.raises(BadImageError, match=r"unreadable image file '.*garbage\.png'.*on_bad_file='skip'") as info:
        build_dataset("image_folder", path=str(class_folder), resolution=8, on_bad_file="stop")
    assert "\n" not in str(info.value)


def test_unverified_bad_file_is_skipped_when_loaded(class_folder):
    _corrupt(class_folder)
    data = ImageFolderDataset(class_folder, resolution=8, verify=False)
    assert len(data) == 7 and data.skipped == []
    garbage = [i for i, (p, _) in enumerate(data.samples) if p.name == "garbage.png"][0]
    with pytest.warns(UserWarning) as record:
        x, y = data[garbage]  # garbage.png, then truncated.png fail: the next readable file is returned
    assert [str(w.message).split("'")[1].rsplit("/", 1)[-1] for w in record] == ["garbage.png", "truncated.png"]
    assert x.shape == (3, 8, 8) and [p.rsplit("/", 1)[-1] for p in data.skipped] == ["garbage.png", "truncated.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data[garbage]  # known bad: skipped quietly from now on
    stopping = ImageFolderDataset(class_folder, resolution=8, verify=False, on_bad_file="stop")
    with pytest.raises(BadImageError, match="garbage.png"):
        stopping[garbage]


def test_folder_without_classes_or_images(tmp_path, png):
    png(tmp_path / "top.png", seed=0)
    with pytest.raises(ValueError, match="no class subfolders with images .*conditional=False"):
        build_dataset("image_folder", path=str(tmp_path), resolution=8)
    (tmp_path / "top.png").unlink()
    with pytest.raises(ValueError, match="no readable images"):
        build_dataset("image_folder", path=str(tmp_path), resolution=8, conditional=False)
