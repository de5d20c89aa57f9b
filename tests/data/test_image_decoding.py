"""Decoding real files: high-bit-depth images scaled (not clipped), links that leave or loop
back into the data ignored, oversized or elongated images skipped at the scan, a real
MemoryError while decoding skipped like any bad file, forged .npz headers and absurd labels
refused before anything is allocated."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffit_toolkit.cli import app
from diffit_toolkit.data import build_dataset
from diffit_toolkit.data.transforms import to_8bit


def pixels(x: torch.Tensor) -> np.ndarray:
    return ((x + 1) * 127.5).round().to(torch.uint8).numpy()


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    # protection: transforms.to_8bit (PIL's convert('L') clips I;16 to 255)
    values = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535 in steps of 257
    (tmp_path / "a").mkdir()
    Image.fromarray(values).save(tmp_path / "a" / "g.png")
    assert Image.open(tmp_path / "a" / "g.png").mode.startswith("I")
    x, _ = build_dataset("image_folder", path=str(tmp_path), resolution=16, channels=1)[0]
    assert np.array_equal(pixels(x)[0], np.arange(256).reshape(16, 16))
    rgb, _ = build_dataset("image_folder", path=str(tmp_path), resolution=16, channels=3)[0]
    assert np.array_equal(pixels(rgb)[1], np.arange(256).reshape(16, 16))


def test_32_bit_integer_images_are_scaled_over_their_range():
    sixteen = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))  # mode I holding 16-bit data
    assert sixteen.mode == "I" and np.asarray(to_8bit(sixteen)).tolist() == [[0, 255]]
    full = Image.fromarray(np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32))
    assert np.asarray(to_8bit(full)).tolist() == [[0, 128, 255]]
    assert to_8bit(Image.new("RGB", (2, 2))).mode == "RGB"  # 8-bit modes untouched


def test_links_that_leave_or_loop_back_into_the_data_are_ignored(tmp_path, png):
    # protection: list_images walks without following linked folders; linked class folders and
    # linked files outside the root are not images of the data set
    root = tmp_path / "data"
    png(root / "cats" / "c0.png", seed=0)
    png(root / "dogs" / "d0.png", seed=1)
    png(tmp_path / "elsewhere" / "secret.png", seed=2)
    os.symlink(root, root / "loop")  # a link to the data root inside it
    os.symlink(root, root / "cats" / "again")  # a loop inside a class folder
    os.symlink(tmp_path / "elsewhere", root / "outside")  # a class folder elsewhere
    os.symlink(tmp_path / "elsewhere" / "secret.png", root / "dogs" / "leak.png")  # a file elsewhere
    os.symlink(root / "cats" / "c0.png", root / "dogs" / "alias.png")  # a file inside the root: kept
    data = build_dataset("image_folder", path=str(root), resolution=8)
    assert data.class_names == ["cats", "dogs"]
    assert sorted(p.name for p, _ in data.samples) == ["alias.png", "c0.png", "d0.png"]
    flat = build_dataset("image_folder", path=str(root), resolution=8, conditional=False)
    assert sorted(p.name for p, _ in flat.samples) == ["alias.png", "c0.png", "d0.png"]


def test_huge_and_elongated_images_are_skipped_at_the_scan(tmp_path, png):
    # protection: check_image_size in verify_image (header only; nothing decoded)
    png(tmp_path / "a" / "ok.png", seed=0)
    Image.new("L", (4_000_000, 1)).save(tmp_path / "a" / "strip.png")  # ~4 KB on disk
    Image.new("1", (9000, 9000)).save(tmp_path / "a" / "big.png")  # 81 M pixels
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        data = build_dataset("image_folder", path=str(tmp_path), resolution=8)
    assert len(data) == 1 and sorted(Path(p).name for p in data.skipped) == ["big.png", "strip.png"]


def test_an_image_that_changes_after_the_scan_is_skipped_at_load(tmp_path, png):
    png(tmp_path / "a" / "x.png", seed=0)
    png(tmp_path / "a" / "y.png", seed=1)
    data = build_dataset("image_folder", path=str(tmp_path), resolution=8)
    Image.new("L", (4_000_000, 1)).save(tmp_path / "a" / "x.png")  # swapped for a strip mid-run
    with pytest.warns(UserWarning, match="skipping unreadable image file .*x.png.*elongated"):
        x, _ = data[0]
    assert x.shape == (3, 8, 8) and data.skipped == [str(tmp_path / "a" / "x.png")]


MEMORY = """
import resource, sys, warnings
from diffit_toolkit.data import build_dataset
data = build_dataset("image_folder", path=sys.argv[1], resolution=8)
assert len(data) == 2
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 120 * 2**20, resource.RLIM_INFINITY))  # no room for 192 MB
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    x, y = data[0]  # big.png does not fit in memory: skipped, the next image is returned
print(tuple(x.shape), len(data.skipped), any("MemoryError" in str(w.message) or "memory" in str(w.message).lower() for w in caught))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc to size the address-space limit")
def test_a_real_memory_error_while_decoding_is_a_skipped_file(tmp_path, png):
    # protection: MemoryError in IMAGE_ERRORS (before: the run died mid-training)
    png(tmp_path / "a" / "small.png", seed=0)
    Image.new("RGB", (7000, 7000), "white").save(tmp_path / "a" / "big.png")  # 49 M pixels: passes the scan
    script = tmp_path / "memory.py"
    script.write_text(MEMORY)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[0] == "(3, 8, 8) 1 True", proc.stdout


def test_eval_on_a_folder_with_a_png_bomb_is_one_line(tmp_path):
    # protection: eval.inputs.load_folder catches IMAGE_ERRORS (DecompressionBombError is not an OSError)
    folder = tmp_path / "samples"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    Image.new("1", (14000, 14000)).save(folder / "bomb.png")  # 196 M pixels, ~25 KB on disk
    result = CliRunner().invoke(app, ["eval", str(folder)], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "bomb.png: unreadable image" in result.output


# -- .npz ------------------------------------------------------------------------------------


def forged_npz(path: Path, shape: tuple[int, ...], labels: np.ndarray | None = None) -> Path:
    """An .npz whose arr_0 header declares ``shape`` uint8 but which holds 64 bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("arr_0.npy", header.getvalue() + bytes(64))
        if labels is not None:
            buf = io.BytesIO()
            np.save(buf, labels)
            archive.writestr("arr_1.npy", buf.getvalue())
    return path


def test_an_npz_header_claiming_183_gib_is_refused_before_allocation(tmp_path):
    # protection: npz.read_member compares the declared size with what the file holds
    path = forged_npz(tmp_path / "forged.npz", (1_000_000, 256, 256, 3))
    with pytest.raises(ValueError, match=r"declares \(1000000, 256, 256, 3\) uint8 .* the file is damaged"):
        build_dataset("npz", path=str(path))
    result = CliRunner().invoke(app, ["eval", str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "the file is damaged" in result.output and result.output.count("\n") == 1


def test_an_npz_label_of_2_to_the_40_is_refused(tmp_path):
    # protection: npz.check_labels (before: a model with 2**40 class embeddings)
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "labels.npz", images, np.array([0, 2**40]))
    with pytest.raises(ValueError, match="labels must be below 1000000, found 1099511627776"):
        build_dataset("npz", path=str(tmp_path / "labels.npz"))
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "labels.npz")], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "labels must be below" in result.output


def deflated_zeros_npz(path: Path, shape: tuple[int, ...]) -> Path:
    """A real, valid compressed .npz (as np.savez_compressed writes) whose arr_0 is ``shape`` uint8
    zeros: streamed through deflate, so it is a few MiB on disk however large ``shape`` is."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": shape})
            chunk, left = bytes(1 << 22), int(np.prod(shape))
            while left:
                member.write(chunk[: min(len(chunk), left)])
                left -= min(len(chunk), left)
    return path


def test_a_compressed_npz_inflating_to_1_5_gib_is_refused_before_inflating(tmp_path):
    # protection: npz.read_member bounds a deflated array's size by its compressed size (before:
    # 6.5 MiB on disk took 3.6 GB of memory and 18 s to load as a dataset)
    import resource

    path = deflated_zeros_npz(tmp_path / "bomb.npz", (8000, 256, 256, 3))
    assert path.stat().st_size < 16 * 2**20
    with np.load(path) as archive:  # a valid file: numpy reads its header as we do
        assert archive.zip.getinfo("arr_0.npy").file_size > 1.5e9
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    expected = r"array arr_0 declares \(8000, 256, 256, 3\) uint8 \(1\.5 GiB\) from .* MiB of compressed data"
    with pytest.raises(ValueError, match=expected + r".*save them uncompressed \(np\.savez\)"):
        build_dataset("npz", path=str(path))
    from diffit_toolkit.eval.inputs import InputError, load_npz

    with pytest.raises(InputError, match=expected):
        load_npz(path)
    result = CliRunner().invoke(app, ["eval", str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "of compressed data" in result.output and "np.savez" in result.output
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # KiB: nothing was inflated


def test_compressed_npz_of_real_images_still_loads(tmp_path):
    """The bound leaves real compressed files alone: the shapes testbed's images (about 3:1)."""
    from diffit_toolkit.data.shapes import make_shapes

    images, labels = make_shapes("train", num=64)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez_compressed(tmp_path / "shapes.npz", pixels, labels.numpy())
    dataset = build_dataset("npz", path=str(tmp_path / "shapes.npz"))
    assert len(dataset) == 64 and dataset.num_classes == int(labels.max()) + 1
