"""Resume inside one big image: the finished bands of tile rows, kept on disk beside the output.

A tiled run (more than one row of tiles) writes its blended maps into
``OUT.partial-state/`` instead of a PID-named temporary folder::

    OUT.partial-state/
        state.json          {"version", "settings" (sha256 of everything the maps depend on), "rows"}
        NAME.f32            raw (C, H, W) float32 maps, written row band by row band
        done/00017.json     tile row 17 is in the maps (written after an fsync); its per-channel sums

A rerun with the same settings (same image file, model weights, tile grid and
options: :func:`settings_digest`) computes only the tile rows that have no
``done`` file; any difference removes the folder and starts afresh. The
folder is removed once the output is complete. Its name has no PID in it, so
:func:`~softcli.io.atomic.remove_stale_temporaries` never sweeps it.
Under ``--split tiles`` every rank writes its own rows into the same files
(the folder must then be on a file system all ranks share).
A global-context run keeps its finished layer passes in the same kind of folder,
with the same keying (:mod:`softcli.context.resume`: one "row" per pass).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .engine import OutputSpec, PersistentSink
from .errors import OutputError

STATE_SUFFIX = ".partial-state"
STATE_VERSION = 1


def state_folder(out: str | os.PathLike[str]) -> Path:
    """``OUT.partial-state`` beside ``out``."""
    out = Path(out).resolve()
    return out.with_name(out.name + STATE_SUFFIX)


def file_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Path, size and modification time: a changed input file starts the run afresh."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def grid_identity(grid: Any) -> list[Any]:
    """Everything about a :class:`~softcli.tiling.TileGrid` the maps depend on."""
    return [grid.height, grid.width, list(grid.ys), list(grid.xs), grid.tile_h, grid.tile_w]


def tensors_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and bytes of tensors (model weights, cluster centroids)."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def settings_digest(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class Syncable(Protocol):
    def sync(self) -> None: ...


class BandState:
    """The resumable state of one output: which tile rows are finished, and the maps they wrote."""

    def __init__(self, out: str | os.PathLike[str], settings: Mapping[str, Any] | str, rows: int) -> None:
        self.folder = state_folder(out)
        self.digest = settings if isinstance(settings, str) else settings_digest(settings)
        self.rows = rows
        self.done_dir = self.folder / "done"
        self.resumed_rows = 0  # finished rows found by prepare()

    def prepare(self) -> None:
        """Keep the folder if it holds a run with the same settings, else replace it with an empty one."""
        expect = {"version": STATE_VERSION, "settings": self.digest, "rows": self.rows}
        try:
            same = json.loads((self.folder / "state.json").read_text()) == expect
        except (OSError, ValueError):
            same = False
        try:
            if not same:
                shutil.rmtree(self.folder, ignore_errors=True)
                self.done_dir.mkdir(parents=True)
                _write_json(self.folder / "state.json", expect)
        except OSError as exc:
            raise OutputError(f"{self.folder}: cannot keep the resumable state there ({exc.strerror or exc})") from exc
        self.resumed_rows = len(self.finished())

    def sink(self) -> PersistentSink:
        return PersistentSink(self.folder)

    def finished(self) -> dict[int, list[list[float]]]:
        """Finished tile row → its per-output channel sums."""
        out: dict[int, list[list[float]]] = {}
        for entry in os.scandir(self.done_dir):
            if entry.name.endswith(".json") and entry.name[:-5].isdigit():
                try:
                    out[int(entry.name[:-5])] = json.loads(Path(entry.path).read_text())["sums"]
                except (OSError, ValueError, KeyError):
                    continue  # unreadable: the row is done again
        return out

    def todo(self, rows: Iterable[int]) -> list[int]:
        done = self.finished()
        return [r for r in rows if r not in done]

    def mark_done(self, sink: Syncable, row: int, sums: Sequence[np.ndarray]) -> None:
        """Record tile row ``row`` as finished, after its map rows are on disk."""
        sink.sync()
        _write_json(self.done_dir / f"{row:05d}.json", {"sums": [[float(v) for v in s] for s in sums]})

    def pooled(self, index: int, cells: int) -> np.ndarray:
        """Mean over the map of output ``index``, summed band by band in row order (as the Stitcher does)."""
        done = self.finished()
        missing = [r for r in range(self.rows) if r not in done]
        if missing:
            raise RuntimeError(f"{self.folder}: tile rows {missing[:5]} are not finished")
        total = np.zeros(len(done[0][index]), np.float64)
        for r in range(self.rows):
            total += np.asarray(done[r][index], np.float64)
        return (total / cells).astype(np.float32)

    def check_complete(self) -> None:
        missing = [r for r in range(self.rows) if r not in self.finished()]
        if missing:
            raise RuntimeError(f"{self.folder}: tile rows {missing[:5]} are not finished")

    def remove(self) -> None:
        """The output is complete: the state is no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rank_rows(rows: int, rank: int, world: int) -> range:
    """The contiguous tile rows of ``rank`` when ``rows`` are split across ``world`` ranks."""
    return range(rows * rank // world, rows * (rank + 1) // world)


def run_bands(fn: Any, reader: Any, grid: Any, outputs: Sequence[OutputSpec], state: BandState, *,
              dist: Any = None, sums_only: Collection[str] = (), **dense: Any) -> PersistentSink:
    """Compute the unfinished tile rows (this rank's share under ``dist``) into the state's maps.

    Rank 0 prepares the folder; every rank then writes its rows and records each
    finished band; all ranks meet at a barrier before returning the (open) sink.
    ``sums_only``: outputs whose rows are only summed (their band sums are in the state), never stored
    (:class:`~softcli.engine.SumsOnlySink`); the returned sink lacks them.
    ``dense``: the keyword arguments of :func:`~softcli.engine.run_dense`.
    """
    from .engine import SumsOnlySink, run_dense

    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    if rank == 0:
        state.prepare()
    if dist is not None:
        dist.barrier()
    sink = state.sink()
    try:
        todo = state.todo(rank_rows(grid.rows, rank, world))
        run_dense(fn, reader, grid, outputs, SumsOnlySink(sink, sums_only) if sums_only else sink, rows=todo,
                  on_band=lambda row, sums: state.mark_done(sink, row, sums), **dense)
        if dist is not None:
            dist.barrier()
    except BaseException:
        sink.close()
        raise
    return sink
