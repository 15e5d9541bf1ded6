"""Synthetic whole-slide images for tests and bench: white background with stained tissue blobs.

Written by tifffile + imagecodecs the way scanners lay them out: an Aperio-style
SVS (JPEG tiles, ``Aperio Image Library`` description with MPP and AppMag,
level 0, a thumbnail page, then the lower levels) and an OME-TIFF with
PhysicalSizeX and SubIFD levels; a Hamamatsu-style NDPI (:func:`write_ndpi`). Pixels are a function of level-0 coordinates,
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


def _ndpi_jpeg(rgb: np.ndarray) -> bytes:
    """One baseline JPEG of a whole level, 4:4:4, a restart marker after every row of 8x8 blocks (as NDPI has)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, subsampling=0, restart_marker_blocks=rgb.shape[1] // 8)
    return buf.getvalue()


def write_ndpi(path: str | Path, height: int, width: int, mpp: float = 0.23, magnification: float = 40,
               levels: int = 2) -> Path:
    """A Hamamatsu-style NDPI: one JPEG strip per level (÷2 each), NDPI tags, NDPI's 64-bit header and IFDs.

    tifffile has no NDPI writer, and a classic TIFF named ``.ndpi`` is misread by tifffile
    (the suffix makes it expect NDPI's layout: "invalid offset to first page"), so the
    file is laid out by hand as tifffile and OpenSlide read NDPI: an 8-byte first-IFD
    offset in the header, and after each IFD's 12-byte entries an 8-byte next-IFD offset
    followed by the high 32 bits of every entry's value (all zero below 4 GB). Tags:
    FileFormat 65420 = 1, SourceLens 65421 = magnification, offsets from the slide centre
    65422-65424, resolution in pixels per centimetre (the mpp).
    """
    import struct

    path = Path(path)
    out = bytearray(b"II*\0" + bytes(8))
    link = 4  # where the offset of the next IFD goes
    for i in range(levels):
        lh, lw = height // 2**i, width // 2**i
        data = _ndpi_jpeg(slide_pixels(0, 0, lh, lw, height, width, 2**i))
        strip = len(out)
        out += data + bytes(len(data) % 2)
        ppcm = round(1e4 / (mpp * 2**i) * 1000)
        tags = [(256, 4, struct.pack("<I", lw)), (257, 4, struct.pack("<I", lh)), (258, 3, struct.pack("<3H", 8, 8, 8)),
                (259, 3, struct.pack("<H", 7)), (262, 3, struct.pack("<H", 6)), (271, 2, b"Hamamatsu\0"),
                (272, 2, b"C13220\0"), (273, 4, struct.pack("<I", strip)), (277, 3, struct.pack("<H", 3)),
                (278, 4, struct.pack("<I", lh)), (279, 4, struct.pack("<I", len(data))),
                (282, 5, struct.pack("<II", ppcm, 1000)), (283, 5, struct.pack("<II", ppcm, 1000)),
                (296, 3, struct.pack("<H", 3)), (305, 2, b"NDP.scan\0"), (65420, 4, struct.pack("<I", 1)),
                (65421, 11, struct.pack("<f", magnification / 2**i)), (65422, 9, bytes(4)), (65423, 9, bytes(4)),
                (65424, 9, bytes(4))]
        sizes = {2: 1, 3: 2, 4: 4, 5: 8, 9: 4, 11: 4}
        entries = bytearray()
        for code, kind, raw in tags:
            field = raw.ljust(4, b"\0")
            if len(raw) > 4:  # the value lives outside the IFD
                field = struct.pack("<I", len(out))
                out += raw + bytes(len(raw) % 2)
            entries += struct.pack("<HHI", code, kind, len(raw) // sizes[kind]) + field
        ifd = len(out)
        out += struct.pack("<H", len(tags)) + entries
        out[link:link + 8] = struct.pack("<Q", ifd)
        link = len(out)
        out += bytes(8) + bytes(4 * len(tags))  # next-IFD offset (64-bit), high bits of every entry
    path.write_bytes(bytes(out))
    return path


def tissue_truth(height: int, width: int) -> np.ndarray:
    """The true tissue mask (bool (height, width)) of a slide of that level-0 size."""
    return slide_pixels(0, 0, height, width, height, width).min(axis=2) < WHITE
