"""Activation stores of the global run: (H, W, C) float32 maps read and written by rectangles."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import OutputError
from ..models.positions import resize_region


class ActivationStore:
    """An (H, W, C) float32 map, channels last, read and written by rectangles."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = tuple(int(v) for v in shape)

    @property
    def nbytes(self) -> int:
        h, w, c = self.shape
        return 4 * h * w * c

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows [y0, y1) x columns [x0, x1) as (h, w, C) float32."""
        raise NotImplementedError

    def write(self, y0: int, x0: int, block: np.ndarray) -> None:
        """Store an (h, w, C) block with its top-left cell at (y0, x0)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the memory or the file."""


class MemoryStore(ActivationStore):
    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__(shape)
        self.array = np.empty(self.shape, np.float32)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.array[y0:y1, x0:x1]

    def write(self, y0: int, x0: int, block: np.ndarray) -> None:
        self.array[y0:y0 + block.shape[0], x0:x0 + block.shape[1]] = block

    def close(self) -> None:
        self.array = np.empty((0, 0, 0), np.float32)


class FileStore(ActivationStore):
    """A raw file accessed with pread/pwrite (no memory map: stored rows are not resident memory)."""

    def __init__(self, shape: tuple[int, int, int], path: Path, existing: bool = False) -> None:
        """``existing``: a map a finished layer pass left (resume), opened on first use and never resized."""
        super().__init__(shape)
        self.path = path
        self._fd = -1
        self._existing = existing
        if not existing:  # no O_TRUNC: every cell is written again, and other ranks may already be writing
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(self._fd, self.nbytes)

    @property
    def fd(self) -> int:
        if self._fd < 0 and self._existing:
            self._existing = False
            try:
                self._fd = os.open(self.path, os.O_RDWR)
            except OSError as exc:
                raise OutputError(f"{self.path}: the resumable activation file is missing ({exc.strerror}); "
                                  f"remove {self.path.parent} to start afresh") from exc
            if os.fstat(self._fd).st_size != self.nbytes:
                raise OutputError(f"{self.path}: the resumable activation file has the wrong size; "
                                  f"remove {self.path.parent} to start afresh")
        return self._fd

    def sync(self) -> None:
        """Flush written rows to the disk (before a layer pass is recorded as finished)."""
        if self._fd >= 0:
            os.fsync(self._fd)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        _, w, c = self.shape
        out = np.empty((y1 - y0, x1 - x0, c), np.float32)
        if x0 == 0 and x1 == w:  # whole rows: one contiguous read
            self._read_into(out, 4 * y0 * w * c)
        else:
            for i, y in enumerate(range(y0, y1)):
                self._read_into(out[i], 4 * (y * w + x0) * c)
        return out

    def _read_into(self, out: np.ndarray, offset: int) -> None:
        view = out.data.cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"short read from the temporary activation file {self.path}")
            done += n

    def write(self, y0: int, x0: int, block: np.ndarray) -> None:
        _, w, c = self.shape
        block = np.ascontiguousarray(block, dtype="<f4")
        if x0 == 0 and block.shape[1] == w:
            self._write_all(block, 4 * y0 * w * c)
        else:
            for i in range(block.shape[0]):
                self._write_all(block[i], 4 * ((y0 + i) * w + x0) * c)

    def _write_all(self, block: np.ndarray, offset: int) -> None:
        view = block.data.cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def close(self) -> None:
        """Close and delete the file."""
        self.detach()
        self.path.unlink(missing_ok=True)

    def detach(self) -> None:
        """Close the file and keep it (a resumable run's state)."""
        self._existing = False
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StoreFactory:
    """Makes activation stores: in memory, or as files in one temporary folder when ``spill_dir`` is set."""

    def __init__(self, spill_dir: str | os.PathLike[str] | None = None, *,
                 keep_folder: str | os.PathLike[str] | None = None) -> None:
        """``keep_folder``: put the files there and leave the folder (and the files not released) on close:
        the activations of a resumable run (:mod:`softcli.context.resume`)."""
        self.kept = keep_folder is not None
        if keep_folder is not None:
            self.folder: Path | None = Path(keep_folder)
        else:
            self.folder = Path(tempfile.mkdtemp(prefix=".soft-context-", dir=spill_dir)) if spill_dir else None
        self._count = 0
        self.peak_files_bytes = 0
        self._live: list[ActivationStore] = []

    @property
    def on_disk(self) -> bool:
        return self.folder is not None

    def new(self, shape: tuple[int, int, int], name: str | None = None, existing: bool = False) -> ActivationStore:
        """A new store; ``name``: its file name (on disk only), ``existing``: reopen that file as it is."""
        self._count += 1
        store: ActivationStore
        if self.folder is None:
            store = MemoryStore(shape)
        else:
            store = FileStore(shape, self.folder / (name or f"act{self._count}.f32"), existing)
        self._live.append(store)
        return store

    def release(self, store: ActivationStore) -> None:
        store.close()
        if store in self._live:
            self._live.remove(store)

    def close(self) -> None:
        for store in self._live:
            if self.kept and isinstance(store, FileStore):
                store.detach()
            else:
                store.close()
        self._live.clear()
        if self.folder is not None and not self.kept:
            shutil.rmtree(self.folder, ignore_errors=True)


def _to_tensor(block: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(block)).to(device=device, dtype=torch.float32)


def _to_numpy(t: Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).numpy()


def store_rows(store: ActivationStore, device: torch.device | str = "cpu") -> Callable[[int, int], Tensor]:
    """``fetch_rows(a, b)`` over a store, for :func:`~softcli.models.soft.resize_region`."""
    return lambda a, b: _to_tensor(store.read(a, b, 0, store.shape[1]), torch.device(device))


def resized_rows(store: ActivationStore, out_size: tuple[int, int], rows: tuple[int, int],
                 device: torch.device | str = "cpu") -> Tensor:
    """Rows [a, b) (all columns) of a store's map resized bilinearly to ``out_size``: (h, W_out, C)."""
    if store.shape[:2] == tuple(out_size):
        return _to_tensor(store.read(rows[0], rows[1], 0, out_size[1]), torch.device(device))
    return resize_region(store_rows(store, device), store.shape[:2], out_size, rows, (0, out_size[1]))  # type: ignore[arg-type]


def export_map(store: ActivationStore, out_size: tuple[int, int], write_rows: Callable[[int, np.ndarray], None],
               band_bytes: int = 1 << 26) -> np.ndarray:
    """Copy a store's map, cropped to ``out_size``, as (C, h, W) row bands to ``write_rows(y0, block)``.

    Returns the per-channel float64 sums of what was written (for pooled means).
    """
    oh, ow = out_size
    c = store.shape[2]
    band = max(1, band_bytes // max(1, 4 * c * ow))
    sums = np.zeros(c, np.float64)
    for y0 in range(0, oh, band):
        y1 = min(oh, y0 + band)
        block = np.ascontiguousarray(store.read(y0, y1, 0, ow).transpose(2, 0, 1))
        sums += block.sum(axis=(1, 2), dtype=np.float64)
        write_rows(y0, block)
    return sums
