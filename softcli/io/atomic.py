"""Write outputs under a temporary name and rename them into place when complete.

An interrupted job (Ctrl-C, SIGTERM, out of memory, a crash) then never leaves a
file that looks finished: the partial file has a ``.partial`` name and is removed
on the way out when Python still can. Every temporary name carries the PID of
the process that made it (``.NAME.partial-PID…``, ``.soft-maps-PID-…``,
``.soft-mask-PID-…``), so what a killed run (``kill -9``) leaves behind is
removed by the next run that writes into that folder
(:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import OutputError
from ..resources import format_bytes, free_disk

PARTIAL_TAG = ".partial-"
#: Prefixes of the temporary folders of disk-backed feature maps and label masks (followed by ``PID-``).
MAPS_TEMP_PREFIX = ".soft-maps-"
MASK_TEMP_PREFIX = ".soft-mask-"
_STALE = re.compile(rf"^(?:{re.escape(MAPS_TEMP_PREFIX)}|{re.escape(MASK_TEMP_PREFIX)}|\..+\.partial-)(\d+)(?:-.*)?$",
                    re.DOTALL)


def _partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{PARTIAL_TAG}{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or an unusable number): leave its files alone
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files/folders in ``folder`` left by softcli runs that no longer exist; returns them.

    Only our own names with a PID in them (see the module docstring), owned by
    this user, whose process is gone, are touched.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _STALE.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def make_temp_dir(prefix: str, folder: str | os.PathLike[str]) -> Path:
    """A new temporary folder ``PREFIX PID-…`` in ``folder`` (stale ones of dead runs removed first)."""
    remove_stale_temporaries(folder)
    try:
        return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=folder))
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create a temporary folder there ({exc.strerror or exc})") from exc


def check_disk_space(folder: str | os.PathLike[str], need: int, what: str) -> None:
    """Refuse early when ``folder``'s file system has less than ``need`` bytes free (``what``: what they are for)."""
    free = free_disk(folder)
    if free is not None and need > free:
        raise OutputError(f"{folder}: {what} need about {format_bytes(need)} of disk space, but only "
                          f"{format_bytes(free)} is free there")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it to ``path`` only if the block succeeds."""
    final = Path(path)
    remove_stale_temporaries(final.parent if str(final.parent) else ".")
    tmp = _partial_name(final)
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError(f"{final}: nothing was written")
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Like :func:`atomic_path` for a folder; an existing folder is replaced only on success."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(f".{final.name}{PARTIAL_TAG}", final.parent)
    try:
        yield tmp
        if final.exists():
            old = make_temp_dir(f".{final.name}.old{PARTIAL_TAG}", final.parent)  # a killed run's is swept
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _same_file(a: Path, b: Path) -> bool:
    return a.exists() and (a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b)))


def _probe_writable(out_path: Path, parent: Path) -> None:
    """Create and delete a file beside ``out_path``: the only test that holds for root, read-only mounts and /sys."""
    probe = parent / f".{out_path.name}{PARTIAL_TAG}{os.getpid()}-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise OutputError(f"{out_path}: cannot write in folder {parent} ({exc.strerror or exc})") from exc
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _is_zarr_output(path: Path) -> bool:
    """A Zarr folder output (``.zarr``/``.ome.zarr`` holding a ``.zgroup``): replaced whole on success, like a file."""
    return path.name.lower().endswith(".zarr") and (path / ".zgroup").is_file()


def check_output_path(out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]] = (),
                      models: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """Fail early (before any compute) when ``out`` cannot be written, is an input or a file of the model in use."""
    out_path = Path(out)
    parent = out_path.parent if str(out_path.parent) else Path(".")
    if out_path.is_dir() and not _is_zarr_output(out_path):
        raise OutputError(f"{out_path}: is a folder; give a file name")
    if not parent.is_dir():
        raise OutputError(f"{out_path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{out_path}: folder {parent} is not writable")
    for inp in inputs:
        if _same_file(Path(inp), out_path):
            raise OutputError(f"{out_path}: is the input file; refusing to overwrite an input")
    for model_file in models:
        if _same_file(Path(model_file), out_path):
            raise OutputError(f"{out_path}: is a file of the model being used; refusing to overwrite it")
    _probe_writable(out_path, parent)
    return out_path
