"""The global run: SOFT stages 1-4 over a whole image, layer by layer, tile by tile (see the package docstring)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from ..models.positions import pos_embed_region
from ..models.soft import SoftBlock, SoftModel, SoftStage
from .resume import LayerCheckpoints
from .sources import ImageSource, embed_region, embed_sizes
from .stores import ActivationStore, FileStore, StoreFactory, _to_numpy, _to_tensor

#: ``on_step(done, total)``: one step = one tile of one pass.
StepCallback = Callable[[int, int], None]


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

    def __enter__(self) -> GlobalResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Runner:
    def __init__(self, model: SoftModel, factory: StoreFactory, tile: int, on_step: StepCallback | None,
                 total: int, checkpoints: LayerCheckpoints | None = None, dist: Any = None) -> None:
        self.model, self.factory, self.tile = model, factory, tile
        self.device = next(model.parameters()).device
        self.on_step, self.done, self.total = on_step, 0, total
        self.checkpoints, self.dist = checkpoints, dist
        self.rank: int = dist.rank if dist is not None else 0
        self.world: int = dist.world_size if dist is not None else 1
        self.passes = 0  # index of the next pass

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.on_step is not None:
            self.on_step(self.done, self.total)

    def tiles(self, hw: tuple[int, int], stride: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        side = max(1, self.tile // stride)
        return [(rows, cols) for rows in blocks_1d(hw[0], side) for cols in blocks_1d(hw[1], side)]

    def my_tiles(self, hw: tuple[int, int], stride: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """This rank's share of the tiles (every tile in a lone process); the others count as done steps."""
        tiles = self.tiles(hw, stride)
        mine = tiles[len(tiles) * self.rank // self.world:len(tiles) * (self.rank + 1) // self.world]
        if len(mine) < len(tiles):
            self.step(len(tiles) - len(mine))
        return mine

    def _next_pass(self) -> tuple[int, bool]:
        index, self.passes = self.passes, self.passes + 1
        return index, self.checkpoints is not None and self.checkpoints.is_done(index)

    def _new_map(self, index: int, shape: tuple[int, int, int], existing: bool = False) -> ActivationStore:
        return self.factory.new(shape, f"pass{index:03d}.f32" if self.checkpoints is not None else None, existing)

    def _finish(self, index: int, stores: Sequence[ActivationStore] = (), **arrays: Tensor) -> None:
        """Every rank's tiles of pass ``index`` are written (and recorded, when resumable)."""
        if self.dist is not None:
            for store in stores:
                if isinstance(store, FileStore):
                    store.sync()
            self.dist.barrier()
        if self.checkpoints is not None and self.rank == 0:
            self.checkpoints.mark(index, stores, **arrays)
        if self.dist is not None:
            self.dist.barrier()

    def layer(self, shape: tuple[int, int, int], hw: tuple[int, int], stride: int,
              compute: Callable[[ActivationStore, tuple[int, int], tuple[int, int]], None]) -> ActivationStore:
        """A pass writing a new map tile by tile (``compute(out, rows, cols)``); reopened when already done."""
        index, done = self._next_pass()
        if done:
            self.step(len(self.tiles(hw, stride)))
            return self._new_map(index, shape, existing=True)
        out = self._new_map(index, shape)
        for rows, cols in self.my_tiles(hw, stride):
            compute(out, rows, cols)
            self.step()
        self._finish(index, [out])
        return out

    def embed(self, index: int, fetch: Callable[[int, int, int, int], Tensor], in_size: tuple[int, int],
              out_size: tuple[int, int]) -> ActivationStore:
        """Patch embedding + positional embedding of stage ``index`` into a new store."""
        stage = _stage(self.model, index)
        c = self.model.config.embed_dims[index]

        def tile(store: ActivationStore, rows: tuple[int, int], cols: tuple[int, int]) -> None:
            m = embed_region(stage, fetch, in_size, rows, cols)  # (1, C, h, w)
            tokens = m[0].permute(1, 2, 0) + pos_embed_region(
                stage.grid_pos_embed, stage.grid, out_size, rows, cols).view(m.shape[2], m.shape[3], c)
            store.write(rows[0], cols[0], _to_numpy(tokens))

        return self.layer((out_size[0], out_size[1], c), out_size, 4 * 2 ** index, tile)

    def global_sums(self, blk: SoftBlock, x: ActivationStore, hw: tuple[int, int], stride: int
                    ) -> tuple[Tensor, Tensor]:
        """Landmarks and pass A: K1ᵀ·V summed over every tile, in tile order (whatever the ranks)."""
        attn = blk.attn
        dev = self.device
        index, done = self._next_pass()
        if done:
            assert self.checkpoints is not None
            self.step(len(self.tiles(hw, stride)))
            return self.checkpoints.load(index, "landmarks", dev), self.checkpoints.load(index, "ktv", dev)
        # Landmarks from the kept patch rows, band by band (r rows at a time); every rank computes them.
        rows_idx, cols_idx = attn.landmark_index(hw)
        r = attn.sr_ratio
        cols_dev = cols_idx.to(dev)
        parts = []
        for p in range(0, len(rows_idx), r):
            y0 = int(rows_idx[p])
            band = _to_tensor(x.read(y0, y0 + r, 0, hw[1]), dev).index_select(1, cols_dev)  # (r, cols, C)
            q, _ = attn.queries_values(band.reshape(1, -1, band.shape[-1]))
            qmap = q.transpose(2, 3).reshape(attn.num_heads, attn.head_dim, r, band.shape[1])
            parts.append(attn.landmarks_from_patches(qmap, 1))
        lm = torch.cat(parts, dim=2)
        tile_sums = []
        for rows, cols in self.my_tiles(hw, stride):
            xt = _to_tensor(x.read(rows[0], rows[1], cols[0], cols[1]), dev)
            q, v = attn.queries_values(xt.reshape(1, -1, xt.shape[-1]))
            tile_sums.append(attn.kernel_values(q, v, lm))
            self.step()
        if self.dist is not None:  # the same additions in the same order as one process: equal numbers
            tile_sums = [t.to(dev) for share in self.dist.all_gather([t.cpu() for t in tile_sums]) for t in share]
        ktv = tile_sums[0]
        for part in tile_sums[1:]:
            ktv = ktv.add_(part)
        self._finish(index, landmarks=lm, ktv=ktv)
        return lm, ktv

    def block(self, blk: SoftBlock, x: ActivationStore, hw: tuple[int, int], stride: int) -> ActivationStore:
        """One SOFT block over the whole map: landmarks, pass A (K1ᵀV), pass B (outputs)."""
        attn = blk.attn
        h, w = hw
        lm, ktv = self.global_sums(blk, x, hw, stride)
        weights = attn.landmark_pinv(lm) @ ktv
        # Pass B: outputs, with a halo for the local k x k term.
        halo = attn.local_conv.kernel_size[0] // 2  # type: ignore[index]

        def tile(out: ActivationStore, rows: tuple[int, int], cols: tuple[int, int]) -> None:
            ry = (max(0, rows[0] - halo), min(h, rows[1] + halo))
            rx = (max(0, cols[0] - halo), min(w, cols[1] + halo))
            xr = _to_tensor(x.read(ry[0], ry[1], rx[0], rx[1]), self.device)  # (rh, rw, C)
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

        return self.layer(x.shape, hw, stride, tile)  # type: ignore[arg-type]

    def stage4(self, x: ActivationStore, hw: tuple[int, int]) -> tuple[ActivationStore, Tensor]:
        """Softmax blocks over all stage-4 tokens at once (exact; see module docstring); rank 0 runs them."""
        stage = _stage(self.model, 3)
        index, done = self._next_pass()
        out = self._new_map(index, x.shape, existing=done)  # type: ignore[arg-type]
        if done:
            assert self.checkpoints is not None
            self.step()
            return out, self.checkpoints.load(index, "cls", self.device)
        cls_out = torch.zeros(0)
        if self.rank == 0:
            c = x.shape[2]
            tokens = _to_tensor(x.read(0, hw[0], 0, hw[1]), self.device).reshape(1, -1, c)
            tokens, cls_out = stage.attend_with_class(tokens, cast(Tensor, self.model.cls_token))
            out.write(0, 0, _to_numpy(tokens.view(hw[0], hw[1], c)))
        if self.dist is not None:
            cls_out = self.dist.broadcast(cls_out.cpu()).to(self.device)
        self.step()
        self._finish(index, [out], cls=cls_out)
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
               on_step: StepCallback | None = None, checkpoints: LayerCheckpoints | None = None,
               dist: Any = None) -> GlobalResult:
    """Stages 1..``upto`` over the whole image, exactly, tile by tile (see module docstring).

    ``keep``: the stages (1-based) whose maps the result holds. ``tile``: tile
    side in input pixels (stage i tiles are tile / 2^(i+1) tokens a side).
    ``spill_dir``: where to put activations as files (None: in memory). The
    result must be closed (it is a context manager) to free them.
    ``checkpoints``: keep the activations in its folder and record every finished
    pass there; passes a killed run finished are skipped (:mod:`.resume`).
    ``dist`` (a :class:`~softcli.cohort.DistContext`): split every pass's tiles
    across ranks, which share the maps through the checkpoint folder (required).
    """
    if not 1 <= upto <= 4:
        raise ValueError("upto must be 1-4")
    if dist is not None and checkpoints is None:
        raise ValueError("ranks share the maps through the checkpoint folder: pass checkpoints with dist")
    factory = StoreFactory(keep_folder=checkpoints.folder) if checkpoints is not None else StoreFactory(spill_dir)
    runner = _Runner(model, factory, tile, on_step, count_steps(model, (source.height, source.width), upto, tile),
                     checkpoints, dist)
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
