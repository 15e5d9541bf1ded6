"""``soft features``: dense stage maps of an image of any size."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError
from ..features import FeaturesPlan, check_request, extract_features
from ..io.image import DEFAULT_MAX_PIXELS, pixel_limit
from ..tiling import parse_memory
from .app import app
from .common import (DeviceOpt, JsonOpt, MagnificationOpt, ModelOpt, MppOpt, TissueOpt, WeightsOpt, err_console,
                     load_cli_model, parse_landmarks, print_json, progress_bar, warn)


@app.command()
def features(
    input: Annotated[Path, typer.Argument(help="Image: TIFF/BigTIFF/OME-TIFF/SVS-like (read region by region) "
                                               "or any Pillow format.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: .safetensors (keys stage1..stage4, "
                                                           "(C, H, W) float32), .npy (one stage), .npz, or "
                                                           ".ome.tif (tiled BigTIFF).", show_default=False)],
    stages: Annotated[str, typer.Option("--stages", help="Stages to write, e.g. 1,2,3,4 or 4 "
                                                          "(strides 4, 8, 16, 32).")] = "1,2,3,4",
    tile: Annotated[int | None, typer.Option("--tile", help="Largest tile side in pixels (multiple of 32); "
                                                            "default: from --max-memory, at most 1024.")] = None,
    overlap: Annotated[int | None, typer.Option("--overlap", help="Pixels shared by neighbouring tiles "
                                                                  "(multiple of 32).")] = None,
    level: Annotated[int, typer.Option("--level", help="Pyramid level of a TIFF pyramid (0 = full size).")] = 0,
    landmarks: Annotated[str, typer.Option("--landmarks", help="auto, official or a landmark budget N.")] = "auto",
    max_memory: Annotated[str, typer.Option("--max-memory", help="Memory budget that picks tile size and "
                                                                 "whether maps stay in memory.")] = "2GB",
    blend: Annotated[str, typer.Option("--blend", help="Tile blending: linear or gaussian.")] = "linear",
    pool: Annotated[bool, typer.Option("--pool", help="Also store the mean of the stage-4 map as 'pooled'.")] = False,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    max_pixels: Annotated[int, typer.Option("--max-pixels", help="Refuse to decode whole a non-TIFF image larger "
                                                                 "than this (0 = no limit).")] = DEFAULT_MAX_PIXELS,
    json_out: JsonOpt = False,
    mpp: MppOpt = None,
    magnification: MagnificationOpt = None,
    tissue: TissueOpt = None,
) -> None:
    """Write the SOFT stage maps of an image of any size, tile by tile with bounded memory.

    Example: soft features slide.ome.tif --out feats.safetensors --weights soft_tiny/ --stages 3,4

    Whole slide at 1 µm/px, tissue only: soft features slide.svs --mpp 1.0 --tissue auto --out feats.safetensors
    """
    try:
        budget = parse_memory(max_memory)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    policy = parse_landmarks(landmarks)
    pixel_limit(max_pixels)  # a negative limit is a usage error before anything is opened
    check_request(input, out, stages, pool, blend)  # fail before loading a model
    net = load_cli_model(model, weights, device)
    net.set_landmark_policy(policy)
    with progress_bar(not json_out) as progress:
        task = progress.add_task(f"features {input.name}", total=None)

        def on_plan(plan: FeaturesPlan) -> None:
            progress.update(task, total=plan.tiles)
            if plan.estimated_peak_bytes > plan.max_memory_bytes:
                warn(f"{plan.tile[0]}x{plan.tile[1]} tiles need about {plan.estimated_peak_bytes / 2**30:.1f} GB, "
                     f"above --max-memory {max_memory}; use a smaller --tile")

        result = extract_features(
            net, input, out, stages=stages, tile=tile, overlap=overlap, level=level, max_memory=budget,
            blend=blend, pool=pool, max_pixels=max_pixels, on_plan=on_plan, mpp=mpp, magnification=magnification,
            tissue=tissue,
            on_tile=lambda done, total: progress.update(task, completed=done))
    if json_out:
        print_json(result.to_json())
        return
    p = result.plan
    shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in result.maps.items())
    err_console.print(f"{result.image_size[0]}x{result.image_size[1]} image, {p.tiles} tile(s) of "
                      f"{p.tile[0]}x{p.tile[1]} ({p.mode}), {result.seconds:.1f}s", highlight=False)
    if result.tissue is not None:
        t = result.tissue
        err_console.print(f"tissue: {t['fraction'] * 100:.1f}% ({t['method']}); {t['tiles_skipped']} of "
                          f"{t['tiles_total']} tiles skipped (zeros), about {t['seconds_saved_estimate']:.1f} s saved",
                          highlight=False)
    typer.echo(f"wrote {result.output} ({result.format}): {shapes}")
