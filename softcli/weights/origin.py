"""Official releases: a registry model rebuilt from the checkpoint the SOFT authors published.

When a registry model's Hub repo is missing or unreachable, its official
release (a Google Drive file) is downloaded, checked against the registry's
sha256 (or, when the registry has none yet, the sha256 of its first download
here), converted to the softcli layout and kept under
``$HF_HOME/softcli/origin/NAME`` with the sha256 of the converted weights,
which is checked again on every later use. This cache is softcli's own:
huggingface_hub has no notion of a converted non-Hub file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import OriginUnavailable, TamperedFile, WeightsError
from ..io.atomic import atomic_path
from ..io.hashing import sha256_file
from .config import ProgressFn, hf_home, origin_cache
from .gdrive import gdrive_download
from .hf import WEIGHTS_NAME
from .registry import SHA256_RE, RegistryEntry
from .spec import ResolvedWeights

ORIGIN_MANIFEST = "origin.json"
#: Where the official checkpoints are published (named in errors when one cannot be downloaded).
OFFICIAL_SITE = "https://github.com/fudan-zvg/SOFT"


def cached_origin(entry: RegistryEntry) -> ResolvedWeights | None:
    """A previous origin conversion, its sha256 checked now; None when there is none."""
    folder = origin_cache() / entry.name
    manifest = folder / ORIGIN_MANIFEST
    if not manifest.is_file():
        return None
    try:
        expected = json.loads(manifest.read_text())["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        expected = None
    weights = folder / WEIGHTS_NAME
    actual = sha256_file(weights) if weights.is_file() else None
    if expected is None or actual != expected:
        raise TamperedFile(f"{folder}: cached weights fail their sha256 check (damaged or edited); they must be "
                           "rebuilt", spec=entry.name)
    return ResolvedWeights(spec=entry.name, kind="registry", path=folder, source="origin", registry_name=entry.name,
                           sha256=actual)


def convert_origin(entry: RegistryEntry, checkpoint: Path, download_sha256: str) -> ResolvedWeights:
    """Store an official checkpoint converted, with the registry's architecture and a sha256 manifest.

    The registry decides what the weights cannot show (Norm vs plain attention,
    the stage-4 head count); every tensor shape is still checked against it.
    """
    folder = origin_cache() / entry.name
    origin = asdict(entry.origin) if entry.origin else {}
    from .publish import (
        convert_checkpoint,  # it builds the model: torch only when converting
    )

    convert_checkpoint(checkpoint, folder, name=entry.name, architecture=entry.architecture, repo_id=entry.hub.repo_id,
                       entry=entry, extra={"registry_name": entry.name, "converted_from": {
                           **origin, "file": checkpoint.name, "sha256": download_sha256}})
    weights_sha256 = sha256_file(folder / WEIGHTS_NAME)
    record = {"name": entry.name, "origin": origin, "download_sha256": download_sha256,
              "weights_sha256": weights_sha256,
              "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with atomic_path(folder / ORIGIN_MANIFEST) as tmp:  # written last: it marks the conversion complete
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return ResolvedWeights(spec=entry.name, kind="registry", path=folder, source="origin", registry_name=entry.name,
                           sha256=weights_sha256)


def _first_download_sha256(entry: RegistryEntry) -> str | None:
    """The official file's sha256 recorded when it was first downloaded here (for origins the registry has none).

    Once known, the file is pinned: a later (forced) download with other
    bytes is refused, just as a registry sha256 mismatch is.
    """
    try:
        digest = json.loads((origin_cache() / entry.name / ORIGIN_MANIFEST).read_text())["download_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return digest if isinstance(digest, str) and SHA256_RE.match(digest) else None


def fetch_origin(entry: RegistryEntry, progress: ProgressFn | None = None) -> ResolvedWeights:
    """Download, verify and convert a registry model from its official release."""
    o = entry.origin
    if o is None or not o.id:
        name = (o.official_name if o else None) or entry.name
        raise OriginUnavailable(f"the Google Drive id of the official {name} checkpoint is not recorded in the "
                                f"registry; download it from {OFFICIAL_SITE}", spec=entry.name)
    if o.kind != "gdrive":
        raise OriginUnavailable(f"{entry.name}: origin kind {o.kind!r} cannot be downloaded by this softcli "
                                "version", spec=entry.name)
    root = hf_home() / "softcli" / "downloads"
    root.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f"{entry.name}-", dir=root))
    try:
        file = tmpdir / f"{o.official_name or entry.name}.{o.format}"
        gdrive_download(o.id, file, progress=progress)
        digest = sha256_file(file)
        first = "its first download (recorded in origin.json)"
        expected, source = (o.sha256, "the registry") if o.sha256 else (_first_download_sha256(entry), first)
        if expected and digest != expected.lower():
            raise WeightsError(f"{entry.name}: the file from Google Drive has sha256 {digest}, {source} says "
                               f"{expected}; refusing to use it", spec=entry.name)
        return convert_origin(entry, file, digest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
