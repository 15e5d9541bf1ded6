"""OME-Zarr outputs (``.zarr`` / ``.ome.zarr``): label masks and feature maps, multiscale, chunked, streamed.

Written directly in the Zarr v2 storage format that OME-NGFF 0.4 uses (a folder of
JSON files and zlib-compressed chunks, ``/``-separated chunk keys), so no ``zarr``
package is needed to write it; any Zarr reader (``zarr``, ``ome-zarr``, napari,
QuPath's OME-Zarr support) reads it. The folder appears under its name only once
complete (:func:`~softcli.io.atomic.atomic_dir`).

- Masks (:func:`write_label_zarr`): one image, axes ``y``, ``x``; levels halve like
  the OME-TIFF mask pyramid (:func:`~softcli.io.masks.pyramid_shapes`, subsampled,
  not averaged: labels); ``.zattrs`` holds ``multiscales`` and ``image-label``
  colours and names.
- Feature maps (:func:`write_feature_zarr`): one multiscale image per stage, in the
  group ``stageN`` (open ``maps.ome.zarr/stage3`` in napari), axes ``c`` (channel),
  ``y``, ``x``. Level 0 is the map itself; each further level is the 2×2 mean of the
  one before (edge cells average what exists) until the longer side is at most
  :data:`FEATURE_CHUNK` cells. Scales are in µm (axis unit ``micrometer``) when the
  input's µm per pixel is known, else in input pixels (no unit); a translation puts
  each cell's centre over the centre of the input pixels it covers. ``pooled``
  (``--pool``) is the 1-D array ``pooled`` at the root. Written band by band from
  the map sink: memory holds a few bands (level-0 rows, their halves, the row
  buffers of each level), each at most about :data:`FEATURE_BAND_BYTES`, never the map.

Both record the run's metadata (model, weights sha256, softcli version, mpp, …)
under the ``softcli`` key of the root ``.zattrs``.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .atomic import atomic_dir

ZARR_CHUNK = 512
ZARR_SUFFIXES = (".ome.zarr", ".zarr")
#: Chunk side (y, x) of feature-map levels, and the side below which no further level is made.
FEATURE_CHUNK = 256
#: Most channels in one feature-map chunk (fewer when a band of them would pass FEATURE_BAND_BYTES).
FEATURE_CHUNK_CHANNELS = 16
#: About the most memory one band of feature-map chunks (channels × FEATURE_CHUNK rows × width) may take.
FEATURE_BAND_BYTES = 64 * 2**20


def _zlib_level1(data: bytes) -> bytes:
    """A zlib stream (what Zarr's ``zlib`` codec reads): libdeflate through imagecodecs, about 2.5x faster than zlib."""
    try:
        import imagecodecs

        return bytes(imagecodecs.deflate_encode(data, level=1))
    except (ImportError, AttributeError):  # imagecodecs without libdeflate
        return zlib.compress(data, 1)


def is_zarr(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().rstrip("/").endswith(ZARR_SUFFIXES)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


class _ZarrArray:
    """A Zarr v2 array folder being filled chunk by chunk (edge chunks stored whole, zero-padded, as Zarr expects)."""

    def __init__(self, folder: Path, shape: Sequence[int], chunks: Sequence[int], dtype: np.dtype) -> None:
        self.folder, self.chunks, self.dtype = folder, tuple(int(c) for c in chunks), np.dtype(dtype)
        folder.mkdir(parents=True)
        _write_json(folder / ".zarray", {
            "zarr_format": 2, "shape": [int(s) for s in shape], "chunks": list(self.chunks), "dtype": self.dtype.str,
            "compressor": {"id": "zlib", "level": 1}, "fill_value": 0, "order": "C", "filters": None,
            "dimension_separator": "/"})

    def write_chunk(self, index: Sequence[int], part: np.ndarray) -> None:
        """Store ``part`` (at most one chunk) as the chunk at ``index``."""
        block = np.zeros(self.chunks, self.dtype)
        block[tuple(slice(0, n) for n in part.shape)] = part
        key = self.folder.joinpath(*(str(i) for i in index))
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(_zlib_level1(block.tobytes()))


def write_label_zarr(raster: Any, path: str | os.PathLike[str], palette: Sequence[Sequence[int]],
                     names: Sequence[str], shapes: Sequence[tuple[int, int]], chunk: int = ZARR_CHUNK,
                     on_chunk: Callable[[], None] | None = None,
                     metadata: Mapping[str, Any] | None = None) -> int:
    """Write a :class:`~softcli.io.masks.LabelRaster` as OME-Zarr with levels ``shapes``; returns the level count.

    ``metadata``: recorded with the label names under the root's ``softcli`` attribute.
    """
    dtype = np.dtype(raster.dtype)
    with atomic_dir(path) as root:
        _write_json(root / ".zgroup", {"zarr_format": 2})
        datasets = []
        for level, (h, w) in enumerate(shapes):
            factor = 2 ** level
            array = _ZarrArray(root / str(level), (h, w), (chunk, chunk), dtype)
            for cy, y in enumerate(range(0, raster.height, chunk * factor)):
                band = raster.read_rows(y, min(raster.height, y + chunk * factor), factor)
                for cx, x in enumerate(range(0, band.shape[1], chunk)):
                    array.write_chunk((cy, cx), band[:, x:x + chunk])
                    if on_chunk is not None:
                        on_chunk()
            datasets.append({"path": str(level),
                             "coordinateTransformations": [{"type": "scale", "scale": [float(factor)] * 2}]})
        colors = [{"label-value": i, "rgba": [int(c) for c in palette[i]] + [255]} for i in range(len(names))]
        _write_json(root / ".zattrs", {
            "multiscales": [{"version": "0.4", "name": "labels",
                             "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                             "datasets": datasets}],
            "image-label": {"version": "0.4", "colors": colors},
            "softcli": {**dict(metadata or {}), "labels": list(names)}})
    return len(shapes)


class _MapRows(Protocol):
    """What the feature writer needs from a map sink (:class:`~softcli.engine.MapSink` has it)."""

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]: ...

    def read_rows(self, name: str, channel: int, y0: int, y1: int) -> np.ndarray: ...


def halve(block: np.ndarray) -> np.ndarray:
    """2×2 mean of a (C, H, W) block → (C, ⌈H/2⌉, ⌈W/2⌉); an odd edge averages the cells it has."""
    if block.shape[1] % 2:
        block = np.concatenate([block, block[:, -1:]], axis=1)
    if block.shape[2] % 2:
        block = np.concatenate([block, block[:, :, -1:]], axis=2)
    c, h, w = block.shape
    return block.reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4), dtype=np.float32)


class _Pyramid:
    """The levels of one channel group of a map, filled from level-0 rows in order (a cascade of row buffers)."""

    def __init__(self, arrays: Sequence[_ZarrArray], group: int) -> None:
        self.arrays, self.group = arrays, group
        self.side = arrays[0].chunks[1]
        self.buffers: list[np.ndarray | None] = [None] * len(arrays)
        self.rows_done = [0] * len(arrays)

    def push(self, level: int, rows: np.ndarray, final: bool = False) -> None:
        """Add rows to ``level``; write every full chunk row (and, when ``final``, what is left) and pass it down."""
        buf = self.buffers[level]
        buf = rows if buf is None else np.concatenate([buf, rows], axis=1)
        while buf.shape[1] >= self.side or (final and buf.shape[1]):
            piece, buf = buf[:, :self.side], buf[:, self.side:]
            cy = self.rows_done[level] // self.side
            for cx, x in enumerate(range(0, piece.shape[2], self.side)):
                self.arrays[level].write_chunk((self.group, cy, cx), piece[:, :, x:x + self.side])
            self.rows_done[level] += piece.shape[1]
            if level + 1 < len(self.arrays):  # chunk rows are even except the last: pairs never straddle two
                self.push(level + 1, halve(piece))
        self.buffers[level] = buf

    def finish(self) -> None:
        for level in range(len(self.arrays)):
            buf = self.buffers[level]
            if buf is not None:
                self.push(level, buf[:, :0], final=True)


def _feature_axes(mpp: float | None) -> list[dict[str, str]]:
    space = {"type": "space", "unit": "micrometer"} if mpp else {"type": "space"}
    return [{"name": "c", "type": "channel"}, {"name": "y", **space}, {"name": "x", **space}]


def _write_stage(root: Path, source: _MapRows, name: str, stride: int, mpp: float | None,
                 on_chunk_row: Callable[[], None] | None) -> int:
    """One stage as a multiscale image in ``root/name``; returns its level count."""
    from .masks import pyramid_shapes

    c_n, h, w = source.shapes[name]
    side = FEATURE_CHUNK
    group = max(1, min(c_n, FEATURE_CHUNK_CHANNELS, FEATURE_BAND_BYTES // (4 * side * max(w, 1))))
    shapes = pyramid_shapes(h, w, side)
    folder = root / name
    folder.mkdir()
    _write_json(folder / ".zgroup", {"zarr_format": 2})
    arrays = [_ZarrArray(folder / str(level), (c_n, lh, lw), (group, side, side), np.dtype("<f4"))
              for level, (lh, lw) in enumerate(shapes)]
    for g, c0 in enumerate(range(0, c_n, group)):
        pyramid = _Pyramid(arrays, g)
        for y in range(0, h, side):
            rows = np.stack([source.read_rows(name, c, y, min(h, y + side)) for c in range(c0, min(c_n, c0 + group))])
            pyramid.push(0, rows.astype(np.float32, copy=False))
            if on_chunk_row is not None:
                on_chunk_row()
        pyramid.finish()
    unit = mpp or 1.0
    datasets = []
    for level in range(len(shapes)):
        cell = stride * 2 ** level  # input pixels per cell at this level
        datasets.append({"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, cell * unit, cell * unit]},
            {"type": "translation", "translation": [0.0, (cell - 1) / 2 * unit, (cell - 1) / 2 * unit]}]})
    _write_json(folder / ".zattrs", {"multiscales": [{
        "version": "0.4", "name": name, "axes": _feature_axes(mpp), "datasets": datasets,
        "type": "mean", "metadata": {"method": "2x2 mean of the level above", "stride": stride}}]})
    return len(shapes)


def write_feature_zarr(path: str | os.PathLike[str], source: _MapRows, names: Sequence[str],
                       strides: Sequence[int], pooled: np.ndarray | None = None, mpp: float | None = None,
                       metadata: Mapping[str, Any] | None = None,
                       on_chunk_row: Callable[[], None] | None = None) -> dict[str, int]:
    """Write the maps ``names`` (at ``strides`` input pixels per cell) as OME-Zarr; returns levels per map."""
    levels: dict[str, int] = {}
    with atomic_dir(path) as root:
        _write_json(root / ".zgroup", {"zarr_format": 2})
        for name, stride in zip(names, strides):
            levels[name] = _write_stage(root, source, name, int(stride), mpp, on_chunk_row)
        if pooled is not None:
            vec = np.ascontiguousarray(pooled, "<f4").ravel()
            _ZarrArray(root / "pooled", vec.shape, vec.shape, vec.dtype).write_chunk((0,), vec)
        _write_json(root / ".zattrs", {"softcli": {**dict(metadata or {}), "maps": list(names),
                                                   "strides": [int(s) for s in strides], "levels": levels}})
    return levels

