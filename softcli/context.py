"""Exact whole-image ("global context") SOFT inference, streamed over tiles with bounded memory.

A SOFT layer of stages 1-3 is local except for two small global quantities per
head: the landmarks L (an r x r conv at landmark patches chosen on the whole
map's grid) and K1ᵀ·V summed over all tokens (m x d). So each layer runs as::

    landmarks: the kept patch rows of the layer input, band by band  → L, A⁺
    pass A:    every tile: q, v → K1ᵀ·V, summed                      → W = A⁺·(K1ᵀ·V)
    pass B:    every tile + a k//2 halo: K1·W + local k x k term → ff, norms, MLP → next store

and gives the numbers of one whole-image forward (up to float summation order).
Patch embeddings run tile by tile with the halo their 3x3 convs need (zeros
exactly where the whole-image conv pads); positional embeddings are the
whole-grid bilinear resize evaluated on each tile (:func:`pos_embed_region`).
Activations between layers live in :class:`ActivationStore` objects: numpy
arrays when they fit the budget, raw files written with ``pwrite`` and read
with ``pread`` in a temporary ``.soft-context-*`` folder when they don't (so
stored rows never count towards resident memory); the folder is removed when
the run ends, also on an exception or Ctrl-C.

Stage 4 (softmax attention with a class token) has no such decomposition: it
runs once over all stage-4 tokens (N/1024 of them) held in memory, through the
same ``scaled_dot_product_attention`` call as the whole-image forward — exact,
O(N) memory on CPU, quadratic time. Ask for it only when you need it (the
class token of ``classify --full-res`` sees the whole image this way).

API::

    with run_global(model, source, upto=3, keep=(1, 2, 3), tile=1024, spill_dir=...) as result:
        result.maps[1].read(y0, y1, x0, x1)     # (h, w, C) float32 of stage 1, channels last
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .engine import to_tensor
from .io.readers import ImageReader
from .models.soft import SoftBlock, SoftModel, SoftStage, pos_embed_region, resize_region
from .tiling import ALIGN, FIXED_OVERHEAD_BYTES, choose_tile_size, estimate_memory

CONTEXT_MODES = ("auto", "global", "tile")
#: Largest default tile side (pixels at stride 1) of the global mode: big tiles cost
#: nothing in exactness, only working memory, and amortise the per-tile overhead.
GLOBAL_TILE_CAP = 2048
#: ``on_step(done, total)``: one step = one tile of one pass.
StepCallback = Callable[[int, int], None]


# -- activation stores ---------------------------------------------------------------------------

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

    def __init__(self, shape: tuple[int, int, int], path: Path) -> None:
        super().__init__(shape)
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, self.nbytes)

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
            n = os.preadv(self._fd, [view[done:]], offset + done)
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
            done += os.pwrite(self._fd, view[done:], offset + done)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.path.unlink(missing_ok=True)


class StoreFactory:
    """Makes activation stores: in memory, or as files in one temporary folder when ``spill_dir`` is set."""

    def __init__(self, spill_dir: str | os.PathLike[str] | None = None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=".soft-context-", dir=spill_dir)) if spill_dir else None
        self._count = 0
        self.peak_files_bytes = 0
        self._live: list[ActivationStore] = []

    @property
    def on_disk(self) -> bool:
        return self.folder is not None

    def new(self, shape: tuple[int, int, int]) -> ActivationStore:
        self._count += 1
        store: ActivationStore
        if self.folder is None:
            store = MemoryStore(shape)
        else:
            store = FileStore(shape, self.folder / f"act{self._count}.f32")
        self._live.append(store)
        return store

    def release(self, store: ActivationStore) -> None:
        store.close()
        if store in self._live:
            self._live.remove(store)

    def close(self) -> None:
        for store in self._live:
            store.close()
        self._live.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


# -- image sources ------------------------------------------------------------------------------

class ImageSource(Protocol):
    """A normalised image the global run reads by rectangles."""

    height: int
    width: int

    def region(self, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        """Pixels [y0, y1) x [x0, x1) as a normalised (1, 3, h, w) float32 tensor on the model's device."""
        ...


class ReaderSource:
    """An :class:`ImageReader` seen as ``height`` x ``width`` pixels (past its edge: replicated, as the reader does)."""

    def __init__(self, reader: ImageReader, height: int, width: int, mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str = "cpu") -> None:
        self.reader, self.height, self.width = reader, int(height), int(width)
        self.mean, self.std, self.device = mean, std, device

    def region(self, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        return to_tensor(self.reader.read_region(y0, x0, y1 - y0, x1 - x0), self.mean, self.std, self.device)


class TensorSource:
    """An already normalised (1, 3, H, W) tensor."""

    def __init__(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[0] != 1:
            raise ValueError(f"expected one (1, 3, H, W) image, got {tuple(x.shape)}")
        self.x = x
        self.height, self.width = int(x.shape[-2]), int(x.shape[-1])

    def region(self, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        return self.x[:, :, y0:y1, x0:x1]


# -- halo convolutions --------------------------------------------------------------------------

def _conv_geometry(conv: nn.Conv2d, axis: int) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a conv along one axis (the patch embeddings pad with numbers)."""
    return int(conv.kernel_size[axis]), int(conv.stride[axis]), int(conv.padding[axis])  # type: ignore[index]


def _conv_out(n: int, conv: nn.Conv2d, axis: int) -> int:
    k, s, p = _conv_geometry(conv, axis)
    return (n + 2 * p - k) // s + 1


def _needed(conv: nn.Conv2d, axis: int, out: tuple[int, int], n_in: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Input range (clipped to [0, n_in)) and zero padding (before, after) that give outputs ``out`` exactly."""
    k, s, p = _conv_geometry(conv, axis)
    lo, hi = s * out[0] - p, s * (out[1] - 1) - p + k
    return (max(lo, 0), min(hi, n_in)), (max(0, -lo), max(0, hi - n_in))


def embed_sizes(stage: SoftStage, size: tuple[int, int]) -> list[tuple[int, int]]:
    """Map sizes before and after every conv of a stage's patch embedding."""
    sizes = [size]
    for m in stage.patch_embed:
        if isinstance(m, nn.Conv2d):
            h, w = sizes[-1]
            sizes.append((_conv_out(h, m, 0), _conv_out(w, m, 1)))
    return sizes


def embed_region(stage: SoftStage, fetch: Callable[[int, int, int, int], Tensor], in_size: tuple[int, int],
                 rows: tuple[int, int], cols: tuple[int, int]) -> Tensor:
    """Cells rows x cols of ``stage.patch_embed`` applied to the whole input, reading only what they need.

    ``fetch(y0, y1, x0, x1)`` returns that window of the input as (1, C, h, w).
    Every conv gets its input window plus explicit zero padding where the
    whole-image conv pads, then runs unpadded; BN and ReLU are per cell.
    """
    convs = [m for m in stage.patch_embed if isinstance(m, nn.Conv2d)]
    sizes = embed_sizes(stage, in_size)
    ranges = [(rows, cols)]
    pads: list[tuple[int, int, int, int]] = []
    for conv, (h, w) in zip(reversed(convs), reversed(sizes[:-1])):
        (ry, py), (rx, px) = _needed(conv, 0, ranges[0][0], h), _needed(conv, 1, ranges[0][1], w)
        ranges.insert(0, (ry, rx))
        pads.insert(0, (px[0], px[1], py[0], py[1]))
    (y0, y1), (x0, x1) = ranges[0]
    x = fetch(y0, y1, x0, x1)
    i = 0
    for m in stage.patch_embed:
        if isinstance(m, nn.Conv2d):
            x = F.conv2d(F.pad(x, pads[i]), m.weight, m.bias, m.stride, 0, m.dilation, m.groups)
            i += 1
        else:
            x = m(x)
    return x


# -- the run ------------------------------------------------------------------------------------

def _stage(model: SoftModel, index: int) -> SoftStage:
    return cast(SoftStage, model.stages[index])


def blocks_1d(n: int, size: int) -> list[tuple[int, int]]:
    """[0, n) cut into consecutive ranges of at most ``size``."""
    return [(s, min(n, s + size)) for s in range(0, n, max(1, size))]


@dataclass
class GlobalResult:
    """Stage maps of a global run (1-based stage → store) and the stage-4 class token when stage 4 ran."""

    maps: dict[int, ActivationStore]
    sizes: dict[int, tuple[int, int]]
    cls: Tensor | None
    factory: StoreFactory
    tile_tokens: dict[int, int] = field(default_factory=dict)

    def close(self) -> None:
        self.factory.close()

    def __enter__(self) -> "GlobalResult":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_tensor(block: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(block)).to(device=device, dtype=torch.float32)


def _to_numpy(t: Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).numpy()


class _Runner:
    def __init__(self, model: SoftModel, factory: StoreFactory, tile: int, on_step: StepCallback | None,
                 total: int) -> None:
        self.model, self.factory, self.tile = model, factory, tile
        self.device = next(model.parameters()).device
        self.on_step, self.done, self.total = on_step, 0, total

    def step(self) -> None:
        self.done += 1
        if self.on_step is not None:
            self.on_step(self.done, self.total)

    def tiles(self, hw: tuple[int, int], stride: int) -> Iterator[tuple[tuple[int, int], tuple[int, int]]]:
        side = max(1, self.tile // stride)
        for rows in blocks_1d(hw[0], side):
            for cols in blocks_1d(hw[1], side):
                yield rows, cols

    def embed(self, index: int, fetch: Callable[[int, int, int, int], Tensor], in_size: tuple[int, int],
              out_size: tuple[int, int]) -> ActivationStore:
        """Patch embedding + positional embedding of stage ``index`` into a new store."""
        stage = _stage(self.model, index)
        c = self.model.config.embed_dims[index]
        store = self.factory.new((out_size[0], out_size[1], c))
        for rows, cols in self.tiles(out_size, 4 * 2 ** index):
            m = embed_region(stage, fetch, in_size, rows, cols)  # (1, C, h, w)
            tokens = m[0].permute(1, 2, 0) + pos_embed_region(
                stage.grid_pos_embed, stage.grid, out_size, rows, cols).view(m.shape[2], m.shape[3], c)
            store.write(rows[0], cols[0], _to_numpy(tokens))
            self.step()
        return store

    def block(self, blk: SoftBlock, x: ActivationStore, hw: tuple[int, int], stride: int) -> ActivationStore:
        """One SOFT block over the whole map: landmarks, pass A (K1ᵀV), pass B (outputs)."""
        attn = blk.attn
        dev = self.device
        h, w = hw
        # Landmarks from the kept patch rows, band by band (r rows at a time).
        rows_idx, cols_idx = attn.landmark_index(hw)
        r = attn.sr_ratio
        cols_dev = cols_idx.to(dev)
        parts = []
        for p in range(0, len(rows_idx), r):
            y0 = int(rows_idx[p])
            band = _to_tensor(x.read(y0, y0 + r, 0, w), dev).index_select(1, cols_dev)  # (r, cols, C)
            q, _ = attn.queries_values(band.reshape(1, -1, band.shape[-1]))
            qmap = q.transpose(2, 3).reshape(attn.num_heads, attn.head_dim, r, band.shape[1])
            parts.append(attn.landmarks_from_patches(qmap, 1))
        lm = torch.cat(parts, dim=2)
        # Pass A: K1ᵀ·V over every token.
        ktv: Tensor | None = None
        for rows, cols in self.tiles(hw, stride):
            xt = _to_tensor(x.read(rows[0], rows[1], cols[0], cols[1]), dev)
            q, v = attn.queries_values(xt.reshape(1, -1, xt.shape[-1]))
            part = attn.kernel_values(q, v, lm)
            ktv = part if ktv is None else ktv.add_(part)
            self.step()
        assert ktv is not None
        weights = attn.landmark_pinv(lm) @ ktv
        # Pass B: outputs, with a halo for the local k x k term.
        halo = attn.local_conv.kernel_size[0] // 2  # type: ignore[index]
        out = self.factory.new(x.shape)  # type: ignore[arg-type]
        for rows, cols in self.tiles(hw, stride):
            ry = (max(0, rows[0] - halo), min(h, rows[1] + halo))
            rx = (max(0, cols[0] - halo), min(w, cols[1] + halo))
            xr = _to_tensor(x.read(ry[0], ry[1], rx[0], rx[1]), dev)  # (rh, rw, C)
            rh, rw, c = xr.shape
            q, v = attn.queries_values(xr.reshape(1, -1, c))
            local = attn.local_term(v, (rh, rw))

            def crop(t: Tensor) -> Tensor:  # (1, h, rh·rw, d) → the tile's tokens
                t = t.reshape(1, attn.num_heads, rh, rw, -1)
                t = t[:, :, rows[0] - ry[0]:rows[1] - ry[0], cols[0] - rx[0]:cols[1] - rx[0]]
                return t.reshape(1, attn.num_heads, -1, t.shape[-1])

            q_tile = crop(q)
            y = attn.merge_heads(attn.kernel_apply(q_tile, lm, weights, q.dtype) + crop(local))
            xt = xr[rows[0] - ry[0]:rows[1] - ry[0], cols[0] - rx[0]:cols[1] - rx[0]].reshape(1, -1, c)
            y = blk.finish(xt, y)
            out.write(rows[0], cols[0], _to_numpy(y.view(rows[1] - rows[0], cols[1] - cols[0], c)))
            self.step()
        return out

    def stage4(self, x: ActivationStore, hw: tuple[int, int]) -> tuple[ActivationStore, Tensor]:
        """Softmax blocks over all stage-4 tokens at once (exact; see module docstring)."""
        stage = _stage(self.model, 3)
        c = x.shape[2]
        tokens = _to_tensor(x.read(0, hw[0], 0, hw[1]), self.device).reshape(1, -1, c)
        tokens, cls_out = stage.attend_with_class(tokens, cast(Tensor, self.model.cls_token))
        out = self.factory.new(x.shape)  # type: ignore[arg-type]
        out.write(0, 0, _to_numpy(tokens.view(hw[0], hw[1], c)))
        self.step()
        return out, cls_out


def stage_sizes(model: SoftModel, size: tuple[int, int], upto: int = 4) -> list[tuple[int, int]]:
    """Token-grid size of stages 1..``upto`` for an input of ``size`` pixels."""
    out = []
    for i in range(upto):
        size = embed_sizes(_stage(model, i), size)[-1]
        out.append(size)
    return out


def count_steps(model: SoftModel, size: tuple[int, int], upto: int, tile: int) -> int:
    """Tile steps of a global run (for progress bars)."""
    total = 0
    for i, (h, w) in enumerate(stage_sizes(model, size, upto)):
        side = max(1, tile // (4 * 2 ** i))
        n = math.ceil(h / side) * math.ceil(w / side)
        total += n + (2 * n * len(_stage(model, i).blocks) if i < 3 else 1)
    return total


def run_global(model: SoftModel, source: ImageSource, upto: int = 3, keep: Sequence[int] = (1, 2, 3), *,
               tile: int = 1024, spill_dir: str | os.PathLike[str] | None = None,
               on_step: StepCallback | None = None) -> GlobalResult:
    """Stages 1..``upto`` over the whole image, exactly, tile by tile (see module docstring).

    ``keep``: the stages (1-based) whose maps the result holds. ``tile``: tile
    side in input pixels (stage i tiles are tile / 2^(i+1) tokens a side).
    ``spill_dir``: where to put activations as files (None: in memory). The
    result must be closed (it is a context manager) to free them.
    """
    if not 1 <= upto <= 4:
        raise ValueError("upto must be 1-4")
    factory = StoreFactory(spill_dir)
    runner = _Runner(model, factory, tile, on_step, count_steps(model, (source.height, source.width), upto, tile))
    maps: dict[int, ActivationStore] = {}
    sizes: dict[int, tuple[int, int]] = {}
    cls_out: Tensor | None = None
    try:
        with torch.inference_mode():
            in_size = (source.height, source.width)
            prev: ActivationStore | None = None
            fetch: Callable[[int, int, int, int], Tensor] = source.region
            for i in range(upto):
                hw = embed_sizes(_stage(model, i), in_size)[-1]
                x = runner.embed(i, fetch, in_size, hw)
                if prev is not None and i not in keep:  # stage i's map (1-based) is no longer needed
                    factory.release(prev)
                if i < 3:
                    for blk in _stage(model, i).blocks:
                        y = runner.block(cast(SoftBlock, blk), x, hw, 4 * 2 ** i)
                        factory.release(x)
                        x = y
                else:
                    y, cls_out = runner.stage4(x, hw)
                    factory.release(x)
                    x = y
                sizes[i + 1] = hw
                if i + 1 in keep:
                    maps[i + 1] = x
                prev, in_size = x, hw
                fetch = _store_fetch(x, runner.device)
            if prev is not None and upto not in keep:
                factory.release(prev)
    except BaseException:
        factory.close()
        raise
    return GlobalResult(maps, sizes, cls_out, factory)


def _store_fetch(store: ActivationStore, device: torch.device) -> Callable[[int, int, int, int], Tensor]:
    def fetch(y0: int, y1: int, x0: int, x1: int) -> Tensor:
        return _to_tensor(store.read(y0, y1, x0, x1), device).permute(2, 0, 1).unsqueeze(0)

    return fetch


def store_rows(store: ActivationStore, device: torch.device | str = "cpu") -> Callable[[int, int], Tensor]:
    """``fetch_rows(a, b)`` over a store, for :func:`~softcli.models.soft.resize_region`."""
    return lambda a, b: _to_tensor(store.read(a, b, 0, store.shape[1]), torch.device(device))


def resized_rows(store: ActivationStore, out_size: tuple[int, int], rows: tuple[int, int],
                 device: torch.device | str = "cpu") -> Tensor:
    """Rows [a, b) (all columns) of a store's map resized bilinearly to ``out_size``: (h, W_out, C)."""
    if store.shape[:2] == tuple(out_size):
        return _to_tensor(store.read(rows[0], rows[1], 0, out_size[1]), torch.device(device))
    return resize_region(store_rows(store, device), store.shape[:2], out_size, rows, (0, out_size[1]))  # type: ignore[arg-type]


# -- choosing a mode ----------------------------------------------------------------------------

def available_memory() -> int | None:
    """Bytes of RAM available to a new allocation now (Linux MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def default_max_memory(fallback: int = 2 * 2**30) -> int:
    """Half of the RAM available now (at least 1 GB); ``fallback`` when that cannot be read."""
    avail = available_memory()
    return fallback if avail is None else max(2**30, avail // 2)


@dataclass(frozen=True)
class ContextChoice:
    """Which context mode runs and why (for ``--json`` and the summary line)."""

    mode: str  # "whole", "global" or "tile"
    reason: str
    estimated_whole_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "reason": self.reason,
                "estimated_whole_gb": round(self.estimated_whole_bytes / 2**30, 2)}


def choose_context(requested: str, height: int, width: int, model_config: Any, params: int,
                   max_memory: int) -> ContextChoice:
    """``auto``: the whole image in one pass when its estimated peak fits ``max_memory``, else ``global``."""
    if requested not in CONTEXT_MODES:
        raise ValueError(f"context must be one of {', '.join(CONTEXT_MODES)}, not {requested!r}")
    pad_h, pad_w = -(-height // ALIGN) * ALIGN, -(-width // ALIGN) * ALIGN
    est = estimate_memory(pad_h * pad_w, model_config, params)
    gb = f"{est / 2**30:.1f} GB"
    if requested == "global":
        return ContextChoice("global", "asked for: exact whole-image context, streamed over tiles", est)
    if requested == "tile":
        return ContextChoice("tile", "asked for: each tile sees only itself; tiles blended at the seams", est)
    if est <= max_memory:
        return ContextChoice("whole", f"the whole image fits the memory limit in one pass (about {gb})", est)
    return ContextChoice("global", f"one pass would need about {gb}, over the memory limit: "
                                   "exact whole-image context streamed over tiles", est)


def plan_global(height: int, width: int, model_config: Any, params: int, max_memory: int,
                stage_channels: Sequence[int], tile: int | None = None) -> tuple[int, bool]:
    """(tile side in pixels, spill activations to disk?) for a global run within ``max_memory``.

    Activations: the largest stage holds up to three maps at once (input, output,
    a kept stage map); they stay in memory when that takes at most a third of the
    budget. Tiles get the rest, sized with the same per-pixel model as whole passes.
    """
    held = max(3 * 4 * c * -(-height // s) * -(-width // s) for c, s in zip(stage_channels, (4, 8, 16, 32)))
    spill = held > max_memory // 3
    room = max_memory - (0 if spill else held)
    if tile is None:
        tile = choose_tile_size(max(room, FIXED_OVERHEAD_BYTES), model_config, params, cap=GLOBAL_TILE_CAP)
    return tile, spill


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
