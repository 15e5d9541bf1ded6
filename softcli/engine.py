"""Run a dense model over an image of any size, tile by tile, with bounded memory.

reader → :class:`~softcli.tiling.TileGrid` → dense function → :class:`Stitcher` → sink.
Each piece is small and swappable; blending happens once, in the stitcher.

API (stable; ``soft segment`` builds on it)::

    fn = lambda x: [m1, m2, ...]        # (1, 3, h, w) tensor → maps (1, C_i, h/s_i, w/s_i)
    grid = TileGrid(reader.height, reader.width, tile=1024, overlap=64)
    sink = MemorySink()                  # or DiskSink(folder) for maps larger than memory
    outputs = [OutputSpec("stage1", channels=64, stride=4), OutputSpec("stage2", channels=128, stride=8)]
    run_dense(fn, reader, grid, outputs, sink, mean=..., std=..., device="cpu", on_tile=callback)
    sink.array("stage1")                 # (C, ceil(H/4), ceil(W/4)) float32

- Tiles run in row-major order; the stitcher keeps, per output, only one band
  of rows as tall as a tile (C x tile/s x W/s floats). When a row of tiles is
  done, the rows no later tile touches are final and go to the sink.
- ``fn`` returns one map per :class:`OutputSpec`, in the specs' order; each is
  blended and goes to the sink under its spec's name.
- The stitcher needs only a :class:`RowSink` (``allocate`` + ``write_rows``:
  the segment label sink, the fit's cell sampler). A :class:`MapSink` also
  reads the maps back (for the writers). Sinks store each output as (C, H, W)
  float32. :class:`MemorySink` holds numpy
  arrays; :class:`DiskSink` writes rows straight into one raw file per output
  with ``pwrite`` (no memory map, so finished rows do not count towards the
  process's resident memory) and reads them back with ``pread`` for the writers.
- Whole-image mode is the one-tile grid: same code, no blending.
- ``run_dense(..., rows=[...])`` writes only some tile rows (a resumed run's
  unfinished bands, one rank's share under ``--split tiles``): each contiguous
  run of them starts by recomputing the earlier tile rows that overlap its first
  row (:func:`warmup_row`), so the blended values equal those of a whole run.
  :class:`PersistentSink` keeps the maps in named raw files that outlive the
  process (see :mod:`softcli.band_state`).
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .io.atomic import MAPS_TEMP_PREFIX, make_temp_dir
from .io.readers import ImageReader
from .tiling import Tile, TileGrid

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self


DenseFn = Callable[[torch.Tensor], Sequence[torch.Tensor]]
#: ``on_tile(done, total)`` after each tile, for progress bars.
TileCallback = Callable[[int, int], None]
#: ``progress(phase, done, total)`` of a run in named phases (segment, fit); the CLI draws one bar per phase.
PhaseProgressFn = Callable[[str, int, int], None]
#: ``on_band(tile_row, sums)`` once the output rows of a tile row are in the sink; ``sums``: per output, the
#: float64 sum over those rows of each channel (what :meth:`Stitcher.pooled` adds up).
BandCallback = Callable[[int, list[np.ndarray]], None]


@dataclass(frozen=True)
class OutputSpec:
    """One map the dense function returns per tile: its name in the sink, its channels and its stride.

    The stride is input pixels per map cell (a stage map's 4, 8, 16 or 32); the
    whole image's map is (channels, ⌈H/stride⌉, ⌈W/stride⌉). ``stage`` says
    which backbone stage a stage map is (:func:`softcli.features.stage_outputs`
    builds those, :func:`softcli.features.stage_maps_fn` the function giving
    them); the engine itself only blends and stores.
    """

    name: str
    channels: int
    stride: int
    stage: int | None = None  # the backbone stage (1-4) the map is, for stage maps


class RowSink(ABC):
    """Where finished rows of the (C, H, W) float32 output maps go: all a :class:`Stitcher` needs."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, int, int]] = {}

    def allocate(self, name: str, shape: tuple[int, int, int]) -> None:
        """Announce map ``name`` of ``shape`` (C, H, W) before its first rows."""
        self.shapes[name] = tuple(int(v) for v in shape)  # type: ignore[assignment]

    @abstractmethod
    def write_rows(self, name: str, y0: int, block: np.ndarray) -> None:
        """Take rows [y0, y0 + h) of all channels; ``block`` is (C, h, W) float32 (a stitcher goes top to bottom)."""

    def close(self) -> None:  # noqa: B027 - optional hook: most sinks have nothing to free
        """Free memory / delete temporary files."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MapSink(RowSink):
    """A sink that keeps the maps and reads them back (for the writers and :func:`replay_rows`)."""

    @abstractmethod
    def read_rows(self, name: str, channel: int, y0: int, y1: int) -> np.ndarray:
        """Rows [y0, y1) of one channel as a (y1 - y0, W) float32 array."""

    @abstractmethod
    def iter_bytes(self, name: str, chunk: int = 1 << 25) -> Iterator[bytes | memoryview]:
        """The whole (C, H, W) map as C-order little-endian float32 bytes, in pieces of about ``chunk``."""

    @abstractmethod
    def array(self, name: str) -> np.ndarray:
        """The whole map (C, H, W); for a disk sink this reads it into memory."""

    def read_block(self, name: str, y0: int, y1: int) -> np.ndarray:
        """Rows [y0, y1) of all channels as a (C, y1 - y0, W) float32 array."""
        return np.stack([self.read_rows(name, c, y0, y1) for c in range(self.shapes[name][0])])

    def nbytes(self, name: str) -> int:
        c, h, w = self.shapes[name]
        return 4 * c * h * w


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
        flat = np.ascontiguousarray(self.arrays[name], dtype="<f4").data.cast("B")
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

    def sync(self) -> None:
        """Flush written rows to the disk (before a band is recorded as finished)."""
        for fd in self._fds.values():
            os.fsync(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


class SumsOnlySink(MapSink):
    """Pass rows on to ``inner``, except those of the maps in ``sums_only``: those are sized, never stored.

    For a map wanted only for its mean (the pooled stage 4 of ``soft features
    --pool`` without stage 4 among the maps): the :class:`Stitcher` adds up each
    finished row before it reaches the sink, so the mean is exact while nothing
    of the map outlives the stitcher's one band. Reading such a map is an error.
    """

    def __init__(self, inner: MapSink, sums_only: Iterable[str]) -> None:
        super().__init__()
        self.inner, self.sums_only = inner, frozenset(sums_only)

    def allocate(self, name: str, shape: tuple[int, int, int]) -> None:
        super().allocate(name, shape)
        if name not in self.sums_only:
            self.inner.allocate(name, shape)

    def write_rows(self, name: str, y0: int, block: np.ndarray) -> None:
        if name not in self.sums_only:
            self.inner.write_rows(name, y0, block)

    def _kept(self, name: str) -> str:
        if name in self.sums_only:
            raise KeyError(f"{name}: only its sums were kept, not the map")
        return name

    def read_rows(self, name: str, channel: int, y0: int, y1: int) -> np.ndarray:
        return self.inner.read_rows(self._kept(name), channel, y0, y1)

    def iter_bytes(self, name: str, chunk: int = 1 << 25) -> Iterator[bytes | memoryview]:
        return self.inner.iter_bytes(self._kept(name), chunk)

    def array(self, name: str) -> np.ndarray:
        return self.inner.array(self._kept(name))

    def close(self) -> None:
        self.inner.close()


class PersistentSink(DiskSink):
    """A :class:`DiskSink` in a named folder whose files are kept: reopening finds the rows already written.

    Several processes (ranks) may write disjoint rows of the same files.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:  # a named folder, not a temporary one
        RowSink.__init__(self)
        self.folder = Path(folder)
        self._fds = {}

    def allocate(self, name: str, shape: tuple[int, int, int]) -> None:
        if name in self._fds:
            if tuple(shape) != self.shapes[name]:
                raise ValueError(f"{name}: allocated as {self.shapes[name]}, now {tuple(shape)}")
            return
        RowSink.allocate(self, name, shape)
        fd = os.open(self.folder / f"{name}.f32", os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(fd).st_size != self.nbytes(name):
            os.ftruncate(fd, self.nbytes(name))
        self._fds[name] = fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class Stitcher:
    """Blend overlapping tile outputs into the sink, one band of tile rows at a time.

    Tiles must be added in the grid's row-major order (as :meth:`TileGrid.__iter__`
    yields them). Weights come from :meth:`TileGrid.axis_weights` and already sum
    to 1, so finished rows are written without a normalisation pass.
    """

    def __init__(self, grid: TileGrid, outputs: Sequence[OutputSpec], sink: RowSink, blend: str = "linear", *,
                 first_row: int = 0, write_from: int = 0) -> None:
        """``first_row``: the first tile row that will be added; rows before ``write_from`` only warm the bands up."""
        if len({o.name for o in outputs}) != len(outputs):
            raise ValueError(f"output names must differ: {[o.name for o in outputs]}")
        self.grid, self.outputs, self.sink, self.blend = grid, list(outputs), sink, blend
        self._row = first_row  # the tile row the bands hold
        self._write_from = write_from
        self._bands: list[np.ndarray] = []
        self.sums = [np.zeros(o.channels, np.float64) for o in outputs]
        self.band_sums: list[np.ndarray] = []  # of the last written tile row
        for o in outputs:
            shape = (o.channels, *grid.out_size(o.stride))
            if sink.shapes.get(o.name) != shape:  # a sink already holding rows of this map keeps them
                sink.allocate(o.name, shape)
            band_shape = (o.channels, grid.tile_h // o.stride, grid.padded[1] // o.stride)
            self._bands.append(np.zeros(band_shape, np.float32))

    def add(self, tile: Tile, outputs: Sequence[np.ndarray]) -> None:
        """Add one tile's maps (each (C, h/s, w/s)); flushes finished rows when a new tile row starts."""
        if tile.row < self._row:
            raise ValueError("tiles must be added in row-major order")
        while tile.row > self._row:
            self._flush_row()
        if len(outputs) != len(self.outputs):
            raise ValueError(f"the dense function gave {len(outputs)} maps for {len(self.outputs)} outputs")
        for k, (out, spec) in enumerate(zip(outputs, self.outputs)):
            band, s = self._bands[k], spec.stride
            expect = (band.shape[0], tile.h // s, tile.w // s)
            if tuple(out.shape) != expect:
                raise ValueError(f"{spec.name}: tile output {tuple(out.shape)}, expected {expect} "
                                 f"(a stride-{s} map of a {tile.w}x{tile.h} tile)")
            wy, wx = self.grid.axis_weights(tile, s, self.blend)
            x0 = tile.x // s
            band[:, :, x0:x0 + out.shape[2]] += out * wy[None, :, None] * wx[None, None, :]

    def finish(self, until: int | None = None) -> None:
        """Flush the tile rows before ``until`` (default: all; every map in the sink is then complete)."""
        while self._row < (self.grid.rows if until is None else until):
            self._flush_row()

    def pooled(self, index: int) -> np.ndarray:
        """Mean over all cells of output ``index`` (valid after :meth:`finish`)."""
        _, h, w = self.sink.shapes[self.outputs[index].name]
        return (self.sums[index] / (h * w)).astype(np.float32)

    def _flush_row(self) -> None:
        r = self._row
        self.band_sums = [np.zeros_like(s) for s in self.sums]
        for k, spec in enumerate(self.outputs):
            band, name, s = self._bands[k], spec.name, spec.stride
            start = self.grid.ys[r] // s
            _, out_h, out_w = self.sink.shapes[name]
            end = min(self.grid.final_rows(r, s), out_h)
            if end > start and r >= self._write_from:
                rows = band[:, : end - start, :out_w]
                self.sink.write_rows(name, start, rows)
                self.band_sums[k] = rows.sum(axis=(1, 2), dtype=np.float64)
                self.sums[k] += self.band_sums[k]
            if r + 1 < self.grid.rows:
                shift = self.grid.ys[r + 1] // s - start
                keep = band.shape[1] - shift
                band[:, :keep] = band[:, shift:]
                band[:, keep:] = 0.0
        self._row += 1


def normalized_batch(region: np.ndarray, mean: Sequence[float], std: Sequence[float],
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Float RGB (h, w, 3) in [0, 1] → normalised (1, 3, h, w) float32 tensor on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(region.transpose(2, 0, 1)))[None]
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).to(device)


def warmup_row(grid: TileGrid, row: int) -> int:
    """The first tile row whose tiles reach into tile row ``row`` (blending needs them all)."""
    first = row
    while first > 0 and grid.ys[first - 1] + grid.tile_h > grid.ys[row]:
        first -= 1
    return first


def contiguous_runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted tile rows → [start, stop) runs of consecutive rows."""
    runs: list[tuple[int, int]] = []
    for r in sorted(set(rows)):
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def run_dense(fn: DenseFn, reader: ImageReader, grid: TileGrid, outputs: Sequence[OutputSpec], sink: RowSink, *,
              mean: Sequence[float] = (0.0, 0.0, 0.0),
              std: Sequence[float] = (1.0, 1.0, 1.0), device: torch.device | str = "cpu", blend: str = "linear",
              on_tile: TileCallback | None = None, skip: Callable[[Tile], bool] | None = None,
              rows: Sequence[int] | None = None, on_band: BandCallback | None = None) -> Stitcher:
    """Run ``fn`` on every tile of ``grid`` over ``reader`` and blend its maps (one per ``outputs`` spec) into ``sink``.

    Returns the last :class:`Stitcher` (for :meth:`Stitcher.pooled`, meaningful
    when all rows ran at once). The grid must describe the reader's size. Tiles
    for which ``skip`` is true (no tissue, say) are neither read nor run: they add
    zeros to the blend.
    ``rows``: write only these tile rows (the earlier rows overlapping each
    contiguous run are recomputed, not written); ``on_band`` is called after each
    written tile row.
    """
    if (grid.height, grid.width) != (reader.height, reader.width):
        raise ValueError(f"grid is for {grid.width}x{grid.height}, image is {reader.width}x{reader.height}")
    runs = [(0, grid.rows)] if rows is None else contiguous_runs(rows)
    if any(r0 < 0 or r1 > grid.rows for r0, r1 in runs):
        raise ValueError(f"tile rows out of range 0..{grid.rows - 1}")
    plan = [(warmup_row(grid, r0), r0, r1) for r0, r1 in runs]
    total = sum(grid.cols * (r1 - w0) for w0, _, r1 in plan)
    done = 0
    if not plan:  # nothing left to compute: the maps are still allocated in the sink
        return Stitcher(grid, outputs, sink, blend, first_row=grid.rows)
    with torch.inference_mode():
        for w0, r0, r1 in plan:
            stitcher = Stitcher(grid, outputs, sink, blend, first_row=w0, write_from=r0)
            for tile in grid:
                if not w0 <= tile.row < r1:
                    continue
                while tile.row > stitcher._row:
                    _flush(stitcher, on_band)
                if skip is None or not skip(tile):
                    x = normalized_batch(reader.read_region(tile.y, tile.x, tile.h, tile.w), mean, std, device)
                    maps = fn(x)
                    del x
                    outs = [m[0].float().cpu().numpy() for m in maps]
                    del maps
                    stitcher.add(tile, outs)
                done += 1
                if on_tile is not None:
                    on_tile(done, total)
            while stitcher._row < r1:
                _flush(stitcher, on_band)
    return stitcher


def _flush(stitcher: Stitcher, on_band: BandCallback | None) -> None:
    """Flush the stitcher's current tile row and report it when it was written (not a warm-up row)."""
    row = stitcher._row
    stitcher.finish(row + 1)
    if on_band is not None and row >= stitcher._write_from:
        on_band(row, stitcher.band_sums)


def replay_rows(source: MapSink, name: str, target: RowSink, rows_per_block: int = 64) -> None:
    """Feed a finished map of ``source`` into ``target`` in row order (e.g. saved scores into a label sink)."""
    c, h, w = source.shapes[name]
    target.allocate(name, (c, h, w))
    for y0 in range(0, h, rows_per_block):
        target.write_rows(name, y0, source.read_block(name, y0, min(h, y0 + rows_per_block)))
