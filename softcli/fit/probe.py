"""The linear probe and the scores it is judged by.

:func:`fit_linear` is class-balanced multinomial logistic regression with an L2
penalty, solved with L-BFGS on standardised features (a convex problem, so the
answer does not depend on a random start). The standardisation is folded back
into the returned weights, so the result applies to raw features as
``x @ W.T + b``. Samples carry weights: a stride-4 cell with 9 labelled pixels
of a class counts 9 times.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: Default L2 penalty on the standardised weights (per sample, class-balanced loss).
DEFAULT_L2 = 1e-3


@dataclass
class LinearFit:
    weight: Tensor  # (K, D), applies to raw features
    bias: Tensor  # (K,)
    iterations: int
    loss: float


def fit_linear(x: Tensor, y: Tensor, num_classes: int, *, sample_weight: Tensor | None = None, l2: float = DEFAULT_L2,
               max_iter: int = 300, device: torch.device | str = "cpu",
               on_step: Callable[[int, int], None] | None = None) -> LinearFit:
    """Class-balanced logistic regression of ``y`` (N,) in 0..K-1 on ``x`` (N, D); see the module docstring."""
    dev = torch.device(device)
    x = x.detach().to(dev, torch.float32)
    y = y.to(dev, torch.int64)
    w_s = torch.ones(len(y), device=dev) if sample_weight is None else sample_weight.to(dev, torch.float32)
    per_class = torch.zeros(num_classes, device=dev).index_add_(0, y, w_s)
    present = per_class > 0
    # Every present class carries the same total weight; the weights sum to 1.
    class_w = torch.where(present, 1.0 / (per_class.clamp_min(1e-12) * present.sum()), torch.zeros_like(per_class))
    w = w_s * class_w[y]
    mean = (w[:, None] * x).sum(0) / w.sum()
    std = ((w[:, None] * (x - mean) ** 2).sum(0) / w.sum()).sqrt().clamp_min(1e-6)
    z = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], device=dev, requires_grad=True)
    bias = torch.zeros(num_classes, device=dev, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-6,
                            tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")
    calls = [0]

    def closure() -> Tensor:
        opt.zero_grad()
        logits = z @ weight.T + bias
        loss = (F.cross_entropy(logits, y, reduction="none") * w).sum() + l2 * (weight * weight).sum()
        loss.backward()
        calls[0] += 1
        if on_step is not None:
            on_step(min(calls[0], max_iter), max_iter)
        return loss

    with torch.enable_grad():
        loss = float(opt.step(closure).detach())
    if on_step is not None:
        on_step(max_iter, max_iter)
    with torch.no_grad():
        raw_w = weight / std
        raw_b = bias - raw_w @ mean
    return LinearFit(raw_w.detach().cpu(), raw_b.detach().cpu(), calls[0], loss)


def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int,
              weight: np.ndarray | None = None) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    idx = target.astype(np.int64) * num_classes + pred.astype(np.int64)
    return np.bincount(idx, weights=weight, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(conf: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class IoU / accuracy (recall) / support, and their means, from a confusion matrix."""
    conf = np.asarray(conf, np.float64)
    tp = np.diag(conf)
    support = conf.sum(1)
    predicted = conf.sum(0)
    union = support + predicted - tp
    classes = []
    for i, name in enumerate(names):
        classes.append({"class": i + 1, "name": name, "support": round(support[i]),
                        "iou": float(tp[i] / union[i]) if union[i] else None,
                        "accuracy": float(tp[i] / support[i]) if support[i] else None})
    ious = [c["iou"] for c in classes if c["iou"] is not None and c["support"]]
    accs = [c["accuracy"] for c in classes if c["accuracy"] is not None]
    total = conf.sum()
    return {"accuracy": float(tp.sum() / total) if total else None,
            "mean_iou": float(np.mean(ious)) if ious else None,
            "mean_accuracy": float(np.mean(accs)) if accs else None,
            "classes": classes, "confusion": [[round(v) for v in row] for row in conf]}
