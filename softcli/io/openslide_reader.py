"""Scanner formats through OpenSlide (Hamamatsu .ndpi/.vms, MIRAX .mrxs, Leica .scn, Ventana .bif, DICOM, ...).

OpenSlide is an optional extra (``pip install 'softcli[openslide]'`` installs
``openslide-python`` and ``openslide-bin``, the library itself). Files are routed
here by content: TIFF-family files go to the tifffile reader first (it reads
SVS, NDPI, SCN, OME-TIFF region by region without OpenSlide) and come here only
when tifffile cannot read them; anything else comes here when OpenSlide
recognises its format (:func:`openslide_claims`). Without the extra, a file that
looks like a scanner format is refused with a one-line error naming the extra.

OpenSlide returns premultiplied RGBA; transparent pixels (outside the scanned
area) are composited on white, like every other reader here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, UsageError
from .image import _fail, _reason, check_pixels, pixel_limit
from .reader_base import ImageReader
from .slidemeta import openslide_info

#: The pip extra that brings OpenSlide, named in errors.
OPENSLIDE_EXTRA = "pip install 'softcli[openslide]'"
#: Scanner formats recognised by name or content when OpenSlide is missing (to name the extra).
SLIDE_SUFFIXES = (".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide", ".dcm", ".tif", ".tiff", ".svs")
DICOM_MAGIC_OFFSET = 128
#: OpenSlide vendors whose files the tifffile reader reads (and refuses) itself.
TIFFFILE_VENDORS = ("generic-tiff", "aperio")


def _openslide() -> Any | None:
    """The ``openslide`` module, or None when the extra is not installed (or its library cannot load)."""
    try:
        import openslide
    except (ImportError, OSError):
        return None
    return openslide


def looks_like_slide(path: str | os.PathLike[str]) -> bool:
    """True for a file a scanner wrote, by content (DICOM preamble, MIRAX/VMS index) or by name."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    if head[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return True
    if head.lstrip().startswith((b"[GENERAL]", b"[Virtual Microscope Specimen]")):
        return True
    return p.suffix.lower() in SLIDE_SUFFIXES[:8]


def openslide_claims(path: str | os.PathLike[str]) -> bool:
    """True when OpenSlide is installed and recognises the file as a scanner format tifffile does not own.

    Plain TIFFs and Aperio SVS (OpenSlide's ``generic-tiff``, ``aperio``) are not
    claimed: the tifffile reader reads them, with its size checks, and its refusal
    of such a file stands.
    """
    openslide = _openslide()
    if openslide is None:
        return False
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - detection failing means "not a format OpenSlide knows"
        return False
    return vendor is not None and vendor not in TIFFFILE_VENDORS


def missing_extra_error(path: str | os.PathLike[str]) -> InputError:
    """The one-line error for a scanner-looking file nothing claimed: OpenSlide missing, or it does not know it."""
    if _openslide() is None:
        return _fail(path, f"a scanner format softcli reads through OpenSlide, which is not installed "
                           f"({OPENSLIDE_EXTRA})")
    return _fail(path, "looks like a scanner file, but OpenSlide does not recognise it (incomplete or corrupt?)")


class OpenSlideReader(ImageReader):
    """One level of a slide OpenSlide reads, region by region (coordinates at that level)."""

    def __init__(self, path: str | os.PathLike[str], level: int = 0, max_pixels: int | None = None) -> None:
        openslide = _openslide()
        if openslide is None:
            raise missing_extra_error(path)
        self.path = str(path)
        self.max_pixels = pixel_limit(max_pixels)
        try:
            self._slide = openslide.OpenSlide(self.path)
        except Exception as exc:  # noqa: BLE001 - the reader boundary: OpenSlideError, OSError, ...
            raise _fail(path, f"unreadable slide ({_reason(exc)})") from exc
        try:
            self.levels = [(int(h), int(w)) for w, h in self._slide.level_dimensions]
            self._downsamples = [float(d) for d in self._slide.level_downsamples]
            if not 0 <= level < len(self.levels):
                raise UsageError(f"{self.path}: level {level} does not exist; the slide has {len(self.levels)} "
                                 "level(s): " + ", ".join(f"{i}: {w}x{h}" for i, (h, w) in enumerate(self.levels)))
            self.level = level
            self.height, self.width = self.levels[level]
            check_pixels(self.path, self.width, self.height, None)
            self.slide = openslide_info(self._slide.properties)
        except BaseException:
            self._slide.close()
            raise

    def _read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        if self.max_pixels is not None and h * w > self.max_pixels:
            raise _fail(self.path, f"a {w}x{h} region is above the pixel limit of {self.max_pixels:,}")
        ds = self._downsamples[self.level]
        try:
            img = self._slide.read_region((round(x * ds), round(y * ds)), self.level, (w, h))
        except Exception as exc:  # noqa: BLE001 - decoder failures inside OpenSlide
            raise _fail(self.path, f"cannot read slide region ({_reason(exc)})") from exc
        rgba = np.asarray(img, dtype=np.float32) / 255.0
        alpha = rgba[:, :, 3:4]
        # Premultiplied alpha: colour + (1 - alpha) puts transparent areas on white.
        return np.ascontiguousarray(rgba[:, :, :3] + (1.0 - alpha), dtype=np.float32)

    def close(self) -> None:
        self._slide.close()
