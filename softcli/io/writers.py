"""Feature-map writers that stream from a :class:`~softcli.engine.MapSink`, so maps larger than memory fit.

Formats, chosen by the output's suffix:

- ``.safetensors`` (default): keys ``stage1`` … ``stage4``, each (C_i, H_i, W_i)
  float32, plus ``pooled`` (C_4,) with ``--pool``; string metadata under
  ``__metadata__``. Written by hand (8-byte header length, JSON header, raw
  little-endian data) so the data streams from disk; any safetensors reader loads it.
- ``.npy``: exactly one array, so exactly one stage; asking for several (or for
  ``--pool``) is a usage error that names .npz/.safetensors instead — silently
  writing only one of them would lose data.
- ``.npz``: ``stage1.npy`` … and ``pooled.npy`` in an uncompressed zip (as
  ``np.savez``), ZIP64 so members may exceed 4 GB.
- ``.tif``/``.tiff``/``.ome.tif``: a BigTIFF OME-TIFF with one image per stage
  (axes CYX, named ``stageN``, physical pixel size = mpp × stride when the mpp is
  known), written tile by tile (256², zlib) from the sink; no pooled vector (a usage error).
- ``.zarr``/``.ome.zarr``: OME-Zarr (NGFF 0.4), one multiscale image per stage
  (:func:`~softcli.io.zarr_writer.write_feature_zarr`).

Metadata (model, weights SHA-256, softcli version: :mod:`softcli.io.provenance`;
image size, strides, mpp, tiling, tissue masking) goes where the format has room:
safetensors ``__metadata__``; the npz member ``metadata.npy`` (a 0-d string
array holding a JSON object: ``json.loads(str(np.load(f)["metadata"]))``); the
sidecar ``NAME.meta.json`` beside a ``.npy``; the OME-TIFF image descriptions
(JSON); the OME-Zarr root attribute ``softcli``.

Every writer goes through :func:`~softcli.io.atomic.atomic_path` (``atomic_dir`` for Zarr).
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from ..constants import FEATURE_TIFF_TILE
from ..errors import ParameterError, UsageError
from .atomic import atomic_path

FORMATS = {".safetensors": "safetensors", ".npy": "npy", ".npz": "npz", ".tif": "tiff", ".tiff": "tiff",
           ".zarr": "zarr"}


def feature_format(path: str | os.PathLike[str]) -> str:
    """``safetensors``, ``npy``, ``npz``, ``tiff`` or ``zarr`` from the file name; anything else is a usage error."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"{path}: unknown output format {suffix or '(no suffix)'!r}; "
                         "use .safetensors, .npy, .npz, .ome.tif or .ome.zarr")
    return FORMATS[suffix]


def check_feature_request(path: str | os.PathLike[str], n_maps: int, pooled: bool) -> str:
    """Fail before any compute when the format cannot hold what was asked for; returns the format."""
    fmt = feature_format(path)
    if fmt == "npy" and n_maps != 1:
        raise UsageError(f"{path}: .npy holds one array but {n_maps} stages were asked for; "
                         "pick one with `stages=N`, or write .npz or .safetensors")
    if pooled and fmt in ("npy", "tiff"):
        raise ParameterError(f"{path}: `pool` needs .safetensors or .npz (a .{fmt} file holds only maps)")
    return fmt


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """``feats.npy`` → ``feats.meta.json``: where the metadata of a ``.npy`` output goes."""
    p = Path(path)
    return p.with_name(f"{p.stem}.meta.json")


def feature_outputs(path: str | os.PathLike[str]) -> list[Path]:
    """Every file a feature output ``path`` makes: itself, and for ``.npy`` its metadata sidecar."""
    return [Path(path), sidecar_path(path)] if feature_format(path) == "npy" else [Path(path)]


class _MapSource(Protocol):
    """What the writers need from a sink (:class:`~softcli.engine.MapSink` has it)."""

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]: ...

    def iter_bytes(self, name: str) -> Iterator[bytes | memoryview]: ...

    def read_rows(self, name: str, channel: int, y0: int, y1: int) -> np.ndarray: ...


def _copy_stream(fh: IO[bytes], chunks: Iterator[bytes | memoryview]) -> None:
    for chunk in chunks:
        fh.write(chunk)


def write_safetensors(path: str | os.PathLike[str], source: _MapSource, names: Sequence[str],
                      pooled: np.ndarray | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    header: dict[str, object] = {}
    offset = 0
    for name in names:
        n = 4 * int(np.prod(source.shapes[name]))
        header[name] = {"dtype": "F32", "shape": list(source.shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    if pooled is not None:
        header["pooled"] = {"dtype": "F32", "shape": [int(pooled.size)],
                            "data_offsets": [offset, offset + 4 * int(pooled.size)]}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in names:
            _copy_stream(fh, source.iter_bytes(name))
        if pooled is not None:
            fh.write(np.ascontiguousarray(pooled, "<f4").tobytes())
    return Path(path)


def _npy_header(shape: Sequence[int]) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(buf, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def write_feature_npy(path: str | os.PathLike[str], source: _MapSource, name: str) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(_npy_header(source.shapes[name]))
        _copy_stream(fh, source.iter_bytes(name))
    return Path(path)


def write_npz(path: str | os.PathLike[str], source: _MapSource, names: Sequence[str],
              pooled: np.ndarray | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name in names:
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                fh.write(_npy_header(source.shapes[name]))
                _copy_stream(fh, source.iter_bytes(name))
        if pooled is not None:
            with zf.open("pooled.npy", "w") as fh:
                fh.write(_npy_header(pooled.shape))
                fh.write(np.ascontiguousarray(pooled, "<f4").tobytes())
        if metadata:
            with zf.open("metadata.npy", "w") as fh:  # a string array: np.load reads it without pickle
                np.lib.format.write_array(fh, np.array(json.dumps(dict(metadata))), allow_pickle=False)
    return Path(path)


def _tiff_tiles(source: _MapSource, name: str, tile: int) -> Iterator[np.ndarray]:
    """Tiles of a (C, H, W) map in TIFF order (channel, tile row, tile column), one band read at a time."""
    c_n, h, w = source.shapes[name]
    for c in range(c_n):
        for y in range(0, h, tile):
            band = source.read_rows(name, c, y, min(h, y + tile))
            for x in range(0, w, tile):
                yield band[:, x:x + tile]


def write_ome_tiff(path: str | os.PathLike[str], source: _MapSource, names: Sequence[str],
                   compression: str | None = "zlib",
                   tile: int = FEATURE_TIFF_TILE, metadata: Mapping[str, str] | None = None,
                   strides: Sequence[int] | None = None, mpp: float | None = None) -> Path:
    """One CYX image per map; ``metadata`` as JSON in each image's description, µm pixel sizes when ``mpp`` is known."""
    import tifffile

    comp: dict[str, Any] = {}
    if compression:
        comp = {"compression": compression, "compressionargs": {"level": 1} if compression == "zlib" else {}}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
        for i, name in enumerate(names):
            c, h, w = source.shapes[name]
            md: dict[str, object] = {"axes": "CYX", "Name": name}
            if metadata:
                md["Description"] = json.dumps(dict(metadata))
            if mpp and strides is not None:
                size = float(mpp) * int(strides[i])
                md.update({"PhysicalSizeX": size, "PhysicalSizeY": size,
                           "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
            tw.write(_tiff_tiles(source, name, tile), shape=(c, h, w), dtype="float32", tile=(tile, tile),
                     photometric="minisblack", metadata=md, **comp)
    return Path(path)


def write_features(path: str | os.PathLike[str], source: _MapSource, names: Sequence[str],
                   pooled: np.ndarray | None = None, metadata: Mapping[str, str] | None = None, *,
                   strides: Sequence[int] | None = None, mpp: float | None = None) -> str:
    """Write the maps ``names`` of ``source`` (and ``pooled``) in the format of ``path``; returns the format.

    ``strides`` (input pixels per map cell) and ``mpp`` (µm per input pixel) give
    the OME formats their physical scale.
    """
    fmt = check_feature_request(path, len(names), pooled is not None)
    if fmt == "safetensors":
        write_safetensors(path, source, names, pooled, metadata)
    elif fmt == "npy":
        write_feature_npy(path, source, names[0])
        if metadata:
            with atomic_path(sidecar_path(path)) as tmp:
                tmp.write_text(json.dumps(dict(metadata), indent=2) + "\n", encoding="utf-8")
    elif fmt == "npz":
        write_npz(path, source, names, pooled, metadata)
    elif fmt == "zarr":
        from .zarr_writer import write_feature_zarr

        write_feature_zarr(path, source, names, strides if strides is not None else [1] * len(names), pooled, mpp,
                           metadata)
    else:
        write_ome_tiff(path, source, names, metadata=metadata, strides=strides, mpp=mpp)
    return fmt
