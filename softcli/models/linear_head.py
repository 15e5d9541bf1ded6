"""A linear segmentation head on frozen SOFT stage features: what ``soft fit segment`` fits by default.

Per stride-4 cell: the chosen stage maps (resized to stride 4 and concatenated),
then their local mean and standard deviation over a ``window`` x ``window``
neighbourhood (texture statistics: a pixel's class depends on what is around
it), then one 1x1 convolution to class logits. Everything before the
convolution is fixed, so fitting the head is a convex problem (multinomial
logistic regression, see :mod:`softcli.fit.probe`), and, because the head is
linear in its features, blending logits across tile overlaps equals blending
the features. Pure module; no file I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cluster import stage_features

__all__ = ["LinearHeadConfig", "LinearSegHead"]


@dataclass(frozen=True)
class LinearHeadConfig:
    """Architecture of a :class:`LinearSegHead`; serialised in a checkpoint's config.json."""

    num_classes: int
    stages: tuple[int, ...] = (1,)
    window: int = 9  # local statistics window, in stride-4 cells (odd; 1 = the cell alone, mean only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(int(s) for s in self.stages))
        if int(self.num_classes) < 2:
            raise ValueError("a segmentation head needs at least 2 classes")
        if not self.stages or any(s not in (1, 2, 3, 4) for s in self.stages) or \
                len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages must be distinct numbers 1-4, not {list(self.stages)}")
        if int(self.window) < 1 or int(self.window) % 2 == 0:
            raise ValueError(f"window must be an odd number of cells (1, 3, 5, ...), not {self.window}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LinearHeadConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown linear head config keys: {', '.join(unknown)}")
        values = dict(data)
        if "stages" in values:
            values["stages"] = tuple(int(s) for s in values["stages"])
        for key in ("num_classes", "window"):
            if key in values:
                values[key] = int(values[key])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stages"] = list(self.stages)
        return out

    def feature_dim(self, embed_dims: Sequence[int]) -> int:
        """Channels the 1x1 convolution sees: stage widths, twice when the window gives a std too."""
        width = sum(int(embed_dims[s - 1]) for s in self.stages)
        return width * (2 if self.window > 1 else 1)


def local_stats(x: Tensor, window: int) -> Tensor:
    """(B, C, h, w) → (B, 2C, h, w): mean and standard deviation over ``window``² cells (edges: valid cells only)."""
    if window == 1:
        return x
    pad = window // 2
    mean = F.avg_pool2d(x, window, 1, pad, count_include_pad=False)
    sq = F.avg_pool2d(x * x, window, 1, pad, count_include_pad=False)
    return torch.cat([mean, (sq - mean * mean).clamp_min(0.0).sqrt()], dim=1)


class LinearSegHead(nn.Module):
    """Stage maps → local statistics → 1x1 conv logits at stride 4 (see the module docstring)."""

    head_type = "linear"

    def __init__(self, in_channels: Sequence[int], cfg: LinearHeadConfig) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError("LinearSegHead takes the four stage widths of a pyramid backbone")
        self.config = cfg
        self.in_channels = tuple(int(c) for c in in_channels)
        self.classifier = nn.Conv2d(cfg.feature_dim(self.in_channels), cfg.num_classes, 1)

    def features(self, maps: Sequence[Tensor]) -> Tensor:
        """What the classifier sees: (B, D, h, w) at the stride of the first stage map."""
        return local_stats(stage_features(maps, self.config.stages).float(), self.config.window)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.features(maps))
