"""Run one single-image job per input over a cohort: resume, failure policy, ranks, manifest.

The job itself (``soft segment`` or ``soft features`` on one image) is a
:class:`CohortTask`; this module decides what runs where and records it. The
library never prints: the caller sees each step through :class:`CohortEvents`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import OutputError, SoftError
from ..io.atomic import remove_stale_temporaries
from ..io.inputs import InputItem
from .distributed import DistContext, split_by_pixels
from .inputs import output_names
from .manifest import (
    FailureCounter,
    Manifest,
    append_line,
    append_lines,
    input_key,
    output_bytes,
    part_path,
    run_lock,
    settings_key,
)

#: ``progress(phase, done, total)`` of the image being processed (tiles, mask tiles, ...).
TileProgress = Callable[[str, int, int], None]


@dataclass
class JobResult:
    """What one single-image job wrote: its files (main output first) and what it learnt about the image."""

    outputs: list[Path]
    size: tuple[int, int] | None = None
    mpp: float | None = None
    resumed: int = 0  # tile rows or layer passes a killed run had left in OUT.partial-state (softcli.band_state)


@dataclass
class CohortTask:
    """One command's single-image job and everything that decides its output.

    ``settings`` must hold every option that changes the output files (it goes
    into the resume key with the weights hash and the softcli version) and
    nothing that does not (device, progress, limits). ``model`` is the model as the user named it
    (registry name, ``hf-hub:`` spec or path as given); ``weights_path`` the checkpoint it resolved to.
    """

    command: str
    suffix: str
    settings: dict[str, Any]
    model: str
    weights_sha256: str
    run_one: Callable[[str, Path, TileProgress], JobResult]
    weights_path: str | None = None

    @property
    def key(self) -> str:
        return settings_key(self.command, self.settings, self.weights_sha256)


class CohortEvents:
    """Hooks the caller overrides to show progress; every method does nothing by default."""

    def planned(self, total: int, mine: int, skipped: int) -> None:
        """``total`` inputs in the run, ``mine`` to process on this rank, ``skipped`` reused from the manifest."""

    def started(self, path: str, index: int, mine: int) -> None:
        """This rank starts its ``index``-th input (1-based) of ``mine``."""

    def tile(self, phase: str, done: int, total: int) -> None:
        """Progress inside the current image."""

    def failed(self, path: str, exc: SoftError) -> None:
        """An input failed with ``exc`` (its record, given to :meth:`finished` next, holds ``str(exc)``)."""

    def finished(self, record: dict[str, Any]) -> None:
        """A manifest record of this rank (done, failed or skipped)."""


@dataclass
class CohortReport:
    """The run as a whole, the same on every rank."""

    out_dir: Path
    manifest: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False  # --max-failures reached: some inputs were not started
    not_started: int = 0

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.records)

    @property
    def ok(self) -> bool:
        return not self.stopped and self.count("failed") == 0

    def to_json(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "manifest": str(self.manifest), "inputs": len(self.records)
                + self.not_started, "done": self.count("done"), "skipped": self.count("skipped"),
                "failed": self.count("failed"), "not_started": self.not_started, "stopped": self.stopped,
                "records": self.records}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def image_pixels(path: str) -> int:
    """Pixels of an image from its header only (0 when it cannot be read: it will fail on its own)."""
    from ..io.image import is_tiff

    try:
        if is_tiff(path):
            from ..io.readers import open_image

            with open_image(path, 0, None) as reader:
                return reader.height * reader.width
        from PIL import Image

        with Image.open(path) as img:
            return int(img.size[0]) * int(img.size[1])
    except Exception:  # noqa: BLE001 - any unreadable header only means "size unknown" here
        return 0


def _base_record(task: CohortTask, path: str, rank: int) -> dict[str, Any]:
    return {"input": path, "path": input_key(path), "command": task.command, "model": task.model,
            "weights_path": task.weights_path, "weights_sha256": task.weights_sha256, "softcli_version": __version__,
            "settings": task.settings, "settings_key": task.key, "rank": rank}


def _plan(items: Sequence[InputItem], out_dir: Path, task: CohortTask, manifest: Manifest, overwrite: bool,
          world: int) -> dict[str, Any]:
    """On rank 0: output names, reused and bad inputs, and which rank runs which input."""
    remove_stale_temporaries(out_dir)  # half-written outputs (files or OME-Zarr folders) of killed runs
    leftovers = manifest.part_files()
    if leftovers:  # a killed run's parts: fold them into the manifest so this run's parts start empty
        manifest.merge([], include_parts=True)
        for part in leftovers:
            part.unlink(missing_ok=True)
    names = output_names([i.path for i in items])
    outputs = [str(Path(os.path.abspath(out_dir / f"{n}{task.suffix}"))) for n in names]
    latest = manifest.latest()
    reused: dict[int, dict[str, Any]] = {}
    bad: dict[int, str] = {}
    todo: list[int] = []
    for i, item in enumerate(items):
        if item.error is not None:
            bad[i] = item.error
            continue
        rec = None if overwrite else manifest.reusable(item.path, task.key, [outputs[i]], latest)
        if rec is not None:
            reused[i] = dict(rec)
        else:
            todo.append(i)
    sizes = [image_pixels(items[i].path) for i in todo] if world > 1 else [0] * len(todo)
    split = split_by_pixels(sizes, world) if world > 1 else [list(range(len(todo)))]
    return {"outputs": outputs, "reused": reused, "bad": bad, "ranks": [[todo[j] for j in r] for r in split]}


def run_cohort(items: Sequence[InputItem], out_dir: str | os.PathLike[str], task: CohortTask, *,
               overwrite: bool = False, max_failures: int | None = None, dist: DistContext | None = None,
               events: CohortEvents | None = None) -> CohortReport:
    """Process every input into ``out_dir`` (see the package docstring); returns the same report on every rank.

    Inputs whose manifest line is reusable are skipped unless ``overwrite``. A
    failing input is recorded and the run goes on; with ``max_failures`` the
    run stops starting new inputs once that many have failed (on all ranks).
    """
    dist = dist or DistContext()
    events = events or CohortEvents()
    out = Path(out_dir)
    if dist.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from exc
    with run_lock(out) if dist.is_main else contextlib.nullcontext():
        return _run(items, out, task, overwrite, max_failures, dist, events)


def _run(items: Sequence[InputItem], out: Path, task: CohortTask, overwrite: bool, max_failures: int | None,
         dist: DistContext, events: CohortEvents) -> CohortReport:
    manifest = Manifest(out)
    plan = dist.broadcast(_plan(items, out, task, manifest, overwrite, dist.world_size) if dist.is_main else None)
    part = part_path(out, dist.rank)
    mine: list[tuple[int, dict[str, Any]]] = []

    def record(index: int, rec: dict[str, Any]) -> None:
        append_line(part, rec)
        mine.append((index, rec))
        events.finished(rec)

    todo = plan["ranks"][dist.rank]
    events.planned(len(items), len(todo), len(plan["reused"]))
    if dist.is_main:  # failed arguments and reused results: recorded at once, one write
        now = _now()
        known = [(i, _base_record(task, items[i].path, 0) | {"status": "failed", "error": error, "outputs": [],
                                                             "seconds": 0.0, "finished_at": now})
                 for i, error in plan["bad"].items()]
        known += [(i, {**old, "input": items[i].path, "status": "skipped", "rank": 0, "seconds": 0.0,
                       "finished_at": now, "reused_from": old.get("reused_from") or old.get("finished_at")})
                  for i, old in plan["reused"].items()]
        append_lines(part, [rec for _, rec in known])
        for i, rec in known:
            mine.append((i, rec))
            events.finished(rec)
    failed_so_far = FailureCounter(manifest)
    stopped_at: int | None = None
    for n, i in enumerate(todo):
        if max_failures is not None and failed_so_far() >= max_failures:
            stopped_at = n
            break
        path = items[i].path
        events.started(path, n + 1, len(todo))
        rec = _base_record(task, path, dist.rank)
        t0 = time.perf_counter()
        try:
            result = task.run_one(path, Path(plan["outputs"][i]), events.tile)
        except SoftError as exc:
            events.failed(path, exc)
            rec |= {"status": "failed", "error": str(exc), "outputs": []}
        except Exception as exc:  # noqa: BLE001 - one bad slide must not end a cohort; the error is recorded
            rec |= {"status": "failed", "error": f"unexpected {type(exc).__name__}: {exc}", "outputs": []}
        else:
            rec |= {"status": "done", "outputs": [{"path": str(Path(os.path.abspath(p))), "bytes": output_bytes(p)}
                                                  for p in result.outputs],
                    "size": list(result.size) if result.size else None, "mpp": result.mpp}
            if result.resumed:
                rec["resumed"] = result.resumed
        rec |= {"seconds": round(time.perf_counter() - t0, 3), "finished_at": _now()}
        record(i, rec)
    not_started = 0 if stopped_at is None else len(todo) - stopped_at
    everything = dist.all_gather((mine, not_started))
    merged = sorted((x for recs, _ in everything for x in recs), key=lambda x: x[0])
    report = CohortReport(out, manifest.path, [r for _, r in merged], any(s for _, s in everything),
                          sum(s for _, s in everything))
    if dist.is_main:
        manifest.merge(report.records)
    dist.barrier()
    manifest.remove_part(dist.rank)
    return report
