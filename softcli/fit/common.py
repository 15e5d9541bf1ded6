"""What both ``soft fit`` tasks share: the frozen backbone and its reference, the output folder, progress."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..backbone_ref import backbone_reference
from ..checkpoint import CONFIG_NAME, Checkpoint, build_model, read_checkpoint
from ..errors import CheckpointError, OutputError
from ..models import LandmarkPolicy, SoftModel

#: ``progress(phase, done, total)``; phases: "features" (tiles or images), "fit" (solver steps).


@dataclass
class Backbone:
    model: SoftModel
    checkpoint: Checkpoint
    reference: dict[str, Any]  # config.json "backbone" entry (spec, kind, sha256, file)


def load_backbone(spec: str | os.PathLike[str] | None, device: torch.device,
                  landmarks: LandmarkPolicy | str | int | None = None) -> Backbone:
    """The frozen backbone for ``--model``/``--weights`` (default: the registry's default model) and its reference.

    ``landmarks``: the policy its features are extracted with (None: the default,
    auto); :func:`fit_extra` records it with the head, which then runs with it.
    """
    from ..api import landmark_policy
    from ..weights import resolve_weights

    policy = landmark_policy(landmarks) if landmarks is not None else LandmarkPolicy()  # a bad value: before loading

    res = resolve_weights(spec)
    ck = read_checkpoint(res.path)
    if ck.extra.get("task") or ck.extra.get("backbone"):
        raise CheckpointError(f"{ck.source}: a fitted {ck.extra.get('task') or 'head'} checkpoint; fit on a "
                              "backbone (a registry name, hf-hub: repo or SOFT weights file) instead")
    model = build_model(ck, device)
    model.set_landmark_policy(policy)
    model.requires_grad_(False)
    kind = "path" if res.kind == "path" else res.kind
    spec_text = res.spec if res.kind != "hub" else f"hf-hub:{res.repo_id}@{res.commit}"
    return Backbone(model, ck, backbone_reference(spec_text, kind, Path(res.path)))


def check_out_dir(out: str | os.PathLike[str], data: str | os.PathLike[str]) -> Path:
    """Fail before any compute when ``--out`` would clobber something that is not a softcli folder, or the data."""
    dest = Path(out)
    src = Path(data).resolve()
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"`out` {dest} is a file; give a folder")
    if dest.resolve() == src or src in dest.resolve().parents or dest.resolve() in src.parents:
        raise OutputError(f"`out` {dest} overlaps the training data {data}; choose another folder")
    if dest.is_dir() and any(dest.iterdir()):
        try:
            ours = json.loads((dest / CONFIG_NAME).read_text()).get("format") == "softcli"
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise OutputError(f"`out` {dest} is a folder with other files in it; give a new or empty folder")
    parent = dest.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"`out` {dest}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"`out` {dest}: folder {parent} is not writable")
    return dest


def fit_extra(bb: Backbone) -> dict[str, Any]:
    """config.json entries every fitted head has: the landmark policy of its training features."""
    from ..api import FITTED_LANDMARKS_KEY

    return {FITTED_LANDMARKS_KEY: str(bb.model.landmark_policy)}


def fit_record(data: str | os.PathLike[str], seed: int, val: float, **more: Any) -> dict[str, Any]:
    """The config.json ``fit`` entry: how the head was made (not needed to use it)."""
    return {"data": str(Path(data).resolve()), "seed": seed, "val": val, "softcli": __version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **more}


def verify_loadable(folder: Path) -> None:
    """Load a checkpoint folder the way ``soft segment``/``soft classify`` would (for ``soft weights push``)."""
    from ..backbone_ref import attach_backbone, check_publishable
    from ..segment import is_segmentation_checkpoint, segmenter_from_checkpoint
    from ..weights import resolve_weights

    ck = read_checkpoint(folder)
    check_publishable(ck)
    ck = attach_backbone(ck, lambda spec: Path(resolve_weights(spec).path))
    if is_segmentation_checkpoint(ck):
        segmenter_from_checkpoint(ck)
    else:
        build_model(ck)
