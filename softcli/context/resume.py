"""Resume a global run at its last finished layer pass.

A global run is a fixed sequence of passes over tiles (per stage: the patch
embedding, then per block pass A and pass B; stage 4: one pass). With a
:class:`LayerCheckpoints` every pass is recorded in the output's
:class:`~softcli.band_state.BandState` folder (``OUT.partial-state/``, keyed
by the same settings digest as tile-context bands) once it is on disk::

    OUT.partial-state/
        state.json              settings digest, "rows" = the number of passes
        pass007.f32             the map a pass wrote: raw (H, W, C) float32, read/written by rectangles
        pass004-landmarks.npy   pass A's small global state: the landmarks and K1ᵀ·V summed over all tiles
        pass004-ktv.npy
        done/00007.json         pass 7 is finished (written after its files were fsync'ed)

A map is deleted as soon as the pass that consumes it last is recorded, so the
folder holds what the in-memory run holds at once: the current layer's input
and output and the stage maps kept for the output. A rerun with the same
settings skips the finished passes (reopening their maps) and computes the
rest; the caller removes the folder once the output is complete.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from ..band_state import BandState
from ..errors import OutputError
from ..models.soft import SoftModel, SoftStage
from .stores import ActivationStore, FileStore


def count_passes(model: torch.nn.Module, upto: int) -> int:
    """Passes over tiles of a global run of stages 1..``upto`` (the checkpoint unit)."""
    return sum(1 + (2 * len(stage.blocks) if i < 3 else 1)
               for i, stage in enumerate(cast(SoftModel, model).stages[:upto]) if isinstance(stage, SoftStage))


class LayerCheckpoints:
    """The finished passes of a global run, kept in a (prepared) :class:`BandState` folder."""

    def __init__(self, state: BandState) -> None:
        self.state = state
        self.folder: Path = state.folder
        self.finished = set(state.finished())
        self.resumed = len(self.finished)  # passes a killed run had finished

    def is_done(self, index: int) -> bool:
        return index in self.finished

    def mark(self, index: int, stores: Sequence[ActivationStore] = (), **arrays: Tensor) -> None:
        """Record pass ``index`` as finished once its maps and its small ``arrays`` are on disk."""
        for name, t in arrays.items():
            _save_array(self.folder / f"pass{index:03d}-{name}.npy", t.detach().to("cpu").numpy())

        class _Stores:
            @staticmethod
            def sync() -> None:
                for store in stores:
                    if isinstance(store, FileStore):
                        store.sync()

        self.state.mark_done(_Stores(), index, [])
        self.finished.add(index)

    def load(self, index: int, name: str, device: torch.device) -> Tensor:
        """A small array saved with :meth:`mark` (numbers only: never unpickled)."""
        path = self.folder / f"pass{index:03d}-{name}.npy"
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise OutputError(f"{path}: the resumable state cannot be read ({exc}); "
                              f"remove {self.folder} to start afresh") from exc
        return torch.from_numpy(array).to(device)


def open_checkpoints(out: str | os.PathLike[str], settings: Mapping[str, Any], model: torch.nn.Module, upto: int,
                     dist: Any = None) -> LayerCheckpoints:
    """The layer checkpoints of a global run writing ``out``: kept when ``settings`` match, else afresh.

    ``settings``: everything the maps depend on (keyed as tile-context bands are,
    :func:`~softcli.band_state.settings_digest`). Under ``dist`` rank 0 prepares
    the folder and the others wait for it.
    """
    state = BandState(out, {"context": "global", **settings}, count_passes(model, upto))
    if dist is None or dist.is_main:
        state.prepare()
    if dist is not None:
        dist.barrier()
    return LayerCheckpoints(state)


def _save_array(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
