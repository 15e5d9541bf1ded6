"""Synthetic whole-slide images for tests and bench: white background with stained tissue blobs.

Written by tifffile + imagecodecs the way scanners lay them out: an Aperio-style
SVS (JPEG tiles, ``Aperio Image Library`` description with MPP and AppMag,
level 0, a thumbnail page, then the lower levels) and an OME-TIFF with
PhysicalSizeX and SubIFD levels. Pixels are a function of level-0 coordinates,
generated tile by tile, so a 40000x30000 slide is written with bounded memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

#: Tissue ellipses (centre y, centre x, radius y, radius x) in fractions of the slide; about 25 % of the area.
BLOBS = ((0.35, 0.3, 0.22, 0.16), (0.62, 0.68, 0.2, 0.18))
WHITE = 243


def slide_pixels(y0: int, x0: int, h: int, w: int, height: int, width: int, downsample: float = 1.0) -> np.ndarray:
    """uint8 RGB (h, w, 3) of the synthetic slide at a level with ``downsample``, region at (y0, x0)."""
    yy = (np.arange(y0, y0 + h, dtype=np.float32) + 0.5) * downsample
    xx = (np.arange(x0, x0 + w, dtype=np.float32) + 0.5) * downsample
    fy, fx = (yy / height)[:, None], (xx / width)[None, :]
    tissue = np.zeros((h, w), bool)
    for cy, cx, ry, rx in BLOBS:
        tissue |= ((fy - cy) / ry) ** 2 + ((fx - cx) / rx) ** 2 < 1
    # Nuclei-like texture: purple spots on pink, at a fixed size in level-0 pixels.
    spots = (np.sin(yy[:, None] / 9.0) * np.sin(xx[None, :] / 11.0)) > 0.55
    out = np.full((h, w, 3), WHITE, np.uint8)
    pink = np.array([225, 150, 190], np.uint8)
    purple = np.array([110, 60, 150], np.uint8)
    out[tissue] = pink
    out[tissue & spots] = purple
    return out


def _tiles(height: int, width: int, level_h: int, level_w: int, tile: int) -> Iterator[np.ndarray]:
    ds = height / level_h
    for y in range(0, level_h, tile):
        for x in range(0, level_w, tile):
            block = np.full((tile, tile, 3), WHITE, np.uint8)
            hh, ww = min(tile, level_h - y), min(tile, level_w - x)
            block[:hh, :ww] = slide_pixels(y, x, hh, ww, height, width, ds)
            yield block


def write_svs(path: str | Path, height: int, width: int, mpp: float = 0.25, app_mag: float = 40,
              levels: int = 3, tile: int = 256, quality: int = 90) -> Path:
    """An Aperio-style SVS: JPEG tiles, Aperio description, level 0 + thumbnail + downsampled levels (÷4 each)."""
    import tifffile

    path = Path(path)
    desc = (f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
            f"JPEG/RGB Q={quality}|AppMag = {app_mag:g}|StripeWidth = 2040|ScanScope ID = SS1234|"
            f"Filename = synthetic|Date = 01/02/26|Time = 10:00:00|MPP = {mpp}")
    sizes = [(height // 4**i, width // 4**i) for i in range(levels)]
    with tifffile.TiffWriter(path, bigtiff=height * width * 3 > 2**31) as tw:
        for i, (lh, lw) in enumerate(sizes):
            tw.write(_tiles(height, width, lh, lw, tile), shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile),
                     photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                     description=desc if i == 0 else f"Aperio Image Library v12.0.15 \r\n{lw}x{lh} -> {lw}x{lh}",
                     subfiletype=0, metadata=None)
            if i == 0:  # the thumbnail page SVS puts second (stripped)
                th, twd = max(1, height // 64), max(1, width // 64)
                thumb = slide_pixels(0, 0, th, twd, height, width, height / th)
                tw.write(thumb, photometric="rgb", compression="jpeg", metadata=None,
                         description="Aperio Image Library v12.0.15 \r\nthumbnail")
    return path


def write_ome(path: str | Path, height: int, width: int, mpp: float = 0.5, levels: int = 2,
              tile: int = 256, compression: str = "zlib") -> Path:
    """An OME-TIFF with PhysicalSizeX/Y in µm and SubIFD pyramid levels (÷2 each)."""
    import tifffile

    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(_tiles(height, width, height, width, tile), shape=(height, width, 3), dtype=np.uint8,
                 tile=(tile, tile), photometric="rgb", compression=compression, subifds=levels - 1,
                 metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp,
                           "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
        for i in range(1, levels):
            lh, lw = height // 2**i, width // 2**i
            tw.write(_tiles(height, width, lh, lw, tile), shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile),
                     photometric="rgb", compression=compression, subfiletype=1, metadata=None)
    return path


def tissue_truth(height: int, width: int) -> np.ndarray:
    """The true tissue mask (bool (height, width)) of a slide of that level-0 size."""
    return slide_pixels(0, 0, height, width, height, width).min(axis=2) < WHITE
