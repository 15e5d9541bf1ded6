"""k-means, tile sampling and clustering of SOFT features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import softcli
from softcli.checkpoint import IMAGENET_PRETRAINED_CFG
from softcli.cluster import (StageEmbedder, cluster_scores, fit_clusters, kmeans, parse_cluster_stages, sample_tiles,
                             stage_features)
from softcli.engine import normalized_batch
from softcli.errors import UsageError
from softcli.io.readers import ArrayReader
from softcli.tiling import TileGrid

from .conftest import TINY_CONFIG
from .synthetic import best_match_miou, regions_image, single_thread  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("single_thread")

MEAN, STD = IMAGENET_PRETRAINED_CFG["mean"], IMAGENET_PRETRAINED_CFG["std"]


def blobs(k: int = 4, n: int = 200, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 10
    labels = torch.arange(k).repeat_interleave(n)
    return centres[labels] + torch.randn(k * n, d, generator=g), labels


def test_kmeans_recovers_separated_blobs():
    x, labels = blobs()
    c, inertia = kmeans(x, 4, seed=0)
    assign = torch.cdist(x, c).argmin(1).numpy()
    assert best_match_miou(assign, labels.numpy(), 4) == 1.0
    assert inertia == pytest.approx(float(torch.cdist(x, c).min(1).values.square().sum()), rel=1e-4)


def test_kmeans_deterministic_for_a_seed():
    x, _ = blobs(k=6, d=8)
    a, _ = kmeans(x, 5, seed=3)
    b, _ = kmeans(x, 5, seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kmeans_k_centroids_even_with_duplicates():
    x = torch.tensor([[0.0, 0.0]] * 50 + [[1.0, 1.0]] * 50 + [[5.0, 5.0]])
    c, _ = kmeans(x, 3, seed=0)
    assert c.shape == (3, 2)
    assert len({tuple(v.tolist()) for v in c}) == 3
    with pytest.raises(ValueError, match="cannot make"):
        kmeans(x[:2], 3)


def test_parse_stages():
    assert parse_cluster_stages(None) == (1, 2)
    assert parse_cluster_stages("3,1") == (1, 3) == parse_cluster_stages("1,3,3")
    assert parse_cluster_stages([4]) == (4,)
    for bad in ("0", "5", "a", ""):
        with pytest.raises(UsageError, match="cluster stages"):
            parse_cluster_stages(bad)


def test_sample_tiles_spread_over_the_whole_image():
    grid = TileGrid(5000, 3000, tile=512, overlap=64)
    tiles = sample_tiles(grid, 16)
    assert 4 <= len(tiles) <= 16
    assert len({t.index for t in tiles}) == len(tiles)
    rows, cols = {t.row for t in tiles}, {t.col for t in tiles}
    assert {0, grid.rows - 1} <= rows and {0, grid.cols - 1} <= cols  # corners included
    assert len(sample_tiles(TileGrid(100, 100, tile=512), 16)) == 1


def test_stage_features_resized_to_stride_4():
    maps = [torch.randn(1, c, 32 // s, 48 // s) for c, s in ((4, 1), (6, 2), (8, 4), (10, 8))]
    f = stage_features(maps, (1, 3))
    assert f.shape == (1, 12, 32, 48)
    torch.testing.assert_close(f[:, :4], maps[0])


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return softcli.create_model(TINY_CONFIG, num_classes=0).eval()


def test_clusters_recover_regions_whole_image(backbone):
    """Regions of distinct colour and texture come back as clusters (random-weight backbone, one tile)."""
    img, gt = regions_image(256, 256)
    reader = ArrayReader(img)
    grid = TileGrid(256, 256, tile=256, overlap=0)
    embedder = StageEmbedder(backbone, (1, 2))
    model = fit_clusters(reader, grid, embedder, 3, mean=MEAN, std=STD, seed=0)
    assert model.k == 3 and model.samples == 64 * 64
    with torch.inference_mode():
        scores = cluster_scores(model, embedder(normalized_batch(img, MEAN, STD)))
    assert scores.shape == (1, 3, 64, 64)
    labels = F.interpolate(scores, size=gt.shape, mode="bilinear", align_corners=False).argmax(1)[0].numpy()
    assert best_match_miou(labels, gt, 3) >= 0.9


def test_fit_is_deterministic_and_seeded(backbone):
    img, _ = regions_image(128, 192, seed=2)
    reader, grid = ArrayReader(img), TileGrid(128, 192, tile=64, overlap=32)
    embedder = StageEmbedder(backbone, (1,))
    a = fit_clusters(reader, grid, embedder, 3, mean=MEAN, std=STD, seed=1, max_samples=500)
    b = fit_clusters(reader, grid, embedder, 3, mean=MEAN, std=STD, seed=1, max_samples=500)
    torch.testing.assert_close(a.centroids, b.centroids, rtol=0, atol=0)
    assert a.samples <= 500 + 3 * len(sample_tiles(grid, 16))
    with pytest.raises(UsageError, match="more than"):
        fit_clusters(ArrayReader(img[:32, :32]), TileGrid(32, 32, tile=32, overlap=0), embedder, 100,
                     mean=MEAN, std=STD)


def test_scores_are_negative_squared_distances(backbone):
    img, _ = regions_image(64, 64)
    embedder = StageEmbedder(backbone, (1, 2))
    model = fit_clusters(ArrayReader(img), TileGrid(64, 64, tile=64, overlap=0), embedder, 2, mean=MEAN, std=STD)
    with torch.inference_mode():
        feats = embedder(normalized_batch(img, MEAN, STD))
        scores = cluster_scores(model, feats)
    z = (feats[0].flatten(1).T - model.mean) * model.scale
    expect = -torch.cdist(z, model.centroids).square()
    torch.testing.assert_close(scores[0].flatten(1).T, expect, rtol=1e-3, atol=1e-3)
