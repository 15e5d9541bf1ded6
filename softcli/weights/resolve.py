"""One entry point: a model spec → local weights (cache, Hub, official release, or a path).

A registry name uses a previous official-release conversion if there is one,
else softcli's Hub repo, else (Hub repo missing or unreachable) the official
release. ``hf-hub:`` specs use the Hub only; anything else is a local path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, HubUnavailable, WeightsError, WeightsNotCached
from ..io.hashing import sha256_file
from .config import ProgressFn, hub_cache, is_offline, origin_cache
from .hf import WEIGHTS_NAME, cached_snapshot, pull_hub
from .origin import ORIGIN_MANIFEST, cached_origin, fetch_origin
from .registry import RegistryEntry, load_registry
from .spec import ResolvedWeights, parse_hub_spec, spec_kind


def resolve_registry(entry: RegistryEntry, *, download: bool = True, force: bool = False,
                     progress: ProgressFn | None = None) -> ResolvedWeights:
    """Weights for a registry name: softcli's Hub repo, else the converted official release."""
    if not force:
        cached = cached_origin(entry)
        if cached:
            return cached
    hub = entry.hub
    try:
        folder, commit = pull_hub(hub.repo_id, hub.revision, force=force, local_only=not download)
        path = folder / hub.filename if (folder / hub.filename).is_file() else folder
        return ResolvedWeights(spec=entry.name, kind="registry", path=path, source="hub", repo_id=hub.repo_id,
                               revision=hub.revision, commit=commit, registry_name=entry.name)
    except HubUnavailable as exc:
        hub_error = exc
    if not download or is_offline():
        why = "HF_HUB_OFFLINE=1 forbids downloads" if is_offline() else "downloads are off here"
        raise WeightsNotCached(f"{entry.name}: its weights are not in the cache ({hub_cache()}) and {why}",
                               spec=entry.name) from hub_error
    try:
        return fetch_origin(entry, progress=progress)
    except WeightsError as exc:
        raise WeightsNotCached(f"{entry.name}: {hub_error.reason}, and the official release could not be used "
                               f"either: {exc}", spec=entry.name) from exc


def resolve_weights(spec: str | os.PathLike[str] | None, *, download: bool = True, force: bool = False,
                    progress: ProgressFn | None = None) -> ResolvedWeights:
    """Find (downloading when allowed) the weights a model spec names.

    ``None`` means the registry's default model; a ``Path`` object is always a
    local path. ``download=False`` never touches the network: the answer comes
    from the caches or fails.
    """
    registry = load_registry()
    if spec is None:
        spec = registry.default
    is_str = isinstance(spec, str)
    kind = spec_kind(spec, registry) if isinstance(spec, str) else "path"  # a Path object is always a path
    spec = os.fspath(spec)
    if kind == "hub":
        repo_id, revision = parse_hub_spec(spec)
        folder, commit = pull_hub(repo_id, revision, force=force, local_only=not download)
        return ResolvedWeights(spec=spec, kind="hub", path=folder, source="hub", repo_id=repo_id,
                               revision=revision or "main", commit=commit)
    if kind == "registry":
        return resolve_registry(registry.get(spec), download=download, force=force, progress=progress)
    path = Path(spec).expanduser()
    if not path.exists():
        if not is_str or "/" in spec or os.sep in spec or path.suffix:
            raise CheckpointError(f"{path}: no such file or folder")
        raise registry.unknown(spec, "not a registry name, not hf-hub:ORG/REPO, and no such file or folder")
    return ResolvedWeights(spec=spec, kind="path", path=path, source="local")


def is_cached(entry: RegistryEntry) -> bool:
    """Whether a registry model can be used without the network (no sha256 work done here)."""
    if (origin_cache() / entry.name / ORIGIN_MANIFEST).is_file():
        return True
    return cached_snapshot(entry.hub.repo_id, entry.hub.revision) is not None


def checkpoint_summary(path: Path) -> dict[str, Any]:
    """Format, architecture, parameter count, labels and sha256 of a checkpoint file or folder."""
    from ..checkpoint import read_checkpoint

    ck = read_checkpoint(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    provenance = ck.extra.get("converted_from")
    return {"format": ck.format, "architecture": ck.config.to_dict(),
            "params": sum(int(t.numel()) for k, t in ck.state_dict.items() if "running_" not in k
                          and "num_batches_tracked" not in k),
            "labels": len(ck.labels) if ck.labels else 0, "pretrained_cfg": ck.pretrained_cfg,
            "weights_file": str(weights) if weights.is_file() else None,
            "sha256": sha256_file(weights) if weights.is_file() else None,
            **({"converted_from": provenance} if provenance else {}),
            **{k: ck.extra[k] for k in FITTED_KEYS if k in ck.extra}}


#: What a checkpoint made by ``soft fit`` adds to config.json (see softcli.fit), shown by ``soft weights info``.
FITTED_KEYS = ("task", "head", "class_names", "backbone", "fit")


def weights_info(spec: str) -> dict[str, Any]:
    """What a model spec is and whether it is usable offline; never touches the network."""
    registry = load_registry()
    out: dict[str, Any] = {"spec": spec, "kind": spec_kind(spec, registry)}
    if out["kind"] == "registry":
        out["registry"] = registry.get(spec).to_dict()
    try:
        res = resolve_weights(spec, download=False)
    except WeightsError:
        if out["kind"] == "path":
            raise
        out.update(cached=False, why="not in the cache")
    else:
        out.update(cached=res.source != "local", resolved=res.to_dict(), checkpoint=checkpoint_summary(res.path))
    return out
