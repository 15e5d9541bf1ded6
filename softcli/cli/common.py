"""Pieces every command shares: consoles, progress bars, JSON output, model options."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

#: Logs, warnings and progress: stderr, so ``--json`` stdout stays clean.
err_console = Console(stderr=True)


def out_console() -> Console:
    return Console()


def print_json(obj: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
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


# Options shared by every command that runs a model ---------------------------------

ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="Registry name (see 'soft weights list'), hf-hub:ORG/REPO[@REV], a folder or a file.")]
WeightsOpt = Annotated[Path | None, typer.Option(
    "--weights", "-w", help="A local checkpoint file or folder (official .pth/.safetensors or softcli).")]
DeviceOpt = Annotated[str, typer.Option("--device", "-d", help="auto, cpu, cuda, cuda:N or mps.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (logs go to stderr).")]


def load_cli_model(model: str | None, weights: Path | None, device: str = "auto") -> Any:
    """The model a command runs, from ``--model``/``--weights``: the one place commands load models.

    This branch resolves local files and folders only; registry names and
    ``hf-hub:`` references are resolved by the shared helper of the same name
    (merged by the lead).
    """
    from ..api import load_model
    from ..errors import UsageError

    if model and weights:
        raise UsageError("give --model or --weights, not both")
    source = weights if weights is not None else model
    if source is None:
        raise UsageError("no model given; use --weights PATH (a checkpoint file or softcli folder)")
    if weights is None and not Path(source).exists():
        raise UsageError(f"--model {source}: not a local file or folder (registry names are not available "
                         "in this build)")
    return load_model(source, device=device)


def parse_landmarks(text: str) -> Any:
    """``--landmarks`` → a :class:`~softcli.models.LandmarkPolicy`; a bad value is a usage error."""
    from ..errors import UsageError
    from ..models import LandmarkPolicy

    try:
        return LandmarkPolicy.parse(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
