"""Model specs: what a user can name, and what it resolves to.

A *model spec* is one of

- a registry name (``soft_tiny``; see :mod:`softcli.weights.registry`),
- ``hf-hub:ORG/REPO[@REVISION]`` (a branch, tag or commit on the Hugging Face Hub),
- a local folder (softcli layout) or checkpoint file.

Nothing here touches the network or imports torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import WeightsError
from .registry import COMMIT_RE, Registry, load_registry, revision_problem

HF_PREFIX = "hf-hub:"
REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ResolvedWeights:
    """Where a model spec's weights are on disk, and how they got there."""

    spec: str
    kind: str  # "registry", "hub" or "path"
    path: Path  # a file or a softcli folder, ready for read_checkpoint
    source: str  # "local", "hub" or "origin"
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    registry_name: str | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def hub_spec(repo_id: str, revision: str | None = None) -> str:
    """``hf-hub:ORG/REPO[@REV]``: how a Hub location is named in messages and pinned specs."""
    return f"{HF_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")


def check_revision(spec: str, revision: str) -> str:
    """``revision`` if it is a branch/tag name or a 40-hex commit; a clear error otherwise (no path is built first)."""
    why = revision_problem(revision)
    if why is not None:
        raise WeightsError(f"{spec}: {revision!r} is not a branch, tag or 40-hex commit ({why})", spec=spec)
    return revision


def check_commit(spec: str, commit: object) -> str:
    """The commit id a Hub (or the cache's refs/) gave, if it is 40 hex; it becomes a folder name."""
    if not isinstance(commit, str) or not COMMIT_RE.match(commit):
        raise WeightsError(f"{spec}: the Hub answered {str(commit)[:80]!r} as the commit id, not 40 hex digits; "
                           "refusing to use that answer", spec=spec)
    return commit


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/REPO[@REV]`` → (repo_id, revision or None)."""
    body = spec.removeprefix(HF_PREFIX)
    repo_id, at, revision = body.partition("@")
    if not REPO_RE.match(repo_id) or (at and not revision):
        raise WeightsError(f"{spec!r} is not a Hub model spec; expected hf-hub:ORG/REPO or hf-hub:ORG/REPO@REVISION",
                           spec=spec)
    if revision:
        check_revision(spec, revision)
    return repo_id, revision or None


def spec_kind(spec: str, registry: Registry | None = None) -> str:
    """``hub``, ``registry`` or ``path``: registry names win over same-named files (write ./NAME for those)."""
    if spec.startswith(HF_PREFIX):
        return "hub"
    registry = registry or load_registry()
    if spec in registry and os.sep not in spec and "/" not in spec:
        return "registry"
    return "path"
