"""``soft classify``: top-k ImageNet (or the model's own) classes for image files."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..constants import DEFAULT_MAX_PIXELS
from ..errors import UsageError
from ..io.atomic import atomic_path, check_output_path
from ..io.image import pixel_limit
from ..io.inputs import display_path, expand_inputs
from . import common
from .advice import cli_text
from .app import app, error_line

CSV_COLUMNS = ("image", "rank", "index", "label", "prob", "input_height", "input_width", "seconds", "model", "error")

if TYPE_CHECKING:
    from ..classify import ClassifyResult


def _table(result: ClassifyResult) -> Table:
    h, w = result.input_size or (0, 0)  # (H, W) like array shapes; shown W x H like every size in messages
    table = Table(title=result.display_name, title_justify="left",
                  caption=f"input {w}x{h} · {result.seconds:.3f} s"
                          + (f" · context {result.context}" if result.context else ""), caption_justify="left")
    table.add_column("#", justify="right")
    table.add_column("label")
    table.add_column("class", justify="right")
    table.add_column("prob", justify="right")
    for p in result.predictions or []:
        table.add_row(str(p.rank), p.label, str(p.index), f"{p.prob:.4f}")
    return table


def _write_csv(path: Path, results: list[ClassifyResult], name: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in results:
            h, w = r.input_size or ("", "")
            base_row = {"image": r.display_name, "input_height": h, "input_width": w, "seconds": f"{r.seconds:.4f}",
                      "model": name}
            if r.error is not None:
                writer.writerow({**base_row, "error": r.error})
            for p in r.predictions or []:
                writer.writerow({**base_row, "rank": p.rank, "index": p.index, "label": p.label,
                                 "prob": f"{p.prob:.6g}"})


@app.command()
def classify(
    inputs: common.InputsArg = None,
    model: common.ModelOpt = None,
    weights: common.WeightsOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="How many classes to show per image.")] = 5,
    device: common.DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1,
                                            help="Images per forward pass (same-size crops are batched).")] = 8,
    json_out: common.JsonOpt = False,
    csv_file: Annotated[Path | None, typer.Option("--csv", metavar="FILE", dir_okay=False,
                                                  help="Also write every prediction to FILE as CSV.")] = None,
    full_res: Annotated[bool, typer.Option(
        "--full-res", help="Classify the whole image at its native resolution "
                           "instead of a centre crop at the model's input size.")] = False,
    context: common.ContextOpt = "auto",
    max_memory: common.MaxMemoryOpt = "auto",
    max_pixels: common.MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    landmarks: common.LandmarksOpt = None,
    mpp: common.MppOpt = None,
    magnification: common.MagnificationOpt = None,
) -> None:
    """Classify images: the top-k classes with their probabilities.

    Each image is resized and centre-cropped as the model's config says (224² and
    ImageNet mean/std for the published checkpoints); [bold]--full-res[/bold] feeds
    the whole image instead, at any size. A missing or broken file is reported on
    stderr and skipped; the exit status is 1 if any input failed. --context and
    --max-memory apply to --full-res (the class token needs the whole image: auto
    or global, no tiled mode).

    Examples:

      soft classify photo.jpg --weights soft_tiny.safetensors

      soft classify photos/ 'scans/**/*.tif' --weights ckpt.pth --json > predictions.json

      soft classify huge.tif --weights ckpt.pth --full-res --top-k 3 --csv out.csv

      soft classify slide.svs --weights ckpt.pth --full-res --mpp 8   (a slide at 8 µm/px, whole)

      soft classify huge.tif --full-res --landmarks 256 --max-memory 8GiB
    """
    from ..checkpoint import model_files  # the task modules import torch: only when the command runs
    from ..classify import classify_paths

    if not inputs:
        raise UsageError("missing INPUT: give image files, folders or quoted globs")
    pixel_limit(max_pixels)  # a negative limit is a usage error before any model loads
    budget = common.memory_budget(max_memory)
    policy = common.parse_landmarks(landmarks) if landmarks is not None else None
    if context not in ("auto", "global"):
        raise UsageError(f"--context for classify is auto or global, not {context!r}: the class token needs "
                         "the whole image, so there is no tiled mode")
    if context != "auto" and not full_res:
        raise UsageError("--context applies to --full-res (a centre crop is always one pass)")
    items = expand_inputs(inputs)
    if csv_file is not None:
        check_output_path(csv_file, [i.path for i in items])
    name = common.model_name(model, weights)
    with common.err_console.status("loading model"):
        net = common.load_cli_model(model, weights, device, landmarks=policy)
    from ..api import landmarks_summary

    note = common.landmarks_note(landmarks_summary(net))
    common.err_console.print(f"model {name} ({net.config.num_classes} classes) on {next(net.parameters()).device}"
                      + (f", {note}" if note else ""), highlight=False, soft_wrap=True)
    if csv_file is not None:  # now that the model's own files are known, --csv must not be one of them
        check_output_path(csv_file, [i.path for i in items], model_files(getattr(net, "source", None)))

    out = Console(file=sys.stdout)  # bound now: a live progress bar must not capture the tables
    show_tables = not json_out
    results: list[ClassifyResult] = []
    # Tables on the terminal already show progress; a bar is for --json or redirected output.
    with common.progress_bar(enabled=not (show_tables and out.is_terminal)) as progress:
        task = progress.add_task("classifying", total=len(items))
        for result in classify_paths(net, items, top_k=top_k, batch_size=batch_size, full_res=full_res,
                                     max_pixels=max_pixels, context=context, max_memory=budget, mpp=mpp,
                                     magnification=magnification):
            results.append(result)
            if result.error is not None:
                error_line(f"{result.display_name}: {cli_text(result.error_template or result.error)}")
            elif show_tables:
                out.print(_table(result))
            progress.advance(task)

    if json_out:
        common.print_json([r.to_dict(name) for r in results])
    if csv_file is not None:
        _write_csv(csv_file, results, name)
        common.err_console.print(f"wrote {display_path(csv_file)}", highlight=False)
    failed = sum(not r.ok for r in results)
    if failed:
        common.err_console.print(f"{failed} of {len(results)} inputs failed", highlight=False)
        raise typer.Exit(1)
