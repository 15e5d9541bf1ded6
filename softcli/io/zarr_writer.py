"""Label masks as OME-Zarr (``.zarr`` / ``.ome.zarr``): multiscale, chunked, readable by napari's ome-zarr reader.

Written directly in the Zarr v2 storage format that OME-NGFF 0.4 uses (a folder of
JSON files and zlib-compressed chunks, ``/``-separated chunk keys), so no ``zarr``
package is needed to write it; any Zarr reader (``zarr``, ``ome-zarr``, napari,
QuPath's OME-Zarr support) reads it. Levels halve like the OME-TIFF mask pyramid
(:func:`~softcli.io.masks.pyramid_shapes`, subsampled, not averaged: labels);
``.zattrs`` holds ``multiscales`` (axes ``y``, ``x``; each level's scale) and
``image-label`` colours and names. The folder appears under its name only once complete.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_dir

ZARR_CHUNK = 512
ZARR_SUFFIXES = (".ome.zarr", ".zarr")


def is_zarr(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().rstrip("/").endswith(ZARR_SUFFIXES)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def write_label_zarr(raster: Any, path: str | os.PathLike[str], palette: Sequence[Sequence[int]],
                     names: Sequence[str], shapes: Sequence[tuple[int, int]], chunk: int = ZARR_CHUNK,
                     on_chunk: Callable[[], None] | None = None) -> int:
    """Write a :class:`~softcli.io.masks.LabelRaster` as OME-Zarr with levels ``shapes``; returns the level count."""
    dtype = np.dtype(raster.dtype)
    with atomic_dir(path) as root:
        _write_json(root / ".zgroup", {"zarr_format": 2})
        datasets = []
        for level, (h, w) in enumerate(shapes):
            factor = 2 ** level
            folder = root / str(level)
            folder.mkdir()
            _write_json(folder / ".zarray", {
                "zarr_format": 2, "shape": [h, w], "chunks": [chunk, chunk], "dtype": dtype.str,
                "compressor": {"id": "zlib", "level": 1}, "fill_value": 0, "order": "C", "filters": None,
                "dimension_separator": "/"})
            for cy, y in enumerate(range(0, raster.height, chunk * factor)):
                band = raster.read_rows(y, min(raster.height, y + chunk * factor), factor)
                (folder / str(cy)).mkdir()
                for cx, x in enumerate(range(0, band.shape[1], chunk)):
                    block = np.zeros((chunk, chunk), dtype)  # edge chunks are stored whole, as Zarr expects
                    part = band[:, x:x + chunk]
                    block[: part.shape[0], : part.shape[1]] = part
                    (folder / str(cy) / str(cx)).write_bytes(zlib.compress(block.tobytes(), 1))
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
            "softcli": {"labels": list(names)}})
    return len(shapes)
