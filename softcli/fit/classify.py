"""``soft fit classify``: a linear probe for the user's classes on SOFT's pooled features.

The probe replaces the backbone's ImageNet head: same input (the class token
after the final norm), same preprocessing as ``soft classify`` (the model's
resize + centre crop), so the saved folder *is* a SOFT classifier with the
user's class names, and ``soft classify --model DIR`` needs nothing new. The
held-out split is stratified: ``val`` of each class's images, at least one
kept for fitting.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..api import resolve_device
from ..backbone_ref import CLASSIFICATION
from ..checkpoint import save_pretrained
from ..engine import PhaseProgressFn
from ..errors import ParameterError
from ..io.image import DEFAULT_MAX_PIXELS, load_image
from ..models import LandmarkPolicy, SoftModel
from ..preprocess import Preprocess, batch_same_size, eval_transform
from .common import check_out_dir, fit_extra, fit_record, load_backbone
from .data import scan_image_folder
from .probe import DEFAULT_L2, confusion, fit_linear, scores


def stratified_split(targets: Sequence[int], k: int, val: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean held-out mask: ``round(val · n)`` images of each class, leaving at least one to fit on."""
    t = np.asarray(targets)
    is_val = np.zeros(len(t), bool)
    if val <= 0:
        return is_val
    for c in range(k):
        idx = np.nonzero(t == c)[0]
        n = min(len(idx) - 1, round(val * len(idx)))
        if n > 0:
            is_val[rng.choice(idx, n, replace=False)] = True
    return is_val


def pooled_features(model: SoftModel, paths: Sequence[Path], *, batch_size: int = 16,
                    max_pixels: int | None = DEFAULT_MAX_PIXELS,
                    progress: PhaseProgressFn | None = None) -> torch.Tensor:
    """What the classification head sees for each image: the normed stage-4 class token (N, C)."""
    pre = Preprocess.for_model(model)
    device = next(model.parameters()).device

    def tensors() -> Any:
        for p in paths:
            yield p, eval_transform(load_image(p, max_pixels=max_pixels), pre)

    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for _keys, batch in batch_same_size(tensors(), batch_size):
            assert batch is not None
            cls_out = model.forward_class_token(batch.to(device))
            out.append(model.norm(cls_out).float().cpu())
            if progress is not None:
                progress("features", sum(len(o) for o in out), len(paths))
    return torch.cat(out)


def fit_classifier(data: str | os.PathLike[str], out: str | os.PathLike[str], *,
                   weights: str | os.PathLike[str] | None = None, val: float = 0.2, seed: int = 0,
                   l2: float = DEFAULT_L2, bundle: bool = False, batch_size: int = 16,
                   device: str | torch.device = "cpu", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                   landmarks: LandmarkPolicy | str | int | None = None,
                   progress: PhaseProgressFn | None = None) -> dict[str, Any]:
    """Fit a linear probe on ``data`` (one sub-folder per class) and write the classifier to ``out``.

    ``landmarks``: the policy the features are extracted with (default auto); the
    classifier records it and runs with it unless told otherwise (:func:`softcli.api.use_landmarks`).
    """
    t0 = time.perf_counter()
    if not 0 <= val < 1:
        raise ParameterError(f"`val` must be in [0, 1), not {val}")
    if batch_size < 1 or l2 < 0:
        raise ParameterError("`batch_size` must be at least 1 and `l2` not negative")
    check_out_dir(out, data)
    ds = scan_image_folder(data)
    k = len(ds.class_names)
    dev = resolve_device(device)
    bb = load_backbone(weights, dev, landmarks)
    rng = np.random.default_rng(seed)
    is_val = stratified_split(ds.targets, k, val, rng)
    x = pooled_features(bb.model, ds.images, batch_size=batch_size, max_pixels=max_pixels, progress=progress)
    y = torch.tensor(ds.targets, dtype=torch.int64)
    t_features = time.perf_counter()
    train = torch.from_numpy(~is_val)
    fit = fit_linear(x[train], y[train], k, l2=l2, device=dev,
                     on_step=None if progress is None else (lambda d, t: progress("fit", d, t)))

    def evaluate(mask: np.ndarray) -> dict[str, Any] | None:
        if not mask.any():
            return None
        m = torch.from_numpy(mask)
        pred = (x[m] @ fit.weight.T + fit.bias).argmax(1).numpy()
        result = scores(confusion(pred, y[m].numpy(), k), ds.class_names)
        result["errors"] = [{"image": str(ds.images[i]), "true": ds.class_names[ds.targets[i]],
                             "predicted": ds.class_names[p]}
                            for i, p in zip(np.nonzero(mask)[0], pred) if p != ds.targets[i]]
        return result

    train_scores, val_scores = evaluate(~is_val), evaluate(is_val)
    model = copy.deepcopy(bb.model).cpu()
    model.config = replace(model.config, num_classes=k)
    model.head = torch.nn.Linear(model.num_features, k)
    with torch.no_grad():
        model.head.weight.copy_(fit.weight)
        model.head.bias.copy_(fit.bias)
    record = fit_record(data, seed, val, images=len(ds.images), held_out=int(is_val.sum()),
                        **({"val_scores": {"accuracy": val_scores["accuracy"]}} if val_scores else {}))
    extra: dict[str, Any] = {"task": CLASSIFICATION, "head": {"type": "linear_probe", "features": "norm(cls_token)"},
                             "class_names": ds.class_names, "fit": record, **fit_extra(bb)}
    if not bundle:
        extra["backbone"] = bb.reference
    save_pretrained(model, out, labels=ds.class_names, pretrained_cfg=bb.checkpoint.pretrained_cfg, extra=extra,
                    keep=None if bundle else (lambda key: key.startswith("head.")))
    return {"task": CLASSIFICATION, "out": str(out), "classes": ds.class_names,
            "backbone": {**bb.reference, "bundled": bundle}, "device": str(dev),
            "landmarks": str(bb.model.landmark_policy),
            "images": {"train": int((~is_val).sum()), "val": int(is_val.sum())},
            "per_class": {name: int(np.sum(np.asarray(ds.targets) == i)) for i, name in enumerate(ds.class_names)},
            "fit": {"solver": "lbfgs", "iterations": fit.iterations, "loss": fit.loss, "l2": l2},
            "train": train_scores, "val": val_scores, "seed": seed,
            "seconds": {"features": round(t_features - t0, 3), "total": round(time.perf_counter() - t0, 3)}}
