"""Which model made an output, recorded in every output format that holds metadata.

Three fields, the same in every format:

- ``model``: how the model was asked for: a registry name (``soft_tiny``),
  ``hf-hub:ORG/REPO[@REV]``, or the path given; a model built in memory is
  named by its weights file, else ``"<in memory>"``.
- ``weights_sha256``: the full SHA-256 (64 hex digits) that the cohort manifest
  records for the same model (:func:`~softcli.io.hashing.weights_sha256`): of the
  weights file alone, or, when a ``config.json`` sits beside it, of the (file name,
  SHA-256) pairs of both. Empty for a model with no file (built in memory).
- ``softcli_version``.

Where they go: safetensors ``__metadata__``, the npz member ``metadata.npy`` (a
JSON string), the ``.npy`` sidecar ``NAME.meta.json``, the OME-TIFF description,
the ``softcli`` attribute of an OME-Zarr root, a mask's legend JSON and PNG text,
and the GeoJSON collection and each feature's ``properties.metadata``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from .hashing import weights_sha256

IN_MEMORY = "<in memory>"


@dataclass(frozen=True)
class Provenance:
    """Model name, weights SHA-256 and softcli version of one run."""

    model: str
    weights_sha256: str
    softcli_version: str = __version__

    def to_strings(self) -> dict[str, str]:
        """The fields as string metadata (what safetensors, TIFF and PNG text hold)."""
        return {"model": self.model, "weights_sha256": self.weights_sha256, "softcli_version": self.softcli_version}


def provenance(model_name: str | os.PathLike[str] | None, files: Iterable[str | os.PathLike[str]]) -> Provenance:
    """The provenance of a model asked for as ``model_name`` whose files (weights, config.json) are ``files``."""
    existing = [Path(f) for f in files if Path(f).is_file()]
    name = os.fspath(model_name) if model_name is not None else (str(existing[0]) if existing else IN_MEMORY)
    return Provenance(name, weights_sha256(existing) if existing else "")
