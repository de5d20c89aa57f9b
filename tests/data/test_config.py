"""``DataConfig`` / ``build_dataset``: option checking with one-line errors."""

from __future__ import annotations

import dataclasses

import pytest

from diffit_toolkit.data import DataConfig, build_dataset


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "imagenet"}, "unknown data kind 'imagenet'"),
        ({"kind": "image_folder"}, "kind='image_folder' needs path"),
        ({"kind": "image_folder", "path": "/no/such/folder", "resolution": 8}, "data path '/no/such/folder' does not exist"),
        ({"kind": "digits", "path": "."}, "kind='digits' takes no path"),
        ({"kind": "image_folder", "path": "."}, "needs resolution"),
        ({"kind": "digits", "channels": 2}, "channels must be 1 or 3"),
        ({"kind": "digits", "on_bad_file": "ignore"}, "on_bad_file must be one of skip, stop"),
        ({"kind": "npz", "path": ".", "split": "test"}, "split applies to kind='digits' or kind='digits_canvas' or kind='shapes_canvas' only"),
        ({"kind": "digits", "resolution": 0}, "resolution must be an image side from 1 to 4096 pixels, got 0"),
            ({"kind": "digits", "resolution": 100000}, "resolution must be an image side from 1 to 4096 pixels, got 100000"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message) as info:
        DataConfig(**options).build()
    assert "\n" not in str(info.value)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown data option\(s\) resoltion \(valid: path, resolution"):
        build_dataset("digits", resoltion=16)


def test_every_field_has_a_default_and_a_docstring_line():
    doc = DataConfig.__doc__
    for field in dataclasses.fields(DataConfig):
        assert field.default is not dataclasses.MISSING, field.name
        assert f"        {field.name}: " in doc, field.name
    assert DataConfig(**{"kind": "digits", "split": "test"}).build().split == "test"
