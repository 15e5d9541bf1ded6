"""Hashing files in bounded memory: one implementation for weights, backbone references and manifests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHUNK = 4 * 1024 * 1024


def hash_file(path: str | os.PathLike[str], h: Any) -> str:
    """Feed the file to the hashlib object ``h`` in chunks; its hex digest."""
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return str(h.hexdigest())


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The file's sha256 (hex)."""
    return hash_file(path, hashlib.sha256())


_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file_cached(path: str | os.PathLike[str]) -> str:
    """:func:`sha256_file`, remembered per (path, size, mtime) for this process: a cohort hashes its model once."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        _CACHE[key] = sha256_file(path)
    return _CACHE[key]


def weights_sha256(files: Iterable[str | os.PathLike[str]]) -> str:
    """SHA-256 of a model's files: of the file itself for one file, else over (name, file SHA-256) pairs."""
    paths = sorted({Path(f) for f in files if Path(f).is_file()}, key=lambda p: p.name)
    if len(paths) == 1:
        return sha256_file_cached(paths[0])
    digest = hashlib.sha256()
    for p in paths:
        digest.update(f"{p.name}\0{sha256_file_cached(p)}\n".encode())
    return digest.hexdigest()
