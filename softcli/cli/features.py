"""``soft features``: dense stage maps of an image of any size."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..constants import DEFAULT_MAX_PIXELS
from ..io.image import pixel_limit
from . import cohort, common
from .app import app
from .cohort import check_cohort_options, check_split, run_cli_cohort, single_input, start_tile_split, wants_cohort


@app.command()
def features(
    inputs: common.InputsArg = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output: .safetensors (keys stage1..stage4, "
                                                                  "(C, H, W) float32), .npy (one stage), .npz, "
                                                                  ".ome.tif (tiled BigTIFF) or .ome.zarr (multiscale "
                                                                  "OME-Zarr, one image per stage).",
                                          show_default=False)] = None,
    stages: Annotated[str, typer.Option("--stages", help="Stages to write, e.g. 1,2,3,4 or 4 "
                                                          "(strides 4, 8, 16, 32).")] = "1,2,3,4",
    tile: Annotated[int | None, typer.Option("--tile", help="Tile side in pixels (multiple of 32) of --context "
                                                            "global or tile; default: the largest that fits "
                                                            "--max-memory.")] = None,
    overlap: Annotated[int | None, typer.Option("--overlap", help="Pixels shared by neighbouring tiles "
                                                                  "(multiple of 32).")] = None,
    level: Annotated[int, typer.Option("--level", help="Pyramid level of a TIFF pyramid (0 = full size).")] = 0,
    landmarks: common.LandmarksOpt = None,
    max_memory: common.MaxMemoryOpt = "auto",
    context: common.ContextOpt = "auto",
    blend: Annotated[str, typer.Option("--blend", help="Tile blending: linear or gaussian.")] = "linear",
    pool: Annotated[bool, typer.Option("--pool", help="Also store the mean of the stage-4 map as 'pooled'.")] = False,
    model: common.ModelOpt = None,
    weights: common.WeightsOpt = None,
    device: common.DeviceOpt = "auto",
    max_pixels: common.MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    json_out: common.JsonOpt = False,
    out_dir: cohort.OutDirOpt = None,
    list_file: cohort.ListOpt = None,
    out_format: Annotated[str, typer.Option("--out-format", help="With --out-dir: safetensors, npz, npy, "
                                            "ome.tif or ome.zarr.")] = "safetensors",
    overwrite: cohort.OverwriteOpt = False,
    max_failures: cohort.MaxFailuresOpt = None,
    mpp: common.MppOpt = None,
    magnification: common.MagnificationOpt = None,
    tissue: common.TissueOpt = None,
    resume: cohort.ResumeOpt = True,
    split: cohort.SplitOpt = "inputs",
) -> None:
    """Write the SOFT stage maps of an image of any size, tile by tile with bounded memory.

    Many images (folders, quoted globs, --list FILE) go to --out-dir DIR as
    NAME.<format> with a manifest.jsonl; a rerun skips finished inputs. Under
    torchrun the inputs are split across ranks.

    Example: soft features slide.ome.tif --out feats.safetensors --weights soft_tiny/ --stages 3,4

    Example: soft features slides/ --out-dir feats/ --weights soft_tiny/ --stages 4 --pool

    Example: soft features slide.ome.tif --out f.safetensors --context global --stages 1,2,3

    Example: soft features slide.svs --mpp 1.0 --out maps.ome.zarr --stages 2,3  (open maps.ome.zarr/stage3 in napari)

    Whole slide at 1 µm/px, tissue only: soft features slide.svs --mpp 1.0 --tissue auto --out feats.safetensors
    """
    from ..features import FeaturesPlan, check_request, extract_features  # imports torch: only when the command runs

    budget = common.memory_budget(max_memory)
    policy = common.parse_landmarks(landmarks) if landmarks is not None else None
    pixel_limit(max_pixels)  # a negative limit is a usage error before anything is opened
    check_split(split, wants_cohort(inputs, out_dir, list_file))
    if wants_cohort(inputs, out_dir, list_file):
        from ..cohort.tasks import check_features_options, features_task

        check_cohort_options(out_dir, out=out)
        check_features_options(out_format, stages, pool, blend)  # fail before loading a model

        auto = max_memory.strip().lower() == "auto"  # recorded as null: not the RAM free at this run's start

        def make_task(dev: str) -> object:
            net = common.load_cli_model(model, weights, dev, landmarks=policy)
            return features_task(net, model_name=common.model_name(model, weights), out_format=out_format,
                                 stages=stages, tile=tile, overlap=overlap, level=level,
                                 max_memory=None if auto else budget, blend=blend,
                                 pool=pool, max_pixels=max_pixels,
                                 extra={"context": context, "mpp": mpp, "magnification": magnification,
                                        "tissue": tissue})

        run_cli_cohort(make_task, inputs, list_file, out_dir, device=device, overwrite=overwrite,
                       max_failures=max_failures, json_out=json_out, phases={"tiles": "tiles"})
        return
    input = single_input(inputs, out, split)
    assert out is not None
    check_request(input, out, stages, pool, blend)  # fail before loading a model
    dist, device = start_tile_split(split, device)
    try:
        net = common.load_cli_model(model, weights, device, landmarks=policy)
        with common.progress_bar(not json_out and (dist is None or dist.is_main)) as progress:
            task = progress.add_task(f"features {input.name}", total=None)

            def on_plan(plan: FeaturesPlan) -> None:
                if plan.estimated_peak_bytes > plan.max_memory_bytes:
                    common.warn(f"{plan.tile[1]}x{plan.tile[0]} tiles need about "
                         f"{plan.estimated_peak_bytes / 2**30:.1f} GB, above --max-memory {max_memory}; "
                         "use a smaller --tile")

            result = extract_features(
                net, input, out, stages=stages, tile=tile, overlap=overlap, level=level, max_memory=budget,
                blend=blend, pool=pool, max_pixels=max_pixels, on_plan=on_plan, context=context, mpp=mpp,
                magnification=magnification, tissue=tissue,
                on_tile=lambda done, total: progress.update(task, completed=done, total=total), resume=resume,
                dist=dist)
    finally:
        if dist is not None:
            dist.stop()
    if dist is not None and not dist.is_main:
        return
    if json_out:
        common.print_json(result.to_json())
        return
    p = result.plan
    shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in result.maps.items())
    common.err_console.print(f"{result.image_size[1]}x{result.image_size[0]} image, {p.tiles} tile(s) of "
                      f"{p.tile[1]}x{p.tile[0]} ({p.mode}), {result.seconds:.1f}s", highlight=False)
    common.err_console.print(f"context {p.context}: {p.context_reason}", highlight=False, soft_wrap=True)
    if result.tissue is not None:
        t = result.tissue
        common.err_console.print(f"tissue: {t['fraction'] * 100:.1f}% ({t['method']}); {t['tiles_skipped']} of "
                          f"{t['tiles_total']} tiles skipped (zeros), about {t['seconds_saved_estimate']:.1f} s saved",
                          highlight=False)
    typer.echo(f"wrote {result.output} ({result.format}): {shapes}")
