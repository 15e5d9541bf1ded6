"""Write outputs under a temporary name and rename them into place when complete.

An interrupted job (Ctrl-C, out of memory, a crash) then never leaves a file
that looks finished: the partial file has a ``.partial`` name and is removed
on the way out when Python still can.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import OutputError

PARTIAL_TAG = ".partial-"


def _partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{PARTIAL_TAG}{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it to ``path`` only if the block succeeds."""
    final = Path(path)
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{PARTIAL_TAG}", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_path(out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """Fail early (before any compute) when ``out`` cannot be written or is an input."""
    out_path = Path(out)
    parent = out_path.parent if str(out_path.parent) else Path(".")
    if out_path.is_dir():
        raise OutputError(f"{out_path}: is a folder; give a file name")
    if not parent.is_dir():
        raise OutputError(f"{out_path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{out_path}: folder {parent} is not writable")
    resolved = out_path.resolve()
    for inp in inputs:
        p = Path(inp)
        if p.exists() and (p.resolve() == resolved or (out_path.exists() and os.path.samefile(p, out_path))):
            raise OutputError(f"{out_path}: is the input file; refusing to overwrite an input")
    return out_path
