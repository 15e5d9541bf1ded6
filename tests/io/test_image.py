"""Whole-image decoding: every Pillow mode, EXIF orientation, 16-bit TIFF, bombs, broken files."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from softcli.errors import InputError
from softcli.io.image import array_to_rgb, load_image


def _check(arr, shape):
    assert arr.dtype == np.float32 and arr.shape == shape
    assert arr.min() >= 0.0 and arr.max() <= 1.0


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F", "HSV"])
def test_every_pillow_mode(tmp_path, mode):
    base = Image.new("RGB", (40, 30), (200, 100, 50))
    img = base.convert(mode) if mode not in ("I;16", "F", "I", "HSV") else None
    if mode == "I;16":
        img = Image.fromarray(np.full((30, 40), 65535 // 2, np.uint16))
    elif mode == "I":
        img = Image.fromarray(np.full((30, 40), 1000, np.int32))
    elif mode == "F":
        img = Image.fromarray(np.full((30, 40), 0.25, np.float32))
    elif mode == "HSV":
        img = base.convert("HSV")
    suffix = {"CMYK": ".jpg", "YCbCr": ".jpg", "F": ".tif", "I": ".tif", "HSV": ".tif", "PA": ".webp"}.get(mode, ".png")
    path = tmp_path / f"img{suffix}"
    if mode == "HSV":  # Pillow cannot save HSV; decode from the in-memory image path instead
        from softcli.io.image import pil_to_rgb

        _check(pil_to_rgb(img), (30, 40, 3))
        return
    img.save(path)
    _check(load_image(path), (30, 40, 3))


def test_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    Image.fromarray(arr, "RGBA").save(tmp_path / "t.png")
    assert np.allclose(load_image(tmp_path / "t.png"), 1.0)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").shape == (60, 20, 3)


def test_16bit_rgb_and_planar_tiff(tmp_path):
    data = np.zeros((20, 30, 3), np.uint16)
    data[..., 0] = 65535
    tifffile.imwrite(tmp_path / "rgb16.tif", data, photometric="rgb")
    out = load_image(tmp_path / "rgb16.tif")
    _check(out, (20, 30, 3))
    assert np.allclose(out[..., 0], 1.0) and np.allclose(out[..., 1:], 0.0)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(data, -1, 0), photometric="rgb", planarconfig="separate")
    assert np.allclose(load_image(tmp_path / "planar.tif"), out)


def test_decompression_bomb_guard(tmp_path):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match="above the limit of 10,000"):
        load_image(tmp_path / "big.png", max_pixels=10_000)
    tifffile.imwrite(tmp_path / "big.tif", np.zeros((300, 300), np.uint8))
    with pytest.raises(InputError, match="decompression-bomb guard"):
        load_image(tmp_path / "big.tif", max_pixels=10_000)


def test_broken_inputs(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        load_image(tmp_path / "empty.jpg")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputError, match="not an image"):
        load_image(tmp_path / "text.png")
    Image.new("RGB", (200, 200), (1, 2, 3)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_array_to_rgb_layouts():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert array_to_rgb(gray).shape == (3, 4, 3)
    planar = np.zeros((3, 5, 6), np.uint8)
    assert array_to_rgb(planar).shape == (5, 6, 3)
    floats = np.array([[-1.0, 3.0]], np.float32)
    assert np.allclose(array_to_rgb(floats)[0, :, 0], [0.0, 1.0])
