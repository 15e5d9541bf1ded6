"""Tissue masks: which tiles of a slide hold tissue, so the white glass around it is never run through the model.

``auto`` mask, computed on a thumbnail of at most :data:`THUMB_MAX_SIDE` pixels a
side read from a low pyramid level (never level 0 whole):

1. saturation ``(max - min) / max`` of each thumbnail pixel (stained tissue is
   coloured, glass and background are white or grey);
2. Otsu's threshold on it, never below :data:`MIN_SATURATION` (so an all-white
   image has no tissue, and an all-tissue image is not split in two);
3. the mask grown by :data:`DILATE` thumbnail pixels, so tissue edges are kept.

A mask file (PNG, TIFF, ...: any image; non-zero = tissue) is scaled to the image.
Tiles whose box holds no mask pixel are skipped; their pixels are label 0
(``background``) in segmentation masks and zero in feature maps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, UsageError
from .io.readers import ImageReader
from .io.slide import preview
from .tiling import Tile

#: ``auto`` by default for slides above this many level-0 pixels (4096²); smaller images are processed whole.
TISSUE_AUTO_PIXELS = 4096 * 4096
THUMB_MAX_SIDE = 1024
MIN_SATURATION = 0.05
DILATE = 2
BACKGROUND_NAME = "background"
BACKGROUND_COLOR = (0, 0, 0)


@dataclass
class TissueMask:
    """A boolean mask over an image of ``height`` x ``width`` pixels, at the mask's own (lower) resolution."""

    mask: np.ndarray  # bool (mh, mw)
    height: int
    width: int
    method: str  # "otsu-saturation" or "file"
    threshold: float | None = None
    source: str = ""

    @property
    def fraction(self) -> float:
        """Share of the image covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def box_has_tissue(self, y: int, x: int, h: int, w: int) -> bool:
        """Whether any mask cell overlapping pixels [y, y+h) x [x, x+w) is tissue."""
        mh, mw = self.mask.shape
        y0, y1 = max(0, math.floor(y * mh / self.height)), min(mh, math.ceil((y + h) * mh / self.height))
        x0, x1 = max(0, math.floor(x * mw / self.width)), min(mw, math.ceil((x + w) * mw / self.width))
        return bool(y0 < y1 and x0 < x1 and self.mask[y0:y1, x0:x1].any())

    def skip_tile(self, tile: Tile) -> bool:
        """True for a tile without tissue (the engine's ``skip``)."""
        return not self.box_has_tissue(tile.y, tile.x, tile.h, tile.w)

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """Pixel rows [y0, y1) of the mask at image resolution (nearest cell): bool (y1 - y0, width)."""
        mh, mw = self.mask.shape
        ri = np.minimum(np.arange(y0, y1) * mh // self.height, mh - 1)
        ci = np.minimum(np.arange(self.width) * mw // self.width, mw - 1)
        return self.mask[ri][:, ci]

    def summary(self, tiles_total: int, tiles_skipped: int, seconds: float) -> dict[str, Any]:
        """For ``--json``: tissue fraction, tiles skipped and the time that saved (estimated from the tiles run)."""
        run = tiles_total - tiles_skipped
        saved = seconds / run * tiles_skipped if run else 0.0
        out: dict[str, Any] = {"method": self.method, "fraction": round(self.fraction, 4),
                               "tiles_total": tiles_total, "tiles_skipped": tiles_skipped,
                               "seconds_saved_estimate": round(saved, 3)}
        if self.threshold is not None:
            out["threshold"] = round(self.threshold, 4)
        if self.source:
            out["source"] = self.source
        return out


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of float RGB (H, W, 3) in [0, 1]."""
    hi, lo = rgb.max(axis=2), rgb.min(axis=2)
    return np.where(hi > 1e-6, (hi - lo) / np.maximum(hi, 1e-6), 0.0).astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (the split maximising between-class variance)."""
    hist, edges = np.histogram(np.clip(values, 0, 1), bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(1, hist.sum())
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    total = m0[-1]
    w1 = 1 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0
    return float(edges[int(np.argmax(between)) + 1])


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2r+1)² square, with shifts (no scipy)."""
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            src = mask[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
            out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] |= src
    return out


def mask_from_rgb(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """(tissue mask, saturation threshold) of a thumbnail (see module docstring)."""
    sat = saturation(rgb)
    threshold = max(otsu_threshold(sat), MIN_SATURATION)
    return dilate(sat > threshold, DILATE), threshold


def parse_tissue(value: str | os.PathLike[str] | None) -> str | Path | None:
    """``auto``, ``none``, None (the default rule) or a mask file path."""
    if value is None:
        return None
    text = str(value)
    if text.lower() in ("auto", "none"):
        return text.lower()
    path = Path(value)
    if not path.is_file():
        raise InputError(f"{path}: tissue mask file not found (the tissue setting takes auto, none or a mask image)")
    return path


def compute_tissue(reader: ImageReader, image: str | os.PathLike[str], tissue: str | os.PathLike[str] | None,
                   max_pixels: int | None) -> TissueMask | None:
    """The tissue mask for ``reader`` as ``tissue`` asks.

    None (the default) is ``auto`` for a slide, a file with a microns-per-pixel in its
    metadata, above 4096² level-0 pixels, and ``none`` otherwise: a grey satellite
    scene has no saturation to threshold and must not lose its tiles.
    """
    choice = parse_tissue(tissue)
    if choice is None:  # the default: masking only for slides (microscope resolution in the file) above 4096²
        h0, w0 = reader.levels[0] if getattr(reader, "levels", None) else (reader.height, reader.width)
        is_slide = reader.slide.mpp is not None
        choice = "auto" if is_slide and h0 * w0 > TISSUE_AUTO_PIXELS else "none"
    if choice == "none":
        return None
    if isinstance(choice, Path):
        from .io.image import load_image

        try:
            arr = load_image(choice, max_pixels=max_pixels)
        except InputError as exc:
            raise InputError(f"tissue mask {exc.template}") from exc
        return TissueMask(arr.max(axis=2) > 0, reader.height, reader.width, "file", source=str(choice))
    thumb, _ = preview(reader, str(image), THUMB_MAX_SIDE, max_pixels)
    mask, threshold = mask_from_rgb(thumb)
    return TissueMask(mask, reader.height, reader.width, "otsu-saturation", threshold)


class TissueLabels:
    """A label raster proxy: labels shift up by one and pixels outside tissue become label 0 (background).

    Stands in for :class:`~softcli.io.masks.LabelRaster` where the segmentation sink writes rows.
    """

    def __init__(self, raster: Any, tissue: TissueMask) -> None:
        if (raster.height, raster.width) != (tissue.height, tissue.width):
            raise ValueError("tissue mask and label raster sizes differ")
        self.raster, self.tissue = raster, tissue
        self.height, self.width = raster.height, raster.width

    def write_rows(self, y0: int, labels: np.ndarray) -> None:
        inside = self.tissue.rows(y0, y0 + labels.shape[0])
        self.raster.write_rows(y0, np.where(inside, labels.astype(np.int64) + 1, 0))


def with_background(names: list[str], palette: list[list[int]]) -> tuple[list[str], list[list[int]]]:
    """Label names and palette with ``background`` as label 0."""
    if BACKGROUND_NAME in names:
        raise UsageError(f"a class is already named {BACKGROUND_NAME!r}; tissue masking needs label 0 for it")
    return [BACKGROUND_NAME, *names], [list(BACKGROUND_COLOR), *palette]


def counting_skip(tissue: TissueMask | None) -> tuple[Callable[[Tile], bool] | None, list[int]]:
    """(skip function for the engine, [tiles skipped so far]) — a counter the summary reads after the run."""
    if tissue is None:
        return None, [0]
    skipped = [0]

    def skip(tile: Tile) -> bool:
        if tissue.skip_tile(tile):
            skipped[0] += 1
            return True
        return False

    return skip, skipped
