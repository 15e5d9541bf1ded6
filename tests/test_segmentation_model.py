"""Semantic-FPN head and SoftSegmenter: shapes, batch independence, config round trip."""

from __future__ import annotations

import pytest
import torch

import softcli
from softcli.models.segmentation import HeadConfig, SemanticFPNHead, SoftSegmenter, default_palette

from .conftest import TINY_CONFIG
from .synthetic import single_thread  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def segmenter() -> SoftSegmenter:
    torch.manual_seed(0)
    backbone = softcli.create_model(TINY_CONFIG, num_classes=0)
    head = SemanticFPNHead(backbone.config.embed_dims, HeadConfig(5, fpn_channels=32, channels=16, groups=8))
    return SoftSegmenter(backbone, head).eval()


@pytest.mark.parametrize("h,w", [(64, 64), (96, 160), (130, 97), (33, 45)])
def test_logits_at_stride_4_and_pixels(segmenter, h, w):
    x = torch.randn(1, 3, h, w)
    with torch.inference_mode():
        maps = segmenter.backbone.forward_features(x)
        logits = segmenter.forward_logits(x)
        full = segmenter(x)
    assert logits.shape == (1, 5, *maps[0].shape[-2:])
    assert full.shape == (1, 5, h, w)
    assert torch.isfinite(full).all()


def test_batch_independent(segmenter):
    """GroupNorm, not BatchNorm: a tile's logits do not depend on the other tiles in its batch."""
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        both = segmenter.forward_logits(x)
        one = segmenter.forward_logits(x[1:])
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-5)


def test_every_level_reaches_the_logits(segmenter):
    """The FPN really uses all four stage maps (gradient reaches every lateral conv)."""
    segmenter.zero_grad()
    segmenter.head.train()
    try:
        segmenter.head(segmenter.backbone.forward_features(torch.randn(1, 3, 64, 64))).square().mean().backward()
    finally:
        segmenter.head.eval()
    for conv in segmenter.head.lateral:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_head_config_round_trip_and_validation():
    cfg = HeadConfig(7, fpn_channels=64, channels=32, groups=16)
    assert HeadConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="num_classes"):
        HeadConfig(0)
    with pytest.raises(ValueError, match="unknown head config"):
        HeadConfig.from_dict({"num_classes": 3, "dropout": 0.1})
    with pytest.raises(ValueError, match="four stage maps"):
        SemanticFPNHead([16, 32, 48], cfg)


def test_default_palette_distinct():
    for n in (1, 3, 16, 40, 256):
        pal = default_palette(n)
        assert len(pal) == n
        assert len({tuple(c) for c in pal}) == n
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in pal)
