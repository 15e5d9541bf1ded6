"""Hashing files in bounded memory: one implementation for weights, backbone references and manifests."""

from __future__ import annotations

import hashlib
import os
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
