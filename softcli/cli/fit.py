"""``soft fit segment|classify``: heads for your own classes on frozen SOFT features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ..constants import DEFAULT_MAX_PIXELS
from ..errors import UsageError
from ..stages import parse_stages
from ..tiling import DEFAULT_OVERLAP, DEFAULT_TILE
from .app import command_group
from .common import (
    DeviceOpt,
    JsonOpt,
    LandmarksOpt,
    ModelOpt,
    WeightsOpt,
    err_console,
    out_console,
    phase_progress,
    print_json,
    progress_bar,
)

fit_app = command_group(
    "fit",
    "Teach SOFT your own classes from a few labelled images or scribbles (the backbone stays frozen).",
    "soft fit segment data/ --out my-segmenter --weights soft_tiny.safetensors",
)

_PHASES = {"features": "Extracting features", "fit": "Fitting head"}

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Checkpoint folder to write (replaced atomically "
                                                          "when it is a softcli folder).", show_default=False)]
ValOpt = Annotated[float, typer.Option("--val", min=0.0, max=0.95, help="Fraction held out for scoring: of the "
                                       "images, or of 64-px blocks when there is a single image (0 = none).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the sampling, the split and the FPN init.")]
BundleOpt = Annotated[bool, typer.Option("--bundle", help="Copy the backbone weights into the folder instead of "
                                                          "referencing them by sha256.")]
#: Training images are decoded whole (not region by region as segment/features read slides).
FitMaxPixelsOpt = Annotated[int, typer.Option("--max-pixels", min=0, metavar="N", help="Refuse images with more "
                                              "pixels than this (0 = no limit).")]
L2Opt = Annotated[float, typer.Option("--l2", min=0.0, help="L2 penalty of the linear probe "
                                                            "(on standardised features).")]


def _spec(model: str | None, weights: Path | None) -> Any:
    if model is not None and weights is not None:
        raise UsageError("give --model or --weights, not both")
    return weights if weights is not None else model


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _print_scores(console: Console, title: str, result: dict[str, Any], unit: str) -> None:
    """A per-class IoU / accuracy table and the overall line under it."""
    table = Table(title=title, title_justify="left")
    table.add_column("class", justify="right")
    table.add_column("name")
    table.add_column(unit, justify="right")
    table.add_column("IoU", justify="right")
    table.add_column("accuracy", justify="right")
    for c in result["classes"]:
        table.add_row(str(c["class"]), c["name"], f"{c['support']:,}", _fmt(c["iou"]), _fmt(c["accuracy"]))
    console.print(table)
    console.print(f"accuracy {_fmt(result['accuracy'])} · mean IoU {_fmt(result['mean_iou'])} · "
                  f"mean class accuracy {_fmt(result['mean_accuracy'])}", highlight=False)


def _confusion_table(result: dict[str, Any], names: list[str]) -> Table:
    table = Table(title="held-out confusion (rows: true, columns: predicted)", title_justify="left")
    table.add_column("")
    for n in names:
        table.add_column(n, justify="right")
    for n, row in zip(names, result["confusion"]):
        table.add_row(n, *(str(v) for v in row))
    return table


def _run(fn: Any, json_out: bool, **kwargs: Any) -> dict[str, Any]:
    with progress_bar(not json_out) as bar:
        return fn(progress=phase_progress(bar, _PHASES), **kwargs)


def _report(summary: dict[str, Any], json_out: bool, train_title: str, val_title: str, unit: str,
            confusion: bool = False) -> None:
    """The summary as JSON, or as score tables (stdout) and a one-line footer (stderr)."""
    if json_out:
        print_json(summary)
        return
    console = out_console()
    _print_scores(console, train_title, summary["train"], unit)
    if summary["val"] is None:
        console.print("nothing held out (--val 0): the training scores above are optimistic", highlight=False)
    else:
        _print_scores(console, val_title, summary["val"], unit)
        if confusion:
            console.print(_confusion_table(summary["val"], summary["classes"]))
            for e in summary["val"]["errors"]:
                console.print(f"  wrong: {e['image']}: {e['true']} → {e['predicted']}", highlight=False)
    err_console.print(_footer(summary), highlight=False, soft_wrap=True)


def _footer(summary: dict[str, Any]) -> str:
    ref = summary["backbone"]
    how = "bundled" if ref["bundled"] else f"referenced by sha256 {ref['sha256'][:12]}…"
    return (f"wrote {summary['out']}: {len(summary['classes'])} classes, backbone {ref['spec']} ({how}), "
            f"landmarks {summary['landmarks']} (kept with the head), {summary['seconds']['total']:.1f} s")


@fit_app.command("segment")
def segment(
    data: Annotated[Path, typer.Argument(help="Folder with images/ and labels/ (same file stems; labels: "
                                              "0 = unlabelled, 1..K = classes) and optionally classes.json.",
                                         show_default=False)],
    out: OutOpt,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    head: Annotated[str, typer.Option("--head", help="linear: a 1x1 conv on local feature statistics (fast, "
                                      "convex); fpn: a small Semantic-FPN head trained on the four stage maps.")]
    = "linear",
    stages: Annotated[str, typer.Option("--stages", help="Stages the linear head reads, e.g. 1 or 1,2.")] = "1",
    window: Annotated[int, typer.Option("--window", help="Linear head: mean and std of the features over this "
                                        "many stride-4 cells a side (odd; 1 = the cell alone).")] = 9,
    val: ValOpt = 0.2,
    seed: SeedOpt = 0,
    l2: L2Opt = 1e-3,
    steps: Annotated[int, typer.Option("--steps", min=1, help="FPN head: AdamW steps.")] = 300,
    bundle: BundleOpt = False,
    tile: Annotated[int, typer.Option("--tile", help="Largest tile side in pixels (a multiple of 32), as for "
                                      "soft segment.")] = DEFAULT_TILE,
    overlap: Annotated[int, typer.Option("--overlap", help="Overlap between tiles in pixels.")] = DEFAULT_OVERLAP,
    max_pixels: FitMaxPixelsOpt = DEFAULT_MAX_PIXELS,
    landmarks: LandmarksOpt = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Fit a segmentation head on labelled pixels (scribbles or masks); the backbone stays frozen.

    Features come from the same tiling engine as soft segment, so images of any
    size work. Prints per-class IoU and accuracy on the training and held-out
    labels, and writes a checkpoint folder for [bold]soft segment --model DIR[/bold].
    --landmarks sets the landmark policy of the training features; the folder
    keeps it, and soft segment uses it unless given another --landmarks.

    Example:

      soft fit segment data/ --out tissue-seg --weights soft_tiny.safetensors

      soft segment slide.tif --model tissue-seg --out mask.tif
    """
    from ..fit import fit_segmenter

    summary = _run(fit_segmenter, json_out, data=data, out=out, weights=_spec(model, weights), head=head,
                   stages=parse_stages(stages), window=window, val=val, seed=seed, l2=l2, steps=steps,
                   bundle=bundle, tile=tile, overlap=overlap, device=device, max_pixels=max_pixels or None,
                   landmarks=landmarks)
    n = summary["samples"]
    _report(summary, json_out, f"training labels ({n['train']:,} cells)",
            f"held-out labels ({n['val']:,} cells; {', '.join(summary['held_out'])})", "pixels")


@fit_app.command("classify")
def classify(
    data: Annotated[Path, typer.Argument(help="Folder with one sub-folder of images per class (ImageFolder).",
                                         show_default=False)],
    out: OutOpt,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    val: ValOpt = 0.2,
    seed: SeedOpt = 0,
    l2: L2Opt = 1e-3,
    bundle: BundleOpt = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")] = 16,
    max_pixels: FitMaxPixelsOpt = DEFAULT_MAX_PIXELS,
    landmarks: LandmarksOpt = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Fit a linear probe on pooled SOFT features for the classes in DATA's sub-folders.

    Images get the model's own preprocessing (resize + centre crop, as soft
    classify). Prints held-out accuracy and the confusion matrix, and writes a
    classifier folder for [bold]soft classify --model DIR[/bold].
    --landmarks sets the landmark policy of the training features; the folder
    keeps it, and soft classify uses it unless given another --landmarks.

    Example:

      soft fit classify photos-by-class/ --out my-classifier --weights soft_tiny.safetensors

      soft classify new-photos/ --model my-classifier
    """
    from ..fit import fit_classifier

    summary = _run(fit_classifier, json_out, data=data, out=out, weights=_spec(model, weights), val=val, seed=seed,
                   l2=l2, bundle=bundle, batch_size=batch_size, device=device, max_pixels=max_pixels or None,
                   landmarks=landmarks)
    imgs = summary["images"]
    _report(summary, json_out, f"training images ({imgs['train']})", f"held-out images ({imgs['val']})", "images",
            confusion=True)
