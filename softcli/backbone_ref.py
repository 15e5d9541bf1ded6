"""Head-only checkpoints: a fitted head whose frozen backbone is referenced by sha256, not copied.

``soft fit`` writes a softcli folder whose ``model.safetensors`` holds only
``head.*`` and whose config.json says which backbone the head was fitted on::

    "backbone": {"spec": "soft_tiny", "kind": "registry", "sha256": "…", "file": "model.safetensors"}

:func:`attach_backbone` turns such a checkpoint into a complete one: it finds
the backbone through the caller's resolver (registry name, ``hf-hub:`` spec or
path, exactly as ``--model`` would), refuses it unless its weights file has
the recorded sha256, and merges the two state dicts into the layout the task
expects (``backbone.*`` + ``head.*`` for segmentation; the backbone with its
ImageNet head replaced for classification). Nothing here touches the network
itself: the resolver does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from .checkpoint import WEIGHTS_NAME, Checkpoint, read_checkpoint
from .errors import CheckpointError
from .io.hashing import sha256_file

BACKBONE_KEY = "backbone"
SEGMENTATION = "segmentation"
CLASSIFICATION = "classification"
#: Reference kinds another machine can resolve (a local path is only valid here).
PORTABLE_KINDS = ("registry", "hub")

Resolver = Callable[[str], Path]


def weights_file(path: Path) -> Path:
    """The file whose bytes a reference hashes: a folder's ``model.safetensors``, or the file itself."""
    if path.is_dir():
        candidate = path / WEIGHTS_NAME
        if candidate.is_file():
            return candidate
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME} to take as the backbone")
    return path


def backbone_reference(spec: str, kind: str, resolved: Path) -> dict[str, Any]:
    """The config.json entry naming a backbone: how it was asked for, and the sha256 of its weights."""
    file = weights_file(resolved)
    ref: dict[str, Any] = {"spec": spec, "kind": kind, "sha256": sha256_file(file), "file": file.name}
    if kind == "path":
        ref["spec"] = str(Path(spec).expanduser().resolve())
    return ref


def reference_of(ck: Checkpoint) -> Mapping[str, Any] | None:
    ref = ck.extra.get(BACKBONE_KEY)
    return ref if isinstance(ref, Mapping) else None


def needs_backbone(ck: Checkpoint) -> bool:
    """A head-only checkpoint: a backbone reference and no backbone weights of its own."""
    if reference_of(ck) is None:
        return False
    if ck.extra.get("task") == SEGMENTATION:
        return not any(k.startswith("backbone.") for k in ck.state_dict)
    return not any(k.startswith("stages.") for k in ck.state_dict)


def check_publishable(ck: Checkpoint) -> None:
    """A head-only checkpoint must reference a backbone others can fetch (a registry name or a Hub repo)."""
    ref = reference_of(ck)
    if ref is not None and needs_backbone(ck) and ref.get("kind") not in PORTABLE_KINDS:
        raise CheckpointError(f"{ck.source}: its backbone is the local file {ref.get('spec')}, which nobody "
                              "else can fetch; fit again with a registry or hf-hub: backbone, or with `bundle`")


def attach_backbone(ck: Checkpoint, resolve: Resolver) -> Checkpoint:
    """``ck`` itself when it is complete; else ``ck`` merged with its referenced, sha256-checked backbone."""
    if not needs_backbone(ck):
        return ck
    ref = reference_of(ck)
    assert ref is not None
    spec, want = ref.get("spec"), ref.get("sha256")
    if not isinstance(spec, str) or not isinstance(want, str):
        raise CheckpointError(f"{ck.source}: the 'backbone' entry needs 'spec' and 'sha256' strings")
    try:
        path = resolve(spec)
    except CheckpointError as exc:
        raise CheckpointError(f"{ck.source}: its backbone {spec} cannot be found ({exc.template})") from exc
    got = sha256_file(weights_file(path))
    if got != want:
        raise CheckpointError(f"{ck.source}: the backbone {spec} has sha256 {got[:12]}…, the head was fitted on "
                              f"{want[:12]}…; fit the head again on these weights, or use the original ones")
    base = read_checkpoint(path)
    if ck.extra.get("task") == SEGMENTATION:
        state = {f"backbone.{k}": v for k, v in base.state_dict.items()}
        state.update({k: v for k, v in ck.state_dict.items() if k.startswith("head.")})
        return replace(ck, state_dict=state, config=base.config)
    if ck.extra.get("task") == CLASSIFICATION:
        state = {k: v for k, v in base.state_dict.items() if not k.startswith("head.")}
        state.update({k: v for k, v in ck.state_dict.items() if k.startswith("head.")})
        if "head.weight" not in state:
            raise CheckpointError(f"{ck.source}: a classification head needs head.weight")
        classes = int(state["head.weight"].shape[0])
        config = replace(base.config, num_classes=classes)
        return replace(ck, state_dict=state, config=config)
    raise CheckpointError(f"{ck.source}: a backbone reference for an unknown task {ck.extra.get('task')!r}")
