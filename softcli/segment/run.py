"""The streamed ``soft segment`` run: tiles → blended scores → :class:`LabelSink` → mask writers."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..api import landmark_policy, landmarks_summary, use_landmarks
from ..backbone_ref import attach_backbone
from ..band_state import BandState, file_identity, grid_identity, run_bands, tensors_digest
from ..checkpoint import (
    Checkpoint,
    build_model,
    model_files,
    read_checkpoint,
)
from ..cluster import (
    ClusterModel,
    StageEmbedder,
    cluster_scores,
    feature_bands,
    fit_clusters,
    fit_clusters_global,
    global_features,
    parse_cluster_stages,
)
from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..context import (
    ContextChoice,
    LayerCheckpoints,
    ReaderSource,
    check_context_mode,
    choose_context,
    memory_budget,
    open_checkpoints,
    plan_global,
    run_global,
    tissue_context,
)
from ..engine import OutputSpec, PhaseProgressFn, RowSink, replay_rows, run_dense
from ..errors import InputError, NoSegmentationModel, ParameterError
from ..io.atomic import check_disk_space
from ..io.geojson import check_geojson_output, write_geojson
from ..io.image import DEFAULT_MAX_PIXELS, pixel_limit
from ..io.masks import (
    OVERLAY_MAX_SIDE,
    LabelRaster,
    check_mask_outputs,
    legend,
    legend_path,
    mask_format,
    tiff_tile_count,
    write_json,
    write_mask,
    write_overlay,
)
from ..io.provenance import provenance
from ..io.reader_base import ImageReader
from ..io.slide import level0_scale, open_at_resolution
from ..io.slide import preview as _preview
from ..models import SoftModel
from ..models.segmentation import SoftSegmenter, default_palette
from ..resources import available_memory, format_bytes
from ..tiling import ALIGN, DEFAULT_OVERLAP, DEFAULT_TILE, TileGrid, choose_tile_size
from ..tissue import TissueLabels, compute_tissue, counting_skip, with_background
from .segmenter import SCORE_STRIDE, is_segmentation_checkpoint, resolve_checkpoint_path, segmenter_from_checkpoint

if TYPE_CHECKING:
    from ..weights.spec import ResolvedWeights


# -- streaming argmax ---------------------------------------------------------------------------

def _lerp_index(n_out: int, n_in: int, stride: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear source rows for ``n_out`` pixels from ``n_in`` cells at ``stride`` (align_corners=False)."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) / stride - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    return i0, i1, (src - i0).clamp(0.0, 1.0).float()


class LabelSink(RowSink):
    """A sink for blended score maps: bilinear ×stride to pixels, argmax, labels to a :class:`LabelRaster`.

    Rows arrive in order from the :class:`~softcli.engine.Stitcher`; a pixel row
    is labelled as soon as both score rows it interpolates between are final,
    so only a few score rows are ever held.
    """

    def __init__(self, raster: LabelRaster, stride: int = SCORE_STRIDE, chunk_elements: int = 1 << 24) -> None:
        super().__init__()
        self.raster, self.stride, self.chunk_elements = raster, stride, chunk_elements
        self._buf: Tensor | None = None
        self._b0 = 0  # score row index of _buf[:, 0]
        self._next = 0  # next pixel row to label

    def allocate(self, name: str, shape: tuple[int, int, int]) -> None:
        super().allocate(name, shape)
        k, h, w = self.shapes[name]
        if (h, w) != (-(-self.raster.height // self.stride), -(-self.raster.width // self.stride)):
            raise ValueError(f"score map {w}x{h} does not match a {self.raster.width}x{self.raster.height} mask")
        self._rows = _lerp_index(self.raster.height, h, self.stride)
        self._cols = _lerp_index(self.raster.width, w, self.stride)
        self._k = k

    def write_rows(self, name: str, y0: int, block: np.ndarray) -> None:
        block_t = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
        if self._buf is None:
            self._buf, self._b0 = block_t, y0
        else:
            if y0 != self._b0 + self._buf.shape[1]:
                raise ValueError("score rows must arrive in order")
            self._buf = torch.cat([self._buf, block_t], dim=1)
        self._emit()

    def _emit(self) -> None:
        assert self._buf is not None
        _, n_in, _ = self.shapes[next(iter(self.shapes))]
        received = self._b0 + self._buf.shape[1]
        i0, i1, ly = self._rows
        end = self._next
        while end < self.raster.height and (received == n_in or int(i1[end]) < received):
            end += 1
        j0, j1, lx = self._cols
        step = max(1, self.chunk_elements // max(1, self._k * self.raster.width))
        for p0 in range(self._next, end, step):
            p1 = min(end, p0 + step)
            a = self._buf[:, i0[p0:p1] - self._b0]
            b = self._buf[:, i1[p0:p1] - self._b0]
            w = ly[p0:p1].view(1, -1, 1)
            rows = torch.lerp(a, b, w)  # (K, P, W/4)
            scores = torch.lerp(rows[:, :, j0], rows[:, :, j1], lx.view(1, 1, -1))  # (K, P, W)
            self.raster.write_rows(p0, scores.argmax(0).numpy())
        self._next = end
        if end < self.raster.height:  # drop score rows no later pixel row needs
            keep_from = int(i0[end])
            if keep_from > self._b0:
                self._buf = self._buf[:, keep_from - self._b0:].contiguous()
                self._b0 = keep_from

    def close(self) -> None:
        self._buf = None


# -- the job ------------------------------------------------------------------------------------

def check_model_request(weights: object, clusters: int | None,
                        cluster_stages: str | Sequence[int] | None) -> tuple[int, ...]:
    """The usage errors of a model/clusters choice, before anything loads; the stages clusters read."""
    if weights is None and clusters is None:
        raise NoSegmentationModel("no segmentation model given: pass `weights` with a segmentation checkpoint, "
                                  "or `clusters=K` to cluster the default backbone's features")
    if clusters is not None and not 1 <= clusters <= 256:
        raise ParameterError(f"`clusters` must be between 1 and 256, not {clusters}")
    stages = parse_cluster_stages(cluster_stages)
    if cluster_stages is not None and clusters is None:
        raise ParameterError("`cluster_stages` only applies with `clusters=K`")
    return stages


def model_spec(weights: str | os.PathLike[str] | ResolvedWeights | None) -> str | os.PathLike[str]:
    """The model as the user asked for it (what outputs record as ``model``), never the file it resolved to.

    ``None`` is the registry's default model name (what a run without weights clusters the features of).
    """
    from ..weights.registry import load_registry
    from ..weights.spec import ResolvedWeights

    if isinstance(weights, ResolvedWeights):
        return weights.spec
    return weights if weights is not None else load_registry().default


def _models_for(ck: Checkpoint, clusters: int | None, device: torch.device) -> tuple[
        SoftSegmenter | None, SoftModel, list[str], list[list[int]]]:
    """(segmenter or None, backbone, label names, palette) for the head or the clustering mode."""
    if clusters is None:
        model, info = segmenter_from_checkpoint(ck, device)
        return model, model.backbone, info.class_names, info.palette
    if is_segmentation_checkpoint(ck):  # cluster a segmentation model's backbone features
        backbone = segmenter_from_checkpoint(ck, device)[0].backbone
    else:
        backbone = build_model(ck, device)
    return None, backbone, [f"cluster {i}" for i in range(clusters)], default_palette(clusters)


def _check_resources(image: str | os.PathLike[str], out: str | os.PathLike[str], grid: TileGrid,
                     classes: int) -> None:
    """Refuse before any allocation a run needing more memory (score bands) or disk (label raster) than there is."""
    bands = 4 * classes * (grid.tile_h // SCORE_STRIDE) * (grid.padded[1] // SCORE_STRIDE)
    free = available_memory()
    if free is not None and 2 * bands > free:  # the stitcher's band and the label sink's rows
        raise InputError(f"{image}: a {grid.width}x{grid.height} image with {classes} labels in "
                         f"{grid.tile_w}x{grid.tile_h} tiles needs about {format_bytes(2 * bands)} of memory for one "
                         f"row of tiles, more than the {format_bytes(free)} available; use a smaller `tile`")
    label_bytes = grid.height * grid.width * (1 if classes <= 256 else 2)
    need = label_bytes * (2 if mask_format(out) == "npy" else 1)
    check_disk_space(Path(out).resolve().parent, need, f"the {grid.width}x{grid.height} label mask "
                     f"({format_bytes(label_bytes)} of temporary labels" + (" and as much for the .npy)"
                                                                             if need > label_bytes else ")"))


def _global_clusters(stack: contextlib.ExitStack, backbone: SoftModel, reader: ImageReader, padded: tuple[int, int],
                     stages: Sequence[int], k: int, budget: int, tile: int | None, mean: Sequence[float],
                     std: Sequence[float], dev: torch.device, folder: Path, seed: int,
                     report: Callable[[str], Callable[[int, int], None] | None],
                     resume: Callable[[int], LayerCheckpoints] | None = None, dist: Any = None
                     ) -> tuple[ClusterModel | None, Callable[[LabelSink], None] | None, LayerCheckpoints | None]:
    """Run the backbone in global context (kept open on ``stack``), fit clusters on the whole image's
    features, and return them with the function that fills a :class:`LabelSink` band by band.

    ``resume(tile side)``: the layer checkpoints to keep the run's passes in (also how ranks share maps).
    Under ``dist`` only rank 0 fits and labels: the other ranks get (None, None, checkpoints)."""
    cfg = backbone.config
    upto = max(stages)
    params = sum(p.numel() for p in backbone.parameters())
    side, spill = plan_global(reader.height, reader.width, cfg, params, budget, cfg.embed_dims[:upto], tile)
    source = ReaderSource(reader, padded[0], padded[1], mean, std, dev)
    checkpoints = resume(side) if resume is not None else None
    res = stack.enter_context(run_global(backbone, source, upto, stages, tile=side,
                                         spill_dir=folder if spill else None, on_step=report("global"),
                                         checkpoints=checkpoints, dist=dist))
    if dist is not None and not dist.is_main:
        return None, None, checkpoints
    out_hw = (-(-reader.height // SCORE_STRIDE), -(-reader.width // SCORE_STRIDE))
    widths = [cfg.embed_dims[s - 1] for s in stages]
    try:
        cm = fit_clusters_global(res, stages, widths, k, out_hw, seed=seed, device=dev).to(dev)
    except BaseException:
        stack.close()
        raise

    def fill(sink: LabelSink) -> None:
        sink.allocate("scores", (k, *out_hw))
        bands = feature_bands(out_hw[0], out_hw[1], sum(widths))
        with torch.inference_mode():
            for i, rows in enumerate(bands, 1):
                scores = cluster_scores(cm, global_features(res, stages, rows, out_hw[1], dev))
                sink.write_rows("scores", rows[0], scores[0].float().cpu().numpy())
                on_band = report("label")
                if on_band is not None:
                    on_band(i, len(bands))

    return cm, fill, checkpoints


def segment(image: str | os.PathLike[str], out: str | os.PathLike[str], *,
            weights: str | os.PathLike[str] | ResolvedWeights | None = None, clusters: int | None = None,
            cluster_stages: str | Sequence[int] | None = None, level: int = 0, tile: int | None = None,
            overlap: int = DEFAULT_OVERLAP, overlay: str | os.PathLike[str] | None = None,
            device: str | torch.device = "cpu", landmarks: str | None = None, seed: int = 0,
            max_pixels: int | None = DEFAULT_MAX_PIXELS, cluster_tiles: int = 16,
            progress: PhaseProgressFn | None = None, context: str = "auto",
            max_memory: int | None = None, mpp: float | None = None, magnification: float | None = None,
            tissue: str | os.PathLike[str] | None = None,
            geojson: str | os.PathLike[str] | None = None, resume: bool = True, dist: Any = None) -> dict[str, Any]:
    """Label every pixel of ``image`` and write the mask, its legend and optionally an overlay.

    ``weights``: a model spec (registry name, ``hf-hub:``, folder or file), or one resolved already
    (:class:`~softcli.weights.spec.ResolvedWeights`, as a cohort passes it); outputs record it as
    the spec was given, never as the file it resolved to.
    With a segmentation checkpoint and no ``clusters``: the head's classes.
    With ``clusters=K``: k-means on backbone features of any checkpoint (a
    segmentation checkpoint's backbone included). Returns the summary that
    ``--json`` prints. Whole slides: ``mpp``/``magnification`` pick the resolution
    (:func:`~softcli.io.slide.open_at_resolution`), ``tissue`` skips tiles without
    tissue (label 0 ``background``, :mod:`softcli.tissue`), ``geojson`` also writes
    the labels as polygons in level-0 pixels (:mod:`softcli.io.geojson`).
    ``--json`` prints. With ``resume`` a tiled image keeps its finished bands
    of scores in ``OUT.partial-state/`` and a rerun continues from them
    (:mod:`softcli.band_state`); ``dist`` (a :class:`~softcli.cohort.DistContext`
    under torchrun) splits the tile rows across ranks and rank 0 writes the mask.
    Both apply to tile context.

    ``context`` (:mod:`softcli.context`): ``auto`` labels the whole image in one
    pass when it fits ``max_memory`` (default: half the available RAM), else
    ``global``: clusters of the exact whole-image features, streamed (a trained
    head's GroupNorm needs whole-map statistics, so heads fall back to tiles, and
    so does tissue masking, which global context has nothing to skip in);
    ``tile``: overlapping tiles of ``tile`` pixels (default: the largest that fit).
    """
    from ..api import resolve_device

    t_start = time.perf_counter()
    stages = check_model_request(weights, clusters, cluster_stages)
    policy = landmark_policy(landmarks) if landmarks is not None else None
    mask_format(out)  # unknown extension → usage error before anything is opened
    max_pixels = pixel_limit(max_pixels)
    dev = resolve_device(device)

    check_context_mode(context)
    if context == "global" and clusters is None:
        raise ParameterError("global context needs `clusters=K`: a trained head normalises over the whole map "
                             "(GroupNorm), which tiles cannot reproduce exactly; use `context` tile or auto")
    budget = memory_budget(max_memory)
    if geojson is not None:
        check_geojson_output(geojson, [image, out])
    with open_at_resolution(image, level=level, mpp=mpp, magnification=magnification,
                            max_pixels=max_pixels) as reader:
        try:
            grid = TileGrid(reader.height, reader.width, tile=tile or DEFAULT_TILE, overlap=overlap)
        except ValueError as exc:
            raise ParameterError(f"`tile`/`overlap`: {exc}") from exc
        check_mask_outputs(out, [image], height=reader.height, width=reader.width,
                           num_classes=clusters, overlay=overlay)
        ck = attach_backbone(read_checkpoint(resolve_checkpoint_path(weights)), resolve_checkpoint_path)
        check_mask_outputs(out, [image], overlay=overlay, models=model_files(ck.source))
        model, backbone, names, palette = _models_for(ck, clusters, dev)
        if context == "global" and tissue is None:
            tissue = "none"  # the default masking gives way to an explicit global context
        tissue_mask = compute_tissue(reader, image, tissue, max_pixels)
        if tissue_mask is not None:
            names, palette = with_background(names, palette)
        if clusters is None:
            check_mask_outputs(out, [image], num_classes=len(names))  # a PNG palette holds 256 classes
        use_landmarks(backbone, policy, ck)  # asked, else the fitted head's, else the default
        pre = dict(ck.pretrained_cfg)
        mean, std = pre.get("mean", IMAGENET_MEAN), pre.get("std", IMAGENET_STD)
        params = sum(p.numel() for p in (model or backbone).parameters())
        choice = tissue_context(choose_context(context, reader.height, reader.width, backbone.config, params,
                                               budget), tissue_mask is not None)
        if choice.mode == "global" and clusters is None:
            choice = ContextChoice("tile", "the whole image does not fit the memory limit and a trained head "
                                   "cannot run in global context: tiles", choice.estimated_whole_bytes)
        padded = (-(-reader.height // ALIGN) * ALIGN, -(-reader.width // ALIGN) * ALIGN)
        if choice.mode == "whole":
            grid = TileGrid(reader.height, reader.width, tile=max(*padded, 2 * ALIGN), overlap=0)
        elif choice.mode == "tile" and tile is None:
            side = choose_tile_size(budget, backbone.config, params, cap=max(*padded, 2 * ALIGN))
            grid = TileGrid(reader.height, reader.width, tile=side, overlap=min(overlap, side - ALIGN))
        if dist is not None and choice.mode == "whole":
            raise ParameterError("splitting the tiles across ranks needs `context` tile or global "
                                 "(this run: the whole image in one pass)")
        _check_resources(image, out, grid, len(names))

        def report(phase: str) -> Callable[[int, int], None] | None:
            return None if progress is None else (lambda done, total: progress(phase, done, total))

        summary: dict[str, Any] = {"input": str(image), "level": reader.level,
                                   "size": [reader.height, reader.width], "width": reader.width,
                                   "height": reader.height, "device": str(dev),
                                   "checkpoint": ck.source, "mpp": reader.mpp}
        summary["context"] = choice.to_json()
        summary["landmarks"] = landmarks_summary(backbone)
        stack = contextlib.ExitStack()
        fill: Callable[[LabelSink], None] | None = None
        checkpoints: LayerCheckpoints | None = None
        if clusters is None:
            assert model is not None
            fn: Callable[[Tensor], list[Tensor]] = lambda x: [model.forward_logits(x)]  # noqa: E731
            k = model.num_classes
            summary["mode"] = "head"
        elif choice.mode == "global":
            def checkpoints_for(side: int) -> LayerCheckpoints:
                return open_checkpoints(out, {"image": file_identity(image), "level": reader.level, "padded": padded,
                                              "tile": side, "stages": list(stages), "mean": list(mean),
                                              "std": list(std), "mpp": reader.mpp,
                                              "landmarks": str(getattr(backbone, "landmark_policy", "")),
                                              "weights": tensors_digest(backbone.state_dict().items())},
                                        backbone, max(stages), dist)

            glob, fill, checkpoints = _global_clusters(
                stack, backbone, reader, padded, stages, clusters, budget, tile, mean, std, dev,
                Path(out).resolve().parent, seed, report, checkpoints_for if resume or dist is not None else None, dist)
            summary["resumed_passes"] = checkpoints.resumed if checkpoints is not None else 0
            if glob is None:  # not rank 0: rank 0 clusters and writes the mask
                stack.close()
                summary["rank"] = dist.rank
                return summary
            k = clusters
            summary["mode"] = "clusters"
            summary["clusters"] = glob.summary() | {"seed": seed}
        else:
            embedder = StageEmbedder(backbone, stages)
            cm = fit_clusters(reader, grid, embedder, clusters, mean=mean, std=std, max_tiles=cluster_tiles,
                              seed=seed, device=dev, on_tile=report("fit"),
                              skip=None if tissue_mask is None else tissue_mask.skip_tile).to(dev)
            if dist is not None:  # every rank labels with rank 0's centroids
                cm = dist.broadcast(cm.to("cpu")).to(dev)
            fn = lambda x: [cluster_scores(cm, embedder(x))]  # noqa: E731
            k = clusters
            summary["mode"] = "clusters"
            summary["clusters"] = cm.summary() | {"seed": seed}
        if fill is None:
            summary["tiles"] = {"count": len(grid), "size": list(grid.tile_size), "overlap": grid.overlap}

        folder = Path(out).resolve().parent
        skip, skipped = counting_skip(tissue_mask)
        dense: dict[str, Any] = {"mean": mean, "std": std, "device": dev, "on_tile": report("label"), "skip": skip}
        score_outputs = [OutputSpec("scores", k, SCORE_STRIDE)]
        state = None
        t_run = time.perf_counter()
        if fill is None and (dist is not None or (resume and grid.rows > 1)):
            weights_of = model if model is not None else backbone
            state = BandState(out, {"image": file_identity(image), "level": reader.level, "grid": grid_identity(grid),
                                    "mode": summary["mode"], "classes": k, "mean": list(mean), "std": list(std),
                                    "landmarks": str(getattr(backbone, "landmark_policy", "")),
                                    "weights": tensors_digest(weights_of.state_dict().items()),
                                    "clusters": None if clusters is None else tensors_digest(
                                        [("mean", cm.mean), ("scale", cm.scale), ("centroids", cm.centroids)]),
                                    "mpp": reader.mpp, "tissue": None if tissue_mask is None else str(tissue),
                                    }, grid.rows)
            scores = run_bands(fn, reader, grid, score_outputs, state, dist=dist, **dense)
            summary["resumed_rows"] = state.resumed_rows  # tile rows a killed run had finished
            with scores:
                if dist is not None and not dist.is_main:
                    summary["rank"] = dist.rank
                    return summary
                state.check_complete()
        with stack, LabelRaster(reader.height, reader.width, len(names), folder=folder) as raster:
            sink = LabelSink(raster if tissue_mask is None else TissueLabels(raster, tissue_mask))  # type: ignore[arg-type]
            if fill is not None:
                fill(sink)
            elif state is None:
                run_dense(fn, reader, grid, score_outputs, sink, **dense)
            else:
                with state.sink() as saved:
                    saved.allocate("scores", (k, *grid.out_size(SCORE_STRIDE)))
                    replay_rows(saved, "scores", sink)
            if tissue_mask is not None and fill is None:
                summary["tissue"] = tissue_mask.summary(len(grid), skipped[0], time.perf_counter() - t_run)
            if raster.rows_written != raster.height:
                raise RuntimeError(f"labelled {raster.rows_written} of {raster.height} rows")
            t_label = time.perf_counter()
            total_tiles = tiff_tile_count(raster.height, raster.width) if mask_format(out) == "tiff" else 0
            written = [0]

            def on_write() -> None:
                written[0] += 1
                if progress is not None:
                    progress("write", written[0], total_tiles)

            made_by = provenance(model_spec(weights), model_files(ck.source)).to_strings()
            summary["mask"] = write_mask(raster, out, palette, names, on_tile=on_write, metadata=made_by)
            entries = legend(names, palette, raster.counts)
            leg = legend_path(out)
            write_json(leg, {"mask": Path(out).name, "source": str(image), "size": [raster.height, raster.width],
                             "width": raster.width, "height": raster.height,
                             "mode": summary["mode"], "mpp": summary["mpp"], **made_by, "labels": entries})
            summary["legend"] = str(leg)
            if geojson is not None:
                summary["geojson"] = write_geojson(raster, geojson, names, palette, level0_scale(reader), made_by)
            summary["labels"] = entries
            if overlay is not None:
                preview, step = _preview(reader, str(image), OVERLAY_MAX_SIDE, max_pixels)
                labels = raster.read_rows(0, raster.height, step)
                size = write_overlay(preview, labels, palette, overlay)
                summary["overlay"] = {"path": str(overlay), "size": size, "downsample": step}
    for finished in (state, checkpoints.state if checkpoints else None):
        if finished is not None:
            finished.remove()
    summary["seconds"] = {"label": round(t_label - t_start, 3), "total": round(time.perf_counter() - t_start, 3)}
    return summary
