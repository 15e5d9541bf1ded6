"""Decoding whole images into RGB float arrays, deliberately, for every common mode.

Every path through here ends in the same place: a float32 array (H, W, 3) with
values in [0, 1], whatever the file held. The choices, stated once:

- EXIF orientation is applied (a phone photo is classified the way it is seen).
- 8-bit data is divided by 255, 16-bit by 65535; 32-bit integer (Pillow ``I``)
  by 65535 when it fits in 16 bits, else min-max scaled; float data is taken
  as [0, 1] when it lies there, else min-max scaled.
- Grayscale is repeated to three channels; alpha is composited on white
  (a transparent background reads as paper, not as black ink).
- Palette images are expanded (with their transparency); CMYK, YCbCr, LAB and
  HSV are converted by Pillow to RGB.
- TIFF files are read with tifffile (16-bit RGB and planar layouts, which Pillow
  cannot open), page 0 / level 0 unless told otherwise.
- Decompression bombs: the pixel count from the header is checked against
  ``max_pixels`` (0 or None: no limit) and the memory the decode needs against
  the memory available, before anything is decoded.
- The format is sniffed from the first bytes, not the name: a JPEG named
  ``.tif`` is decoded as the JPEG it is.
- Any failure of a decoder on a bad file (zlib errors, zero tile sizes, bad
  offsets, ...) becomes an :class:`~softcli.errors.InputError` naming the file:
  this module is the boundary where third-party decoder exceptions stop.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ..constants import DEFAULT_MAX_PIXELS  # re-exported: the --max-pixels default
from ..errors import InputError, ParameterError
from ..resources import available_memory, format_bytes

if TYPE_CHECKING:
    from PIL import Image

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".svs", ".ome.tif", ".ome.tiff")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: Leading bytes of formats Pillow reads, so a misnamed file still goes to the right decoder.
PILLOW_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF", b"\x00\x00\x00\x0cjP")
#: Working memory of a whole decode per pixel beyond the raw samples: float32 RGB and its intermediates.
DECODE_BYTES_PER_PIXEL = 24


def pixel_limit(max_pixels: int | None) -> int | None:
    """``--max-pixels`` as a limit: 0 or None mean no limit; a negative value is a usage error."""
    if max_pixels is None or max_pixels == 0:
        return None
    if max_pixels < 0:
        raise ParameterError(f"`max_pixels` must be 0 (no limit) or a positive number of pixels, not {max_pixels}")
    return int(max_pixels)


def _fail(path: str | os.PathLike[str], reason: str) -> InputError:
    return InputError(f"{path}: {reason}")


def check_pixels(path: str | os.PathLike[str], width: int, height: int, max_pixels: int | None) -> None:
    """Refuse images larger than ``max_pixels`` (0/None: no limit) before decoding them."""
    if width <= 0 or height <= 0:
        raise _fail(path, f"image has no pixels ({width}x{height})")
    max_pixels = pixel_limit(max_pixels)
    if max_pixels is not None and width * height > max_pixels:
        raise _fail(path, f"{width}x{height} = {width * height:,} pixels is above the limit of {max_pixels:,} "
                          "(a decompression-bomb guard; raise it with `max_pixels`)")


def check_decode_memory(path: str | os.PathLike[str], width: int, height: int, raw_bytes: int) -> None:
    """Refuse a whole decode that would need more memory than is available (``raw_bytes``: the samples)."""
    need = int(raw_bytes) + DECODE_BYTES_PER_PIXEL * width * height
    free = available_memory()
    if free is not None and need > free:
        raise _fail(path, f"decoding {width}x{height} whole needs about {format_bytes(need)} of memory, more than "
                          f"the {format_bytes(free)} available")


def _scale_to_unit(arr: np.ndarray) -> np.ndarray:
    """Integer or float samples → float32 in [0, 1] (rules in the module docstring)."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min(initial=0)), int(arr.max(initial=0))
        if lo >= 0 and hi <= 65535:
            return arr.astype(np.float32) / (255.0 if hi <= 255 and arr.dtype.itemsize == 1 else 65535.0)
        return _minmax(arr.astype(np.float64))
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
            return _minmax(finite)
        return finite
    raise ValueError(f"unsupported sample type {arr.dtype}")


def _minmax(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
    if hi <= lo:
        return np.zeros(arr.shape, np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def array_to_rgb(arr: np.ndarray, planar: bool | None = None) -> np.ndarray:
    """An image array (H, W), (H, W, C) or planar (C, H, W) → float32 RGB (H, W, 3) in [0, 1].

    C = 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA (alpha on white); more channels keep
    the first three. ``planar=None`` guesses channel-first when the first axis is
    small (≤ 4) and the last is not.
    """
    if arr.ndim == 3 and (planar or (planar is None and arr.shape[0] <= 4 < arr.shape[2])):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"unsupported image array shape {arr.shape}")
    x = _scale_to_unit(arr)
    c = x.shape[2]
    if c in (2, 4):
        color, alpha = x[:, :, : c - 1], x[:, :, c - 1 : c]
        x = color * alpha + (1.0 - alpha)  # composite on white
        c -= 1
    if c == 1:
        x = np.repeat(x, 3, axis=2)
    elif c > 3:
        x = x[:, :, :3]
    return np.ascontiguousarray(x, dtype=np.float32)


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A decoded Pillow image of any mode → float32 RGB (H, W, 3) in [0, 1]."""
    from PIL import Image

    mode = img.mode
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
    elif mode in ("1", "L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pass
    elif mode == "La":
        img = img.convert("LA")
    elif mode == "RGBa":
        img = img.convert("RGBA")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        img = img.convert("RGB")
    else:
        try:
            img = img.convert("RGBA" if "A" in mode else "RGB")
        except (ValueError, OSError) as exc:
            raise ValueError(f"unsupported image mode {mode}") from exc
    arr = np.asarray(img)
    if img.mode.startswith("I;16") and arr.dtype != np.uint16:
        arr = arr.astype(np.uint16)
    del Image
    return array_to_rgb(arr, planar=False)


def is_tiff(path: str | os.PathLike[str]) -> bool:
    """True for a TIFF by content; the name decides only for content no decoder claims."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(12)
    except OSError:
        head = b""
    if head[:4] in TIFF_MAGIC:
        return True
    if head.startswith(PILLOW_MAGIC):
        return False
    return p.name.lower().endswith(TIFF_SUFFIXES)


def _open_checks(path: Path) -> None:
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "is a folder, not an image")
    if path.stat().st_size == 0:
        raise _fail(path, "empty file")


def load_tiff(path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS,
              page: int = 0) -> np.ndarray:
    """Page ``page`` of a TIFF (8/16-bit, gray/RGB/RGBA, contiguous or planar) as float RGB."""
    import tifffile

    p = Path(path)
    _open_checks(p)
    try:
        with tifffile.TiffFile(p) as tif:
            if page >= len(tif.pages):
                raise _fail(p, f"has {len(tif.pages)} pages, no page {page}")
            pg = cast(tifffile.TiffPage, tif.pages[page])  # pages are TiffPage unless useframes is set
            width, height = int(pg.imagewidth), int(pg.imagelength)
            check_pixels(p, width, height, max_pixels)
            depth = int(getattr(pg, "imagedepth", 1) or 1)
            if depth > 1:
                raise _fail(p, f"volumetric (3D) TIFF page ({depth} slices of {width}x{height}); "
                               "only 2D images are supported")
            check_decode_memory(p, width, height, int(pg.nbytes))
            arr = pg.asarray()
            planar = pg.planarconfig == tifffile.PLANARCONFIG.SEPARATE and arr.ndim == 3
    except InputError:
        raise
    except MemoryError as exc:
        raise _fail(p, "out of memory decoding this TIFF") from exc
    except Exception as exc:  # noqa: BLE001 - decoders raise their own types (zlib.error, ZeroDivisionError, ...)
        raise _fail(p, f"unreadable TIFF ({_reason(exc)})") from exc
    if arr.ndim == 4 and arr.shape[0] == 1:  # (1, H, W, C) from some writers
        arr = arr[0]
    if arr.ndim > 3:
        raise _fail(p, f"a {arr.ndim}-D TIFF page (shape {arr.shape}); only 2D images are supported")
    try:
        return array_to_rgb(arr, planar=planar)
    except ValueError as exc:
        raise _fail(p, str(exc)) from exc


def open_pil(path: str | os.PathLike[str], max_pixels: int | None) -> Any:
    """``PIL.Image.open`` with Pillow's own size guard replaced by ours (:func:`check_pixels`, one clear error).

    Only the header is read; the caller closes the image (``with open_pil(...) as img``).
    """
    from PIL import Image

    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        img = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    try:
        check_pixels(path, img.width, img.height, max_pixels)
    except BaseException:
        img.close()
        raise
    return img


def load_image(path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a whole image file to float32 RGB (H, W, 3) in [0, 1], EXIF orientation applied."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    _open_checks(p)
    if is_tiff(p):
        return load_tiff(p, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_pil(p, max_pixels) as img:
                check_decode_memory(p, img.width, img.height, img.width * img.height * 4 * len(img.getbands()))
                img.load()
                img = ImageOps.exif_transpose(img) or img
                return pil_to_rgb(img)
    except InputError:
        raise
    except UnidentifiedImageError as exc:
        raise _fail(p, "not an image, or a format Pillow cannot read") from exc
    except MemoryError as exc:
        raise _fail(p, "out of memory decoding this image") from exc
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, zlib.error, struct.error, ...
        raise _fail(p, f"truncated or corrupt image ({_reason(exc)})") from exc


def _reason(exc: BaseException) -> str:
    """The first line of a decoder's message, or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
