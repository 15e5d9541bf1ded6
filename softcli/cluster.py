"""Segmentation without a trained head: k-means on SOFT stage features.

No segmentation weights were released for SOFT, so ``soft segment --clusters K``
groups pixels by what the backbone sees. Labels must mean the same thing in
every tile of a huge image, so the clustering is fitted once and applied
everywhere:

1. :func:`fit_clusters` reads a coarse sub-grid of the tiling grid's own tiles
   spread over the whole image (through the reader, so a 16000² slide is never
   decoded whole; the same tiles with the same context as when labelling),
   embeds them, samples feature vectors with a fixed seed, standardises each
   channel and runs k-means (k-means++ init, a few restarts, fixed seed) in torch.
2. :func:`cluster_scores` turns a tile's features into negative squared
   distances to the centroids; the tiling engine blends those across overlaps
   like logits, and the label is the argmax (the nearest centroid after
   blending).

Features: the chosen stage maps (default stages 1 and 2, strides 4 and 8)
resized to stride 4, each channel standardised with statistics from the fitted
samples, and each stage weighted by 1/√channels so that every stage counts the
same whatever its width. Shallow stages carry colour and texture, which is what
separates regions even with untrained weights of trained-like scale (the golden
reference weights); deeper stages carry more semantics with trained weights
(``--cluster-stages 1,2,3``). Freshly initialised weights (std 0.02) are a poor
feature extractor here: SOFT's global term is then an unnormalised sum over the
whole tile, so features, and labels, follow the tile more than the content.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .context import GlobalResult, resized_rows
from .engine import normalized_batch
from .errors import ParameterError
from .io.readers import ImageReader
from .stages import parse_stages
from .tiling import Tile, TileGrid

#: Stages (1-based, as on the command line) whose maps the features use by default.
DEFAULT_CLUSTER_STAGES = (1, 2)


def parse_cluster_stages(text: str | Sequence[int] | None) -> tuple[int, ...]:
    """The stages whose features are clustered: ``"1,2"`` → (1, 2); None → :data:`DEFAULT_CLUSTER_STAGES`."""
    return parse_stages(text, default=DEFAULT_CLUSTER_STAGES, what="cluster stages")


def stage_features(maps: Sequence[Tensor], stages: Sequence[int]) -> Tensor:
    """Concatenate the chosen stage maps (1-based), resized to the first map's (stride-4) grid."""
    size = maps[0].shape[-2:]
    parts = [maps[s - 1] if maps[s - 1].shape[-2:] == size
             else F.interpolate(maps[s - 1], size=size, mode="bilinear", align_corners=False) for s in stages]
    return torch.cat(parts, dim=1)


def kmeans(x: Tensor, k: int, *, seed: int = 0, iters: int = 100, restarts: int = 4,
           tol: float = 1e-5) -> tuple[Tensor, float]:
    """Lloyd's k-means with k-means++ init on rows of ``x`` (N, D); returns (centroids, inertia).

    Deterministic for a given ``seed``. The best of ``restarts`` runs (lowest
    inertia) wins. An emptied cluster is re-seeded at the point farthest from
    its centroid, so exactly ``k`` centroids come back whenever N ≥ k.
    """
    n = x.shape[0]
    if k < 1:
        raise ValueError("k must be at least 1")
    if n < k:
        raise ValueError(f"{n} samples cannot make {k} clusters")
    x = x.float()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x_sq = (x * x).sum(1)
    best: tuple[Tensor, float] | None = None
    for _ in range(max(1, restarts)):
        c = _kmeans_pp(x, x_sq, k, gen)
        prev = math.inf
        for _ in range(iters):
            d2 = _sq_dists(x, x_sq, c)
            dmin, assign = d2.min(1)
            inertia = float(dmin.sum())
            sums = torch.zeros_like(c).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).to(x.dtype)
            empty = counts == 0
            c = sums / counts.clamp_min(1).unsqueeze(1)
            if bool(empty.any()):  # re-seed at the worst-fitted points
                far = dmin.topk(int(empty.sum())).indices
                c[empty] = x[far]
            if prev - inertia <= tol * max(prev, 1e-12) and not bool(empty.any()):
                break
            prev = inertia
        inertia = float(_sq_dists(x, x_sq, c).min(1).values.sum())
        if best is None or inertia < best[1]:
            best = (c, inertia)
    assert best is not None
    return best


def _sq_dists(x: Tensor, x_sq: Tensor, c: Tensor) -> Tensor:
    return (x_sq.unsqueeze(1) + (c * c).sum(1).unsqueeze(0) - 2.0 * (x @ c.T)).clamp_min_(0.0)


def _kmeans_pp(x: Tensor, x_sq: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++: each next centre drawn with probability proportional to D²."""
    n = x.shape[0]
    idx = [int(torch.randint(n, (1,), generator=gen))]
    d2 = _sq_dists(x, x_sq, x[idx]).squeeze(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k: take any unused one
            nxt = next(i for i in range(n) if i not in idx)
        else:
            nxt = int(torch.multinomial(d2 / total, 1, generator=gen))
        idx.append(nxt)
        d2 = torch.minimum(d2, _sq_dists(x, x_sq, x[nxt:nxt + 1]).squeeze(1))
    return x[idx].clone()


@dataclass
class ClusterModel:
    """A fitted clustering: feature standardisation + centroids, applied identically to every tile."""

    stages: tuple[int, ...]
    mean: Tensor  # (D,)
    scale: Tensor  # (D,): 1 / (std · √channels of its stage)
    centroids: Tensor  # (K, D) in the standardised space
    inertia: float
    samples: int

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def to(self, device: torch.device | str) -> ClusterModel:
        return ClusterModel(self.stages, self.mean.to(device), self.scale.to(device), self.centroids.to(device),
                            self.inertia, self.samples)

    def summary(self) -> dict[str, Any]:
        return {"k": self.k, "stages": list(self.stages), "samples": self.samples,
                "inertia_per_sample": self.inertia / max(1, self.samples)}


def cluster_scores(model: ClusterModel, feats: Tensor) -> Tensor:
    """(B, D, h, w) features → (B, K, h, w) negative squared distances (argmax = nearest centroid)."""
    b, d, h, w = feats.shape
    z = (feats.permute(0, 2, 3, 1).reshape(-1, d) - model.mean) * model.scale
    d2 = _sq_dists(z, (z * z).sum(1), model.centroids)
    return (-d2).reshape(b, h, w, -1).permute(0, 3, 1, 2)


def sample_tiles(grid: TileGrid, max_tiles: int) -> list[Tile]:
    """Up to ``max_tiles`` tiles of ``grid`` on a coarse sub-grid spread evenly over the whole image.

    They are the grid's own tiles, so the sampled features have exactly the
    context (tile size, position) the same pixels have when the image is labelled.
    """
    ny = max(1, min(grid.rows, round(math.sqrt(max_tiles * grid.rows / grid.cols))))
    nx = max(1, min(grid.cols, max_tiles // ny))
    rows = sorted({round(v) for v in np.linspace(0, grid.rows - 1, ny)})
    cols = sorted({round(v) for v in np.linspace(0, grid.cols - 1, nx)})
    wanted = {(r, c) for r in rows for c in cols}
    return [t for t in grid if (t.row, t.col) in wanted]


class StageEmbedder:
    """Normalised image tile (B, 3, h, w) → concatenated stride-4 stage features (B, D, h/4, w/4)."""

    def __init__(self, backbone: Any, stages: Sequence[int] = DEFAULT_CLUSTER_STAGES) -> None:
        self.backbone = backbone
        self.stages = tuple(stages)
        self.widths = [int(backbone.config.embed_dims[s - 1]) for s in self.stages]

    def __call__(self, x: Tensor) -> Tensor:
        # Stages 1..deepest: stage_features resizes to stage 1's grid; later stages are not run.
        maps = self.backbone.forward_intermediates(x, list(range(max(self.stages))), intermediates_only=True)
        return stage_features(maps, self.stages)


def fit_clusters(reader: ImageReader, grid: TileGrid, embedder: StageEmbedder, k: int, *,
                 mean: Sequence[float], std: Sequence[float], max_tiles: int = 16, max_samples: int = 50_000,
                 seed: int = 0, device: torch.device | str = "cpu",
                 on_tile: Callable[[int, int], None] | None = None,
                 skip: Callable[[Tile], bool] | None = None) -> ClusterModel:
    """Fit standardisation and k-means centroids on features sampled across the whole image.

    Features come from the tiles of :func:`sample_tiles` (pixels past the image
    edge left out), ``max_samples`` vectors in all, drawn with ``seed``.
    """
    if k < 1:
        raise ParameterError("`clusters` must be at least 1")
    tiles = sample_tiles(grid, max_tiles)
    if skip is not None:  # sample only tiles the run will label (tissue), spread over those
        kept = [t for t in grid if not skip(t)]
        tiles = [kept[round(i)] for i in np.linspace(0, len(kept) - 1, min(max_tiles, len(kept)))] if kept else tiles
    gen = torch.Generator(device="cpu").manual_seed(seed)
    per_tile = max(k, max_samples // len(tiles))
    chunks = []
    with torch.inference_mode():
        for done, t in enumerate(tiles, 1):
            f = embedder(normalized_batch(reader.read_region(t.y, t.x, t.h, t.w), mean, std, device))[0]
            vh = min(f.shape[1], -(-(reader.height - t.y) // 4))
            vw = min(f.shape[2], -(-(reader.width - t.x) // 4))
            f = f[:, :vh, :vw].flatten(1).T.float().cpu()  # (cells, D)
            if f.shape[0] > per_tile:
                f = f[torch.randperm(f.shape[0], generator=gen)[:per_tile]]
            chunks.append(f)
            if on_tile is not None:
                on_tile(done, len(tiles))
    return fit_samples(torch.cat(chunks), k, embedder.stages, embedder.widths, seed=seed)


def fit_samples(x: Tensor, k: int, stages: Sequence[int], widths: Sequence[int], *, seed: int = 0) -> ClusterModel:
    """Standardisation + k-means on sampled feature vectors (N, D) of the stages ``stages`` (``widths`` channels)."""
    if x.shape[0] < k:
        raise ParameterError(f"`clusters` {k} is more than the {x.shape[0]} feature vectors the image gives")
    mu = x.mean(0)
    sd = x.std(0).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones_like(mu)
    weight = torch.cat([torch.full((c,), 1.0 / math.sqrt(c)) for c in widths])
    scale = weight / sd
    centroids, inertia = kmeans((x - mu) * scale, k, seed=seed)
    return ClusterModel(tuple(stages), mu, scale, centroids, inertia, int(x.shape[0]))


# -- global context: features from whole-image maps ------------------------------------------

def global_features(result: GlobalResult, stages: Sequence[int], rows: tuple[int, int], width: int,
                    device: torch.device | str = "cpu") -> Tensor:
    """:func:`stage_features` of the whole image for stride-4 rows [a, b), columns [0, width): (1, D, h, width).

    The maps come from a global run (:func:`softcli.context.run_global`); deeper
    maps are resized to the stage-1 grid exactly as the whole-image resize does.
    """
    target = result.sizes[1]
    parts = [resized_rows(result.maps[s], target, rows, device)[:, :width] for s in stages]
    return torch.cat(parts, dim=-1).permute(2, 0, 1).unsqueeze(0)


def feature_bands(height: int, width: int, channels: int, band_bytes: int = 1 << 25) -> list[tuple[int, int]]:
    """Row bands of a (channels, height, width) float32 feature map, about ``band_bytes`` each."""
    band = max(1, band_bytes // max(1, 4 * channels * width))
    return [(y, min(height, y + band)) for y in range(0, height, band)]


def fit_clusters_global(result: GlobalResult, stages: Sequence[int], widths: Sequence[int], k: int,
                        out_size: tuple[int, int], *, max_samples: int = 50_000, seed: int = 0,
                        device: torch.device | str = "cpu") -> ClusterModel:
    """:func:`fit_samples` on ``max_samples`` vectors drawn uniformly (fixed ``seed``) over the whole image."""
    oh, ow = out_size
    total = oh * ow
    gen = torch.Generator(device="cpu").manual_seed(seed)
    chunks = []
    with torch.inference_mode():
        for a, b in feature_bands(oh, ow, sum(widths)):
            f = global_features(result, stages, (a, b), ow, device)[0].flatten(1).T.float().cpu()
            take = min(f.shape[0], max(1, round(max_samples * f.shape[0] / total)))
            chunks.append(f[torch.randperm(f.shape[0], generator=gen)[:take]])
    return fit_samples(torch.cat(chunks), k, stages, widths, seed=seed)
