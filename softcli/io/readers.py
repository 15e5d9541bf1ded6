"""Image readers that hand out regions, so a 40000² slide never has to be one array.

API (stable; ``soft segment`` builds on it)::

    with open_image(path, level=0, max_pixels=DEFAULT_MAX_PIXELS) as reader:
        reader.height, reader.width      # size of the chosen level
        reader.levels                    # [(h, w), ...] of every pyramid level, level 0 first
        reader.level                     # the level being read
        reader.read_region(y, x, h, w)   # float32 RGB (h, w, 3) in [0, 1]

- :class:`TiffReader` (TIFF, BigTIFF, OME-TIFF, SVS-like files) decodes only the
  tiles or strips that intersect the region, with tifffile's own per-segment
  decoder (``page.decode``) — no zarr needed. Pyramid levels come from
  ``series[0].levels`` (OME SubIFDs, SVS-like multi-page pyramids). Codecs
  tifffile has built in (none, deflate/zlib, LZW, PackBits, LZMA) always work;
  JPEG/JPEG 2000 (most SVS files) need the optional ``imagecodecs`` package,
  and the error says so. The image is the first page of the first series
  (a file with several series, or a channel stack stored as pages, gives its
  first one).
- :class:`PillowReader` decodes every other format whole, guarded by
  ``max_pixels``, through :func:`softcli.io.image.load_image`.

Sample conversion is the one in :mod:`softcli.io.image` (8-bit ÷255, 16-bit
÷65535, gray repeated, alpha on white, planar moved last). One deliberate
difference for region reads: data that is neither 8- nor 16-bit (int32, float)
is scaled with one range for the whole image, taken from its smallest pyramid
level, so tiles do not each get their own min-max and show seams.

Reads past the image edge are padded by **replicating** the edge pixels
(reflection is undefined when the pad is larger than the image). The tiler
only reads past the edge to round an image up to a multiple of 32.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..errors import InputError, ParameterError, UsageError
from ..resources import format_bytes
from .image import (
    DEFAULT_MAX_PIXELS,
    PILLOW_MAGIC,
    _fail,
    _open_checks,
    _reason,
    array_to_rgb,
    check_pixels,
    is_tiff,
    load_image,
    pixel_limit,
)
from .reader_base import ArrayReader, ImageReader
from .slidemeta import tiff_slide_info

#: Above this many pixels, the value range of non-8/16-bit data is estimated from a sample of tiles.
RANGE_SAMPLE_PIXELS = 1 << 24
#: No codec turns one stored byte into more pixel data than this (deflate: ~1000x, zstd on zeros: ~30000x);
#: a level that claims more declares a size its file cannot hold (a 500-byte file "of" 100000² pixels).
MAX_TIFF_INFLATION = 100_000
#: Levels with less pixel data than this are never refused as implausible.
TIFF_INFLATION_FLOOR = 64 * 2**20

__all__ = ["ImageReader", "PillowReader", "TiffReader", "ArrayReader", "open_image"]


class PillowReader(ArrayReader):
    """Formats Pillow reads (PNG, JPEG, WebP, BMP, ...): decoded whole once, within ``max_pixels``."""

    def __init__(self, path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(load_image(path, max_pixels=max_pixels), str(path))


class TiffReader(ImageReader):
    """TIFF/BigTIFF read segment by segment: a region decodes only the tiles (or strips) it touches."""

    def __init__(self, path: str | os.PathLike[str], level: int = 0,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        import tifffile

        self._tifffile = tifffile
        self.path = str(path)
        self.max_pixels = pixel_limit(max_pixels)
        p = Path(path)
        _open_checks(p)
        try:
            self._tif = tifffile.TiffFile(p)
        except Exception as exc:  # noqa: BLE001 - the reader boundary: any parser failure is a bad file
            raise _fail(p, f"unreadable TIFF ({_reason(exc)})") from exc
        try:
            self._setup(level)
        except (InputError, UsageError):
            self._tif.close()
            raise
        except Exception as exc:  # noqa: BLE001 - malformed tags surface as any type
            self._tif.close()
            raise _fail(p, f"unreadable TIFF ({_reason(exc)})") from exc
        except BaseException:
            self._tif.close()
            raise

    # -- setup --------------------------------------------------------------------------

    def _setup(self, level: int) -> None:
        tifffile = self._tifffile
        try:
            series = self._tif.series[0]
            pages = [lv.keyframe for lv in series.levels]
        except (tifffile.TiffFileError, ValueError, IndexError, KeyError, AttributeError) as exc:
            raise _fail(self.path, f"unreadable TIFF ({exc})") from exc
        self.levels = [(int(pg.imagelength), int(pg.imagewidth)) for pg in pages]
        if not 0 <= level < len(pages):
            raise ParameterError(f"{self.path}: `level` {level} does not exist; the file has "
                             f"{len(pages)} level(s): " + ", ".join(f"{i}: {w}x{h}" for i, (h, w) in
                                                                      enumerate(self.levels)))
        self.level = level
        self.slide = tiff_slide_info(self._tif)
        page = pages[level]
        self._page = page
        self.height, self.width = self.levels[level]
        check_pixels(self.path, self.width, self.height, None)
        if page.imagedepth > 1:
            raise _fail(self.path, f"volumetric (3D) TIFF page ({page.imagedepth} slices of "
                                   f"{self.width}x{self.height}); only 2D images are supported")
        if page.dtype is None:
            raise _fail(self.path, f"unsupported TIFF sample format ({page.bitspersample}-bit)")
        self._dtype = np.dtype(page.dtype)
        nsep, _, length, width, ncontig = page.shaped
        self._separate = int(nsep)
        self._contig = int(ncontig)
        if page.is_tiled:
            self._seg_h, self._seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self._seg_h, self._seg_w = int(min(page.rowsperstrip or length, length)), int(width)
        if self._seg_h <= 0 or self._seg_w <= 0:
            raise _fail(self.path, f"corrupt TIFF (tile/strip size {self._seg_w}x{self._seg_h})")
        self._check_plausible(page)
        if self.max_pixels is not None and self._seg_h * self._seg_w > self.max_pixels:
            raise _fail(self.path, f"a {self._seg_w}x{self._seg_h} tile/strip is above the pixel limit")
        self._ny = math.ceil(self.height / self._seg_h)
        self._nx = math.ceil(self.width / self._seg_w)
        if len(page.dataoffsets) < self._separate * self._ny * self._nx:
            raise _fail(self.path, "corrupt TIFF (fewer tiles/strips than the image size needs)")
        self._range = self._value_range(pages[-1]) if self._dtype not in (np.uint8, np.uint16, np.bool_) else None

    def _check_plausible(self, page: object) -> None:
        """Refuse a level whose declared pixel data is far more than its stored bytes could decode to."""
        declared = int(page.nbytes)  # type: ignore[attr-defined]
        stored = int(np.sum(np.asarray(page.databytecounts, dtype=np.int64)))  # type: ignore[attr-defined]
        if declared > TIFF_INFLATION_FLOOR and stored * MAX_TIFF_INFLATION < declared:
            raise _fail(self.path, f"declares a {self.width}x{self.height} image ({format_bytes(declared)} of "
                                   f"pixel data) but stores only {stored:,} bytes of it; refusing a file that "
                                   "cannot hold what it declares (a decompression bomb or a truncated file)")

    def _value_range(self, smallest: object) -> tuple[float, float]:
        """One scaling range for non-8/16-bit data, from the smallest level (see module docstring).

        A smallest level above :data:`RANGE_SAMPLE_PIXELS` is sampled: up to 64
        of its tiles/strips, spread evenly, are decoded instead of all of it.
        """
        try:
            h, w = int(smallest.imagelength), int(smallest.imagewidth)  # type: ignore[attr-defined]
            if h * w <= RANGE_SAMPLE_PIXELS:
                arr = smallest.asarray()  # type: ignore[attr-defined]
            else:
                offsets, counts = smallest.dataoffsets, smallest.databytecounts  # type: ignore[attr-defined]
                picks = np.unique(np.linspace(0, len(offsets) - 1, 64).astype(int))
                parts = []
                fh = self._tif.filehandle
                for i in picks:
                    if counts[i]:
                        with fh.lock:
                            fh.seek(offsets[i])
                            data = fh.read(counts[i])
                        seg = self._decode(smallest, data, int(i))
                        if seg is not None:
                            parts.append(seg.ravel())
                arr = np.concatenate(parts) if parts else np.zeros(1)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
            raise _fail(self.path, f"cannot decode TIFF data ({exc})") from exc
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        if np.issubdtype(self._dtype, np.integer) and lo >= 0 and hi <= 65535:
            return 0.0, (255.0 if hi <= 255 and self._dtype.itemsize == 1 else 65535.0)  # as io.image
        if np.issubdtype(self._dtype, np.floating) and lo >= 0 and hi <= 1:
            return 0.0, 1.0
        return lo, hi

    # -- reading ------------------------------------------------------------------------

    def _read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        if self.max_pixels is not None and h * w > self.max_pixels:
            raise _fail(self.path, f"a {w}x{h} region is above the pixel limit of {self.max_pixels:,}")
        raw = np.zeros((self._separate, h, w, self._contig), self._dtype)
        page = self._page
        fh = self._tif.filehandle
        offsets, counts = page.dataoffsets, page.databytecounts
        per_plane = self._ny * self._nx
        ty0, ty1 = y // self._seg_h, (y + h - 1) // self._seg_h
        tx0, tx1 = x // self._seg_w, (x + w - 1) // self._seg_w
        for s in range(self._separate):
            for ty in range(ty0, ty1 + 1):
                for tx in range(tx0, tx1 + 1):
                    index = s * per_plane + ty * self._nx + tx
                    if not counts[index]:
                        continue  # an empty segment reads as zeros, as in tifffile
                    with fh.lock:
                        fh.seek(offsets[index])
                        data = fh.read(counts[index])
                    seg = self._decode(page, data, index)
                    if seg is None:
                        continue
                    seg = seg.reshape(tuple(seg.shape[-3:]))  # (h, w, contig samples)
                    sy, sx = ty * self._seg_h, tx * self._seg_w
                    a0, a1 = max(y, sy), min(y + h, sy + seg.shape[0], self.height)
                    b0, b1 = max(x, sx), min(x + w, sx + seg.shape[1], self.width)
                    if a0 < a1 and b0 < b1:
                        raw[s, a0 - y:a1 - y, b0 - x:b1 - x] = seg[a0 - sy:a1 - sy, b0 - sx:b1 - sx]
        # (separate, h, w, contig) → (h, w, samples)
        arr = raw[0] if self._separate == 1 else np.moveaxis(raw[..., 0], 0, -1)
        if self._range is not None:
            lo, hi = self._range
            arr = np.clip((arr.astype(np.float32) - lo) / max(hi - lo, 1e-30), 0.0, 1.0)
        try:
            return array_to_rgb(arr, planar=False)
        except ValueError as exc:
            raise _fail(self.path, str(exc)) from exc

    def _decode(self, page: object, data: bytes, index: int) -> np.ndarray | None:
        try:
            seg, _, _ = page.decode(data, index, jpegtables=page.jpegtables,  # type: ignore[attr-defined]
                                    jpegheader=page.jpegheader)  # type: ignore[attr-defined]
        except (ValueError, NotImplementedError, RuntimeError, KeyError) as exc:
            comp = getattr(page, "compression", None)
            name = getattr(comp, "name", comp)
            if "imagecodecs" in str(exc):
                raise _fail(self.path, f"{name}-compressed TIFF data needs the optional 'imagecodecs' package "
                                       "(pip install imagecodecs)") from exc
            raise _fail(self.path, f"cannot decode {name} TIFF data: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - corrupt segments raise codec-specific types
            comp = getattr(page, "compression", None)
            raise _fail(self.path, f"corrupt {getattr(comp, 'name', comp)} TIFF data in tile/strip {index} "
                                   f"({type(exc).__name__}: {exc})") from exc
        return seg

    def close(self) -> None:
        self._tif.close()


def _pillow_magic(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(12).startswith(PILLOW_MAGIC)


def open_image(path: str | os.PathLike[str], level: int = 0,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageReader:
    """A reader for ``path``: TIFF-family and OpenSlide formats region by region, others decoded whole.

    ``level`` picks a pyramid level (0 = full resolution); ``max_pixels`` guards
    whole decodes and single region reads against decompression bombs.
    """
    p = Path(path)
    _open_checks(p)
    if level < 0:
        raise ParameterError(f"`level` must be 0 or more, not {level}")
    from .openslide_reader import OpenSlideReader, looks_like_slide, missing_extra_error, openslide_claims

    if is_tiff(p):
        try:
            return TiffReader(p, level=level, max_pixels=max_pixels)
        except InputError:
            if not openslide_claims(p):  # a TIFF variant tifffile cannot read may still be a slide OpenSlide reads
                raise
        return OpenSlideReader(p, level=level, max_pixels=max_pixels)
    if openslide_claims(p):
        return OpenSlideReader(p, level=level, max_pixels=max_pixels)
    if looks_like_slide(p) and not _pillow_magic(p):
        raise missing_extra_error(p)
    if level != 0:
        raise ParameterError(f"{p}: `level` {level} asked for, but only TIFF pyramids have levels (this file has one)")
    return PillowReader(p, max_pixels=max_pixels)
