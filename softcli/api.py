"""The Python API: build or load a SOFT model in one call."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, build_model, read_checkpoint
from .models import LandmarkPolicy, SoftConfig, SoftModel, create_soft


def create_model(name_or_config: str | Mapping[str, Any] | SoftConfig, num_classes: int | None = 1000,
                 **overrides: Any) -> SoftModel:
    """A freshly initialised SOFT model (eval mode).

    ``name_or_config`` is a variant name (``soft_tiny`` … ``soft_norm_huge``), a
    config dict as in the official configs, or a :class:`SoftConfig`.
    """
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    return create_soft(name_or_config, **overrides).eval()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device must exist."""
    from .errors import ParameterError

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ParameterError(f"unknown `device` {device!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError("`device` cuda asked for, but PyTorch sees no CUDA GPU here")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ParameterError("`device` mps asked for, but MPS is not available here")
    return dev


def load_model(path: str | os.PathLike[str] | None, device: str | torch.device = "cpu", *, use_ema: bool = False,
               landmarks: LandmarkPolicy | str | int | None = None) -> SoftModel:
    """Load an official or softcli checkpoint and return the model in eval mode.

    ``path`` is any model spec: a registry name (``soft_tiny``), a Hub repo
    (``hf-hub:ORG/REPO[@REV]``, downloaded into the Hugging Face cache), a
    ``.pth``/``.pth.tar``/``.safetensors`` file or a folder with
    ``model.safetensors`` + ``config.json``; ``None``: the registry's default
    model. ``forward(x)`` on (B, 3, H, W)
    returns logits; ``forward_features(x)`` the four stage maps.
    """
    from .backbone_ref import SEGMENTATION, attach_backbone
    from .errors import SegmentationCheckpoint
    from .weights import resolve_weights

    resolved = resolve_weights(path)
    ck = read_checkpoint(resolved.path, use_ema=use_ema)
    if ck.extra.get("task") == SEGMENTATION:
        raise SegmentationCheckpoint(f"{ck.source}: a segmentation checkpoint, not a classifier or backbone")
    ck = attach_backbone(ck, lambda spec: Path(resolve_weights(spec).path))
    model = build_model(ck, resolve_device(device))
    model.spec = resolved.spec  # type: ignore[assignment]  # how it was asked for: outputs record it (softcli.io.provenance)
    use_landmarks(model, landmarks, ck)
    return model


#: config.json entry of a fitted head: the landmark policy its training features were extracted with.
FITTED_LANDMARKS_KEY = "landmarks"


def fitted_landmarks(ck: Checkpoint) -> LandmarkPolicy | None:
    """The landmark policy ``soft fit`` trained the checkpoint's head with (None: not a fitted head, or older)."""
    from .errors import CheckpointError

    text = ck.extra.get(FITTED_LANDMARKS_KEY)
    if text is None:
        return None
    try:
        return LandmarkPolicy.parse(text)
    except ValueError as exc:
        raise CheckpointError(f"{ck.source}: bad {FITTED_LANDMARKS_KEY!r} entry in its config ({exc})") from exc


def use_landmarks(model: SoftModel, asked: LandmarkPolicy | str | int | None, ck: Checkpoint) -> str:
    """Set ``model``'s landmark policy: ``asked``, else the one its head was fitted with, else the default.

    Returns where it came from (``"asked"``, ``"fitted"`` or ``"default"``), also
    kept as ``model.landmarks_source``; ``model.fitted_landmarks`` is the fitted one
    (or None), so a caller can say when ``asked`` overrides it.
    """
    fitted = fitted_landmarks(ck)
    chosen = landmark_policy(asked) if asked is not None else fitted
    source = "asked" if asked is not None else "fitted" if fitted is not None else "default"
    if chosen is not None:
        model.set_landmark_policy(chosen)
    model.fitted_landmarks = fitted  # type: ignore[assignment]
    model.landmarks_source = source  # type: ignore[assignment]
    return source


def landmarks_summary(model: SoftModel) -> dict[str, Any]:
    """For ``--json``: the policy a model runs with, where it came from, and the fitted one if ``asked`` overrode it."""
    fitted = getattr(model, "fitted_landmarks", None)
    out: dict[str, Any] = {"policy": str(model.landmark_policy),
                           "source": getattr(model, "landmarks_source", "default")}
    if fitted is not None and fitted != model.landmark_policy:
        out["fitted"] = str(fitted)
    return out


def landmark_policy(value: LandmarkPolicy | str | int) -> LandmarkPolicy:
    """``--landmarks`` / ``landmarks=`` (auto, official or a budget N) → a policy; a bad value is a usage error."""
    from .errors import ParameterError
    from .models.landmarks import POLICY_CHOICES

    if isinstance(value, LandmarkPolicy):
        return value
    try:
        return LandmarkPolicy.parse(value)
    except ValueError as exc:
        raise ParameterError(f"`landmarks` takes {POLICY_CHOICES}, not {value!r}") from exc
