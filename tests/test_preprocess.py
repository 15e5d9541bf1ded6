"""Preprocessing: timm's eval crop from pretrained_cfg, full resolution, 16-bit precision, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softcli.preprocess import (Preprocess, batch_same_size, center_crop, eval_transform, full_res_transform,
                                min_side, resize, scale_to_cover)


def test_from_cfg_defaults_and_overrides():
    pre = Preprocess.from_cfg(None)
    assert pre.input_size == (224, 224) and pre.crop_pct == 0.875 and pre.resize_size == (256, 256)
    pre = Preprocess.from_cfg({"input_size": [3, 384, 320], "mean": [0.5] * 3, "std": [0.5] * 3,
                               "interpolation": "bilinear", "crop_pct": 1.0})
    assert pre.input_size == (384, 320) and pre.resize_size == (384, 320) and pre.interpolation == "bilinear"
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess.from_cfg({"interpolation": "lanczos7"})
    with pytest.raises(ValueError, match="crop_pct"):
        Preprocess.from_cfg({"crop_pct": 1.5})


@pytest.mark.parametrize(("hw", "target", "expected"), [
    ((300, 451), (256, 256), (256, 384)),  # torchvision Resize(256): int(256 * 451 / 300) = 384
    ((451, 300), (256, 256), (384, 256)),
    ((100, 100), (256, 256), (256, 256)),
    ((100, 400), (256, 128), (256, 1024)),  # non-square target: scaled until it covers both sides
])
def test_scale_to_cover(hw, target, expected):
    assert scale_to_cover(hw, target) == expected


def test_center_crop_matches_torchvision_placement():
    x = torch.arange(7 * 9, dtype=torch.float32).view(1, 7, 9)
    out = center_crop(x, (4, 4))
    # torchvision: top = round((7 - 4) / 2) = 2, left = round((9 - 4) / 2) = 2 (round half to even)
    assert torch.equal(out, x[:, 2:6, 2:6])


def test_eval_transform_shape_and_normalisation():
    pre = Preprocess()
    img = np.full((300, 451, 3), 0.5, np.float32)
    out = eval_transform(img, pre)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    expected = (0.5 - torch.tensor(pre.mean)) / torch.tensor(pre.std)
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(out.std(dim=(1, 2)), torch.zeros(3), atol=1e-5)


def test_resize_clamps_bicubic_overshoot_and_is_antialiased():
    x = torch.zeros(3, 64, 64)
    x[:, :, ::2] = 1.0  # a 1-pixel stripe pattern: aliasing would keep it, a proper filter averages it
    small = resize(x, (16, 16))
    assert small.min() >= 0 and small.max() <= 1
    assert torch.allclose(small, torch.full_like(small, 0.5), atol=0.05)


def test_sixteen_bit_tiff_precision_survives(tmp_path):
    import tifffile

    from softcli.io.image import load_image

    # A ramp 0.01 wide: about 2.5 steps of 8 bits, about 655 steps of 16 bits.
    ramp = np.linspace(0.4 * 65535, 0.41 * 65535, 448).round().astype(np.uint16)
    tifffile.imwrite(tmp_path / "ramp16.tif", np.repeat(np.repeat(ramp[None, :, None], 256, 0), 3, 2),
                     photometric="rgb")
    out = eval_transform(load_image(tmp_path / "ramp16.tif"), Preprocess())
    assert len(torch.unique(out[0, 100])) > 100  # an 8-bit round trip would leave about 3 levels


def test_full_res_keeps_size_and_upscales_only_tiny_images():
    pre = Preprocess()
    assert full_res_transform(np.zeros((333, 517, 3), np.float32), pre).shape == (3, 333, 517)
    assert full_res_transform(np.zeros((10, 40, 3), np.float32), pre, smallest=32).shape == (3, 32, 128)


def test_min_side_runs_through_the_model(tiny_model):
    side = min_side(tiny_model)
    assert side == 32
    with torch.no_grad():
        assert tiny_model(torch.rand(1, 3, side, side + 7)).shape == (1, 10)


def test_batch_same_size_keeps_order_and_breaks_on_size_and_failures():
    a, b = torch.zeros(3, 4, 4), torch.zeros(3, 5, 5)
    items = [("1", a), ("2", a), ("3", a), ("bad", None), ("4", a), ("5", b), ("6", b)]
    got = [(keys, None if t is None else tuple(t.shape)) for keys, t in batch_same_size(items, 2)]
    assert got == [(["1", "2"], (2, 3, 4, 4)), (["3"], (1, 3, 4, 4)), (["bad"], None),
                   (["4"], (1, 3, 4, 4)), (["5", "6"], (2, 3, 5, 5))]
    with pytest.raises(ValueError):
        list(batch_same_size(items, 0))


@pytest.mark.parametrize("shape", [(40, 2000), (3, 1001), (300, 20000), (2000, 40)])
def test_elongated_images_are_cut_before_resizing_with_the_same_crop(shape):
    """The cut-first path (resize would be > 16x the crop) gives the crop the full resize gives, to filter rounding."""
    from softcli.preprocess import normalize, rgb_to_chw

    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([np.sin(xx / w * 40 + yy / h), np.cos(xx / w * 17 + yy / h), xx / w], -1) * 0.5 + 0.5
    pre = Preprocess()
    full = resize(rgb_to_chw(img.astype(np.float32)), scale_to_cover((h, w), pre.resize_size))
    reference = normalize(center_crop(full, pre.input_size), pre)
    out = eval_transform(img.astype(np.float32), pre)
    assert out.shape == reference.shape == (3, 224, 224)
    assert float((out - reference).abs().max()) < 0.02
