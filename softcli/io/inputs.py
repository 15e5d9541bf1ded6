"""Turning command-line INPUT arguments (files, folders, globs) into a list of image paths.

A bad argument does not stop the others: it becomes an :class:`InputItem` with
an ``error``, reported in its place, so a batch job over many files finishes
what it can.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: Files taken from a folder (any file named explicitly is tried, whatever its suffix).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".pbm",
                  ".pnm", ".jp2", ".j2k", ".ico", ".tga", ".svs", ".btf")

_GLOB_CHARS = set("*?[")


def display_path(path: str | os.PathLike[str]) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 (surrogate-escaped by Python) become ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def path_bytes(path: str | os.PathLike[str]) -> str | None:
    """The exact bytes of a file name, hex-encoded, when its text form had to be escaped; else None."""
    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.hex()
    return None


def safe_text(text: str) -> str:
    """``text`` as valid UTF-8: escaped file-name bytes become ``\\xNN``, other lone surrogates ``\\uNNNN``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_safe(obj: object) -> object:
    """``obj`` with every string made valid UTF-8 (:func:`safe_text`), so JSON of it always encodes."""
    if isinstance(obj, str):
        return safe_text(obj)
    if isinstance(obj, dict):
        return {json_safe(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


@dataclass(frozen=True)
class InputItem:
    """One image to process, or one argument that named none (``error`` says why)."""

    path: str
    error: str | None = None


def _folder_images(folder: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in sorted(files)
                     if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES))
    return found


def expand_inputs(args: Sequence[str | os.PathLike[str]]) -> list[InputItem]:
    """Files as given; folders → their image files (recursively, sorted); quoted globs → matches.

    Each file appears once, at its first mention. A missing file, a glob with no
    match or a folder with no images becomes an item with an ``error``.
    """
    items: list[InputItem] = []
    seen: set[str] = set()

    def add(p: Path) -> None:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            items.append(InputItem(str(p)))

    for arg in args:
        text = os.fspath(arg)
        p = Path(text)
        if p.is_dir():
            images = _folder_images(p)
            if not images:
                items.append(InputItem(text, "folder holds no images (looked for "
                                             + ", ".join(IMAGE_SUFFIXES[:5]) + ", …)"))
            for img in images:
                add(img)
        elif p.exists() or p.is_symlink():
            add(p)
        elif _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            for d in (Path(m) for m in matches if Path(m).is_dir()):
                files.extend(_folder_images(d))
            if not files:
                items.append(InputItem(text, "no file matches this pattern"))
            for f in files:
                add(f)
        else:
            items.append(InputItem(text, "no such file"))
    return items
