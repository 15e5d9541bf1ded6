"""A Hamamatsu-style NDPI (tests/slides.py: write_ndpi) reads the same through tifffile and OpenSlide."""

from __future__ import annotations

import numpy as np
import pytest

from softcli.io.readers import TiffReader, open_image

from .slides import slide_pixels, write_ndpi

MPP, H, W = 0.23, 384, 512


@pytest.fixture(scope="module")
def ndpi(tmp_path_factory):
    return write_ndpi(tmp_path_factory.mktemp("ndpi") / "slide.ndpi", H, W, mpp=MPP, magnification=40, levels=2)


def test_tifffile_path_reads_ndpi_levels_and_resolution(ndpi) -> None:
    with open_image(ndpi) as reader:
        assert isinstance(reader, TiffReader)  # a TIFF: tifffile, no OpenSlide needed
        assert (reader.height, reader.width) == (H, W) and reader.mpp == pytest.approx(MPP, rel=1e-4)
        assert reader.levels[:2] == [(H, W), (H // 2, W // 2)] and reader.slide.objective_power == 40
        got = reader.read_region(0, 0, H, W)
    truth = slide_pixels(0, 0, H, W, H, W).astype(np.float32) / 255
    assert np.abs(got - truth).mean() < 0.02  # JPEG quality 95


def test_openslide_reads_the_same_pixels(ndpi) -> None:
    openslide = pytest.importorskip("openslide")
    from softcli.io.openslide_reader import OpenSlideReader

    assert openslide.OpenSlide.detect_format(str(ndpi)) == "hamamatsu"
    for level in (0, 1):
        with TiffReader(ndpi, level=level) as tif, OpenSlideReader(ndpi, level=level) as osr:
            assert (osr.height, osr.width) == (tif.height, tif.width)
            assert osr.mpp == pytest.approx(tif.mpp, rel=1e-4) and osr.slide.objective_power == 40
            np.testing.assert_array_equal(osr.read_region(0, 0, osr.height, osr.width),
                                          tif.read_region(0, 0, tif.height, tif.width))
            # A region that is not on a restart-interval boundary.
            np.testing.assert_array_equal(osr.read_region(37, 53, 61, 99), tif.read_region(37, 53, 61, 99))
