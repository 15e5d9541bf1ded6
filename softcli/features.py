"""Dense SOFT features of an image of any size: the library behind ``soft features``.

:func:`extract_features` = open the image region by region
(:func:`~softcli.io.readers.open_image`), plan tiles from a memory budget
(:func:`plan_features`), run the backbone tile by tile and blend
(:func:`~softcli.engine.run_dense`), and write the stage maps
(:func:`~softcli.io.writers.write_features`).

Default settings keep time linear in pixels and memory bounded:

- tiles are at most :data:`~softcli.tiling.DEFAULT_TILE` (1024) pixels a side,
  fewer/smaller when ``--max-memory`` says so, because stage 4 is softmax
  attention (quadratic in tokens); an image that fits in one tile runs whole;
- output maps stay in memory when they take at most a quarter of the budget,
  else they go to temporary raw files next to the output (a disk sink) and are
  streamed into the output file;
- ``pool`` without stage 4 among the maps sums stage 4 as it is blended
  (:class:`~softcli.engine.SumsOnlySink`) and stores no stage-4 map. Global
  context still holds stage 4 once, as the activations of its last layer pass
  (in memory or spilled to disk, planned within the budget like every pass):
  its mean is read from there (:func:`~softcli.context.export_map`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from .band_state import BandState, file_identity, grid_identity, run_bands, tensors_digest
from .checkpoint import model_files
from .constants import DEFAULT_MAX_PIXELS, IMAGENET_MEAN, IMAGENET_STD, STAGE_STRIDES
from .context import (
    LayerCheckpoints,
    ReaderSource,
    check_context_mode,
    choose_context,
    export_map,
    memory_budget,
    open_checkpoints,
    plan_global,
    run_global,
    tissue_context,
)
from .engine import DiskSink, MapSink, MemorySink, OutputSpec, SumsOnlySink, TileCallback, run_dense
from .errors import InputError, ParameterError
from .io.atomic import check_disk_space, check_output_path
from .io.image import pixel_limit
from .io.provenance import Provenance, provenance
from .io.readers import ArrayReader, ImageReader
from .io.slide import open_at_resolution, slide_metadata
from .io.writers import check_feature_request, feature_outputs, write_features
from .models import SoftModel
from .resources import device_memory_available, format_bytes
from .stages import parse_stages
from .tiling import ALIGN, DEFAULT_OVERLAP, DEFAULT_TILE, TileGrid, choose_tile_size, estimate_memory
from .tissue import compute_tissue, counting_skip


@dataclass
class FeaturesPlan:
    """How an image will be processed; everything is decided before any compute."""

    height: int
    width: int
    tile: tuple[int, int]
    overlap: int
    rows: int
    cols: int
    mode: str  # "whole", "tiled" or "global"
    sink: str  # "memory" or "disk"
    map_bytes: int
    estimated_peak_bytes: int
    max_memory_bytes: int
    context: str = "tile"  # what ran: "whole", "global" or "tile" (see softcli.context)
    context_reason: str = ""
    activations: str | None = None  # global mode: "memory" or "disk" (spilled between layers)

    @property
    def tiles(self) -> int:
        return self.rows * self.cols


def check_tiling(tile: int | None, overlap: int | None) -> None:
    """Tile and overlap values every context mode accepts (multiples of 32)."""
    if overlap is not None and (overlap < 0 or overlap % ALIGN):
        raise ParameterError(f"`overlap` must be a multiple of {ALIGN} (0, 32, 64, ...), not {overlap}")
    if tile is not None and (tile < 2 * ALIGN or tile % ALIGN):
        raise ParameterError(f"`tile` must be a multiple of {ALIGN} and at least {2 * ALIGN}, not {tile}")


def plan_features(height: int, width: int, channels: Sequence[int], strides: Sequence[int], *,
                  model_config: Any = None, params: int = 0, tile: int | None = None, overlap: int | None = None,
                  max_memory: int | None = None, image_in_memory: bool = True,
                  tile_cap: int = DEFAULT_TILE, stored: Sequence[bool] | None = None) -> tuple[TileGrid, FeaturesPlan]:
    """Choose tile size and sink for an image so the run fits ``max_memory`` (see module docstring).

    ``max_memory`` None: half the RAM available now (:func:`~softcli.context.memory_budget`).
    ``stored``: per map, whether the sink keeps it (default all); one computed only for its
    mean (:class:`~softcli.engine.SumsOnlySink`) costs its stitcher band, not a whole map.

    Without ``tile``, tiles are the largest that fit, at most ``tile_cap`` pixels a side.
    """
    budget = memory_budget(max_memory)
    overlap = DEFAULT_OVERLAP if overlap is None else overlap
    check_tiling(tile, overlap)
    kept = [True] * len(channels) if stored is None else stored
    map_bytes = sum(4 * c * math.ceil(height / s) * math.ceil(width / s)
                    for c, s, keep in zip(channels, strides, kept) if keep)
    image_bytes = 12 * height * width if image_in_memory else 0
    sink = "memory" if map_bytes <= budget // 4 else "disk"
    padded_w = -(-width // ALIGN) * ALIGN
    if tile is None:
        held = image_bytes + (map_bytes if sink == "memory" else 0)
        # Stitcher bands: one tile-high band of every map, at most a DEFAULT_TILE high.
        held += sum(4 * c * (DEFAULT_TILE // s) * (padded_w // s) for c, s in zip(channels, strides))
        tile = choose_tile_size(budget - held, model_config, params, cap=tile_cap)
    if overlap >= tile:
        raise ParameterError(f"`overlap` ({overlap}) must be smaller than the tile ({tile})")
    grid = TileGrid(height, width, tile, overlap)
    th, tw = grid.tile_size
    bands = sum(4 * c * (th // s) * (padded_w // s) for c, s in zip(channels, strides))
    peak = (estimate_memory(th * tw, model_config, params) + image_bytes + bands
            + (map_bytes if sink == "memory" else 0))
    plan = FeaturesPlan(height, width, (th, tw), overlap, grid.rows, grid.cols, "whole" if grid.whole else "tiled",
                        sink, map_bytes, peak, budget)
    return grid, plan


@dataclass
class FeaturesResult:
    """What :func:`extract_features` did; ``to_json()`` is the ``--json`` document."""

    input: str
    output: str
    format: str
    level: int
    image_size: tuple[int, int]
    maps: dict[str, list[int]]
    strides: dict[str, int]
    plan: FeaturesPlan
    landmarks: str
    device: str
    seconds: float
    pooled: np.ndarray | None = field(default=None, repr=False)
    mpp: float | None = None  # µm per pixel the maps' input had (None: the file does not say)
    tissue: dict[str, Any] | None = None  # tissue masking summary (softcli.tissue); None: no masking
    resumed_rows: int = 0  # tile rows an interrupted run had finished (see softcli.band_state)
    resumed_passes: int = 0  # layer passes an interrupted global run had finished (softcli.context.resume)

    def to_json(self) -> dict[str, Any]:
        plan = asdict(self.plan)
        plan["tiles"] = self.plan.tiles
        return {
            "input": self.input, "output": self.output, "format": self.format, "level": self.level,
            "image_size": list(self.image_size), "width": self.image_size[1], "height": self.image_size[0],
            "maps": self.maps, "strides": self.strides,
            "pooled_dim": None if self.pooled is None else int(self.pooled.size),
            "landmarks": self.landmarks, "device": self.device, "seconds": round(self.seconds, 3), "plan": plan,
            "resumed_rows": self.resumed_rows,
            "resumed_passes": self.resumed_passes,
            "context": {"mode": self.plan.context, "reason": self.plan.context_reason},
            "mpp": self.mpp, "tissue": self.tissue,
        }


def check_request(image: str | os.PathLike[str] | np.ndarray, out: str | os.PathLike[str],
                  stages: str | Sequence[int] = (1, 2, 3, 4), pool: bool = False,
                  blend: str = "linear", model_source: str | None = None) -> tuple[tuple[int, ...], str]:
    """Everything about a request that can be wrong before a model is loaded: (stages, output format).

    ``model_source``: the weights file of the model in use, which ``out`` must not be.
    """
    stage_list = parse_stages(stages)
    if not isinstance(image, np.ndarray) and not Path(image).is_file():
        raise InputError(f"{image}: no such file" if not Path(image).exists() else f"{image}: not a file")
    fmt = check_feature_request(out, len(stage_list), pool)
    for path in feature_outputs(out):
        check_output_path(path, [] if isinstance(image, np.ndarray) else [image], model_files(model_source))
    check_blend(blend)
    return stage_list, fmt


def check_blend(blend: str) -> None:
    """How tile overlaps are weighted (:class:`~softcli.engine.Stitcher`): linear or gaussian."""
    if blend not in ("linear", "gaussian"):
        raise ParameterError(f"`blend` must be linear or gaussian, not {blend!r}")


def check_resources(plan: FeaturesPlan, image: str, out: str | os.PathLike[str],
                    device: torch.device | str = "cpu") -> None:
    """Refuse before any allocation a plan that needs more memory (on ``device``), or more disk, than there is."""
    free = device_memory_available(torch.device(device))
    if free is not None and plan.estimated_peak_bytes > free:
        raise InputError(f"{image}: a {plan.width}x{plan.height} image in {plan.tile[1]}x{plan.tile[0]} tiles needs "
                         f"about {format_bytes(plan.estimated_peak_bytes)} of memory, more than the "
                         f"{format_bytes(free)} available on {device}; use a smaller `tile` or `max_memory`")
    spill = plan.map_bytes if plan.sink == "disk" else 0
    check_disk_space(Path(out).resolve().parent, spill + plan.map_bytes,
                     f"the feature maps ({format_bytes(plan.map_bytes)}" + (", written twice: spill files and output)"
                                                                            if spill else ")"))


def model_provenance(model: torch.nn.Module) -> Provenance:
    """:class:`~softcli.io.provenance.Provenance` of a loaded model (its spec and files, set by the loader)."""
    source = getattr(model, "source", None)
    return provenance(getattr(model, "spec", None), model_files(source))


def stage_outputs(config: Any, stages: Sequence[int]) -> list[OutputSpec]:
    """The engine's outputs for the backbone stage maps ``stages`` (1-based, ascending): ``stageN`` at its stride."""
    return [OutputSpec(f"stage{s}", int(config.embed_dims[s - 1]), STAGE_STRIDES[s - 1], stage=s) for s in stages]


def stage_maps_fn(model: torch.nn.Module, outputs: Sequence[OutputSpec]) -> Callable[[torch.Tensor],
                                                                                     list[torch.Tensor]]:
    """Tile → the maps of the stage ``outputs``, in their order; stops after the deepest (stage 1 alone skips 2-4)."""
    if any(o.stage is None for o in outputs):
        raise ValueError(f"not all outputs are stage maps: {[o.name for o in outputs if o.stage is None]}")
    soft = cast(SoftModel, model)
    indices = [cast(int, o.stage) - 1 for o in outputs]
    taken = sorted(set(indices))  # forward_intermediates gives each stage once, in stage order

    def fn(x: torch.Tensor) -> list[torch.Tensor]:
        maps = soft.forward_intermediates(x, taken, intermediates_only=True)
        return [maps[taken.index(i)] for i in indices]

    return fn


def _run_global(model: Any, reader: ImageReader, padded: tuple[int, int], outputs: Sequence[OutputSpec],
                sink: MapSink, plan: FeaturesPlan, folder: Path, mean: Sequence[float], std: Sequence[float],
                device: torch.device, on_tile: TileCallback | None, pool: bool,
                checkpoints: LayerCheckpoints | None = None, dist: Any = None) -> np.ndarray | None:
    """Exact whole-image maps of the stage ``outputs``, streamed (:func:`softcli.context.run_global`), into ``sink``;
    the pooled stage 4.

    Under ``dist`` every rank computes its share of each pass and rank 0 alone fills ``sink``."""
    source = ReaderSource(reader, padded[0], padded[1], mean, std, device)
    pooled = None
    stage_list = [cast(int, o.stage) for o in outputs]
    with run_global(model, source, max(stage_list), stage_list, tile=plan.tile[0],
                    spill_dir=folder if plan.activations == "disk" else None, on_step=on_tile,
                    checkpoints=checkpoints, dist=dist) as res:
        if dist is not None and not dist.is_main:
            return None
        for o, s in zip(outputs, stage_list):
            out_hw = (-(-reader.height // o.stride), -(-reader.width // o.stride))
            sink.allocate(o.name, (o.channels, *out_hw))
            def write(y0: int, block: np.ndarray, name: str = o.name) -> None:
                sink.write_rows(name, y0, block)

            sums = export_map(res.maps[s], out_hw, write)
            if pool and s == 4:
                pooled = (sums / (out_hw[0] * out_hw[1])).astype(np.float32)
    return pooled


def extract_features(model: torch.nn.Module, image: str | os.PathLike[str] | np.ndarray,
                     out: str | os.PathLike[str], *, stages: str | Sequence[int] = (1, 2, 3, 4),
                     tile: int | None = None, overlap: int | None = None, level: int = 0,
                     max_memory: int | None = None, blend: str = "linear", pool: bool = False,
                     max_pixels: int | None = DEFAULT_MAX_PIXELS, on_plan: Callable[[FeaturesPlan], None] | None = None,
                     on_tile: TileCallback | None = None, context: str = "auto", mpp: float | None = None,
                     magnification: float | None = None, tissue: str | os.PathLike[str] | None = None,
                     resume: bool = True, dist: Any = None) -> FeaturesResult:
    """Write the chosen stage maps of ``image`` (a path or an (H, W, 3) float array) to ``out``.

    Maps are (C_i, ⌈H/s_i⌉, ⌈W/s_i⌉) float32 at strides 4, 8, 16, 32; ``pool``
    adds the mean of the stage-4 map (C_4,). Fails before any compute when the
    output cannot be written or cannot hold what was asked. ``mpp``/``magnification``
    pick the resolution of a slide; ``tissue`` leaves tiles without tissue as zeros
    (:mod:`softcli.tissue`; the metadata records both). With ``resume`` an
    image keeps its finished bands (tile context, :mod:`softcli.band_state`) or
    layer passes (global context, :mod:`softcli.context.resume`) in
    ``OUT.partial-state/`` and a rerun continues from them. ``dist`` (a
    :class:`~softcli.cohort.DistContext` under torchrun) splits the tiles across
    ranks; rank 0 writes the output.

    ``context`` (:mod:`softcli.context`): ``auto`` runs the whole image in one
    pass when it fits ``max_memory`` (bytes; default: half the RAM available now,
    as for segment and classify, :func:`~softcli.context.memory_budget`), else ``global``; ``global`` streams the
    exact whole-image computation over tiles; ``tile`` runs overlapping tiles
    (each its own context, blended), the largest that fit ``max_memory``.
    The image is seen padded to a multiple of 32 by edge replication in every mode.
    With tissue masking, ``auto`` takes tiles instead of ``global`` (which computes
    every token, so it has nothing to skip).
    """
    stage_list, fmt = check_request(image, out, stages, pool, blend, getattr(model, "source", None))
    max_pixels = pixel_limit(max_pixels)
    check_context_mode(context)
    check_tiling(tile, overlap)
    keep = [f"stage{s}" for s in stage_list]
    sums_only = () if not pool or 4 in stage_list else ("stage4",)  # computed for its mean, never stored
    if sums_only:
        stage_list = (*stage_list, 4)
    cfg = model.config  # type: ignore[attr-defined]
    outputs = stage_outputs(cfg, stage_list)
    names = [o.name for o in outputs]
    channels = [o.channels for o in outputs]
    strides = [o.stride for o in outputs]
    device = next(model.parameters()).device
    pre = getattr(model, "pretrained_cfg", None) or {}
    mean, std = pre.get("mean", IMAGENET_MEAN), pre.get("std", IMAGENET_STD)
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    reader: ImageReader
    reader = ArrayReader(image) if isinstance(image, np.ndarray) else open_at_resolution(
        image, level=level, mpp=mpp, magnification=magnification, max_pixels=max_pixels)
    with reader:
        if context == "global" and tissue is None:
            tissue = "none"  # the default masking gives way to an explicit global context
        tissue_mask = None if isinstance(image, np.ndarray) else compute_tissue(reader, image, tissue, max_pixels)
        skip, skipped = counting_skip(tissue_mask)
        budget = memory_budget(max_memory)
        choice = tissue_context(choose_context(context, reader.height, reader.width, cfg, params, budget),
                                tissue_mask is not None)
        padded = (-(-reader.height // ALIGN) * ALIGN, -(-reader.width // ALIGN) * ALIGN)
        if choice.mode == "whole":  # one tile: the same engine path, no blending
            tile, overlap = max(*padded, 2 * ALIGN), 0
        elif choice.mode == "global":  # tiles do not overlap: halos are exact
            overlap = 0
        grid, plan = plan_features(reader.height, reader.width, channels, strides, model_config=cfg, params=params,
                                   tile=tile, overlap=overlap, max_memory=max_memory,
                                   image_in_memory=isinstance(reader, ArrayReader), tile_cap=max(padded),
                                   stored=[n in keep for n in names])
        plan.context, plan.context_reason = choice.mode, choice.reason
        if choice.mode == "global":
            side, spill = plan_global(reader.height, reader.width, cfg, params, budget, channels, tile)
            plan.mode, plan.tile, plan.overlap = "global", (side, side), 0
            plan.activations = "disk" if spill else "memory"
            plan.rows, plan.cols = -(-padded[0] // side), -(-padded[1] // side)
            plan.estimated_peak_bytes = (estimate_memory(side * side, cfg, params)
                                         + (plan.map_bytes if plan.sink == "memory" else 0))
        if dist is not None and choice.mode == "whole":
            raise ParameterError("splitting the tiles across ranks needs `context` tile or global "
                             "(this run: the whole image in one pass)")
        state = None
        checkpoints = None
        resumable = not isinstance(image, np.ndarray) and (dist is not None or resume)
        if resumable:  # everything the maps depend on (a change starts afresh)
            key = {"image": file_identity(image), "level": level, "names": names, "channels": channels,  # type: ignore[arg-type]
                   "mean": list(mean), "std": list(std), "landmarks": str(getattr(model, "landmark_policy", "")),
                   "weights": tensors_digest(model.state_dict().items()), "mpp": reader.mpp}
        if resumable and choice.mode == "tile" and (dist is not None or grid.rows > 1):
            plan.sink = "disk"  # the maps are the resumable state
            state = BandState(out, {**key, "grid": grid_identity(grid), "blend": blend,
                                    "tissue": None if tissue_mask is None else str(tissue)}, grid.rows)
        elif resumable and choice.mode == "global":
            plan.activations = "disk"  # kept beside the output: the resumable state, shared by ranks
        check_resources(plan, str(image) if not isinstance(image, np.ndarray) else "<array>", out, device)
        if on_plan is not None:
            on_plan(plan)
        if resumable and choice.mode == "global":
            checkpoints = open_checkpoints(out, {**key, "tile": plan.tile[0], "padded": padded}, model,
                                           max(stage_list), dist)
        dense: dict[str, Any] = {"mean": mean, "std": std, "device": device, "blend": blend, "on_tile": on_tile,
                                 "skip": skip}
        fn = stage_maps_fn(model, outputs)
        sink: MapSink
        if state is not None:
            sink = run_bands(fn, reader, grid, outputs, state, dist=dist, sums_only=sums_only, **dense)
        else:
            sink = MemorySink() if plan.sink == "memory" else DiskSink(Path(out).resolve().parent)
            if sums_only:
                sink = SumsOnlySink(sink, sums_only)
        with sink:
            if choice.mode == "global":
                pooled = _run_global(model, reader, padded, outputs, sink, plan, Path(out).resolve().parent,
                                     mean, std, device, on_tile, pool, checkpoints, dist)
            elif state is None:
                stitcher = run_dense(fn, reader, grid, outputs, sink, **dense)
                pooled = stitcher.pooled(names.index("stage4")) if pool else None
            elif dist is not None and not dist.is_main:
                pooled = None  # rank 0 writes the output (and may already be removing the state)
            else:
                state.check_complete()
                cells = math.prod(grid.out_size(STAGE_STRIDES[3]))
                pooled = state.pooled(names.index("stage4"), cells) if pool else None
            t_run = time.perf_counter() - start
            tissue_info = None if tissue_mask is None else tissue_mask.summary(len(grid), skipped[0], t_run)
            meta = {"image_size": f"{reader.height}x{reader.width}", "level": str(level),
                    "strides": ",".join(str(STAGE_STRIDES[int(n[5:]) - 1]) for n in keep),
                    "tile": f"{plan.tile[0]}x{plan.tile[1]}", "overlap": str(plan.overlap), "blend": blend,
                    "context": plan.context,
                    "landmarks": str(getattr(model, "landmark_policy", "")), "format": "softcli-features",
                    **slide_metadata(reader.mpp, tissue_info)}
            if dist is None or dist.is_main:
                meta.update(model_provenance(model).to_strings())
                write_features(out, sink, keep, pooled, meta, strides=[STAGE_STRIDES[int(n[5:]) - 1] for n in keep],
                               mpp=reader.mpp)
            shapes = {n: list(sink.shapes[n]) for n in keep if n in sink.shapes}  # rank 0's under dist
        if dist is None or dist.is_main:
            for finished in (state, checkpoints.state if checkpoints else None):
                if finished is not None:
                    finished.remove()
    return FeaturesResult(
        input="<array>" if isinstance(image, np.ndarray) else str(image), output=str(out), format=fmt, level=level,
        image_size=(reader.height, reader.width), maps=shapes,
        strides={n: STAGE_STRIDES[int(n[5:]) - 1] for n in keep}, plan=plan,
        landmarks=str(getattr(model, "landmark_policy", "")), device=str(device),
        seconds=time.perf_counter() - start, pooled=pooled, mpp=reader.mpp, tissue=tissue_info,
        resumed_rows=state.resumed_rows if state is not None else 0,
        resumed_passes=checkpoints.resumed if checkpoints is not None else 0)
