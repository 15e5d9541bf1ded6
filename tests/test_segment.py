"""Library orchestration: streaming argmax, segmentation checkpoints, the segment() job."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import softcli
from softcli.checkpoint import read_checkpoint, save_pretrained
from softcli.engine import OutputSpec, run_dense
from softcli.errors import CheckpointError, OutputError, UsageError
from softcli.io.masks import LabelRaster
from softcli.io.readers import ArrayReader
from softcli.segment import LabelSink, load_segmenter, save_segmenter, segment
from softcli.tiling import TileGrid

from .conftest import TINY_CONFIG
from .synthetic import (best_match_miou, iou_per_class, make_trained_checkpoint, regions_image,  # noqa: F401
                        single_thread)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("h,w,bands", [(37, 53, [3, 5, 2]), (64, 64, [16]), (5, 130, [1]), (101, 9, [7, 1, 30])])
def test_label_sink_equals_whole_upsample_then_argmax(tmp_path, h, w, bands):
    """Rows fed in bands of any size give exactly argmax(bilinear ×4 of the whole score map)."""
    torch.manual_seed(h * w)
    k = 5
    scores = torch.randn(1, k, -(-h // 4), -(-w // 4))
    src_h, src_w = scores.shape[-2:]
    # The reference: bilinear at scale exactly 4 (the pixel grid of a stride-4 map), then argmax.
    big = F.interpolate(scores, scale_factor=4, mode="bilinear", align_corners=False)[..., :h, :w]
    expect = big.argmax(1)[0].numpy()
    with LabelRaster(h, w, k, folder=tmp_path) as raster:
        sink = LabelSink(raster)
        sink.allocate("scores", (k, src_h, src_w))
        y, i = 0, 0
        while y < src_h:
            n = min(bands[i % len(bands)], src_h - y)
            sink.write_rows("scores", y, scores[0, :, y:y + n].numpy())
            y, i = y + n, i + 1
        assert raster.rows_written == h
        np.testing.assert_array_equal(raster.array(), expect)
        np.testing.assert_array_equal(raster.counts, np.bincount(expect.ravel(), minlength=k))


def test_tiled_blend_then_argmax_equals_whole_image(tmp_path):
    """With a context-free score function, tiled labels equal whole-image labels exactly."""
    h, w, k = 300, 235, 4
    img = np.random.default_rng(0).random((h, w, 3), dtype=np.float32)
    proj = torch.randn(k, 3, generator=torch.Generator().manual_seed(0))

    def fn(x):
        return [torch.einsum("kc,bchw->bkhw", proj, F.avg_pool2d(x, 4))]

    out = []
    for tile, overlap in ((320, 0), (96, 32), (64, 32)):
        grid = TileGrid(h, w, tile=tile, overlap=overlap)
        with LabelRaster(h, w, k, folder=tmp_path) as raster:
            run_dense(fn, ArrayReader(img), grid, [OutputSpec("scores", k, 4)], LabelSink(raster))
            out.append(raster.array().copy())
    assert len(TileGrid(h, w, 64, 32)) > 1
    # Blending identical scores with weights summing to 1 only rounds; nearly every label agrees.
    for tiled in out[1:]:
        assert (tiled == out[0]).mean() > 0.999


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return softcli.create_model(TINY_CONFIG, num_classes=0).eval()


@pytest.fixture(scope="module")
def trained(backbone, tmp_path_factory):
    """A head trained for a few dozen steps on a 3-region image, saved as a checkpoint folder."""
    return make_trained_checkpoint(backbone, tmp_path_factory.mktemp("seg"))


def test_segmentation_checkpoint_round_trip(trained):
    model, folder, _, _ = trained
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["task"] == "segmentation" and cfg["head"]["type"] == "semantic_fpn"
    assert cfg["class_names"] == ["stripes", "noise", "checker"] and len(cfg["palette"]) == 3
    ck = read_checkpoint(folder)  # the ordinary reader validates the file and keeps our keys
    assert any(k.startswith("backbone.") for k in ck.state_dict) and any(k.startswith("head.") for k in ck.state_dict)
    loaded, info = load_segmenter(folder)
    assert info.class_names == cfg["class_names"] and info.palette == cfg["palette"]
    x = torch.randn(1, 3, 96, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x))
    # A lone safetensors file (no config.json) carries the head, names and palette in its metadata.
    single = folder.parent / "single.safetensors"
    single.write_bytes((folder / "model.safetensors").read_bytes())
    loaded2, info2 = load_segmenter(single)
    assert loaded2.head.config == model.head.config and info2.class_names == cfg["class_names"]
    with torch.inference_mode():
        torch.testing.assert_close(loaded2(x), model(x))


def test_segmentation_checkpoint_errors(trained, backbone, tmp_path):
    model, folder, _, _ = trained
    plain = save_pretrained(backbone, tmp_path / "plain")
    with pytest.raises(CheckpointError, match="no segmentation head.*clusters=K"):
        load_segmenter(plain)
    with pytest.raises(CheckpointError, match="'class_names' must be 3"):
        save_segmenter(model, tmp_path / "bad", ["a", "b"])
    cfg = json.loads((folder / "config.json").read_text())
    bad = tmp_path / "badhead"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (bad / "config.json").write_text(json.dumps({**cfg, "head": {**cfg["head"], "channels": 64}}))
    with pytest.raises(CheckpointError, match="does not fit the semantic_fpn head"):
        load_segmenter(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "palette": [[0, 0, 0]]}))
    with pytest.raises(CheckpointError, match="'palette' must be 3"):
        load_segmenter(bad)


def test_segment_with_trained_head(trained, tmp_path):
    _, folder, png, gt = trained
    out = tmp_path / "mask.png"
    summary = segment(png, out, weights=folder)
    mask = np.asarray(Image.open(out))
    assert mask.shape == gt.shape
    assert min(iou_per_class(mask, gt, 3)) >= 0.9  # the head's classes, no relabelling
    assert summary["mode"] == "head" and [e["name"] for e in summary["labels"]] == ["stripes", "noise", "checker"]


def test_segment_clusters_outputs_agree(backbone, tmp_path):
    img, gt = regions_image(256, 256)
    src = tmp_path / "in.png"
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(src)
    ck = save_pretrained(backbone, tmp_path / "bb")
    masks = {}
    for ext in ("png", "tif", "npy"):
        out = tmp_path / f"mask.{ext}"
        summary = segment(src, out, weights=ck, clusters=3, overlay=tmp_path / f"ov_{ext}.png" if ext == "png"
                          else None)
        masks[ext] = summary
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    import tifffile

    np.testing.assert_array_equal(tifffile.imread(tmp_path / "mask.tif"), mask)
    np.testing.assert_array_equal(np.load(tmp_path / "mask.npy"), mask)
    assert mask.shape == gt.shape  # mask size = input size
    assert best_match_miou(mask, gt, 3) >= 0.9
    # Palette and legend agree, and the legend counts are the mask's.
    leg = json.loads((tmp_path / "mask.legend.json").read_text())
    pal = Image.open(tmp_path / "mask.png").getpalette()
    for e in leg["labels"]:
        assert pal[3 * e["label"]: 3 * e["label"] + 3] == e["color"]
        assert e["pixels"] == int((mask == e["label"]).sum())
        assert e["hex"] == "#%02x%02x%02x" % tuple(e["color"])
    assert sum(e["fraction"] for e in leg["labels"]) == pytest.approx(1.0, abs=1e-5)
    assert Image.open(tmp_path / "ov_png.png").size == (256, 256)
    assert masks["tif"]["mask"]["levels"] == 1


def test_segment_checks_outputs_before_compute(backbone, tmp_path):
    img, _ = regions_image(64, 64)
    src = tmp_path / "in.png"
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(src)
    missing_ck = tmp_path / "nope"  # never read: the output checks fail first
    with pytest.raises(OutputError, match="does not exist"):
        segment(src, tmp_path / "no" / "mask.png", weights=missing_ck, clusters=2)
    with pytest.raises(OutputError, match="input"):
        segment(src, src, weights=missing_ck, clusters=2)
    with pytest.raises(UsageError, match="format"):
        segment(src, tmp_path / "mask.jpg", weights=missing_ck, clusters=2)
    with pytest.raises(UsageError, match="different files"):
        segment(src, tmp_path / "m.png", weights=missing_ck, clusters=2, overlay=tmp_path / "m.png")
    with pytest.raises(UsageError, match="^clusters must be between 1 and 256, not 0$"):
        segment(src, tmp_path / "m.png", weights=missing_ck, clusters=0)
    assert not list(tmp_path.glob("m*"))


def test_clusters_consistent_across_tiles(golden, tmp_path):
    """16 overlapping tiles, one clustering: the regions come back with one set of labels.

    Uses the golden ``mini_plain`` weights (random but with trained-like scales).
    Freshly initialised weights (std 0.02) do not work here: SOFT's global term
    is then an unnormalised sum over the whole tile and labels follow the tiles.
    """
    img, gt = regions_image(384, 384)
    src = tmp_path / "in.png"
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(src)
    summary = segment(src, tmp_path / "mask.npy", weights=golden / "mini_plain.weights.safetensors", clusters=3,
                      tile=128, overlap=64, context="tile")
    assert summary["tiles"]["count"] >= 16
    assert best_match_miou(np.load(tmp_path / "mask.npy"), gt, 3) >= 0.9


def test_level_of_a_pyramid_sets_the_mask_size(backbone, tmp_path):
    import tifffile

    img, _ = regions_image(256, 320)
    src = tmp_path / "pyr.ome.tif"
    data = np.round(img * 255).astype(np.uint8)
    with tifffile.TiffWriter(src, ome=True) as tif:
        tif.write(data, tile=(64, 64), subifds=1, photometric="rgb")
        tif.write(data[::2, ::2], tile=(64, 64), subfiletype=1, photometric="rgb")
    ck = save_pretrained(backbone, tmp_path / "bb")
    summary = segment(src, tmp_path / "m.npy", weights=ck, clusters=2, level=1, overlay=tmp_path / "o.png")
    assert np.load(tmp_path / "m.npy").shape == (128, 160) and summary["level"] == 1
    assert summary["size"] == [128, 160] and Image.open(tmp_path / "o.png").size == (160, 128)
    with pytest.raises(UsageError, match="level 2 does not exist"):
        segment(src, tmp_path / "m2.npy", weights=ck, clusters=2, level=2)
