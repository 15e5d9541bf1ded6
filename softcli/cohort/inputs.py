"""What to process and what to call the results.

Inputs are expanded by :func:`~softcli.io.inputs.expand_inputs` (files as given,
folders recursively, quoted globs), plus list files with one path per line.
Output names follow the input stems; see :func:`output_names` for collisions.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ..io.inputs import InputItem, expand_inputs

#: Suffixes removed whole from a name to get its stem (``slide.ome.tif`` → ``slide``).
DOUBLE_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.btf")
#: Largest list file read (a list of 100 000 paths is a few MB).
MAX_LIST_BYTES = 64 * 2**20


def read_list_file(path: str | os.PathLike[str]) -> list[str]:
    """Paths from a list file: one per line; blank lines and lines starting with ``#`` are ignored.

    Relative paths are relative to the list file's folder, so a list travels with its data.
    """
    p = Path(path)
    try:
        if p.stat().st_size > MAX_LIST_BYTES:
            raise InputError(f"{p}: list file larger than {MAX_LIST_BYTES // 2**20} MB")
        text = p.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise InputError(f"{p}: cannot read the list file ({exc.strerror or exc})") from exc
    base = p.parent
    paths = []
    for line in text.splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            paths.append(entry if os.path.isabs(entry) else str(base / entry))
    return paths


def gather_inputs(args: Sequence[str | os.PathLike[str]], list_file: str | os.PathLike[str] | None = None,
                  out_dir: str | os.PathLike[str] | None = None) -> list[InputItem]:
    """Every input named by ``args`` and ``list_file``, each once, in the order given (bad ones carry an error).

    Files inside ``out_dir`` are left out: with the output folder inside an
    input folder, a rerun must not take the previous run's outputs as inputs.
    """
    named = [os.fspath(a) for a in args]
    if list_file is not None:
        named += read_list_file(list_file)
    items = expand_inputs(named)
    if out_dir is None:
        return items
    outside = os.path.realpath(out_dir) + os.sep
    return [i for i in items if i.error is not None or not os.path.realpath(i.path).startswith(outside)]


def input_stem(path: str | os.PathLike[str]) -> str:
    """``a/b/slide.ome.tif`` → ``slide``; ``a/b/photo.jpg`` → ``photo``."""
    name = Path(path).name
    for suffix in DOUBLE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def output_names(paths: Sequence[str]) -> list[str]:
    """One output base name per input path, unique within the run, independent of the input order.

    The name is the input's stem. When several inputs share a stem (compared
    case-insensitively, for case-insensitive file systems), every one of them is
    named ``STEM-XXXXXXXX`` instead, where ``XXXXXXXX`` is the first 8 hex digits
    of the SHA-256 of its absolute path: the same input always gets the same
    name in a run over the same set of inputs.
    """
    stems = [input_stem(p) for p in paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s.casefold()] = counts.get(s.casefold(), 0) + 1
    names = []
    for path, stem in zip(paths, stems):
        if counts[stem.casefold()] > 1:
            digest = hashlib.sha256(os.fsencode(os.path.abspath(path))).hexdigest()[:8]
            names.append(f"{stem}-{digest}")
        else:
            names.append(stem)
    return names
