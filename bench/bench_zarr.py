"""Memory of writing feature maps from a disk sink: OME-Zarr against OME-TIFF, side by side in one process.

Fills a :class:`~softcli.engine.DiskSink` with a (C, H, W) float32 map (smooth
values plus noise, so zlib has something to do), then writes it with
:func:`softcli.io.writers.write_features` as ``.ome.zarr`` and as ``.ome.tif``,
measuring each write's wall and CPU time and the peak of Python-traced allocations
(``tracemalloc``: numpy buffers are traced; the map itself lives on disk).
The claim checked: the Zarr writer holds about one band of chunks per pyramid
level (:data:`~softcli.io.zarr_writer.FEATURE_BAND_BYTES`), not the map.

Example:
    python bench/bench_zarr.py --channels 64 --side 2048
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from softcli.engine import DiskSink
from softcli.io.writers import write_features


def fill(sink: DiskSink, name: str, c: int, side: int, band: int = 256) -> None:
    sink.allocate(name, (c, side, side))
    rng = np.random.default_rng(0)
    xs = np.linspace(0, 8, side, dtype=np.float32)
    for y in range(0, side, band):
        rows = np.sin(xs[y:y + band, None] + xs[None, :])[None] * np.arange(1, c + 1, dtype=np.float32)[:, None, None]
        sink.write_rows(name, y, rows + rng.standard_normal(rows.shape, dtype=np.float32) * 0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--side", type=int, default=2048)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-zarr-"))
    try:
        with DiskSink(folder) as sink:
            fill(sink, "stage1", args.channels, args.side)
            map_mb = sink.nbytes("stage1") / 2**20
            print(f"map (C, H, W) = ({args.channels}, {args.side}, {args.side}) float32: {map_mb:.0f} MiB on disk")
            print("| output | wall s | CPU s | peak traced MiB | output MiB |")
            print("|---|---|---|---|---|")
            for name in ("maps.ome.zarr", "maps.ome.tif"):
                out = folder / name
                tracemalloc.start()
                t, cpu = time.perf_counter(), time.process_time()
                write_features(out, sink, ["stage1"], None, {"model": "bench"}, strides=[4], mpp=0.5)
                wall, cpu = time.perf_counter() - t, time.process_time() - cpu
                peak = tracemalloc.get_traced_memory()[1] / 2**20
                tracemalloc.stop()
                size = (sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir()
                        else out.stat().st_size) / 2**20
                print(f"| {name} | {wall:.1f} | {cpu:.1f} | {peak:.0f} | {size:.0f} |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
