"""Region readers: tiled, stripped, planar, pyramidal (OME SubIFDs, multi-page) TIFF/BigTIFF and Pillow files."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from softcli.errors import InputError, UsageError
from softcli.io.image import load_image
from softcli.io.readers import PillowReader, TiffReader, open_image

REGIONS = [(0, 0, 300, 200), (17, 33, 100, 77), (250, 150, 50, 50), (63, 64, 1, 1), (128, 0, 64, 200)]


def _padded_slice(full: np.ndarray, y: int, x: int, h: int, w: int) -> np.ndarray:
    H, W = full.shape[:2]
    pad = ((max(0, -y), max(0, y + h - H)), (max(0, -x), max(0, x + w - W)), (0, 0))
    p = np.pad(full, pad, mode="edge")
    y0, x0 = y + pad[0][0], x + pad[1][0]
    return p[y0:y0 + h, x0:x0 + w]


@pytest.fixture
def rgb16():
    return (np.random.default_rng(1).random((300, 200, 3)) * 65535).astype(np.uint16)


@pytest.mark.parametrize("layout", ["tiled", "strips", "planar-tiled", "planar-strips", "bigtiff-tiled"])
def test_region_reads_equal_full_decode(tmp_path, rgb16, layout):
    f = tmp_path / "img.tif"
    kw = dict(photometric="rgb", compression="zlib")
    data = rgb16
    if layout.startswith("planar"):
        data, kw["planarconfig"] = np.moveaxis(rgb16, -1, 0), "separate"
    if layout.endswith("tiled"):
        kw["tile"] = (64, 48)
    else:
        kw["rowsperstrip"] = 37
    tifffile.imwrite(f, data, bigtiff=layout.startswith("bigtiff"), **kw)
    full = rgb16.astype(np.float32) / 65535.0
    np.testing.assert_allclose(load_image(f), full, atol=1e-6)
    with open_image(f) as r:
        assert isinstance(r, TiffReader)
        assert (r.height, r.width, r.levels) == (300, 200, [(300, 200)])
        for y, x, h, w in REGIONS + [(-5, -7, 20, 20), (290, 190, 40, 40), (400, 400, 3, 3)]:
            got = r.read_region(y, x, h, w)
            assert got.dtype == np.float32 and got.shape == (h, w, 3)
            np.testing.assert_allclose(got, _padded_slice(full, y, x, h, w), atol=1e-6)


def test_only_touched_tiles_are_decoded(tmp_path, rgb16, monkeypatch):
    f = tmp_path / "img.tif"
    tifffile.imwrite(f, rgb16, photometric="rgb", tile=(64, 64))
    with open_image(f) as r:
        seen = []
        orig = r._decode
        monkeypatch.setattr(r, "_decode", lambda page, data, i: (seen.append(i), orig(page, data, i))[1])
        r.read_region(70, 70, 50, 50)  # inside tile row 1, col 1
        assert seen == [1 * 4 + 1]


@pytest.mark.parametrize("kind", ["gray8", "gray16", "rgba8", "float"])
def test_sample_types(tmp_path, kind):
    rng = np.random.default_rng(2)
    f = tmp_path / "img.tif"
    if kind == "gray8":
        a = (rng.random((96, 80)) * 255).astype(np.uint8)
        expect = np.repeat(a[..., None] / 255.0, 3, axis=2)
        tifffile.imwrite(f, a, tile=(32, 32))
    elif kind == "gray16":
        a = (rng.random((96, 80)) * 65535).astype(np.uint16)
        expect = np.repeat(a[..., None] / 65535.0, 3, axis=2)
        tifffile.imwrite(f, a, tile=(32, 32))
    elif kind == "rgba8":
        a = (rng.random((96, 80, 4)) * 255).astype(np.uint8)
        x = a / 255.0
        expect = x[..., :3] * x[..., 3:] + (1 - x[..., 3:])
        tifffile.imwrite(f, a, photometric="rgb", extrasamples=["unassalpha"], tile=(32, 32))
    else:  # float outside [0, 1]: one range for the whole image, not per region
        a = (rng.random((96, 80)) * 10 - 2).astype(np.float32)
        expect = np.repeat(((a - a.min()) / (a.max() - a.min()))[..., None], 3, axis=2)
        tifffile.imwrite(f, a, tile=(32, 32))
    with open_image(f) as r:
        np.testing.assert_allclose(r.read_region(0, 0, 96, 80), expect, atol=1e-5)
        np.testing.assert_allclose(r.read_region(40, 30, 20, 20), expect[40:60, 30:50], atol=1e-5)


def _write_pyramid(path, base, subifds: bool):
    levels = [base, base[::2, ::2], base[::4, ::4]]
    with tifffile.TiffWriter(path, bigtiff=True, ome=subifds) as tw:
        if subifds:  # OME-TIFF: reduced levels in SubIFDs of the first page
            tw.write(levels[0], subifds=2, tile=(64, 64), photometric="rgb", compression="zlib")
            for lv in levels[1:]:
                tw.write(lv, subfiletype=1, tile=(64, 64), photometric="rgb", compression="zlib")
        else:  # SVS-like: one page per level
            for i, lv in enumerate(levels):
                tw.write(lv, tile=(64, 64), photometric="rgb", subfiletype=1 if i else 0,
                         description="Aperio Image Library" if i == 0 else None)
    return levels


@pytest.mark.parametrize("subifds", [True, False], ids=["ome-subifds", "multipage"])
def test_pyramid_levels(tmp_path, subifds):
    base = (np.random.default_rng(3).random((512, 384, 3)) * 255).astype(np.uint8)
    f = tmp_path / ("pyr.ome.tif" if subifds else "pyr.tif")
    levels = _write_pyramid(f, base, subifds)
    for i, lv in enumerate(levels):
        with open_image(f, level=i) as r:
            assert r.level == i
            assert r.levels == [(512, 384), (256, 192), (128, 96)]
            assert (r.height, r.width) == lv.shape[:2]
            np.testing.assert_allclose(r.read_region(10, 20, 50, 60), lv[10:60, 20:80] / 255.0, atol=1e-6)
    with pytest.raises(UsageError, match="level 3 does not exist"):
        open_image(f, level=3)


def test_pillow_reader(tmp_path):
    a = (np.random.default_rng(4).random((50, 70, 3)) * 255).astype(np.uint8)
    f = tmp_path / "img.png"
    Image.fromarray(a).save(f)
    with open_image(f) as r:
        assert isinstance(r, PillowReader) and r.levels == [(50, 70)]
        np.testing.assert_allclose(r.read_region(5, 6, 20, 30), a[5:25, 6:36] / 255.0, atol=1e-6)
        np.testing.assert_allclose(r.read_region(40, 60, 20, 20), _padded_slice(a / 255.0, 40, 60, 20, 20),
                                   atol=1e-6)
    with pytest.raises(UsageError, match="only TIFF"):
        open_image(f, level=1)
    with pytest.raises(InputError, match="above the limit"):
        open_image(f, max_pixels=100)


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_image(tmp_path / "missing.tif")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 10)
    with pytest.raises(InputError, match="unreadable TIFF"):
        open_image(bad)
    f = tmp_path / "img.tif"
    tifffile.imwrite(f, np.zeros((64, 64), np.uint8), tile=(32, 32))
    with pytest.raises(InputError, match="above the pixel limit"):
        with open_image(f, max_pixels=100) as r:
            r.read_region(0, 0, 64, 64)


def test_codec_without_imagecodecs_names_the_package(tmp_path):
    """A JPEG-compressed TIFF (patched tag, as SVS files are) fails with one clear line."""
    f = tmp_path / "jpeg.tif"
    tifffile.imwrite(f, np.zeros((64, 64, 3), np.uint8), photometric="rgb", tile=(32, 32))
    with tifffile.TiffFile(f) as tf:
        offset = tf.pages[0].tags["Compression"].valueoffset
    with open(f, "r+b") as fh:
        fh.seek(offset)
        fh.write((7).to_bytes(2, "little"))  # Compression = JPEG, data left raw
    try:
        import imagecodecs  # noqa: F401
        expect = "JPEG"  # installed: the raw bytes are simply not a JPEG stream
    except ImportError:
        expect = "needs the optional 'imagecodecs' package"
    with pytest.raises(InputError, match=expect):
        with open_image(f) as r:
            r.read_region(0, 0, 10, 10)
