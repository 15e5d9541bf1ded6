"""Whole-slide readers: synthetic scanner files (tifffile + imagecodecs), resolution metadata, level choice."""

from __future__ import annotations

import numpy as np
import pytest

from tests.slides import tissue_truth, write_ome, write_svs
from softcli.errors import InputError, UsageError
from softcli.io.readers import open_image
from softcli.io.slide import ResampledReader, choose_level, open_at_resolution
from softcli.io.slidemeta import parse_aperio, parse_ome


@pytest.fixture(scope="module")
def svs(tmp_path_factory: pytest.TempPathFactory):
    return write_svs(tmp_path_factory.mktemp("svs") / "slide.svs", 1024, 1536)


def test_svs_has_three_jpeg_levels_mpp_and_white_background(svs) -> None:
    import tifffile

    with tifffile.TiffFile(svs) as tif:
        assert tif.is_svs and tif.pages[0].compression == tifffile.COMPRESSION.JPEG
    with open_image(svs) as r:
        assert r.levels == [(1024, 1536), (256, 384), (64, 96)]
        assert r.slide.mpp == 0.25 and r.slide.objective_power == 40 and r.mpp == 0.25
        region = r.read_region(0, 0, 64, 64)
        assert region.dtype == np.float32 and abs(float(region.mean()) - 243 / 255) < 0.02  # white corner
    with open_image(svs, level=2) as r:
        assert r.mpp == pytest.approx(4.0)
    assert 1 - tissue_truth(1024, 1536).mean() >= 0.6


def test_ome_physical_size(tmp_path) -> None:
    path = write_ome(tmp_path / "s.ome.tif", 512, 768, mpp=0.5)
    with open_image(path) as r:
        assert r.slide.mpp == pytest.approx(0.5) and r.slide.source == "ome"
        assert r.levels == [(512, 768), (256, 384)]
        assert r.mpp == pytest.approx(0.5)
    with open_image(path, level=1) as r:
        assert r.mpp == pytest.approx(1.0)


def test_metadata_parsers() -> None:
    info = parse_aperio("Aperio Image Library v12 \r\n1x1 |AppMag = 20|MPP = 0.4990")
    assert (info.mpp, info.objective_power) == (0.499, 20.0)
    assert parse_aperio("ImageJ=1.5").mpp is None
    xml = ('<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image><Pixels PhysicalSizeX="250" '
           'PhysicalSizeXUnit="nm" PhysicalSizeY="0.25"/></Image></OME>')
    assert parse_ome(xml).mpp == pytest.approx(0.25)
    assert parse_ome("<not xml").mpp is None


def test_resolution_tags_cm_and_photo_dpi_ignored(tmp_path) -> None:
    import tifffile

    img = np.zeros((64, 64, 3), np.uint8)
    tifffile.imwrite(tmp_path / "cm.tif", img, resolution=(40000, 40000), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "dpi.tif", img, resolution=(300, 300), resolutionunit="INCH")
    with open_image(tmp_path / "cm.tif") as r:
        assert r.mpp == pytest.approx(0.25)
    with open_image(tmp_path / "dpi.tif") as r:
        assert r.mpp is None


def test_choose_level_at_or_finer_then_resample() -> None:
    mpps = [0.25, 1.0, 4.0]
    assert choose_level(mpps, 0.25) == (0, 1.0)
    assert choose_level(mpps, 1.0) == (1, 1.0)
    assert choose_level(mpps, 2.0) == (1, 2.0)
    assert choose_level(mpps, 8.0) == (2, 2.0)
    with pytest.raises(UsageError, match="never upsampled"):
        choose_level(mpps, 0.1)


def test_open_at_resolution(svs) -> None:
    with open_at_resolution(svs, mpp=1.0) as r:
        assert (r.level, r.height, r.width, r.mpp) == (1, 256, 384, 1.0)
    with open_at_resolution(svs, mpp=2.0) as r:
        assert isinstance(r, ResampledReader) and (r.height, r.width) == (128, 192) and r.mpp == pytest.approx(2.0)
        with open_image(svs, level=1) as base:
            ref = base.read_region(0, 0, 256, 384).reshape(128, 2, 192, 2, 3).mean(axis=(1, 3))
        got = r.read_region(0, 0, 128, 192)
        assert np.abs(got - ref).mean() < 0.03
    with open_at_resolution(svs, magnification=10) as r:  # 40x slide: 10x is 4x coarser
        assert r.level == 1 and r.mpp == pytest.approx(1.0)
    with pytest.raises(UsageError):
        open_at_resolution(svs, mpp=1.0, magnification=10)


def test_resolution_without_metadata_is_an_input_error(tmp_path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(InputError, match="microns-per-pixel"):
        open_at_resolution(tmp_path / "a.png", mpp=1.0)


def test_openslide_reads_equal_pixels(svs) -> None:
    pytest.importorskip("openslide")
    from softcli.io.openslide_reader import OpenSlideReader

    for level in range(3):
        with open_image(svs, level=level) as a, OpenSlideReader(svs, level=level) as b:
            assert b.levels == a.levels and b.mpp == pytest.approx(a.mpp)
            np.testing.assert_array_equal(a.read_region(10, 20, 50, 60), b.read_region(10, 20, 50, 60))


def test_scanner_format_without_openslide_names_the_extra(tmp_path, monkeypatch) -> None:
    from softcli.io import openslide_reader

    monkeypatch.setattr(openslide_reader, "_openslide", lambda: None)
    path = tmp_path / "slide.mrxs"
    path.write_bytes(b"[GENERAL]\nSLIDE_VERSION = 01.02\n")
    with pytest.raises(InputError, match=r"softcli\[openslide\]"):
        open_image(path)


def test_scanner_looking_file_openslide_cannot_read(tmp_path) -> None:
    pytest.importorskip("openslide")
    path = tmp_path / "slide.mrxs"
    path.write_bytes(b"[GENERAL]\n")
    with pytest.raises(InputError, match="OpenSlide does not recognise it"):
        open_image(path)
