"""Segmentation checkpoints: a SOFT backbone + head saved as a softcli folder, and loaded back.

Their config.json adds ``task: "segmentation"``, the head config, class names and a palette.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..backbone_ref import attach_backbone
from ..checkpoint import (
    CONFIG_NAME,
    FORMAT_TAG,
    IMAGENET_PRETRAINED_CFG,
    WEIGHTS_NAME,
    Checkpoint,
    build_model,
    read_checkpoint,
)
from ..errors import CheckpointError
from ..io.atomic import atomic_dir
from ..models.linear_head import LinearHeadConfig, LinearSegHead
from ..models.segmentation import HeadConfig, SemanticFPNHead, SoftSegmenter, default_palette

if TYPE_CHECKING:
    from ..weights.spec import ResolvedWeights

TASK = "segmentation"
HEAD_TYPE = "semantic_fpn"
SEG_META_KEY = "segmentation"
SCORE_STRIDE = 4

#: ``progress(phase, done, total)``; phases: "fit" (cluster sampling), "label" (tiles), "write" (mask tiles).


# -- checkpoints --------------------------------------------------------------------------------

@dataclass
class SegmenterInfo:
    """What a segmentation checkpoint says beyond its weights."""

    class_names: list[str]
    palette: list[list[int]]
    pretrained_cfg: dict[str, Any] = field(default_factory=lambda: dict(IMAGENET_PRETRAINED_CFG))
    source: str = ""


def _check_names_palette(names: Sequence[str], palette: Sequence[Sequence[int]], k: int, where: str) -> None:
    if len(names) != k or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{where}: 'class_names' must be {k} strings (the head has {k} classes)")
    if len(palette) != k or not all(isinstance(c, (list, tuple)) and len(c) == 3 and
                                    all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in palette):
        raise CheckpointError(f"{where}: 'palette' must be {k} [r, g, b] triples of integers 0-255")


def save_segmenter(model: SoftSegmenter, out_dir: str | os.PathLike[str], class_names: Sequence[str],
                   palette: Sequence[Sequence[int]] | None = None,
                   pretrained_cfg: Mapping[str, Any] | None = None, *,
                   backbone_ref: Mapping[str, Any] | None = None,
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write a segmentation checkpoint in the softcli folder layout, atomically.

    ``model.safetensors`` holds ``backbone.*`` (our key layout) and ``head.*``;
    config.json is a softcli config (``model_config`` = the backbone) plus
    ``task``, ``head``, ``class_names`` and ``palette``. With ``backbone_ref``
    (see :mod:`softcli.backbone_ref`) only ``head.*`` is written and the
    backbone is referenced by sha256; ``extra`` adds config.json entries.
    """
    from safetensors.torch import save_file

    k = model.num_classes
    palette = [list(map(int, c)) for c in (palette if palette is not None else default_palette(k))]
    _check_names_palette(list(class_names), palette, k, str(out_dir))
    backbone_cfg = model.backbone.config.to_dict()
    pre = dict(pretrained_cfg or getattr(model.backbone, "pretrained_cfg", None) or IMAGENET_PRETRAINED_CFG)
    head_type = getattr(model.head, "head_type", HEAD_TYPE)
    config = {"architecture": "soft", "format": FORMAT_TAG, "model_config": backbone_cfg, "labels": None,
              "pretrained_cfg": pre, "task": TASK, "head": {"type": head_type, **model.head.config.to_dict()},
              "class_names": list(class_names), "palette": palette, **dict(extra or {})}
    state = {k_: v.detach().to("cpu").contiguous() for k_, v in model.state_dict().items()}
    if backbone_ref is not None:
        config["backbone"] = dict(backbone_ref)
        state = {k_: v for k_, v in state.items() if k_.startswith("head.")}
    with atomic_dir(out_dir) as tmp:
        # The metadata repeats the segmentation part of config.json, so a lone .safetensors file is complete.
        seg_meta = {k: config[k] for k in ("task", "head", "class_names", "palette") + (
            ("backbone",) if backbone_ref is not None else ())}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT_TAG, "config": json.dumps(backbone_cfg),
                                                            SEG_META_KEY: json.dumps(seg_meta)})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


def _read_segmentation_metadata(ck: Checkpoint) -> None:
    """A lone .safetensors file has no config.json: take task/head/names/palette from its metadata."""
    if ck.extra.get("task") or not ck.source.lower().endswith(".safetensors"):
        return
    from safetensors import safe_open

    try:
        with safe_open(ck.source, framework="pt") as fh:
            text = (fh.metadata() or {}).get(SEG_META_KEY)
        data = json.loads(text) if text else None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{ck.source}: unreadable segmentation metadata ({exc})") from exc
    if isinstance(data, Mapping):
        ck.extra = {**data, **ck.extra}


def is_segmentation_checkpoint(ck: Checkpoint) -> bool:
    return ck.extra.get("task") == TASK or any(k.startswith("head.lateral.") for k in ck.state_dict)


def _infer_head_config(sd: Mapping[str, Tensor], source: str) -> HeadConfig:
    """Head architecture from weight shapes (checkpoints without config); GroupNorm groups assumed default."""
    try:
        return HeadConfig(num_classes=int(sd["head.classifier.weight"].shape[0]),
                          fpn_channels=int(sd["head.lateral.0.weight"].shape[0]),
                          channels=int(sd["head.classifier.weight"].shape[1]))
    except KeyError as exc:
        raise CheckpointError(f"{source}: segmentation head incomplete (no {exc.args[0]})") from exc


def resolve_checkpoint_path(spec: str | os.PathLike[str] | ResolvedWeights | None) -> Path:
    """A model spec (registry name, hf-hub:ORG/REPO[@REV], folder or file) → a local checkpoint path.

    A spec resolved already (:class:`~softcli.weights.spec.ResolvedWeights`, as a cohort passes it) is not
    looked up again.
    """
    from ..weights import resolve_weights
    from ..weights.spec import ResolvedWeights

    return Path(spec.path if isinstance(spec, ResolvedWeights) else resolve_weights(spec).path)


def load_segmenter(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[SoftSegmenter,
                                                                                               SegmenterInfo]:
    """Load a segmentation checkpoint (softcli folder, safetensors or .pth with backbone.* + head.*)."""
    ck = attach_backbone(read_checkpoint(path), resolve_checkpoint_path)
    return segmenter_from_checkpoint(ck, device)


def segmenter_from_checkpoint(ck: Checkpoint, device: str | torch.device = "cpu") -> tuple[SoftSegmenter,
                                                                                           SegmenterInfo]:
    """Build a :class:`SoftSegmenter` from a checkpoint read by :func:`read_checkpoint`, checking every shape."""
    _read_segmentation_metadata(ck)
    if not is_segmentation_checkpoint(ck):
        what = "a classification" if ck.extra.get("task") == "classification" else "a backbone"
        raise CheckpointError(f"{ck.source}: {what} checkpoint with no segmentation head; "
                              "use `clusters=K` to segment without one")
    backbone_sd = {k[len("backbone."):]: v for k, v in ck.state_dict.items() if k.startswith("backbone.")}
    head_sd = {k[len("head."):]: v for k, v in ck.state_dict.items() if k.startswith("head.")}
    other = [k for k in ck.state_dict if not k.startswith(("backbone.", "head."))]
    if other:
        raise CheckpointError(f"{ck.source}: unexpected key {other[0]} in a segmentation checkpoint "
                              "(expected backbone.* and head.*)")
    backbone = build_model(Checkpoint(backbone_sd, ck.config, ck.source, ck.format, None, ck.pretrained_cfg), "cpu")
    head_meta = ck.extra.get("head")
    head_type = head_meta.get("type", HEAD_TYPE) if isinstance(head_meta, Mapping) else HEAD_TYPE
    head_kinds: dict[str, tuple[Any, Any]] = {HEAD_TYPE: (HeadConfig, SemanticFPNHead),
                                              LinearSegHead.head_type: (LinearHeadConfig, LinearSegHead)}
    if head_type not in head_kinds:
        raise CheckpointError(f"{ck.source}: unknown segmentation head {head_type!r} "
                              f"(softcli has {', '.join(head_kinds)})")
    config_cls, head_cls = head_kinds[head_type]
    if isinstance(head_meta, Mapping):
        try:
            head_cfg = config_cls.from_dict({k: v for k, v in head_meta.items() if k != "type"})
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{ck.source}: bad head config ({exc})") from exc
        stored = _infer_head_config(ck.state_dict, ck.source) if head_type == HEAD_TYPE else None
        for name in ("num_classes", "fpn_channels", "channels") if stored else ():  # sizes must match the weights
            if getattr(head_cfg, name) != getattr(stored, name):
                raise CheckpointError(f"{ck.source}: does not fit the {HEAD_TYPE} head: its config says {name} = "
                                      f"{getattr(head_cfg, name)} but the weights have {getattr(stored, name)}")
    else:
        head_cfg = _infer_head_config(ck.state_dict, ck.source)
    head = head_cls(backbone.config.embed_dims, head_cfg)
    expected = head.state_dict()
    for k, v in expected.items():
        if k not in head_sd:
            raise CheckpointError(f"{ck.source}: does not fit the {head_type} head: missing head.{k}")
        if tuple(head_sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{ck.source}: does not fit the {head_type} head: head.{k} has shape "
                                  f"{tuple(head_sd[k].shape)}, expected {tuple(v.shape)}")
    extra = [k for k in head_sd if k not in expected]
    if extra:
        raise CheckpointError(f"{ck.source}: does not fit the {head_type} head: unexpected head.{extra[0]}")
    if any(v.is_floating_point() and not torch.isfinite(v).all() for v in head_sd.values()):
        raise CheckpointError(f"{ck.source}: head weights contain NaN or infinity")
    head.load_state_dict(head_sd, strict=True)
    k = head_cfg.num_classes
    names = ck.extra.get("class_names")
    names = list(names) if isinstance(names, list) else [f"class {i}" for i in range(k)]
    palette = ck.extra.get("palette")
    palette = [list(c) for c in palette] if isinstance(palette, list) else default_palette(k)
    _check_names_palette(names, palette, k, ck.source)
    model = SoftSegmenter(backbone, head).to(device).eval()
    return model, SegmenterInfo(names, palette, dict(ck.pretrained_cfg), ck.source)
