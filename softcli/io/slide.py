"""Whole-slide metadata and resolution: microns per pixel, objective power, level choice, resampling.

Where the resolution comes from, in this order (the first that gives one wins):

- Aperio descriptions (``Aperio Image Library ... |MPP = 0.2499|AppMag = 40|...``);
- OME-XML ``Pixels`` ``PhysicalSizeX``/``PhysicalSizeY`` (unit attribute honoured; µm by default);
- Hamamatsu NDPI ``Magnification`` tag (power only; its mpp is in the resolution tags);
- OpenSlide properties (``openslide.mpp-x``, ``openslide.objective-power``) for files OpenSlide reads;
- TIFF ``XResolution``/``YResolution`` with ``ResolutionUnit`` centimetre, or inch when
  the result is finer than :data:`MAX_RESOLUTION_TAG_MPP` (a 72/300 dpi photo tag is not a microscope).

Magnification is turned into a target resolution with the slide's own objective
power when it has one (``downsample = power / magnification``), else with the
common convention ``mpp = 10 / magnification`` (40x ≈ 0.25 µm/px).

Level choice: the coarsest pyramid level whose mpp is at or below (finer than or
equal to) the target, then resampled down by the remaining factor (antialiased
bilinear, :class:`ResampledReader`). Never upsampled: a target finer than level 0
is an error.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from ..errors import InputError, UsageError
from .readers import DEFAULT_MAX_PIXELS, ImageReader, open_image
from .slidemeta import SlideInfo, openslide_info, parse_aperio, parse_ome, tiff_slide_info

__all__ = ["SlideInfo", "openslide_info", "parse_aperio", "parse_ome", "tiff_slide_info", "target_mpp",
           "choose_level", "level_mpps", "ResampledReader", "open_at_resolution",
           "preview", "downsampled_rgb", "level0_scale",
           "load_for_crop", "slide_metadata"]

#: Relative tolerance when comparing a level's mpp with the target (scanner mpps are rounded).
MPP_TOLERANCE = 0.02
#: Microns per pixel times objective power, by convention (40x ≈ 0.25 µm/px).
MPP_TIMES_POWER = 10.0


# -- resolution → level -------------------------------------------------------------------------

def level_mpps(reader: ImageReader) -> list[float] | None:
    """µm per pixel of every level of ``reader``'s file (level 0's mpp times each level's downsample)."""
    mpp0 = reader.slide.mpp
    if mpp0 is None:
        return None
    h0, w0 = reader.levels[0]
    return [mpp0 * 0.5 * (w0 / w + h0 / h) for h, w in reader.levels]


def target_mpp(reader: ImageReader, mpp: float | None = None, magnification: float | None = None) -> float | None:
    """The resolution asked for, in µm per pixel (None: none asked); errors name what the file lacks."""
    if mpp is not None and magnification is not None:
        raise UsageError("give a resolution in microns per pixel or a magnification, not both")
    if mpp is None and magnification is None:
        return None
    info = reader.slide
    if mpp is not None:
        if not (math.isfinite(mpp) and mpp > 0):
            raise UsageError(f"microns per pixel must be a positive number, not {mpp}")
        if info.mpp is None:
            raise InputError(f"{reader.path}: no microns-per-pixel in this file's metadata (Aperio MPP, OME "
                             "PhysicalSizeX, TIFF resolution tags); choose a pyramid level instead")
        return float(mpp)
    assert magnification is not None
    if not (math.isfinite(magnification) and magnification > 0):
        raise UsageError(f"magnification must be a positive number, not {magnification}")
    if info.objective_power is not None and info.mpp is not None:
        return info.mpp * info.objective_power / magnification
    if info.mpp is not None:
        return MPP_TIMES_POWER / magnification
    raise InputError(f"{reader.path}: no microns-per-pixel or objective power in this file's metadata; "
                     "choose a pyramid level instead")


def choose_level(mpps: list[float], target: float) -> tuple[int, float]:
    """(level, resample factor ≥ 1): the coarsest level at or finer than ``target``, and what is left."""
    if target < mpps[0] * (1 - MPP_TOLERANCE):
        raise UsageError(f"{target:g} µm/px is finer than the image's full resolution ({mpps[0]:g} µm/px); "
                         "images are never upsampled")
    best = 0
    for i, m in enumerate(mpps):
        if m <= target * (1 + MPP_TOLERANCE):
            best = i if m >= mpps[best] else best
    factor = target / mpps[best]
    return best, (1.0 if abs(factor - 1) <= MPP_TOLERANCE else factor)


class ResampledReader(ImageReader):
    """A reader downsampled by ``factor`` (> 1): regions map back to the base reader and are resized.

    Antialiased bilinear (torch ``interpolate``); each region is resampled on its own
    from the source pixels it covers plus a two-pixel margin, so neighbouring tiles agree
    to within interpolation at their edge.
    """

    MARGIN = 2

    def __init__(self, base: ImageReader, factor: float) -> None:
        if not factor > 1:
            raise ValueError("ResampledReader needs a factor above 1")
        self.base, self.factor = base, float(factor)
        self.path = base.path
        self.level = base.level
        self.levels = base.levels
        self.slide = base.slide
        self.height = max(1, round(base.height / factor))
        self.width = max(1, round(base.width / factor))

    @property
    def mpp(self) -> float | None:
        base = self.base.mpp
        return None if base is None else base * self.factor

    def _read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        f, m = self.factor, self.MARGIN
        sy0, sy1 = math.floor(y * f) - m, math.ceil((y + h) * f) + m
        sx0, sx1 = math.floor(x * f) - m, math.ceil((x + w) * f) + m
        src = self.base.read_region(sy0, sx0, sy1 - sy0, sx1 - sx0)
        # Output pixel centres in source coordinates, relative to the region read.
        big_h, big_w = round((sy1 - sy0) / f), round((sx1 - sx0) / f)
        t = torch.from_numpy(np.ascontiguousarray(src.transpose(2, 0, 1)))[None]
        out = F.interpolate(t, size=(max(big_h, h), max(big_w, w)), mode="bilinear", antialias=True,
                            align_corners=False)[0]
        oy = round((y * f - sy0) / f)
        ox = round((x * f - sx0) / f)
        return np.ascontiguousarray(out[:, oy:oy + h, ox:ox + w].permute(1, 2, 0).numpy(), dtype=np.float32)

    def close(self) -> None:
        self.base.close()


def downsampled_rgb(reader: ImageReader, out_h: int, out_w: int, band_bytes: int = 1 << 26) -> np.ndarray:
    """The whole image as (out_h, out_w, 3), box-averaged in bands of about ``band_bytes`` (never decoded whole)."""
    from PIL import Image

    f = max(1, min(reader.height // out_h, reader.width // out_w))
    band = max(1, band_bytes // (12 * f * f * max(1, reader.width)))  # output rows per read
    rows = []
    for y in range(0, reader.height, band * f):
        h = min(band * f, reader.height - y)
        region = reader.read_region(y, 0, h, reader.width)
        hh, ww = h // f, reader.width // f
        if hh == 0:
            continue
        rows.append(region[: hh * f, : ww * f].reshape(hh, f, ww, f, 3).mean(axis=(1, 3)))
    small = np.concatenate(rows)
    img = Image.fromarray(np.clip(small * 255 + 0.5, 0, 255).astype(np.uint8))
    if img.size != (out_w, out_h):
        img = img.resize((out_w, out_h), Image.Resampling.BILINEAR)
    return np.asarray(img, np.float32) / 255.0


def preview(reader: ImageReader, path: str, max_side: int, max_pixels: int | None) -> tuple[np.ndarray, int]:
    """A downsampled RGB preview (longest side ≤ ``max_side``) and its subsampling step.

    Reads a coarser level when there is one."""
    step = max(1, math.ceil(max(reader.height, reader.width) / max_side))
    out_h, out_w = -(-reader.height // step), -(-reader.width // step)
    # A coarser pyramid level, when the file has one at least as large as the preview, is much cheaper to read.
    levels = getattr(reader, "levels", [(reader.height, reader.width)])
    best = getattr(reader, "level", 0)
    for i, (h, w) in enumerate(levels):
        if i > best and h >= out_h and w >= out_w:
            best = i
    if best != getattr(reader, "level", 0):
        with open_image(path, level=best, max_pixels=max_pixels) as small:
            return downsampled_rgb(small, out_h, out_w), step
    return downsampled_rgb(reader, out_h, out_w), step


def level0_scale(reader: ImageReader) -> tuple[float, float]:
    """(y, x) factors from ``reader``'s pixels to level-0 pixels (what QuPath and OpenSlide coordinates use)."""
    h0, w0 = reader.levels[0] if getattr(reader, "levels", None) else (reader.height, reader.width)
    return h0 / reader.height, w0 / reader.width


def slide_metadata(mpp: float | None, tissue: dict[str, Any] | None) -> dict[str, str]:
    """String metadata for output files: the mpp the output was computed at and the tissue masking used."""
    meta = {"mpp": "" if mpp is None else f"{mpp:.6g}"}
    if tissue is not None:
        meta.update({"tissue": tissue["method"], "tissue_fraction": f"{tissue['fraction']:.4f}",
                     "tissue_skipped_tiles": f"{tissue['tiles_skipped']}/{tissue['tiles_total']}",
                     "tissue_empty": "tiles without tissue are not computed: their cells are 0"})
    return meta


#: Above this many pixels a single-level TIFF is read band by band for a classification crop, not decoded whole.
WHOLE_DECODE_PIXELS = 4096 * 4096


def load_for_crop(path: str | os.PathLike[str], short_side: int | None, *, mpp: float | None = None,
                  magnification: float | None = None, max_pixels: int | None = None) -> np.ndarray | None:
    """A slide as float RGB at the pyramid level a crop needs, never level 0 whole; None for ordinary images.

    ``short_side``: the shortest side the preprocessing resizes to (the image is read at the
    coarsest level that still has it, then box-averaged towards it); None: the whole image at level 0 or at
    ``mpp``/``magnification`` (full-resolution classification). Pyramids, OpenSlide formats,
    TIFFs above :data:`WHOLE_DECODE_PIXELS` and any request with a resolution come here;
    the caller decodes everything else whole as before.
    """
    from .image import is_tiff
    from .openslide_reader import openslide_claims

    if mpp is None and magnification is None:
        if not (is_tiff(path) or openslide_claims(path)):
            return None
        with open_image(path, max_pixels=0) as probe:
            h0, w0 = probe.levels[0]
            if len(probe.levels) == 1 and h0 * w0 <= WHOLE_DECODE_PIXELS:
                return None
    with open_at_resolution(path, mpp=mpp, magnification=magnification, max_pixels=max_pixels) as reader:
        if short_side is None:
            return reader.read_region(0, 0, reader.height, reader.width)
        step = max(1, min(reader.height, reader.width) // short_side)
        if step == 1:
            return reader.read_region(0, 0, reader.height, reader.width)
        longest = math.ceil(max(reader.height, reader.width) / step)
        small, _ = preview(reader, str(path), longest, max_pixels)
        return small


def open_at_resolution(path: Any, *, level: int = 0, mpp: float | None = None, magnification: float | None = None,
                       max_pixels: int | None = None) -> ImageReader:
    """A reader at ``level``, or at the resolution asked for (``mpp`` or ``magnification``).

    The returned reader's ``mpp`` is the resolution it delivers (None when the file has none).
    """
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    reader = open_image(path, level=level, max_pixels=limit)
    target = None
    try:
        target = target_mpp(reader, mpp, magnification)
        if target is None:
            return reader
        if level != 0:
            raise UsageError("choose a pyramid level or a resolution, not both")
        mpps = level_mpps(reader)
        assert mpps is not None
        best, factor = choose_level(mpps, target)
    except BaseException:
        reader.close()
        raise
    if best != reader.level:
        reader.close()
        reader = open_image(path, level=best, max_pixels=limit)
    if factor > 1:
        return ResampledReader(reader, factor)
    return reader
