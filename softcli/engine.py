"""Run a dense model over an image of any size, tile by tile, with bounded memory.

reader → :class:`~softcli.tiling.TileGrid` → dense function → :class:`Stitcher` → sink.
Each piece is small and swappable; blending happens once, in the stitcher.

API (stable; ``soft segment`` builds on it)::

    fn = lambda x: [m1, m2, ...]        # (1, 3, h, w) tensor → maps (1, C_i, h/s_i, w/s_i)
    grid = TileGrid(reader.height, reader.width, tile=1024, overlap=64)
    sink = MemorySink()                  # or DiskSink(folder) for maps larger than memory
    run_dense(fn, reader, grid, strides=[4, 8], channels=[64, 128], names=["stage1", "stage2"],
              sink=sink, mean=..., std=..., device="cpu", on_tile=callback)
    sink.array("stage1")                 # (C, ceil(H/4), ceil(W/4)) float32

- Tiles run in row-major order; the stitcher keeps, per output, only one band
  of rows as tall as a tile (C x tile/s x W/s floats). When a row of tiles is
  done, the rows no later tile touches are final and go to the sink.
- Sinks store each output as (C, H, W) float32. :class:`MemorySink` holds numpy
  arrays; :class:`DiskSink` writes rows straight into one raw file per output
  with ``pwrite`` (no memory map, so finished rows do not count towards the
  process's resident memory) and reads them back with ``pread`` for the writers.
- Whole-image mode is the one-tile grid: same code, no blending.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from .io.atomic import MAPS_TEMP_PREFIX, make_temp_dir
from .io.readers import ImageReader
from .tiling import Tile, TileGrid

DenseFn = Callable[[torch.Tensor], Sequence[torch.Tensor]]
#: ``on_tile(done, total)`` after each tile, for progress bars.
TileCallback = Callable[[int, int], None]


class MapSink:
    """Where finished rows of the (C, H, W) float32 output maps go."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, int, int]] = {}

    def allocate(self, name: str, shape: tuple[int, int, int]) -> None:
        self.shapes[name] = tuple(int(v) for v in shape)  # type: ignore[assignment]

    def write_rows(self, name: str, y0: int, block: np.ndarray) -> None:
        """Store rows [y0, y0 + h) of all channels; ``block`` is (C, h, W) float32."""
        raise NotImplementedError

    def read_rows(self, name: str, channel: int, y0: int, y1: int) -> np.ndarray:
        """Rows [y0, y1) of one channel as a (y1 - y0, W) float32 array."""
        raise NotImplementedError

    def iter_bytes(self, name: str, chunk: int = 1 << 25) -> Iterator[bytes | memoryview]:
        """The whole (C, H, W) map as C-order little-endian float32 bytes, in pieces of about ``chunk``."""
        raise NotImplementedError

    def array(self, name: str) -> np.ndarray:
        """The whole map (C, H, W); for a disk sink this reads it into memory."""
        raise NotImplementedError

    def nbytes(self, name: str) -> int:
        c, h, w = self.shapes[name]
        return 4 * c * h * w

    def close(self) -> None:
        """Free memory / delete temporary files."""

    def __enter__(self) -> "MapSink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemorySink(MapSink):
    """Output maps as numpy arrays in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.arrays: dict[str, np.ndarray] = {}

    def allocate(self, name: str, shape: tuple[int, int, int]) -> None:
        super().allocate(name, shape)
        self.arrays[name] = np.zeros(self.shapes[name], np.float32)

    def write_rows(self, name: str, y0: int, block: np.ndarray) -> None:
        self.arrays[name][:, y0:y0 + block.shape[1]] = block

    def read_rows(self, name: str, channel: int, y0: int, y1: int) -> np.ndarray:
        return self.arrays[name][channel, y0:y1]

    def iter_bytes(self, name: str, chunk: int = 1 << 25) -> Iterator[bytes | memoryview]:
        flat = memoryview(np.ascontiguousarray(self.arrays[name], dtype="<f4")).cast("B")
        for s in range(0, len(flat), chunk):
            yield flat[s:s + chunk]

    def array(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def close(self) -> None:
        self.arrays.clear()


class DiskSink(MapSink):
    """Output maps in raw (C, H, W) float32 files in a temporary folder inside ``folder``."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        super().__init__()
        self.folder = make_temp_dir(MAPS_TEMP_PREFIX, folder)  # PID in the name: a killed run's is swept later
        self._fds: dict[str, int] = {}

    def allocate(self, name: str, shape: tuple[int, int, int]) -> None:
        super().allocate(name, shape)
        fd = os.open(self.folder / f"{name}.f32", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, self.nbytes(name))
        self._fds[name] = fd

    def write_rows(self, name: str, y0: int, block: np.ndarray) -> None:
        _, h, w = self.shapes[name]
        fd = self._fds[name]
        block = np.ascontiguousarray(block, dtype="<f4")
        for c in range(block.shape[0]):
            os.pwrite(fd, block[c].data, 4 * (c * h + y0) * w)

    def read_rows(self, name: str, channel: int, y0: int, y1: int) -> np.ndarray:
        _, h, w = self.shapes[name]
        n = 4 * (y1 - y0) * w
        data = os.pread(self._fds[name], n, 4 * (channel * h + y0) * w)
        if len(data) != n:
            raise OSError(f"short read from the temporary map file of {name}")
        return np.frombuffer(data, "<f4").reshape(y1 - y0, w)

    def iter_bytes(self, name: str, chunk: int = 1 << 25) -> Iterator[bytes | memoryview]:
        fd, total = self._fds[name], self.nbytes(name)
        for s in range(0, total, chunk):
            data = os.pread(fd, min(chunk, total - s), s)
            if not data:
                raise OSError(f"short read from the temporary map file of {name}")
            yield data

    def array(self, name: str) -> np.ndarray:
        c, h, w = self.shapes[name]
        return np.frombuffer(b"".join(self.iter_bytes(name)), "<f4").reshape(c, h, w)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


class Stitcher:
    """Blend overlapping tile outputs into the sink, one band of tile rows at a time.

    Tiles must be added in the grid's row-major order (as :meth:`TileGrid.__iter__`
    yields them). Weights come from :meth:`TileGrid.axis_weights` and already sum
    to 1, so finished rows are written without a normalisation pass.
    """

    def __init__(self, grid: TileGrid, strides: Sequence[int], channels: Sequence[int], names: Sequence[str],
                 sink: MapSink, blend: str = "linear") -> None:
        if not (len(strides) == len(channels) == len(names)):
            raise ValueError("strides, channels and names must have the same length")
        self.grid, self.strides, self.names, self.sink, self.blend = grid, list(strides), list(names), sink, blend
        self._row = 0  # the tile row the bands hold
        self._bands: list[np.ndarray] = []
        self.sums = [np.zeros(c, np.float64) for c in channels]
        for name, s, c in zip(names, strides, channels):
            sink.allocate(name, (c, *grid.out_size(s)))
            self._bands.append(np.zeros((c, grid.tile_h // s, grid.padded[1] // s), np.float32))

    def add(self, tile: Tile, outputs: Sequence[np.ndarray]) -> None:
        """Add one tile's maps (each (C, h/s, w/s)); flushes finished rows when a new tile row starts."""
        if tile.row < self._row:
            raise ValueError("tiles must be added in row-major order")
        while tile.row > self._row:
            self._flush_row()
        for k, (out, s) in enumerate(zip(outputs, self.strides)):
            band = self._bands[k]
            expect = (band.shape[0], tile.h // s, tile.w // s)
            if tuple(out.shape) != expect:
                raise ValueError(f"{self.names[k]}: tile output {tuple(out.shape)}, expected {expect} "
                                 f"(a stride-{s} map of a {tile.h}x{tile.w} tile)")
            wy, wx = self.grid.axis_weights(tile, s, self.blend)
            x0 = tile.x // s
            band[:, :, x0:x0 + out.shape[2]] += out * wy[None, :, None] * wx[None, None, :]

    def finish(self) -> None:
        """Flush the remaining rows; every map in the sink is then complete."""
        while self._row < self.grid.rows:
            self._flush_row()

    def pooled(self, index: int) -> np.ndarray:
        """Mean over all cells of output ``index`` (valid after :meth:`finish`)."""
        _, h, w = self.sink.shapes[self.names[index]]
        return (self.sums[index] / (h * w)).astype(np.float32)

    def _flush_row(self) -> None:
        r = self._row
        for k, (name, s) in enumerate(zip(self.names, self.strides)):
            band = self._bands[k]
            start = self.grid.ys[r] // s
            _, out_h, out_w = self.sink.shapes[name]
            end = min(self.grid.final_rows(r, s), out_h)
            if end > start:
                rows = band[:, : end - start, :out_w]
                self.sink.write_rows(name, start, rows)
                self.sums[k] += rows.sum(axis=(1, 2), dtype=np.float64)
            if r + 1 < self.grid.rows:
                shift = self.grid.ys[r + 1] // s - start
                keep = band.shape[1] - shift
                band[:, :keep] = band[:, shift:]
                band[:, keep:] = 0.0
        self._row += 1


def to_tensor(region: np.ndarray, mean: Sequence[float], std: Sequence[float],
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Float RGB (h, w, 3) in [0, 1] → normalised (1, 3, h, w) float32 tensor on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(region.transpose(2, 0, 1)))[None]
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).to(device)


def run_dense(fn: DenseFn, reader: ImageReader, grid: TileGrid, strides: Sequence[int], channels: Sequence[int],
              names: Sequence[str], sink: MapSink, *, mean: Sequence[float] = (0.0, 0.0, 0.0),
              std: Sequence[float] = (1.0, 1.0, 1.0), device: torch.device | str = "cpu", blend: str = "linear",
              on_tile: TileCallback | None = None, skip: Callable[[Tile], bool] | None = None) -> Stitcher:
    """Run ``fn`` on every tile of ``grid`` over ``reader`` and blend its maps into ``sink``.

    Returns the finished :class:`Stitcher` (for :meth:`Stitcher.pooled`). The
    grid must describe the reader's size. Tiles for which ``skip`` is true (no
    tissue, say) are neither read nor run: they add zeros to the blend.
    """
    if (grid.height, grid.width) != (reader.height, reader.width):
        raise ValueError(f"grid is for {grid.height}x{grid.width}, image is {reader.height}x{reader.width}")
    stitcher = Stitcher(grid, strides, channels, names, sink, blend)
    total = len(grid)
    with torch.inference_mode():
        for done, tile in enumerate(grid, 1):
            if skip is not None and skip(tile):
                if on_tile is not None:
                    on_tile(done, total)
                continue
            x = to_tensor(reader.read_region(tile.y, tile.x, tile.h, tile.w), mean, std, device)
            maps = fn(x)
            del x
            outs = [m[0].float().cpu().numpy() for m in maps]
            del maps
            stitcher.add(tile, outs)
            if on_tile is not None:
                on_tile(done, total)
    stitcher.finish()
    return stitcher
