"""Tile grids with overlap and the blend weights that hide the seams.

API (stable; ``soft segment`` builds on it)::

    grid = TileGrid(height, width, tile=1024, overlap=64)
    for t in grid:                        # row-major Tile(index, row, col, y, x, h, w)
        img = reader.read_region(t.y, t.x, t.h, t.w)
        w4 = grid.weights(t, stride=4)    # (h/4, w/4) float32 blend weights at stride 4
    grid.out_size(stride)                 # (ceil(H/stride), ceil(W/stride))

Rules, chosen so stage maps at strides 4..32 line up between tiles:

- The image is treated as rounded up to a multiple of ``align`` (32) — the
  reader replicates edge pixels there — and every tile origin and size is a
  multiple of ``align``. So a tile's stride-s map covers exactly
  [y/s, (y+h)/s) of the whole image's stride-s map.
- ``tile`` is the *largest* tile. Along each axis the grid uses the fewest
  tiles that keep at least ``overlap`` pixels between neighbours, then shrinks
  the tiles to the smallest aligned size that still covers the image and
  spreads them evenly; edge tiles are therefore never padded or shifted
  out of the image. An image no larger than a tile is one tile (whole-image mode).
- Blend weights are separable ramps (``linear``: across the actual overlap
  with each neighbour, 0 over its outer quarter — so a tile's own border
  effects never reach the output — rising linearly over the middle half, and 1
  elsewhere and at image borders;
  ``gaussian``: centred, σ = tile/8) normalised so the weights of all tiles
  covering a pixel sum to 1. Because the grid is a product of row and column
  positions, normalising the 1-D ramps normalises the 2-D weights: the blend
  needs no full-size weight accumulator, and a row of tiles is final as soon
  as it has been added (:meth:`TileGrid.final_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

#: Largest default tile side (pixels). Stage 4 is softmax attention, quadratic in
#: tokens, so a whole 4096² image costs an estimated ~7.6x a 2048² one; capping tiles keeps
#: ``soft features`` linear in pixels (see bench/README.md, "features").
DEFAULT_TILE = 1024
#: Default overlap between neighbouring tiles (pixels; a multiple of 32 = 2 stage-4 tokens).
DEFAULT_OVERLAP = 64
ALIGN = 32
BLEND_MODES = ("linear", "gaussian")


def _ceil_to(v: int, m: int) -> int:
    return -(-v // m) * m


@dataclass(frozen=True)
class Tile:
    """One tile: its place in the grid and its pixel box in the (aligned) image."""

    index: int
    row: int
    col: int
    y: int
    x: int
    h: int
    w: int


def axis_layout(length: int, tile: int, overlap: int, align: int = ALIGN) -> tuple[list[int], int]:
    """Tile origins and the common tile length along one axis of ``length`` pixels.

    ``length`` is rounded up to ``align``; origins and the tile length are multiples
    of ``align``; neighbours overlap by at least ``overlap``.
    """
    if length < 1:
        raise ValueError("an image axis needs at least one pixel")
    padded = _ceil_to(length, align)
    if padded <= tile:
        return [0], padded
    n = math.ceil((padded - overlap) / (tile - overlap))
    t = min(tile, _ceil_to(math.ceil((padded + (n - 1) * overlap) / n), align))
    span = (padded - t) // align  # in align units
    pos = [(i * span // (n - 1)) * align for i in range(n)]
    return pos, t


def _ramp(length: int, left: int, right: int, mode: str) -> np.ndarray:
    """Un-normalised 1-D weights for a tile of ``length`` cells overlapping its neighbours by left/right cells.

    ``linear`` is 0 over the outer quarter of each overlap (where the tile's own
    border effects live), rises linearly over the middle half, and is 1 elsewhere.
    """
    i = np.arange(length, dtype=np.float64) + 0.5
    if mode == "gaussian":
        sigma = max(length / 8.0, 0.5)
        return np.exp(-0.5 * ((i - length / 2.0) / sigma) ** 2)
    w = np.ones(length)
    if left > 0:
        w = np.minimum(w, np.clip((i - left / 4.0) / (left / 2.0), 0.0, 1.0))
    if right > 0:
        w = np.minimum(w, np.clip((length - i - right / 4.0) / (right / 2.0), 0.0, 1.0))
    return w


@lru_cache(maxsize=64)
def _axis_weights(positions: tuple[int, ...], tile: int, stride: int, mode: str) -> tuple[np.ndarray, ...]:
    """Normalised 1-D weights of every tile along one axis at ``stride`` (they sum to 1 at each cell)."""
    if mode not in BLEND_MODES:
        raise ValueError(f"blend must be one of {', '.join(BLEND_MODES)}, not {mode!r}")
    length = tile // stride
    starts = [p // stride for p in positions]
    raws = []
    for k, s in enumerate(starts):
        left = starts[k - 1] + length - s if k > 0 else 0
        right = s + length - starts[k + 1] if k + 1 < len(starts) else 0
        raws.append(_ramp(length, left, right, mode))
    total = np.zeros(starts[-1] + length)
    for s, r in zip(starts, raws):
        total[s:s + length] += r
    if not total.all():  # overlaps wider than half a tile can leave cells nobody weighs: share them
        for s, r in zip(starts, raws):
            r[total[s:s + length] == 0] = 1.0
        total[:] = 0.0
        for s, r in zip(starts, raws):
            total[s:s + length] += r
    out = tuple((r / total[s:s + length]).astype(np.float32) for s, r in zip(starts, raws))
    for a in out:
        a.setflags(write=False)
    return out


class TileGrid:
    """An overlapping, 32-aligned grid of tiles over an ``height`` x ``width`` image (see module docstring)."""

    def __init__(self, height: int, width: int, tile: int | tuple[int, int] = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP, align: int = ALIGN) -> None:
        th, tw = (tile, tile) if isinstance(tile, int) else tile
        if height < 1 or width < 1:
            raise ValueError(f"image has no pixels ({width}x{height})")
        if th < align or tw < align or th % align or tw % align:
            raise ValueError(f"tile size must be a positive multiple of {align}, not {tw}x{th}")
        if overlap < 0 or overlap >= min(th, tw):
            raise ValueError(f"overlap must be at least 0 and smaller than the tile ({min(th, tw)}), not {overlap}")
        self.height, self.width = int(height), int(width)
        self.align = align
        self.overlap = int(overlap)
        self.ys, self.tile_h = axis_layout(self.height, th, overlap, align)
        self.xs, self.tile_w = axis_layout(self.width, tw, overlap, align)
        self.padded = (_ceil_to(self.height, align), _ceil_to(self.width, align))

    @property
    def rows(self) -> int:
        return len(self.ys)

    @property
    def cols(self) -> int:
        return len(self.xs)

    @property
    def tile_size(self) -> tuple[int, int]:
        return self.tile_h, self.tile_w

    @property
    def whole(self) -> bool:
        """True when one tile covers the image (no blending at all)."""
        return len(self) == 1

    def __len__(self) -> int:
        return self.rows * self.cols

    def __iter__(self) -> Iterator[Tile]:
        for r, y in enumerate(self.ys):
            for c, x in enumerate(self.xs):
                yield Tile(r * self.cols + c, r, c, y, x, self.tile_h, self.tile_w)

    def out_size(self, stride: int) -> tuple[int, int]:
        """Size of the whole image's map at ``stride`` (what a model returns for the unpadded image)."""
        return -(-self.height // stride), -(-self.width // stride)

    def weights(self, tile: Tile, stride: int = 1, mode: str = "linear") -> np.ndarray:
        """Blend weights (h/stride, w/stride) of ``tile``; over all tiles they sum to 1 at every cell."""
        self._check_stride(stride)
        wy = _axis_weights(tuple(self.ys), self.tile_h, stride, mode)[tile.row]
        wx = _axis_weights(tuple(self.xs), self.tile_w, stride, mode)[tile.col]
        return np.outer(wy, wx)

    def axis_weights(self, tile: Tile, stride: int = 1, mode: str = "linear") -> tuple[np.ndarray, np.ndarray]:
        """The separable factors of :meth:`weights`: (rows, cols) 1-D arrays."""
        self._check_stride(stride)
        return (_axis_weights(tuple(self.ys), self.tile_h, stride, mode)[tile.row],
                _axis_weights(tuple(self.xs), self.tile_w, stride, mode)[tile.col])

    def final_rows(self, row: int, stride: int) -> int:
        """Map rows (at ``stride``) that are complete once tile rows 0..``row`` have been added."""
        if row + 1 < self.rows:
            return self.ys[row + 1] // stride
        return self.out_size(stride)[0]

    def _check_stride(self, stride: int) -> None:
        if stride < 1 or self.align % stride:
            raise ValueError(f"stride must divide the alignment {self.align}, not {stride}")

    def __repr__(self) -> str:
        return (f"TileGrid({self.width}x{self.height}: {self.cols}x{self.rows} tiles of "
                f"{self.tile_w}x{self.tile_h}, overlap ≥ {self.overlap})")


# --------------------------------------------------------------------------------------
# Memory model

#: Peak bytes per input pixel of ``forward_features`` in inference mode for a
#: stage-1 width of 64 (all published variants), float32, CPU. Measured with
#: bench/bench_features.py --memory-model (see bench/README.md).
BYTES_PER_PIXEL_C64 = 450.0
#: Model weights, framework and I/O overhead outside the per-pixel activations.
FIXED_OVERHEAD_BYTES = 350 * 2**20


def estimate_memory(pixels: int, model_config: Mapping[str, Any] | Any | None = None,
                    params: int = 0) -> int:
    """Estimated peak bytes to run ``forward_features`` on ``pixels`` input pixels."""
    c1 = 64
    if model_config is not None:
        dims = model_config["embed_dims"] if isinstance(model_config, Mapping) else model_config.embed_dims
        c1 = int(dims[0])
    return int(FIXED_OVERHEAD_BYTES + 4 * params + pixels * BYTES_PER_PIXEL_C64 * c1 / 64)


def choose_tile_size(max_memory_bytes: int, model_config: Mapping[str, Any] | Any | None = None,
                     params: int = 0, cap: int = DEFAULT_TILE, align: int = ALIGN) -> int:
    """Largest aligned tile side whose estimated peak fits ``max_memory_bytes``, at most ``cap``."""
    per_px = estimate_memory(1, model_config) - FIXED_OVERHEAD_BYTES
    room = max_memory_bytes - estimate_memory(0, model_config, params)
    side = int(math.sqrt(max(room, 0) / max(per_px, 1)))
    side = side // align * align
    return max(2 * align, min(cap, side))
