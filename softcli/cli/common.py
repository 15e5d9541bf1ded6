"""Pieces every command shares: consoles, progress bars, JSON output, model options."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..units import SIZE_HELP, parse_size

if TYPE_CHECKING:
    from ..models import SoftModel

#: Logs, warnings and progress: stderr, so ``--json`` stdout stays clean.
err_console = Console(stderr=True)


def out_console() -> Console:
    return Console()


def print_json(obj: Any) -> None:
    """One JSON document on stdout, valid UTF-8 whatever the file names (see :func:`~softcli.io.inputs.json_safe`)."""
    from ..io.inputs import json_safe

    sys.stdout.write(json.dumps(json_safe(obj), indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress]:
    """A rich progress bar on stderr, shown only when stderr is a terminal."""
    progress = Progress(
        SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err_console, transient=False, disable=not (enabled and err_console.is_terminal),
    )
    with progress:
        yield progress


def phase_progress(bar: Progress, phases: Mapping[str, str]) -> Callable[[str, int, int], None]:
    """A library ``progress(phase, done, total)`` callback drawing one bar per phase (named by ``phases``)."""
    tasks: dict[str, TaskID] = {}

    def progress(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phases.get(phase, phase), total=total)
        bar.update(tasks[phase], completed=done, total=total)

    return progress


def load_cli_model(model: str | None, weights: Path | None, device: str = "auto",
                   landmarks: str | int | None = None) -> SoftModel:
    """The model for ``--model``/``--weights``: one of them, or the registry's default (soft_tiny).

    ``--model`` takes a registry name, ``hf-hub:ORG/REPO[@REV]``, a folder or a
    file; ``--weights`` a local file or folder. Downloads show huggingface_hub's
    progress bars on stderr.
    """
    from ..api import load_model
    from ..errors import UsageError

    if model is not None and weights is not None:
        raise UsageError("give --model or --weights, not both")
    return load_model(Path(weights) if weights is not None else model, device=device, landmarks=landmarks)


# Options shared by every command that runs a model ---------------------------------

ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="Registry name (see 'soft weights list'), hf-hub:ORG/REPO[@REV], a folder or a file.")]
WeightsOpt = Annotated[Path | None, typer.Option(
    "--weights", "-w", help="A local checkpoint file or folder (official .pth/.safetensors or softcli).")]
DeviceOpt = Annotated[str, typer.Option("--device", "-d", help="auto, cpu, cuda, cuda:N or mps.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (logs go to stderr).")]
LandmarksOpt = Annotated[str | None, typer.Option(
    "--landmarks", metavar="auto|official|N", help="Landmarks of every SOFT attention: auto (the default), official "
    "(the published r x r pooling) or a budget N per head.")]

# Inputs and budgets shared by the commands that read images (see softcli/cli/README.md) --------

#: The metavar of the positional input argument, the same in every command and message.
INPUT_METAVAR = "INPUT"  # usage shows [INPUT]...: Typer adds the dots of a list argument
InputsArg = Annotated[list[str] | None, typer.Argument(
    metavar=INPUT_METAVAR, show_default=False, help="Images: files (TIFF/BigTIFF/OME-TIFF and slides read region "
    "by region, or any Pillow format), folders (searched recursively) or quoted globs.")]
MaxPixelsOpt = Annotated[int, typer.Option(
    "--max-pixels", metavar="N", help="Refuse to decode whole an image with more pixels than N, a "
    "decompression-bomb guard (TIFFs and slides are read region by region; 0 = no limit).")]
MaxMemoryOpt = Annotated[str, typer.Option(
    "--max-memory", metavar="SIZE", help="Memory budget that picks the context mode and tile size: auto (half the "
    f"RAM available now) or a size. {SIZE_HELP}")]
ContextOpt = Annotated[str, typer.Option(
    "--context", metavar="auto|global|tile", help="auto (the whole image in one pass when it fits --max-memory, "
    "else global), global (exact whole-image attention streamed over tiles) or tile (each tile its own context, "
    "blended; not for classify).")]


def size_option(option: str, text: str) -> int:
    """A size option's value in bytes (:func:`softcli.units.parse_size`); a bad value is a usage error naming it."""
    from ..errors import UsageError

    try:
        return parse_size(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def memory_budget(text: str) -> int:
    """``--max-memory``: ``auto`` (half the RAM available now) or a size, in bytes."""
    if text.strip().lower() == "auto":
        from ..context import default_max_memory

        return default_max_memory()
    return size_option("--max-memory", text)

# Whole-slide options (softcli.io.slide, softcli.tissue) -----------------------------

MppOpt = Annotated[float | None, typer.Option(
    "--mpp", metavar="FLOAT", help="Resolution in microns per pixel (from the file's metadata): the nearest "
    "pyramid level at or finer than it, resampled the rest of the way.")]
MagnificationOpt = Annotated[float | None, typer.Option(
    "--magnification", metavar="FLOAT", help="Resolution as objective magnification (e.g. 20 for 20x), "
    "instead of --mpp.")]
TissueOpt = Annotated[str | None, typer.Option(
    "--tissue", metavar="auto|none|MASK", help="Skip tiles without tissue: auto (Otsu on saturation of a "
    "thumbnail), none, or a mask image (non-zero = tissue). Default: auto for slides (a file with microns "
    "per pixel) above 4096x4096 pixels, else none.")]


# Model loading: the one place a command turns --model/--weights into a model -------

#: The model used when neither --model nor --weights is given.
DEFAULT_MODEL = "soft_tiny"


def model_name(model: str | None, weights: Path | None) -> str:
    """What to call the model in output: the --weights path, the --model value or the default."""
    if weights is not None:
        return str(weights)
    return model or DEFAULT_MODEL


def landmarks_note(landmarks: Mapping[str, Any]) -> str:
    """``landmarks X (...)`` for a summary line unless the default (:func:`softcli.api.landmarks_summary`), else ""."""
    if landmarks.get("source") == "fitted":
        return f"landmarks {landmarks['policy']} (as the head was fitted)"
    if landmarks.get("fitted"):
        return f"landmarks {landmarks['policy']} (--landmarks; the head was fitted with {landmarks['fitted']})"
    return ""


def parse_landmarks(text: str) -> Any:
    """``--landmarks`` → a :class:`~softcli.models.LandmarkPolicy`; a bad value is a usage error."""
    from ..api import landmark_policy

    return landmark_policy(text)
