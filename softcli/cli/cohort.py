"""Many inputs for ``soft segment`` and ``soft features``: options, progress and the summary of a cohort run.

The commands call :func:`run_cli_cohort` when given ``--out-dir``, ``--list`` or
more than one input; the work is in :mod:`softcli.cohort`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress, TaskID

from ..cohort.runner import CohortEvents
from ..errors import SoftError, UsageError
from ..io.inputs import display_path
from .advice import cli_message
from .app import error_line
from .common import err_console, print_json, progress_bar

OutDirOpt = Annotated[Path | None, typer.Option(
    "--out-dir", metavar="DIR", file_okay=False, help="Many inputs: write NAME.<format> per input here, with a "
    "resumable manifest.jsonl (a rerun skips finished inputs).")]
ListOpt = Annotated[Path | None, typer.Option(
    "--list", metavar="FILE", dir_okay=False, help="Also process the images listed in FILE, one path per line "
    "(relative to FILE's folder; # comments).")]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="With --out-dir: redo inputs the manifest says are done.")]
MaxFailuresOpt = Annotated[int | None, typer.Option(
    "--max-failures", metavar="N", min=1, help="With --out-dir: stop starting new inputs once N have failed.")]

SplitOpt = Annotated[str, typer.Option(
    "--split", help="Under torchrun: inputs (ranks share the inputs of --out-dir) or tiles (ranks share the tile "
    "rows of one image; rank 0 writes --out).")]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume/--no-resume", help="Keep finished bands of tile rows (tile context) or finished layer passes "
    "(global context) in OUT.partial-state/ so that a killed run "
    "continues where it stopped (removed once OUT is written).")]

#: Seconds a torch.distributed collective may wait (the end-of-run gather waits for the slowest rank).
TIMEOUT_ENV = "SOFTCLI_DIST_TIMEOUT"


def wants_cohort(inputs: list[str] | None, out_dir: Path | None, list_file: Path | None) -> bool:
    return out_dir is not None or list_file is not None or len(inputs or []) > 1


def check_cohort_options(out_dir: Path | None, **one_file_options: object) -> None:
    """Several inputs need ``--out-dir``; options that name one output file do not apply to them."""
    if out_dir is None:
        raise UsageError("several inputs need --out-dir DIR (--out names one file)")
    given = [f"--{name}" for name, value in one_file_options.items() if value is not None]
    if given:
        raise UsageError(f"{' and '.join(given)} name{'s' if len(given) == 1 else ''} one file; with --out-dir "
                         "each input gets NAME.<format>")


def single_input(inputs: list[str] | None, out: Path | None, split: str = "inputs") -> Path:
    """The one image of a single-image run (``--out FILE``), or a usage error saying what to give."""
    if not inputs:
        raise UsageError("give an input image (or several with --out-dir DIR)")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and split != "tiles":
        raise UsageError("under torchrun give --out-dir DIR (ranks split many inputs) or --split tiles (ranks "
                         "split the tile rows of one image)")
    if Path(inputs[0]).is_dir():
        raise UsageError(f"{inputs[0]}: is a folder; give --out-dir DIR to process the images in it")
    if out is None:
        raise UsageError("give --out FILE for one image, or --out-dir DIR for many")
    return Path(inputs[0])


def check_split(split: str, cohort: bool) -> None:
    if split not in ("inputs", "tiles"):
        raise UsageError(f"--split takes inputs or tiles, not {split!r}")
    if split == "tiles" and cohort:
        raise UsageError("--split tiles splits one image (--out FILE) across ranks; with --out-dir the ranks "
                         "split the inputs")


def start_tile_split(split: str, device: str) -> tuple[Any, str]:
    """``--split tiles`` under torchrun: join the process group; (DistContext or None, this rank's device)."""
    if split != "tiles" or int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None, device
    from ..cohort import DistContext

    dist = DistContext.from_env()
    rank_device = dist.device(device)
    dist.start(rank_device, _timeout())
    return dist, rank_device


def _timeout() -> float:
    from ..cohort.distributed import DEFAULT_TIMEOUT_S

    text = os.environ.get(TIMEOUT_ENV)
    try:
        return float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV} must be a number of seconds, not {text!r}") from None


class _CliEvents(CohortEvents):
    """Two bars on rank 0's terminal (inputs, tiles of the current image); otherwise a log line per input."""

    def __init__(self, bar: Progress, draw: bool, rank: int | None, phases: dict[str, str]) -> None:
        self.bar, self.draw, self.prefix = bar, draw, f"[rank {rank}] " if rank is not None else ""
        self.phases = phases
        self.inputs: TaskID | None = None
        self.tiles: TaskID | None = None
        self.done = 0
        self.mine = 0
        self.reasons: dict[str, str] = {}  # input → its error in CLI words (options, not parameters)

    def planned(self, total: int, mine: int, skipped: int) -> None:
        self.mine = mine
        if self.draw:
            self.inputs = self.bar.add_task("inputs", total=mine)
            self.tiles = self.bar.add_task("tiles", total=None)
        else:
            err_console.print(f"{self.prefix}{mine} of {total} inputs to process here"
                              + (f", {skipped} already done" if skipped else ""), markup=False, highlight=False)

    def started(self, path: str, index: int, mine: int) -> None:
        if self.tiles is not None:
            self.bar.reset(self.tiles, total=None, description=f"tiles of {Path(display_path(path)).name}")

    def tile(self, phase: str, done: int, total: int) -> None:
        if self.tiles is not None:
            self.bar.update(self.tiles, completed=done, total=total, description=self.phases.get(phase, phase))

    def failed(self, path: str, exc: SoftError) -> None:
        self.reasons[path] = cli_message(exc)

    def finished(self, record: dict[str, Any]) -> None:
        status = record["status"]
        if status == "failed":
            name = display_path(record["input"])
            reason = self.reasons.pop(record["input"], None) or str(record.get("error"))
            error_line(reason if reason.startswith(name) else f"{name}: {reason}")
        if status != "skipped":
            self.done += 1
            if self.inputs is not None:
                self.bar.update(self.inputs, completed=self.done)
        if not self.draw and status != "failed":
            out = record["outputs"][0]["path"] if record.get("outputs") else ""
            err_console.print(f"{self.prefix}{status} {display_path(record['input'])} → {display_path(out)}"
                              + (f" ({record['seconds']:.1f} s)" if status == "done" else ""), markup=False,
                              highlight=False)


def run_cli_cohort(make_task: Callable[[str], Any], inputs: list[str] | None, list_file: Path | None,
                   out_dir: Path | None, *, device: str, overwrite: bool, max_failures: int | None,
                   json_out: bool, phases: dict[str, str] | None = None) -> None:
    """Expand the inputs, run the cohort (ranks from torchrun), print the summary; exit 1 if any input failed.

    ``make_task(device)`` builds the command's :class:`~softcli.cohort.CohortTask` on this rank's device;
    ``phases`` names the phases of the tiles bar.
    """
    from ..cohort import DistContext, gather_inputs, run_cohort

    check_cohort_options(out_dir)
    assert out_dir is not None
    items = gather_inputs(inputs or [], list_file, out_dir)
    if not items:
        raise UsageError("no inputs: give images, folders, quoted globs or --list FILE")
    dist = DistContext.from_env()
    rank_device = dist.device(device)
    dist.start(rank_device, _timeout())
    try:
        task = make_task(rank_device)
        draw = dist.is_main and not json_out
        with progress_bar(draw) as bar:
            events = _CliEvents(bar, draw and err_console.is_terminal, dist.rank if dist.distributed else None,
                                phases or {})
            report = run_cohort(items, out_dir, task, overwrite=overwrite, max_failures=max_failures, dist=dist,
                                events=events)
    finally:
        dist.stop()
    if dist.is_main:
        if json_out:
            print_json(report.to_json())
        err_console.print(f"{len(report.records) + report.not_started} inputs: {report.count('done')} done, "
                          f"{report.count('skipped')} skipped, {report.count('failed')} failed"
                          + (f", {report.not_started} not started (--max-failures {max_failures} reached)"
                             if report.stopped else "")
                          + f"; manifest {display_path(report.manifest)}", markup=False, highlight=False)
    if not report.ok:
        raise typer.Exit(1)
