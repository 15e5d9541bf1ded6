"""Semantic segmentation on the SOFT pyramid: a Semantic-FPN head and the segmenter module.

The SOFT papers report UperNet on ADE20K but released no segmentation weights,
so softcli uses the lighter Semantic FPN (Kirillov et al., "Panoptic Feature
Pyramid Networks", 2019), the standard head for pyramid backbones (PVT, Twins,
SOFT's own PVT-style ablations): an FPN over the four stage maps, each level
brought to stride 4 by conv-norm-ReLU-upsample steps, summed, and classified.
GroupNorm instead of BatchNorm keeps a tile's logits independent of the batch,
which tiled inference over huge images relies on. Pure modules; no file I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .soft import SoftModel

__all__ = ["HeadConfig", "SemanticFPNHead", "SoftSegmenter", "default_palette"]


@dataclass(frozen=True)
class HeadConfig:
    """Architecture of a :class:`SemanticFPNHead`; serialised in a checkpoint's config.json."""

    num_classes: int
    fpn_channels: int = 256
    channels: int = 128
    groups: int = 32  # GroupNorm groups (capped at the channel count)

    def __post_init__(self) -> None:
        for name in ("num_classes", "fpn_channels", "channels", "groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"head {name} must be at least 1")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown head config keys: {', '.join(unknown)}")
        return cls(**{k: int(v) for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


class SemanticFPNHead(nn.Module):
    """FPN over four maps at strides 4-32 → class logits at stride 4.

    ``forward(maps)`` takes the list of (B, C_i, H_i, W_i) maps that
    :meth:`SoftModel.forward_features` returns and gives (B, classes, H_0, W_0).
    """

    def __init__(self, in_channels: Sequence[int], cfg: HeadConfig) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError("SemanticFPNHead takes the four stage maps of a pyramid backbone")
        self.config = cfg
        self.in_channels = tuple(int(c) for c in in_channels)
        f, c = cfg.fpn_channels, cfg.channels
        self.lateral = nn.ModuleList(nn.Conv2d(ci, f, 1) for ci in self.in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(f, f, 3, padding=1) for _ in self.in_channels)
        # Level i (stride 4·2^i): max(1, i) conv-norm-ReLU steps, each followed by a 2x upsample when i > 0.
        self.scale_heads = nn.ModuleList()
        for i in range(4):
            steps = []
            for s in range(max(1, i)):
                steps += [nn.Conv2d(f if s == 0 else c, c, 3, padding=1, bias=False), _norm(c, cfg.groups),
                          nn.ReLU(inplace=True)]
                if i > 0:
                    steps.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*steps))
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(c, cfg.num_classes, 1)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        lat = [conv(m) for conv, m in zip(self.lateral, maps)]
        for i in range(3, 0, -1):  # top-down pathway
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="bilinear",
                                                    align_corners=False)
        fpn = [conv(x) for conv, x in zip(self.smooth, lat)]
        size = fpn[0].shape[-2:]
        out = self.scale_heads[0](fpn[0])
        for i in range(1, 4):
            y = self.scale_heads[i](fpn[i])
            if y.shape[-2:] != size:  # odd sizes: the 2x steps can miss the stride-4 grid by a pixel
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            out = out + y
        return self.classifier(self.dropout(out))


class SoftSegmenter(nn.Module):
    """SOFT backbone + segmentation head; ``forward`` gives logits at the input's pixel size."""

    def __init__(self, backbone: SoftModel, head: SemanticFPNHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def num_classes(self) -> int:
        return self.head.config.num_classes

    def forward_logits(self, x: Tensor) -> Tensor:
        """Logits at stride 4: (B, classes, ⌈H/4⌉, ⌈W/4⌉) or so, as the stem rounds."""
        return self.head(self.backbone.forward_features(x))

    def forward(self, x: Tensor) -> Tensor:
        logits = self.forward_logits(x)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def default_palette(n: int) -> list[list[int]]:
    """``n`` distinct RGB colours: a fixed, readable start, then golden-ratio hues."""
    base = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180), (70, 240, 240),
            (245, 130, 48), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
            (128, 0, 0), (0, 0, 128), (128, 128, 0), (128, 128, 128)]
    out = [list(c) for c in base[:n]]
    import colorsys

    h = 0.0
    while len(out) < n:
        h = (h + 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.55 + 0.4 * (len(out) % 3) / 2, 0.65 + 0.35 * (len(out) % 2))
        out.append([round(r * 255), round(g * 255), round(b * 255)])
    return out
