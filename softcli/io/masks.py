"""Label masks: a disk-backed label raster and its writers (PNG, pyramidal OME-TIFF, .npy), legend, overlay.

Labels arrive row band by row band from the tiling engine and go to a
:class:`LabelRaster`, a raw file of one byte (or two, above 256 classes) per
pixel written with ``pwrite``: a 16000² mask costs 256 MB of disk, not of
memory. The writers then read it back in pieces:

- ``.tif``/``.tiff``: a tiled, deflate-compressed, pyramidal (SubIFD) OME-TIFF
  written tile by tile, each level subsampled by 2 (nearest: a label is never
  averaged into another), with the palette as the TIFF colour map. Readable by
  tifffile, QuPath, napari, GDAL.
- ``.png``: a palette ("P") image, one label per pixel; needs the mask in
  memory, so it is refused above :data:`PNG_MAX_PIXELS` (use ``.tif``).
- ``.npy``: the raw label array (uint8/uint16), streamed.

The legend (label → name, colour, pixel count and fraction) is written as JSON
beside the mask; :func:`write_overlay` makes a downsampled blended preview.
Which model made the mask (:mod:`softcli.io.provenance`) goes into the legend,
the OME-TIFF description (JSON), PNG text chunks and the OME-Zarr attributes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import MASK_TIFF_TILE
from ..errors import OutputError, UsageError
from .atomic import MASK_TEMP_PREFIX, atomic_path, check_output_path, make_temp_dir
from .inputs import json_safe

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".npy", ".zarr")
OVERLAY_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")
#: Largest mask written as PNG (it is encoded from one in-memory array): 2^28 px = 256 MB.
PNG_MAX_PIXELS = 1 << 28
#: Largest palette a PNG (and a TIFF colour map of uint8 labels) holds.
PALETTE_MAX = 256
#: Pyramid levels stop once the longer side is at most this.
TIFF_MIN_LEVEL_SIDE = 512
OVERLAY_MAX_SIDE = 2048


def mask_format(out: str | os.PathLike[str]) -> str:
    """The output format from the file name: ``png``, ``tiff`` or ``npy``."""
    name = Path(out).name.lower()
    for suffix in MASK_SUFFIXES:
        if name.endswith(suffix):
            return {".tif": "tiff", ".tiff": "tiff"}.get(suffix, suffix[1:])
    raise UsageError(f"{out}: cannot tell the mask format from the name; use .png, .tif/.tiff or .npy (or .ome.zarr)")


def legend_path(out: str | os.PathLike[str]) -> Path:
    """``mask.png`` → ``mask.legend.json`` (beside the mask)."""
    p = Path(out)
    stem = next((p.name[: -len(s)] for s in (".ome.tif", ".ome.zarr") if p.name.lower().endswith(s)), p.stem)
    return p.with_name(f"{stem}.legend.json")


def check_mask_outputs(out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]], *,
                       height: int | None = None, width: int | None = None, num_classes: int | None = None,
                       overlay: str | os.PathLike[str] | None = None,
                       models: Sequence[str | os.PathLike[str]] = ()) -> list[Path]:
    """Every problem with the output paths, found before any compute. Returns [mask, legend, overlay?].

    ``models``: files of the model in use (:func:`softcli.checkpoint.model_files`), which no output may replace.
    """
    fmt = mask_format(out)
    if fmt == "png" and height is not None and width is not None and height * width > PNG_MAX_PIXELS:
        raise UsageError(f"{out}: a {width}x{height} mask is too large for PNG (it is encoded in memory, "
                         f"limit {PNG_MAX_PIXELS:,} pixels); write .tif instead")
    if fmt == "png" and num_classes is not None and num_classes > PALETTE_MAX:
        raise UsageError(f"{out}: {num_classes} classes do not fit a PNG palette (256); write .tif or .npy")
    paths = [check_output_path(out, inputs, models), check_output_path(legend_path(out), inputs, models)]
    if overlay is not None:
        if not Path(overlay).name.lower().endswith(OVERLAY_SUFFIXES):
            raise UsageError(f"{overlay}: the overlay is an image; use .png, .jpg, .webp or .tif")
        paths.append(check_output_path(overlay, inputs, models))
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise UsageError("the mask, its legend and the overlay must be different files")
    return paths


class LabelRaster:
    """An (H, W) label map in a temporary raw file: rows written once, read back in pieces."""

    def __init__(self, height: int, width: int, num_labels: int, folder: str | os.PathLike[str] | None = None) -> None:
        self.height, self.width = int(height), int(width)
        self.num_labels = int(num_labels)
        self.dtype = np.dtype(np.uint8 if num_labels <= 256 else np.uint16)
        self.counts = np.zeros(num_labels, np.int64)
        self._dir = make_temp_dir(MASK_TEMP_PREFIX, folder if folder is not None else tempfile.gettempdir())
        self._fd = os.open(self._dir / "labels.raw", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, self.nbytes)
        self.rows_written = 0

    @property
    def nbytes(self) -> int:
        return self.height * self.width * self.dtype.itemsize

    def write_rows(self, y0: int, labels: np.ndarray) -> None:
        """Store rows [y0, y0 + h) of labels (h, W) and count them."""
        if labels.ndim != 2 or labels.shape[1] != self.width or y0 + labels.shape[0] > self.height:
            raise ValueError(f"label rows {labels.shape} at {y0} do not fit a {self.width}x{self.height} mask")
        block = np.ascontiguousarray(labels, dtype=self.dtype)
        self.counts += np.bincount(block.ravel(), minlength=self.num_labels)[: self.num_labels]
        os.pwrite(self._fd, block.data, y0 * self.width * self.dtype.itemsize)
        self.rows_written += block.shape[0]

    def read_rows(self, y0: int, y1: int, step: int = 1) -> np.ndarray:
        """Rows y0, y0+step, … < y1, every ``step``-th column: ((y1-y0)/step, W/step)."""
        row_bytes = self.width * self.dtype.itemsize
        if step == 1:
            data = os.pread(self._fd, (y1 - y0) * row_bytes, y0 * row_bytes)
            return np.frombuffer(data, self.dtype).reshape(y1 - y0, self.width)
        rows = [np.frombuffer(os.pread(self._fd, row_bytes, y * row_bytes), self.dtype)[::step]
                for y in range(y0, y1, step)]
        return np.stack(rows) if rows else np.zeros((0, -(-self.width // step)), self.dtype)

    def array(self) -> np.ndarray:
        return self.read_rows(0, self.height)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LabelRaster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _palette_bytes(palette: Sequence[Sequence[int]]) -> list[int]:
    flat = [int(v) for rgb in palette[:PALETTE_MAX] for v in rgb]
    return flat + [0] * (3 * PALETTE_MAX - len(flat))


def write_png(raster: LabelRaster, path: Path, palette: Sequence[Sequence[int]],
              metadata: Mapping[str, str] | None = None) -> None:
    """A palette PNG; ``metadata`` as text chunks (``tEXt``, ``iTXt`` when not Latin-1)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    if raster.height * raster.width > PNG_MAX_PIXELS:
        raise UsageError(f"{path}: mask too large for PNG; write .tif instead")
    if raster.num_labels > PALETTE_MAX:
        raise UsageError(f"{path}: {raster.num_labels} classes do not fit a PNG palette; write .tif or .npy")
    img = Image.fromarray(raster.array())  # mode "L": the label values themselves
    img.putpalette(_palette_bytes(palette))  # L → P, keeping every value as its palette index
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_itxt(str(key), str(value))
    img.save(path, format="PNG", optimize=False, compress_level=6, pnginfo=info)


def write_mask_npy(raster: LabelRaster, path: Path, chunk_rows: int = 1024) -> None:
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(raster.dtype),
                                                  "fortran_order": False, "shape": (raster.height, raster.width)})
        for y in range(0, raster.height, chunk_rows):
            fh.write(raster.read_rows(y, min(raster.height, y + chunk_rows)).tobytes())


def pyramid_shapes(height: int, width: int, min_side: int = TIFF_MIN_LEVEL_SIDE) -> list[tuple[int, int]]:
    """Level sizes, each half the previous (rounded up), until the longer side is ≤ ``min_side``."""
    shapes = [(height, width)]
    while max(shapes[-1]) > min_side:
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def _level_tiles(raster: LabelRaster, factor: int, tile: int) -> Iterator[np.ndarray]:
    """Tiles (row-major) of the mask subsampled by ``factor``, read band by band from the raster."""
    band_rows = tile * factor
    for y in range(0, raster.height, band_rows):
        band = raster.read_rows(y, min(raster.height, y + band_rows), factor)
        for x in range(0, band.shape[1], tile):
            yield band[:, x:x + tile]


def write_tiff(raster: LabelRaster, path: Path, palette: Sequence[Sequence[int]], names: Sequence[str],
               tile: int = MASK_TIFF_TILE, on_tile: Callable[[], None] | None = None,
               metadata: Mapping[str, str] | None = None) -> int:
    """Tiled pyramidal OME-TIFF (SubIFDs), deflate, tile by tile. Returns the number of levels."""
    import tifffile

    shapes = pyramid_shapes(raster.height, raster.width)
    use_palette = raster.num_labels <= PALETTE_MAX
    common: dict[str, Any] = {"dtype": raster.dtype, "tile": (tile, tile), "compression": "zlib",
                              "photometric": "palette" if use_palette else "minisblack"}
    if use_palette:
        cmap = np.array(_palette_bytes(palette), np.uint16).reshape(PALETTE_MAX, 3).T * 257
        common["colormap"] = cmap

    def counted(it: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        for t in it:
            yield t
            if on_tile is not None:
                on_tile()

    # BigTIFF when the pyramid (4/3 of level 0), uncompressed, could pass 2 GB: a margin below 4 GB offsets.
    with tifffile.TiffWriter(path, bigtiff=raster.nbytes * 4 // 3 > 2**31, ome=True) as tif:
        description = json.dumps({**dict(metadata or {}), "labels": list(names)})
        meta = {"axes": "YX", "Name": "labels", "Description": description}
        tif.write(counted(_level_tiles(raster, 1, tile)), shape=shapes[0], subifds=len(shapes) - 1,
                  metadata=meta, **common)
        for level, shape in enumerate(shapes[1:], 1):
            tif.write(counted(_level_tiles(raster, 2 ** level, tile)), shape=shape, subfiletype=1,
                      metadata=None, **common)
    return len(shapes)


def tiff_tile_count(height: int, width: int, tile: int = MASK_TIFF_TILE) -> int:
    return sum(-(-h // tile) * -(-w // tile) for h, w in pyramid_shapes(height, width))


def write_mask(raster: LabelRaster, out: str | os.PathLike[str], palette: Sequence[Sequence[int]],
               names: Sequence[str], on_tile: Callable[[], None] | None = None,
               metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write the mask in the format its name asks for, atomically. Returns what was written.

    ``metadata`` (string pairs: the run's provenance) goes where the format has room: not in ``.npy``.
    """
    fmt = mask_format(out)
    info: dict[str, Any] = {"path": str(out), "format": fmt, "size": [raster.height, raster.width],
                            "width": raster.width, "height": raster.height,
                            "dtype": raster.dtype.name}
    try:
        if fmt == "zarr":  # a folder (softcli.io.zarr_writer), with its own atomic rename
            from .zarr_writer import write_label_zarr

            info["levels"] = write_label_zarr(raster, out, palette, names, pyramid_shapes(raster.height, raster.width),
                                              on_chunk=on_tile, metadata=metadata)
            return info
        with atomic_path(out) as tmp:
            if fmt == "png":
                write_png(raster, tmp, palette, metadata)
            elif fmt == "npy":
                write_mask_npy(raster, tmp)
            else:
                info["levels"] = write_tiff(raster, tmp, palette, names, on_tile=on_tile, metadata=metadata)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the mask ({exc.strerror or exc})") from exc
    return info


def legend(names: Sequence[str], palette: Sequence[Sequence[int]], counts: np.ndarray) -> list[dict[str, Any]]:
    """label → name, colour, pixel count and fraction, one entry per label."""
    total = max(1, int(counts.sum()))
    return [{"label": i, "name": names[i], "color": [int(c) for c in palette[i]],
             "hex": "#{:02x}{:02x}{:02x}".format(*(int(c) for c in palette[i])),
             "pixels": int(counts[i]), "fraction": round(int(counts[i]) / total, 6)} for i in range(len(names))]


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(json_safe(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc


def write_overlay(preview: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]],
                  path: str | os.PathLike[str], alpha: float = 0.5) -> list[int]:
    """Blend a float RGB preview (h, w, 3) in [0, 1] with the colours of ``labels`` (h, w). Returns [h, w]."""
    from PIL import Image

    colours = np.asarray([list(c) for c in palette], np.float32) / 255.0
    blended = (1.0 - alpha) * preview + alpha * colours[labels.astype(np.int64)]
    img = Image.fromarray(np.clip(blended * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    try:
        with atomic_path(path) as tmp:
            fmt = {"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF", "tiff": "TIFF"}.get(
                Path(path).suffix.lower().lstrip("."), Path(path).suffix.lstrip(".").upper())
            img.save(tmp, format=fmt)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the overlay ({exc.strerror or exc})") from exc
    return [int(labels.shape[0]), int(labels.shape[1])]
