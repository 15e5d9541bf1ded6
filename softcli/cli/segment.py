"""``soft segment``: a label for every pixel, with a trained head or by clustering backbone features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..constants import DEFAULT_MAX_PIXELS
from ..errors import UsageError
from ..io.image import pixel_limit
from ..tiling import DEFAULT_OVERLAP
from . import cohort, common
from .app import app
from .cohort import check_cohort_options, check_split, run_cli_cohort, single_input, start_tile_split, wants_cohort

_PHASES = {"fit": "Fitting clusters", "label": "Labelling tiles", "write": "Writing mask",
           "global": "Global context (exact)"}


@app.command()
def segment(
    inputs: common.InputsArg = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Mask file: .png (palette), .tif/.tiff (tiled "
                                             "pyramidal OME-TIFF, for huge images), .npy or .ome.zarr "
                                             "(multiscale OME-Zarr folder).")] = None,
    model: common.ModelOpt = None,
    weights: common.WeightsOpt = None,
    clusters: Annotated[int | None, typer.Option("--clusters", metavar="K", help="No trained head: k-means the "
                                                 "backbone features into K labels (fixed seed).")] = None,
    cluster_stages: Annotated[str | None, typer.Option("--cluster-stages", help="Stages whose features "
                                                       "--clusters uses, e.g. 1,2 (default) or 1,2,3.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the k-means sampling and init.")] = 0,
    level: Annotated[int, typer.Option("--level", help="Pyramid level of the input to label (0 = full "
                                       "resolution); the mask has that level's size.")] = 0,
    tile: Annotated[int | None, typer.Option("--tile", help="Largest tile side in pixels (a multiple of 32); "
                                             "default: the largest that fits --max-memory.")] = None,
    context: common.ContextOpt = "auto",
    max_memory: common.MaxMemoryOpt = "auto",
    overlap: Annotated[int, typer.Option("--overlap", help="Overlap between tiles in pixels; scores are "
                                         "blended across it before the argmax.")] = DEFAULT_OVERLAP,
    overlay: Annotated[Path | None, typer.Option("--overlay", help="Also write a blended preview of image and "
                                                  "mask (downsampled to at most 2048 px for huge inputs).")] = None,
    landmarks: common.LandmarksOpt = None,
    device: common.DeviceOpt = "auto",
    max_pixels: common.MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    json_out: common.JsonOpt = False,
    out_dir: cohort.OutDirOpt = None,
    list_file: cohort.ListOpt = None,
    out_format: Annotated[str, typer.Option("--out-format", help="With --out-dir: mask format, tif, png or "
                                            "npy.")] = "tif",
    overwrite: cohort.OverwriteOpt = False,
    max_failures: cohort.MaxFailuresOpt = None,
    mpp: common.MppOpt = None,
    magnification: common.MagnificationOpt = None,
    tissue: common.TissueOpt = None,
    geojson: Annotated[Path | None, typer.Option("--geojson", metavar="FILE", help="Also write the labels as "
                                                  "GeoJSON polygons (one MultiPolygon per class, level-0 pixel "
                                                  "coordinates) for QuPath.")] = None,
    resume: cohort.ResumeOpt = True,
    split: cohort.SplitOpt = "inputs",
) -> None:
    """Label every pixel of INPUT and write a mask, a legend JSON beside it and optionally an overlay.

    With a segmentation checkpoint (SOFT backbone + Semantic-FPN head) the labels
    are its classes. Any backbone checkpoint segments without a trained head by
    clustering its features: --clusters K. --context global works with --clusters
    only.

    Many images (folders, quoted globs, --list FILE) go to --out-dir DIR as
    NAME.tif + NAME.legend.json with a manifest.jsonl; a rerun skips finished
    inputs. Under torchrun the inputs are split across ranks.

    Example: soft segment slide.tif --weights soft_tiny/ --clusters 4 --out mask.tif

    Example: soft segment slides/ --clusters 4 --out-dir masks/

    Example: soft segment slide.tif --clusters 3 --context global --out mask.tif

    Whole slide: soft segment slide.svs --clusters 3 --mpp 1.0 --out mask.tif --geojson mask.geojson

    Example: torchrun --nproc-per-node 4 -m softcli segment huge.tif --weights seg/ --out mask.tif --split tiles
    """
    from ..segment import segment as run_segment

    budget = common.memory_budget(max_memory)

    if model is not None and weights is not None:
        raise UsageError("give --model or --weights, not both")
    pixel_limit(max_pixels)  # a negative limit is a usage error before anything is opened
    spec: Any = weights if weights is not None else model
    check_split(split, wants_cohort(inputs, out_dir, list_file))
    if wants_cohort(inputs, out_dir, list_file):
        from ..cohort.tasks import segment_task

        check_cohort_options(out_dir, out=out, overlay=overlay)
        if geojson is not None:
            raise UsageError("--geojson names one file, for one image; with --out-dir run each slide that needs "
                             "GeoJSON on its own")
        name = common.model_name(model, weights)
        run_cli_cohort(lambda dev: segment_task(spec, model_name=name, out_format=out_format,
                                                clusters=clusters, cluster_stages=cluster_stages, seed=seed,
                                                level=level, tile=tile, overlap=overlap, landmarks=landmarks,
                                                device=dev, max_pixels=max_pixels, max_memory=budget,
                                                extra={"context": context, "mpp": mpp,
                                                       "magnification": magnification, "tissue": tissue}),
                       inputs, list_file, out_dir, device=device, overwrite=overwrite, max_failures=max_failures,
                       json_out=json_out, phases=_PHASES)
        return
    image = single_input(inputs, out, split)
    assert out is not None
    dist, device = start_tile_split(split, device)
    try:
        with common.progress_bar(not json_out and (dist is None or dist.is_main)) as bar:
            summary = run_segment(image, out, weights=spec, clusters=clusters, cluster_stages=cluster_stages,
                                  level=level, tile=tile, overlap=overlap, overlay=overlay, device=device,
                                  landmarks=landmarks, seed=seed, max_pixels=max_pixels,
                                  progress=common.phase_progress(bar, _PHASES), context=context, max_memory=budget,
                                  mpp=mpp, magnification=magnification, tissue=tissue, geojson=geojson,
                                  resume=resume, dist=dist)
    finally:
        if dist is not None:
            dist.stop()
    if dist is not None and not dist.is_main:
        return
    if json_out:
        common.print_json(summary)
        return
    h, w = summary["size"]
    console = common.out_console()
    tiles = f"{summary['tiles']['count']} tiles, " if "tiles" in summary else ""
    console.print(f"{summary['mask']['path']}: {w}x{h} mask, {len(summary['labels'])} labels "
                      f"({summary['mode']}), {tiles}{summary['seconds']['total']:.1f} s", highlight=False)
    console.print(f"context {summary['context']['mode']}: {summary['context']['reason']}", highlight=False)
    if common.landmarks_note(summary["landmarks"]):
        console.print(common.landmarks_note(summary["landmarks"]), highlight=False)
    for e in summary["labels"]:
        console.print(f"  {e['label']:>3}  {e['hex']}  {e['fraction'] * 100:6.2f}%  {e['name']}",
                          highlight=False)
    if summary.get("tissue"):
        t = summary["tissue"]
        console.print(f"tissue: {t['fraction'] * 100:.1f}% of the image ({t['method']}); {t['tiles_skipped']} of "
                      f"{t['tiles_total']} tiles skipped, about {t['seconds_saved_estimate']:.1f} s saved",
                      highlight=False)
    if summary.get("geojson"):
        console.print(f"geojson: {summary['geojson']['path']} ({summary['geojson']['features']} classes)",
                      highlight=False)
    console.print(f"legend: {summary['legend']}" +
                      (f"; overlay: {summary['overlay']['path']}" if "overlay" in summary else ""), highlight=False)
