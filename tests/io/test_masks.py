"""Label rasters and mask writers: PNG palette, pyramidal OME-TIFF, npy, legend, overlay."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from softcli.errors import OutputError, UsageError
from softcli.io.masks import (LabelRaster, check_mask_outputs, legend, legend_path, mask_format, pyramid_shapes,
                              write_mask, write_overlay)
from softcli.models.segmentation import default_palette


def _raster(tmp_path, labels: np.ndarray, k: int) -> LabelRaster:
    r = LabelRaster(*labels.shape, k, folder=tmp_path)
    for y in range(0, labels.shape[0], 77):  # bands of any height
        r.write_rows(y, labels[y:y + 77])
    return r


def test_formats_round_trip(tmp_path):
    h, w, k = 700, 1100, 6
    lab = ((np.arange(h)[:, None] // 50 + np.arange(w)[None] // 90) % k).astype(np.uint8)
    pal, names = default_palette(k), [f"c{i}" for i in range(k)]
    with _raster(tmp_path, lab, k) as r:
        np.testing.assert_array_equal(r.counts, np.bincount(lab.ravel(), minlength=k))
        np.testing.assert_array_equal(r.read_rows(3, 40, 4), lab[3:40:4, ::4])
        info = write_mask(r, tmp_path / "m.tif", pal, names)
        write_mask(r, tmp_path / "m.png", pal, names)
        write_mask(r, tmp_path / "m.npy", pal, names)
    assert info["levels"] == len(pyramid_shapes(h, w)) == 3  # until the longer side is ≤ 512
    with tifffile.TiffFile(tmp_path / "m.tif") as tif:
        assert tif.is_ome
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(700, 1100), (350, 550), (175, 275)]
        page = levels[0].keyframe
        assert page.is_tiled and page.tilewidth == 512 and page.photometric == tifffile.PHOTOMETRIC.PALETTE
        np.testing.assert_array_equal(levels[0].asarray(), lab)
        np.testing.assert_array_equal(levels[1].asarray(), lab[::2, ::2])  # nearest: labels never mixed
        np.testing.assert_array_equal(levels[2].asarray(), lab[::4, ::4])
        assert (page.colormap[:, :k].T // 257).tolist() == pal
    png = Image.open(tmp_path / "m.png")
    assert png.mode == "P" and png.getpalette()[: 3 * k] == [v for c in pal for v in c]
    np.testing.assert_array_equal(np.asarray(png), lab)
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), lab)
    assert not list(tmp_path.glob(".*partial*")) and not list(tmp_path.glob(".soft-mask-*"))


def test_more_than_256_labels(tmp_path):
    lab = (np.arange(40 * 30).reshape(40, 30) % 300).astype(np.uint16)
    with _raster(tmp_path, lab, 300) as r:
        assert r.dtype == np.uint16
        write_mask(r, tmp_path / "m.tif", default_palette(300), [str(i) for i in range(300)])
        with pytest.raises(UsageError, match="palette"):
            write_mask(r, tmp_path / "m.png", default_palette(300), [str(i) for i in range(300)])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "m.tif"), lab)
    with pytest.raises(UsageError, match="256"):
        check_mask_outputs(tmp_path / "x.png", [], num_classes=300)


def test_names_and_checks(tmp_path):
    assert mask_format("a/B.TIFF") == "tiff" and mask_format("m.npy") == "npy"
    with pytest.raises(UsageError):
        mask_format("m.jpg")
    assert legend_path("out/mask.png").name == "mask.legend.json"
    assert legend_path("slide.ome.tif").name == "slide.legend.json"
    with pytest.raises(UsageError, match="too large for PNG"):
        check_mask_outputs(tmp_path / "m.png", [], height=20000, width=20000)
    with pytest.raises(OutputError, match="does not exist"):
        check_mask_outputs(tmp_path / "nope" / "m.tif", [])
    with pytest.raises(UsageError, match="overlay is an image"):
        check_mask_outputs(tmp_path / "m.tif", [], overlay=tmp_path / "o.txt")


def test_legend_and_overlay(tmp_path):
    counts = np.array([30, 10, 0])
    entries = legend(["a", "b", "c"], [[255, 0, 0], [0, 255, 0], [0, 0, 255]], counts)
    assert [e["pixels"] for e in entries] == [30, 10, 0]
    assert [e["fraction"] for e in entries] == [0.75, 0.25, 0.0]
    assert entries[0]["hex"] == "#ff0000"
    preview = np.zeros((4, 6, 3), np.float32)
    labels = np.zeros((4, 6), np.uint8)
    labels[:, 3:] = 1
    assert write_overlay(preview, labels, [[255, 0, 0], [0, 255, 0]], tmp_path / "o.png") == [4, 6]
    out = np.asarray(Image.open(tmp_path / "o.png"))
    assert out[0, 0].tolist() == [128, 0, 0] and out[0, 5].tolist() == [0, 128, 0]
