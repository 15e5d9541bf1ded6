"""Positional-embedding grids resized to any token grid, whole or one window at a time.

SOFT adds a learned grid, bilinearly resized (align_corners=False) to the
actual H x W. :func:`resize_pos_embed` does it for a whole grid;
:func:`pos_embed_region` evaluates the same resize on a window only, which is
what streamed whole-image inference (:mod:`softcli.context`) needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pos_embed_region", "resize_pos_embed", "resize_region"]


def resize_pos_embed(pos: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Bilinear resize of a (1, gh·gw, C) grid to (1, H·W, C); identity at the trained size."""
    if tuple(size) == tuple(grid):
        return pos
    c = pos.shape[-1]
    g = pos.reshape(1, grid[0], grid[1], c).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=size, mode="bilinear", align_corners=False)
    return g.flatten(2).transpose(1, 2)


def _lerp_index(start: int, stop: int, n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices and weights of bilinear (align_corners=False) output cells [start, stop)."""
    scale = n_in / n_out
    src = ((torch.arange(start, stop, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    return i0, i1, (src - i0).clamp(0.0, 1.0)


def resize_region(fetch_rows: Callable[[int, int], Tensor], in_size: tuple[int, int], out_size: tuple[int, int],
                  rows: tuple[int, int], cols: tuple[int, int]) -> Tensor:
    """Cells rows x cols (half-open ranges) of a bilinear resize (align_corners=False) of an
    (H_in, W_in, C) map to ``out_size``, reading only the source rows they need.

    ``fetch_rows(a, b)`` returns source rows [a, b) as (b - a, W_in, C). This is
    the whole-grid interpolation evaluated on a window, for streamed inference.
    """
    r0, r1, ly = _lerp_index(rows[0], rows[1], in_size[0], out_size[0])
    c0, c1, lx = _lerp_index(cols[0], cols[1], in_size[1], out_size[1])
    base = int(r0.min())
    src = fetch_rows(base, int(r1.max()) + 1)
    lyt = ly.to(src.dtype).to(src.device).view(-1, 1, 1)
    lxt = lx.to(src.dtype).to(src.device).view(1, -1, 1)
    dev = src.device
    a = src.index_select(0, (r0 - base).to(dev))
    b = src.index_select(0, (r1 - base).to(dev))
    rows_out = a + (b - a) * lyt  # (h, W_in, C)
    left = rows_out.index_select(1, c0.to(dev))
    right = rows_out.index_select(1, c1.to(dev))
    return left + (right - left) * lxt


def pos_embed_region(pos: Tensor, grid: tuple[int, int], size: tuple[int, int], rows: tuple[int, int],
                     cols: tuple[int, int]) -> Tensor:
    """Tokens rows x cols of :func:`resize_pos_embed` (1, h·w, C), without building the whole grid."""
    c = pos.shape[-1]
    if tuple(size) == tuple(grid):
        g = pos.reshape(grid[0], grid[1], c)[rows[0]:rows[1], cols[0]:cols[1]]
    else:
        g = resize_region(lambda a, b: pos.reshape(grid[0], grid[1], c)[a:b], grid, size, rows, cols)
    return g.reshape(1, -1, c)
