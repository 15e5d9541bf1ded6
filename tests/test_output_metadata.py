"""Feature maps as OME-Zarr, and which model made an output, in every output format that has metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image
from safetensors import safe_open

import softcli
from softcli.checkpoint import model_files
from softcli.engine import MemorySink
from softcli.errors import OutputError
from softcli.features import extract_features
from softcli.io import zarr_writer
from softcli.io.atomic import check_output_path
from softcli.io.hashing import weights_sha256
from softcli.io.writers import write_features
from softcli.io.zarr_writer import halve

from .slides import write_svs
from .synthetic import ONE_THREAD_ENV, single_thread  # noqa: F401 - fixture

zarr = pytest.importorskip("zarr")
pytestmark = pytest.mark.usefixtures("single_thread")
MPP = 0.5


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_svs(tmp_path_factory.mktemp("meta") / "slide.svs", 192, 288, mpp=MPP, levels=1)


@pytest.fixture(scope="module")
def backbone(tiny_backbone):
    return softcli.load_model(tiny_backbone)


def _expected(folder) -> dict[str, str]:
    return {"model": str(folder), "weights_sha256": weights_sha256(model_files(folder / "model.safetensors")),
            "softcli_version": softcli.__version__}


def _sink(rng: np.random.Generator, **shapes: tuple[int, int, int]) -> MemorySink:
    sink = MemorySink()
    for name, shape in shapes.items():
        sink.allocate(name, shape)
        sink.arrays[name][:] = rng.standard_normal(shape, dtype=np.float32)
    return sink


def test_zarr_pyramid_is_the_2x2_mean_in_channel_groups(tmp_path, monkeypatch) -> None:
    """Odd sizes, several channel groups (a small band budget), pooled at the root, rewrite over the old folder."""
    monkeypatch.setattr(zarr_writer, "FEATURE_CHUNK", 64)
    monkeypatch.setattr(zarr_writer, "FEATURE_BAND_BYTES", 3 * 4 * 64 * 201)  # 3 channels of a 201-wide band
    sink = _sink(np.random.default_rng(0), stage2=(7, 259, 201), stage4=(5, 9, 7))
    out = tmp_path / "m.ome.zarr"
    write_features(out, sink, ["stage2", "stage4"], np.arange(5, dtype=np.float32), {"model": "m"},
                   strides=[8, 32], mpp=None)
    group = zarr.open_group(str(out), mode="r")
    level, expect = 0, sink.arrays["stage2"]
    assert group["stage2"]["0"].chunks == (3, 64, 64)
    while str(level) in group["stage2"]:
        got = group["stage2"][str(level)][:]
        assert got.shape == expect.shape
        np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-6)
        level, expect = level + 1, halve(expect)
    assert level == 4 and max(group["stage2"]["3"].shape[1:]) <= 64  # 259 → 130 → 65 → 33
    np.testing.assert_array_equal(group["stage4"]["0"][:], sink.arrays["stage4"])
    np.testing.assert_array_equal(group["pooled"][:], np.arange(5, dtype=np.float32))
    ms = dict(group["stage2"].attrs)["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"] and "unit" not in ms["axes"][1]  # no mpp: no unit
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [1.0, 16.0, 16.0]  # input pixels
    assert dict(group.attrs)["softcli"]["levels"] == {"stage2": 4, "stage4": 1}
    # A second run replaces the folder whole; a folder that is not a Zarr output is refused.
    write_features(out, sink, ["stage4"], None, {"model": "m"}, strides=[32])
    assert sorted(zarr.open_group(str(out), mode="r").group_keys()) == ["stage4"]
    assert [p.name for p in tmp_path.iterdir()] == ["m.ome.zarr"]
    (tmp_path / "plain.zarr").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_output_path(tmp_path / "plain.zarr")


def test_feature_outputs_agree_and_record_model_and_mpp(slide, backbone, tiny_backbone, tmp_path) -> None:
    kw = {"stages": "1,4", "tile": 96, "overlap": 32, "context": "tile"}
    extract_features(backbone, slide, tmp_path / "f.npz", pool=True, **kw)
    res = extract_features(backbone, slide, tmp_path / "f.ome.zarr", pool=True, **kw)
    extract_features(backbone, slide, tmp_path / "f.safetensors", **kw)
    extract_features(backbone, slide, tmp_path / "f.ome.tif", **kw)
    extract_features(backbone, slide, tmp_path / "s4.npy", stages="4", tile=96, overlap=32, context="tile")
    assert res.plan.tiles > 1 and res.mpp == MPP
    made_by = _expected(tiny_backbone)
    npz = np.load(tmp_path / "f.npz")  # no pickle needed for the metadata member
    assert sorted(npz.keys()) == ["metadata", "pooled", "stage1", "stage4"]
    assert json.loads(str(npz["metadata"])).items() >= made_by.items()
    group = zarr.open_group(str(tmp_path / "f.ome.zarr"), mode="r")
    for name, stride in (("stage1", 4), ("stage4", 32)):
        np.testing.assert_array_equal(group[name]["0"][:], npz[name])
        ms = dict(group[name].attrs)["multiscales"][0]
        assert ms["version"] == "0.4" and ms["axes"][2] == {"name": "x", "type": "space", "unit": "micrometer"}
        scale, shift = (t["scale"] if "scale" in t else t["translation"]
                        for t in ms["datasets"][0]["coordinateTransformations"])
        assert scale == [1.0, stride * MPP, stride * MPP] and shift[1] == (stride - 1) / 2 * MPP
    np.testing.assert_array_equal(group["pooled"][:], npz["pooled"])
    attrs = dict(group.attrs)["softcli"]
    assert attrs.items() >= {**made_by, "mpp": "0.5"}.items()
    with safe_open(str(tmp_path / "f.safetensors"), "np") as fh:
        assert fh.metadata().items() >= made_by.items()
    with tifffile.TiffFile(tmp_path / "f.ome.tif") as tf:
        assert json.loads(_ome_description(tf, 0)).items() >= made_by.items()
        np.testing.assert_array_equal(tf.series[1].asarray(), npz["stage4"])
        pixels = _ome_pixels(tf, 1)
        assert float(pixels["PhysicalSizeX"]) == 32 * MPP and pixels["PhysicalSizeXUnit"] == "µm"
    np.testing.assert_array_equal(np.load(tmp_path / "s4.npy"), npz["stage4"])
    sidecar = json.loads((tmp_path / "s4.meta.json").read_text())
    assert sidecar.items() >= {**made_by, "strides": "32"}.items()


def _ome_images(tf: tifffile.TiffFile) -> list:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(tf.ome_metadata)
    return [el for el in root if el.tag.endswith("Image")]


def _ome_description(tf: tifffile.TiffFile, index: int) -> str:
    image = _ome_images(tf)[index]
    return next(el.text for el in image if el.tag.endswith("Description"))


def _ome_pixels(tf: tifffile.TiffFile, index: int) -> dict[str, str]:
    image = _ome_images(tf)[index]
    return dict(next(el for el in image if el.tag.endswith("Pixels")).attrib)


def test_mask_outputs_record_the_model(slide, tiny_backbone, tmp_path) -> None:
    from softcli.segment import segment

    made_by = _expected(tiny_backbone)
    kw = {"weights": tiny_backbone, "clusters": 2, "tissue": "none"}
    segment(slide, tmp_path / "m.ome.tif", geojson=tmp_path / "m.geojson", **kw)
    legend = json.loads((tmp_path / "m.legend.json").read_text())
    assert legend.items() >= made_by.items()
    with tifffile.TiffFile(tmp_path / "m.ome.tif") as tf:
        assert json.loads(_ome_description(tf, 0)).items() >= made_by.items()
    doc = json.loads((tmp_path / "m.geojson").read_text())
    assert doc["softcli"] == made_by and doc["features"]
    assert all(f["properties"]["metadata"] == made_by for f in doc["features"])
    segment(slide, tmp_path / "m.png", **kw)
    assert Image.open(tmp_path / "m.png").text.items() >= made_by.items()
    segment(slide, tmp_path / "z.ome.zarr", **kw)
    assert dict(zarr.open_group(str(tmp_path / "z.ome.zarr"), mode="r").attrs)["softcli"].items() >= made_by.items()


def test_cli_features_to_ome_zarr(slide, tiny_backbone, tmp_path, soft) -> None:
    out = tmp_path / "maps.ome.zarr"
    r = soft("features", slide, "--out", out, "--weights", tiny_backbone, "--stages", "2,3", "--json",
             env=ONE_THREAD_ENV)
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)
    assert doc["format"] == "zarr" and doc["maps"]["stage3"] == [48, 12, 18]
    group = zarr.open_group(str(out), mode="r")
    assert group["stage3"]["0"].shape == (48, 12, 18) and dict(group.attrs)["softcli"]["model"] == str(tiny_backbone)
