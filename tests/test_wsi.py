"""Whole slides end to end: tissue masking, resolution choice, GeoJSON, classify on pyramids (synthetic SVS)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import softcli
from softcli.checkpoint import save_pretrained
from softcli.classify import classify
from softcli.errors import InputError
from softcli.features import extract_features
from softcli.io.geojson import labels_geojson
from softcli.io.readers import TiffReader, open_image
from softcli.segment import segment
from softcli.tissue import compute_tissue, dilate, mask_from_rgb, otsu_threshold

from .conftest import TINY_CONFIG, run_soft
from .slides import tissue_truth, write_svs
from .synthetic import ONE_THREAD_ENV, single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")
H, W = 1024, 1536


@pytest.fixture(scope="module")
def svs(tmp_path_factory):
    return write_svs(tmp_path_factory.mktemp("wsi") / "slide.svs", H, W)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "soft_tiny"
    save_pretrained(softcli.create_model(TINY_CONFIG, num_classes=0).eval(), folder)
    return folder


# -- tissue -----------------------------------------------------------------------------------

def test_otsu_splits_two_populations() -> None:
    values = np.concatenate([np.full(1000, 0.02), np.full(500, 0.4)])
    assert 0.02 <= otsu_threshold(values) <= 0.4


def test_white_image_has_no_tissue_and_dilate_grows() -> None:
    mask, threshold = mask_from_rgb(np.full((32, 32, 3), 0.95, np.float32))
    assert not mask.any() and threshold >= 0.05
    one = np.zeros((5, 5), bool)
    one[2, 2] = True
    assert dilate(one, 1).sum() == 9


def test_auto_mask_matches_the_slide_tissue(svs) -> None:
    with open_image(svs) as reader:
        tissue = compute_tissue(reader, svs, "auto", None)
    assert tissue is not None and tissue.method == "otsu-saturation"
    truth = tissue_truth(H, W).mean()
    assert truth < tissue.fraction < truth + 0.08  # the dilation adds a rim
    assert tissue.box_has_tissue(int(0.35 * H), int(0.3 * W), 32, 32)
    assert not tissue.box_has_tissue(0, 0, 64, 64)


def test_default_is_none_for_small_images_and_mask_file_is_scaled(svs, tmp_path) -> None:
    from PIL import Image

    with open_image(svs) as reader:
        assert compute_tissue(reader, svs, None, None) is None  # 1024x1536 is below 4096²
        half = np.zeros((10, 20), np.uint8)
        half[:, :10] = 255
        Image.fromarray(half).save(tmp_path / "m.png")
        tissue = compute_tissue(reader, svs, tmp_path / "m.png", None)
    assert tissue is not None and tissue.method == "file" and tissue.fraction == 0.5
    assert tissue.rows(0, 2).shape == (2, W) and tissue.rows(0, 1)[0, : W // 2].all()
    with pytest.raises(InputError, match="tissue mask"):
        compute_tissue(reader, svs, tmp_path / "missing.png", None)


# -- segment ------------------------------------------------------------------------------------

def test_segment_tissue_auto_background_is_label_0_and_geojson_matches(svs, tiny, tmp_path) -> None:
    shapely = pytest.importorskip("shapely")
    from shapely.geometry import shape

    out, gj = tmp_path / "mask.npy", tmp_path / "mask.geojson"
    summary = segment(svs, out, weights=tiny, clusters=2, mpp=0.5, tissue="auto", tile=128, overlap=32,
                      context="tile",
                      geojson=gj)  # level 0 (0.25 µm/px) resampled by 2
    mask = np.load(out)
    assert mask.shape == (H // 2, W // 2) and summary["mpp"] == 0.5 and summary["level"] == 0
    assert summary["labels"][0]["name"] == "background"
    t = summary["tissue"]
    assert t["tiles_skipped"] > 0 and t["tiles_total"] == summary["tiles"]["count"]
    # The white glass is background; tissue pixels are labelled.
    truth = tissue_truth(H, W)[::2, ::2]
    assert (mask[~truth] == 0).mean() > 0.9
    assert (mask[truth] > 0).mean() > 0.99
    legend = json.loads((tmp_path / "mask.legend.json").read_text())
    assert legend["mpp"] == 0.5 and legend["labels"][0]["name"] == "background"
    # GeoJSON: valid polygons in level-0 pixels, areas as the mask's within 1 %.
    doc = json.loads(gj.read_text())
    assert summary["geojson"]["features"] == len(doc["features"]) >= 1
    for feature in doc["features"]:
        geom = shape(feature["geometry"])
        assert geom.is_valid, shapely.validation.explain_validity(geom)
        label = feature["properties"]["label"]
        assert label != 0 and feature["properties"]["classification"]["name"] == summary["labels"][label]["name"]
        area_level0 = (mask == label).sum() * 4
        assert abs(geom.area - area_level0) <= 0.01 * area_level0
        minx, miny, maxx, maxy = geom.bounds
        assert 0 <= minx and maxx <= W and 0 <= miny and maxy <= H


def test_geojson_valid_on_noise() -> None:
    pytest.importorskip("shapely")
    from shapely.geometry import shape

    rng = np.random.default_rng(1)
    for trial in range(6):
        labels = (rng.random((30, 40)) * 3).astype(int)
        if trial % 2:
            labels = np.kron(labels[:8, :10], np.ones((3, 3), int))
        doc = labels_geojson(labels, ["a", "b", "c"], [[1, 2, 3]] * 3, scale=(2.0, 2.0))
        for f in doc["features"]:
            g = shape(f["geometry"])
            assert g.is_valid
            assert g.area == pytest.approx(4 * (labels == f["properties"]["label"]).sum())


def test_segment_cli_mpp_geojson_and_errors(svs, tiny, tmp_path) -> None:
    out, gj = tmp_path / "m.tif", tmp_path / "m.geojson"
    r = run_soft("segment", svs, "--weights", tiny, "--out", out, "--clusters", "3", "--mpp", "1.0",
                 "--tissue", "auto", "--geojson", gj, "--json", env=ONE_THREAD_ENV)
    assert r.returncode == 0, r.stderr.decode()
    summary = json.loads(r.stdout)
    assert summary["mpp"] == 1.0 and summary["size"] == [H // 4, W // 4] and gj.exists()
    png = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(png)
    r = run_soft("segment", png, "--weights", tiny, "--out", tmp_path / "x.png", "--clusters", "2", "--mpp", "1")
    err = r.stderr.decode()
    assert r.returncode == 1 and err.startswith("error:") and "microns-per-pixel" in err and "Traceback" not in err
    r = run_soft("segment", svs, "--weights", tiny, "--out", tmp_path / "y.png", "--clusters", "2", "--mpp", "0.1")
    assert r.returncode == 2 and "never upsampled" in r.stderr.decode()
    r = run_soft("segment", svs, "--weights", tiny, "--out", tmp_path / "z.png", "--clusters", "2",
                 "--geojson", tmp_path / "z.txt")
    assert r.returncode == 2 and ".geojson" in r.stderr.decode()


# -- features ---------------------------------------------------------------------------------------

def test_features_tissue_tiles_are_zero_and_metadata_records_mpp(svs, tiny, tmp_path) -> None:
    from safetensors import safe_open

    model = softcli.load_model(tiny)
    out = tmp_path / "f.safetensors"
    result = extract_features(model, svs, out, stages="1", tile=128, overlap=32, mpp=0.5, tissue="auto",
                              context="tile")
    assert result.mpp == 0.5 and result.tissue is not None and result.tissue["tiles_skipped"] > 0
    with safe_open(str(out), "np") as f:
        meta = f.metadata()
        stage1 = f.get_tensor("stage1")
    assert meta["mpp"] == "0.5" and meta["tissue"] == "otsu-saturation"
    assert np.abs(stage1[:, :8, -8:]).max() == 0  # the white top-right corner was not computed
    assert np.abs(stage1).max(axis=0).mean() > 0


# -- classify -----------------------------------------------------------------------------------------

def test_classify_slide_reads_a_low_level_not_level_0(svs, monkeypatch) -> None:
    torch.manual_seed(0)
    model = softcli.create_model(TINY_CONFIG, num_classes=5).eval()
    reads: list[tuple[int, int, int]] = []
    original = TiffReader._read

    def spy(self, y, x, h, w):
        reads.append((self.level, h, w))
        return original(self, y, x, h, w)

    monkeypatch.setattr(TiffReader, "_read", spy)
    (result,) = classify(model, [svs])
    assert result.ok and result.input_size == (224, 224)
    assert reads and all(level >= 1 for level, _, _ in reads)
    reads.clear()
    (full,) = classify(model, [svs], full_res=True, mpp=4.0)
    assert full.ok and full.input_size == (64, 96) and {lv for lv, _, _ in reads} == {2}


def test_default_tissue_rule_needs_a_slide_above_4096_squared(monkeypatch, tmp_path) -> None:
    from softcli import tissue as tissue_mod

    class Big:
        def __init__(self, mpp):
            from softcli.io.slidemeta import SlideInfo

            self.levels, self.height, self.width, self.slide = [(5000, 5000)], 5000, 5000, SlideInfo(mpp)

    monkeypatch.setattr(tissue_mod, "preview", lambda *a: (np.full((50, 50, 3), 0.95, np.float32), 100))
    assert compute_tissue(Big(0.25), "x", None, None) is not None  # a slide: auto
    assert compute_tissue(Big(None), "x", None, None) is None  # a big photo or satellite scene: none
    assert compute_tissue(Big(None), "x", "auto", None) is not None  # asked for


def test_segment_to_ome_zarr_multiscale(svs, tiny, tmp_path) -> None:
    zarr = pytest.importorskip("zarr")
    from softcli.io.masks import LabelRaster, write_mask

    rng = np.random.default_rng(0)
    labels = (rng.random((1100, 700)) * 3).astype(np.uint8)
    with LabelRaster(1100, 700, 3, folder=tmp_path) as raster:
        raster.write_rows(0, labels)
        info = write_mask(raster, tmp_path / "m.ome.zarr", [[255, 0, 0], [0, 255, 0], [0, 0, 255]], ["a", "b", "c"])
    assert info["levels"] == 3
    group = zarr.open_group(str(tmp_path / "m.ome.zarr"), mode="r")
    np.testing.assert_array_equal(group["0"][:], labels)
    np.testing.assert_array_equal(group["1"][:], labels[::2, ::2])
    attrs = dict(group.attrs)
    assert [d["path"] for d in attrs["multiscales"][0]["datasets"]] == ["0", "1", "2"]
    assert attrs["image-label"]["colors"][1]["rgba"] == [0, 255, 0, 255]
    # End to end, with the legend beside it.
    out = tmp_path / "slide.ome.zarr"
    summary = segment(svs, out, weights=tiny, clusters=2, level=2)
    assert summary["mask"]["format"] == "zarr" and (tmp_path / "slide.legend.json").exists()
    assert zarr.open_group(str(out), mode="r")["0"].shape == (64, 96)


def test_cohort_manifest_records_the_mpp_each_slide_ran_at(svs, tiny, tmp_path) -> None:
    """Many slides into --out-dir: each manifest line says at which microns per pixel it was computed."""
    out_dir = tmp_path / "masks"
    r = run_soft("segment", svs, "--weights", tiny, "--clusters", "2", "--mpp", "1.0", "--out-dir", out_dir,
                 "--out-format", "png", env=ONE_THREAD_ENV)
    assert r.returncode == 0, r.stderr.decode()
    records = [json.loads(line) for line in (out_dir / "manifest.jsonl").read_text().splitlines()]
    assert [rec["status"] for rec in records] == ["done"] and records[0]["mpp"] == 1.0
