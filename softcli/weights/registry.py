"""The registry of named SOFT models: data, not code.

One file, ``softcli/data/registry.json`` (``weights/registry.json`` in the
source tree links to it), ships inside the package so a pip install has it.
Each entry names the architecture, the paper's ImageNet top-1, where softcli's
converted weights live on the Hugging Face Hub, and the official release
origin the weights can be rebuilt from when that Hub repo is missing.

``SOFTCLI_REGISTRY=/path/registry.json`` replaces the built-in registry (for a
private model zoo, or tests).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import RegistryError, UnknownModel

REGISTRY_ENV = "SOFTCLI_REGISTRY"
ORIGIN_KINDS = ("gdrive", "url")
ORIGIN_FORMATS = ("pth", "pth.tar", "safetensors")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def revision_problem(revision: str) -> str | None:
    """Why ``revision`` is not a branch/tag name or a 40-hex commit (None when it is one).

    The rules are git's (``git check-ref-format``): a revision later becomes a
    file name under the cache's ``refs/`` and part of a URL, so ``/tmp/x``,
    ``../../x``, ``a//b`` or control characters must never get that far.
    """
    if not isinstance(revision, str) or not revision:
        return "it is empty"
    if COMMIT_RE.match(revision):
        return None
    if len(revision) > 255:
        return "it is longer than 255 characters"
    if _REF_FORBIDDEN.search(revision):
        return "it contains a space, a control character or one of ~ ^ : ? * [ \\"
    if revision.startswith(("/", "-")) or revision.endswith(("/", ".")):
        return "it starts with '/' or '-', or ends with '/' or '.'"
    if ".." in revision or "//" in revision or "@{" in revision or revision == "@":
        return "it contains '..', '//' or '@{'"
    if any(part.startswith(".") or part.endswith(".lock") for part in revision.split("/")):
        return "a part of it starts with '.' or ends with '.lock'"
    return None


@dataclass(frozen=True)
class HubLocation:
    repo_id: str
    filename: str = "model.safetensors"
    revision: str = "main"


@dataclass(frozen=True)
class Origin:
    """Where the official checkpoint was released (``id`` None: not recorded)."""

    kind: str
    format: str
    id: str | None = None
    official_name: str | None = None
    sha256: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    architecture: dict[str, Any]
    params: int
    top1: float | None
    hub: HubLocation
    origin: Origin | None
    description: str = ""
    top1_source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        out = asdict(self)
        out.update(out.pop("extra"))
        return out


@dataclass(frozen=True)
class Registry:
    default: str
    entries: dict[str, RegistryEntry]
    source: str

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def get(self, name: str) -> RegistryEntry:
        try:
            return self.entries[name]
        except KeyError as exc:
            raise self.unknown(name) from exc

    def unknown(self, name: str, what: str = "not a registry name") -> UnknownModel:
        """The error for a name it does not know, suggesting the closest known names (difflib)."""
        close = difflib.get_close_matches(name, list(self.entries), n=3, cutoff=0.6)
        named = ", ".join(close[:-1]) + " or " + close[-1] if len(close) > 1 else "".join(close)
        hint = f"; did you mean {named}?" if close else f"; known: {', '.join(self.entries)}"
        return UnknownModel(f"unknown model {name!r}: {what}{hint}", spec=name, suggestions=close)


def _bad(source: str, what: str) -> RegistryError:
    return RegistryError(f"{source}: bad registry ({what})")


def _entry(name: str, raw: Any, source: str) -> RegistryEntry:
    if not isinstance(raw, dict):
        raise _bad(source, f"entry {name!r} is not an object")
    if not NAME_RE.match(name):  # it names a cache folder: no '/', '..' or leading '.'
        raise _bad(source, f"model name {name!r} must be letters, digits, '_', '-' or '.', not starting with '.'")
    try:
        arch = raw["architecture"]
        hub = HubLocation(**raw["hub"])
        if not isinstance(arch, dict) or "/" not in hub.repo_id:
            raise ValueError("architecture must be an object and hub.repo_id ORG/NAME")
        if not NAME_RE.match(hub.filename):
            raise ValueError(f"hub.filename {hub.filename!r} must be a file name in the repo's top folder")
        if (why := revision_problem(hub.revision)) is not None:
            raise ValueError(f"hub.revision {hub.revision!r} is not a branch, tag or commit: {why}")
        origin = None
        if raw.get("origin") is not None:
            origin = Origin(**raw["origin"])
            if origin.kind not in ORIGIN_KINDS or origin.format not in ORIGIN_FORMATS:
                raise ValueError(f"origin kind must be one of {ORIGIN_KINDS}, format one of {ORIGIN_FORMATS}")
            if origin.sha256 is not None and not SHA256_RE.match(str(origin.sha256)):
                raise ValueError("origin.sha256 must be 64 lowercase hex digits or null")
            if origin.official_name is not None and not NAME_RE.match(str(origin.official_name)):
                raise ValueError("origin.official_name must be a plain file name (no '/', not starting with '.')")
        top1 = raw.get("top1")
        known = {"architecture", "hub", "origin", "params", "top1", "description", "top1_source"}
        return RegistryEntry(name=name, architecture=dict(arch), params=int(raw["params"]),
                             top1=None if top1 is None else float(top1), hub=hub, origin=origin,
                             description=str(raw.get("description", "")), top1_source=raw.get("top1_source"),
                             extra={k: v for k, v in raw.items() if k not in known})
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(source, f"entry {name!r}: {exc}") from exc


def parse_registry(text: str, source: str) -> Registry:
    """Parse and validate registry JSON; every problem names the file and entry."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(source, f"invalid JSON: {exc.msg} at line {exc.lineno}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict) or not data["models"]:
        raise _bad(source, "expected an object with a non-empty 'models' object")
    entries = {name: _entry(name, raw, source) for name, raw in data["models"].items()}
    default = data.get("default") or next(iter(entries))
    if default not in entries:
        raise _bad(source, f"default {default!r} is not one of its models")
    return Registry(default=default, entries=entries, source=source)


@lru_cache(maxsize=4)
def _load(path: str | None) -> Registry:
    if path:
        p = Path(path)
        try:
            return parse_registry(p.read_text(encoding="utf-8"), str(p))
        except OSError as exc:
            raise RegistryError(f"{p}: cannot read registry ({exc.strerror}); check {REGISTRY_ENV}") from exc
    ref = resources.files("softcli") / "data" / "registry.json"
    return parse_registry(ref.read_text(encoding="utf-8"), "softcli/data/registry.json")


def load_registry() -> Registry:
    """The active registry: ``$SOFTCLI_REGISTRY`` if set, else the one shipped with softcli."""
    return _load(os.environ.get(REGISTRY_ENV) or None)
