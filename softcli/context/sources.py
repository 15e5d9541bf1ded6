"""What a global run reads: image sources, and patch embeddings evaluated on windows with exact halos."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import normalized_batch
from ..io.readers import ImageReader
from ..models.layers import embed_convs
from ..models.soft import SoftStage


class ImageSource(Protocol):
    """A normalised image the global run reads by rectangles."""

    height: int
    width: int

    def region(self, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        """Pixels [y0, y1) x [x0, x1) as a normalised (1, 3, h, w) float32 tensor on the model's device."""
        ...


class ReaderSource:
    """An :class:`ImageReader` seen as ``height`` x ``width`` pixels (past its edge: replicated, as the reader does)."""

    def __init__(self, reader: ImageReader, height: int, width: int, mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str = "cpu") -> None:
        self.reader, self.height, self.width = reader, int(height), int(width)
        self.mean, self.std, self.device = mean, std, device

    def region(self, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        return normalized_batch(self.reader.read_region(y0, x0, y1 - y0, x1 - x0), self.mean, self.std, self.device)


class TensorSource:
    """An already normalised (1, 3, H, W) tensor."""

    def __init__(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[0] != 1:
            raise ValueError(f"expected one (1, 3, H, W) image, got {tuple(x.shape)}")
        self.x = x
        self.height, self.width = int(x.shape[-2]), int(x.shape[-1])

    def region(self, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        return self.x[:, :, y0:y1, x0:x1]


# -- halo convolutions --------------------------------------------------------------------------

def _conv_geometry(conv: nn.Conv2d, axis: int) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a conv along one axis (the patch embeddings pad with numbers)."""
    return int(conv.kernel_size[axis]), int(conv.stride[axis]), int(conv.padding[axis])  # type: ignore[index]


def _conv_out(n: int, conv: nn.Conv2d, axis: int) -> int:
    k, s, p = _conv_geometry(conv, axis)
    return (n + 2 * p - k) // s + 1


def _needed(conv: nn.Conv2d, axis: int, out: tuple[int, int], n_in: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Input range (clipped to [0, n_in)) and zero padding (before, after) that give outputs ``out`` exactly."""
    k, s, p = _conv_geometry(conv, axis)
    lo, hi = s * out[0] - p, s * (out[1] - 1) - p + k
    return (max(lo, 0), min(hi, n_in)), (max(0, -lo), max(0, hi - n_in))


def embed_sizes(stage: SoftStage, size: tuple[int, int]) -> list[tuple[int, int]]:
    """Map sizes before and after every conv of a stage's patch embedding."""
    sizes = [size]
    for m in stage.patch_embed:
        if isinstance(m, nn.Conv2d):
            h, w = sizes[-1]
            sizes.append((_conv_out(h, m, 0), _conv_out(w, m, 1)))
    return sizes


def embed_region(stage: SoftStage, fetch: Callable[[int, int, int, int], Tensor], in_size: tuple[int, int],
                 rows: tuple[int, int], cols: tuple[int, int]) -> Tensor:
    """Cells rows x cols of ``stage.patch_embed`` applied to the whole input, reading only what they need.

    ``fetch(y0, y1, x0, x1)`` returns that window of the input as (1, C, h, w).
    Every conv gets its input window plus explicit zero padding where the
    whole-image conv pads, then runs unpadded; BN and ReLU are per cell.
    """
    convs = [m for m in stage.patch_embed if isinstance(m, nn.Conv2d)]
    sizes = embed_sizes(stage, in_size)
    ranges = [(rows, cols)]
    pads: list[tuple[int, int, int, int]] = []
    for conv, (h, w) in zip(reversed(convs), reversed(sizes[:-1])):
        (ry, py), (rx, px) = _needed(conv, 0, ranges[0][0], h), _needed(conv, 1, ranges[0][1], w)
        ranges.insert(0, (ry, rx))
        pads.insert(0, (px[0], px[1], py[0], py[1]))
    (y0, y1), (x0, x1) = ranges[0]
    x = fetch(y0, y1, x0, x1).contiguous(memory_format=torch.channels_last)  # as SoftStage runs it
    for i, (conv, weight, bias, after) in enumerate(embed_convs(stage.patch_embed)):
        x = after(F.conv2d(F.pad(x, pads[i]), weight, bias, conv.stride, 0, conv.dilation, conv.groups))
    return x
