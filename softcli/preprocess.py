"""From a decoded image to the tensor a model expects, as its ``pretrained_cfg`` says.

Two paths:

- **eval crop** (the default, timm's evaluation transform): scale the image so
  that it covers ``input_size / crop_pct`` (for a square input: the shorter side
  becomes ``int(size / crop_pct)``, 256 for 224 at 0.875), centre-crop
  ``input_size``, normalise with ``mean``/``std``. This is what the ImageNet
  accuracy of a checkpoint was measured with.
- **full resolution**: the whole image, every pixel, normalised; SOFT takes any
  size. Only images too small for the network (see :func:`min_side`) are scaled
  up to its minimum.

An image so elongated that scaling its short side up would make a huge
intermediate (3x100000 → 256x8.5M, 26 GB) is first cut, on the decoded array,
to the part that lands in the centre crop (plus a margin for the filter), and
only that part is resized: same crop, bounded memory.

Resizing runs in float32 on the [0, 1] array with antialiasing (no round trip
through 8 bits, so 16-bit TIFF precision survives) and is clamped back to [0, 1]
because bicubic overshoots.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import IMAGENET_PRETRAINED_CFG
from .constants import IMAGENET_MEAN, IMAGENET_STD

#: The eval path cuts the source first when the scaled image would be this many times the crop.
CUT_FIRST_RATIO = 16
#: Output pixels kept around the crop when cutting first, so the resize filter sees the same neighbours.
CUT_MARGIN = 8

#: ``pretrained_cfg["interpolation"]`` → ``F.interpolate`` mode.
_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "area": "area"}


@dataclass(frozen=True)
class Preprocess:
    """The preprocessing half of a model's ``pretrained_cfg``, validated."""

    input_size: tuple[int, int] = (224, 224)  # (H, W)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be two positive sizes (H, W), not {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std > 0")
        if self.interpolation not in _MODES:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {', '.join(_MODES)}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], not {self.crop_pct}")

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any] | None) -> Preprocess:
        """From a timm-style ``pretrained_cfg`` (``input_size`` is ``[C, H, W]``); ImageNet defaults fill gaps."""
        merged = {**IMAGENET_PRETRAINED_CFG, **dict(cfg or {})}
        size = list(merged["input_size"])
        if len(size) == 3:
            size = size[1:]
        return cls(input_size=(int(size[0]), int(size[1])),
                   mean=tuple(float(v) for v in merged["mean"]),  # type: ignore[arg-type]
                   std=tuple(float(v) for v in merged["std"]),  # type: ignore[arg-type]
                   interpolation=str(merged.get("interpolation") or "bicubic"),
                   crop_pct=float(merged.get("crop_pct") or 1.0))

    @classmethod
    def for_model(cls, model: Any) -> Preprocess:
        return cls.from_cfg(getattr(model, "pretrained_cfg", None))

    @property
    def resize_size(self) -> tuple[int, int]:
        """The (H, W) the image must cover before the centre crop, as timm computes it."""
        h, w = self.input_size
        return math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)


def min_side(model: Any) -> int:
    """The smallest image side a SOFT network takes: every stage's token map must hold one landmark cell."""
    ratios = getattr(getattr(model, "config", None), "sr_ratios", (8, 4, 2))
    return max(4 * 2**i * int(r) for i, r in enumerate(ratios))


def rgb_to_chw(image: np.ndarray) -> Tensor:
    """float RGB (H, W, 3) in [0, 1] → (3, H, W) float32."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)


def resize(x: Tensor, size: tuple[int, int], interpolation: str = "bicubic") -> Tensor:
    """(3, H, W) → (3, h, w), antialiased when shrinking, clamped to [0, 1]."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    mode = _MODES[interpolation]
    kwargs: dict[str, Any] = {}
    if mode in ("bicubic", "bilinear"):
        kwargs = {"align_corners": False, "antialias": True}
    out = F.interpolate(x[None], size=size, mode=mode, **kwargs)[0]
    return out.clamp_(0.0, 1.0)


def scale_to_cover(hw: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The size of ``hw`` scaled (aspect kept) until it covers ``target``.

    For a square target this is torchvision's ``Resize(int)``: the shorter side
    becomes the target and the longer one ``int(target * long / short)``.
    """
    h, w = hw
    th, tw = target
    if th == tw:
        if h <= w:
            return th, max(th, int(th * w / h))
        return max(tw, int(tw * h / w)), tw
    s = max(th / h, tw / w)
    return max(th, round(h * s)), max(tw, round(w * s))


def center_crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """The centre ``size`` of (3, H, W), placed as torchvision's ``center_crop``."""
    h, w = x.shape[-2:]
    ch, cw = size
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return x[:, top : top + ch, left : left + cw]


def normalize(x: Tensor, pre: Preprocess) -> Tensor:
    mean = torch.tensor(pre.mean, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


def _cut_axis(n: int, scaled: int, crop: int) -> tuple[int, int, int]:
    """Along one axis: (source start, source length, scaled length) of the centre part a crop needs."""
    keep = crop + 2 * CUT_MARGIN
    if scaled <= 4 * keep:  # only the long axis is cut; the short one keeps timm's exact scale
        return 0, n, scaled
    per_out = n / scaled  # source pixels per scaled pixel
    length = min(n, math.ceil(keep * per_out))
    length += (n - length) % 2  # same parity as n: the cut is centred exactly, like the crop
    return (n - length) // 2, length, max(crop, round(length / per_out))


def eval_transform(image: np.ndarray, pre: Preprocess) -> Tensor:
    """Resize to cover ``input_size / crop_pct``, centre-crop ``input_size``, normalise → (3, H, W).

    The scaled size is computed from the decoded array's size; when it would be
    more than :data:`CUT_FIRST_RATIO` times the crop, the array is cut to the
    centre first (see the module docstring).
    """
    x = rgb_to_chw(image)
    h, w = x.shape[-2:]
    size = scale_to_cover((h, w), pre.resize_size)
    ch, cw = pre.input_size
    if size[0] * size[1] > CUT_FIRST_RATIO * ch * cw:
        y0, hh, sh = _cut_axis(h, size[0], ch)
        x0, ww, sw = _cut_axis(w, size[1], cw)
        x, size = x[:, y0:y0 + hh, x0:x0 + ww], (sh, sw)
    x = resize(x, size, pre.interpolation)
    return normalize(center_crop(x, pre.input_size), pre)


def full_res_size(hw: tuple[int, int], smallest: int = 32) -> tuple[int, int]:
    """The (H, W) :func:`full_res_transform` gives an image of size ``hw``: scaled up only when a side is short."""
    h, w = hw
    if min(h, w) >= smallest:
        return h, w
    s = smallest / min(h, w)
    return max(smallest, round(h * s)), max(smallest, round(w * s))


def full_res_transform(image: np.ndarray, pre: Preprocess, smallest: int = 32) -> Tensor:
    """The whole image normalised; scaled up (aspect kept) only when a side is under ``smallest``."""
    x = rgb_to_chw(image)
    size = full_res_size((int(x.shape[-2]), int(x.shape[-1])), smallest)
    if size != tuple(x.shape[-2:]):
        x = resize(x, size, pre.interpolation)
    return normalize(x, pre)


T = TypeVar("T")


def batch_same_size(items: Iterable[tuple[T, Tensor | None]],
                    batch_size: int) -> Iterator[tuple[list[T], Tensor | None]]:
    """Group consecutive (key, (3, H, W) tensor) pairs of one size into (keys, (B, 3, H, W)) batches.

    Order is kept: a change of size closes the batch, and an item whose tensor is
    ``None`` (it failed to load) closes it too and comes out alone as
    ``([key], None)``, so results can be reported in input order.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    keys: list[T] = []
    tensors: list[Tensor] = []
    for key, t in items:
        if tensors and (t is None or t.shape != tensors[0].shape or len(tensors) >= batch_size):
            yield keys, torch.stack(tensors)
            keys, tensors = [], []
        if t is None:
            yield [key], None
            continue
        keys.append(key)
        tensors.append(t)
    if tensors:
        yield keys, torch.stack(tensors)
