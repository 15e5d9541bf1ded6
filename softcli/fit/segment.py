"""``soft fit segment``: a segmentation head for the user's classes, on frozen SOFT features.

1. :func:`~softcli.fit.data.scan_segmentation` checks every image/label pair.
2. Labelled pixels become (stride-4 cell, class, pixel count) samples; at most
   ``max_samples`` of them, drawn per class with ``seed``.
3. Features come from the same tiling engine as ``soft segment``
   (:func:`~softcli.engine.run_dense`, same tiles, overlap and blending), and
   :class:`CellSampler` keeps only the labelled cells, so memory follows the
   labels, not the image size.
4. ``head="linear"``: :class:`~softcli.models.linear_head.LinearSegHead` fitted
   in closed form-like fashion (L-BFGS logistic regression,
   :func:`~softcli.fit.probe.fit_linear`). ``head="fpn"``: a small
   Semantic-FPN head trained with AdamW on the four stage maps (backbone
   frozen), on crops around labelled cells, class-balanced.
5. Held-out scores: ``val`` of the images (or, for a single image, of its
   64-pixel blocks) are kept out of the fit and scored per class (IoU and
   accuracy over their labelled pixels, at the stride-4 cell each falls in).
6. The head is saved with :func:`~softcli.segment.save_segmenter`, its backbone
   referenced by sha256 (or bundled): ``soft segment --model DIR`` uses it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..api import resolve_device
from ..constants import STAGE_STRIDES
from ..engine import MemorySink, OutputSpec, PhaseProgressFn, RowSink, run_dense
from ..errors import ParameterError
from ..features import stage_maps_fn, stage_outputs
from ..io.image import DEFAULT_MAX_PIXELS
from ..io.readers import open_image
from ..models import LandmarkPolicy
from ..models.linear_head import LinearHeadConfig, LinearSegHead
from ..models.segmentation import HeadConfig, SemanticFPNHead, SoftSegmenter
from ..segment import SCORE_STRIDE, save_segmenter
from ..tiling import DEFAULT_OVERLAP, DEFAULT_TILE, TileGrid
from .common import check_out_dir, fit_extra, fit_record, load_backbone
from .data import read_label_image, scan_segmentation
from .probe import DEFAULT_L2, confusion, fit_linear, scores

HEADS = ("linear", "fpn")
#: Side of the blocks a single image is split into for ``--val`` (pixels; a multiple of the stride).
VAL_BLOCK = 64
DEFAULT_MAX_SAMPLES = 200_000
#: Four stage maps of all training images are held in memory for ``--head fpn``: refuse beyond this.
FPN_MAX_MAP_BYTES = 4 * 2**30
FPN_LR = 3e-3


@dataclass
class CellSamples:
    """Labelled stride-4 cells of one image: flat cell index, class (0-based), labelled pixel count."""

    cells: np.ndarray
    classes: np.ndarray
    counts: np.ndarray
    grid: tuple[int, int]  # cells (rows, cols)
    features: np.ndarray | None = None  # (N, D) once extracted
    is_val: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))


def label_cells(labels: np.ndarray, num_classes: int, stride: int = SCORE_STRIDE) -> CellSamples:
    """Group labelled pixels by the stride-4 cell they fall in (the cell whose logits label them)."""
    h, w = labels.shape
    gh, gw = -(-h // stride), -(-w // stride)
    ys, xs = np.nonzero(labels)
    cls = labels[ys, xs] - 1
    key = ((ys // stride) * gw + xs // stride) * num_classes + cls
    uniq, counts = np.unique(key, return_counts=True)
    return CellSamples(uniq // num_classes, uniq % num_classes, counts.astype(np.float32), (gh, gw))


class CellSampler(RowSink):
    """A sink that keeps, of each finished row band, only the feature vectors of the wanted cells."""

    def __init__(self, cells: np.ndarray, width: int) -> None:
        super().__init__()
        self.cells = cells
        self.rows, self.cols = cells // width, cells % width
        self.out: np.ndarray | None = None

    def allocate(self, name: str, shape: tuple[int, int, int]) -> None:
        super().allocate(name, shape)
        self.out = np.zeros((len(self.cells), shape[0]), np.float32)

    def write_rows(self, name: str, y0: int, block: np.ndarray) -> None:
        assert self.out is not None
        sel = np.nonzero((self.rows >= y0) & (self.rows < y0 + block.shape[1]))[0]
        self.out[sel] = block[:, self.rows[sel] - y0, self.cols[sel]].T


def _subsample(samples: list[CellSamples], k: int, max_samples: int, rng: np.random.Generator) -> None:
    """Keep at most ``max_samples // k`` cells per class over all images (drawn with ``rng``)."""
    cap = max(1, max_samples // k)
    for c in range(k):
        where = [(i, np.nonzero(s.classes == c)[0]) for i, s in enumerate(samples)]
        total = sum(len(idx) for _, idx in where)
        if total <= cap:
            continue
        keep = np.zeros(total, bool)
        keep[rng.choice(total, cap, replace=False)] = True
        start = 0
        for i, idx in where:
            drop = idx[~keep[start:start + len(idx)]]
            start += len(idx)
            s = samples[i]
            mask = np.ones(len(s.cells), bool)
            mask[drop] = False
            s.cells, s.classes, s.counts = s.cells[mask], s.classes[mask], s.counts[mask]


def split_validation(samples: list[CellSamples], val: float, rng: np.random.Generator,
                     names: Sequence[str]) -> list[str]:
    """Mark held-out samples: whole images when there are several, else 64-px blocks of the one image.

    Returns what was held out, for the summary.
    """
    for s in samples:
        s.is_val = np.zeros(len(s.cells), bool)
    if val <= 0:
        return []
    if len(samples) > 1:
        n_val = min(len(samples) - 1, max(1, round(val * len(samples))))
        chosen = sorted(rng.choice(len(samples), n_val, replace=False).tolist())
        for i in chosen:
            samples[i].is_val[:] = True
        return [names[i] for i in chosen]
    s = samples[0]
    per = VAL_BLOCK // SCORE_STRIDE
    bcols = -(-s.grid[1] // per)
    block = (s.cells // s.grid[1]) // per * bcols + (s.cells % s.grid[1]) // per
    labelled_blocks = np.unique(block)
    n_val = min(len(labelled_blocks) - 1, max(1, round(val * len(labelled_blocks))))
    if n_val < 1:
        return []
    held = rng.choice(labelled_blocks, n_val, replace=False)
    s.is_val = np.isin(block, held)
    return [f"{n_val} of {len(labelled_blocks)} labelled {VAL_BLOCK}-px blocks"]


def _stack(samples: Sequence[CellSamples], val: bool) -> tuple[Tensor, Tensor, Tensor]:
    xs, ys, ws = [], [], []
    for s in samples:
        m = s.is_val if val else ~s.is_val
        assert s.features is not None
        xs.append(s.features[m])
        ys.append(s.classes[m])
        ws.append(s.counts[m])
    return (torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys).astype(np.int64)),
            torch.from_numpy(np.concatenate(ws)))


def _score(pred_fn: Callable[[Tensor], Tensor], samples: Sequence[CellSamples], val: bool, k: int,
           names: Sequence[str]) -> dict[str, Any] | None:
    x, y, w = _stack(samples, val)
    if len(y) == 0:
        return None
    pred = pred_fn(x).numpy()
    return scores(confusion(pred, y.numpy(), k, w.numpy()), names)


def _check_train_classes(samples: Sequence[CellSamples], names: Sequence[str], val: float) -> None:
    present = set()
    for s in samples:
        present |= set(np.unique(s.classes[~s.is_val]).tolist())
    missing = [names[c] for c in range(len(names)) if c not in present]
    if missing:
        raise ParameterError(f"with `val` {val:g}, class {missing[0]!r} has no labelled pixels left to fit on; "
                         "label it in more images/places, or pass `val=0`")


@dataclass
class _Features:
    """What one tile gives the fit: the linear head's features, or the four stage maps for the FPN head."""

    fn: Callable[[Tensor], list[Tensor]]
    outputs: list[OutputSpec]


def fit_segmenter(data: str | os.PathLike[str], out: str | os.PathLike[str], *,
                  weights: str | os.PathLike[str] | None = None, head: str = "linear",
                  stages: Sequence[int] = (1,), window: int = 9, val: float = 0.2, seed: int = 0,
                  l2: float = DEFAULT_L2, steps: int = 300, bundle: bool = False,
                  tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP, device: str | torch.device = "cpu",
                  max_samples: int = DEFAULT_MAX_SAMPLES, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                  landmarks: LandmarkPolicy | str | int | None = None,
                  progress: PhaseProgressFn | None = None) -> dict[str, Any]:
    """Fit a segmentation head on ``data`` (see the module docstring) and write it to ``out``; returns the summary.

    ``landmarks``: the policy the features are extracted with (default auto); the
    head records it and segments with it unless told otherwise (:func:`softcli.api.use_landmarks`).
    """
    t0 = time.perf_counter()
    if head not in HEADS:
        raise ParameterError(f"`head` must be one of {', '.join(HEADS)}, not {head!r}")
    if not 0 <= val < 1:
        raise ParameterError(f"`val` must be in [0, 1), not {val}")
    if steps < 1 or l2 < 0:
        raise ParameterError("`steps` must be at least 1 and `l2` not negative")
    if max_samples < 1:
        raise ParameterError("`max_samples` must be at least 1")  # no command-line option: Python only
    try:
        head_cfg = LinearHeadConfig(num_classes=2, stages=tuple(stages), window=window)
    except ValueError as exc:
        raise ParameterError(f"`stages`/`window`: {exc}") from exc
    check_out_dir(out, data)
    ds = scan_segmentation(data, max_pixels)
    k = ds.num_classes
    dev = resolve_device(device)
    for item in ds.items:  # the same checks soft segment makes, before any compute
        try:
            TileGrid(item.height, item.width, tile=tile, overlap=overlap)
        except ValueError as exc:
            raise ParameterError(f"`tile`/`overlap`: {exc}") from exc
    bb = load_backbone(weights, dev, landmarks)
    backbone = bb.model
    pre = bb.checkpoint.pretrained_cfg
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    samples = [label_cells(read_label_image(it.labels, max_pixels), k) for it in ds.items]
    _subsample(samples, k, max_samples, rng)
    held_out = split_validation(samples, val, rng, [it.image.name for it in ds.items])
    _check_train_classes(samples, ds.class_names, val)

    dims = list(backbone.config.embed_dims)
    if head == "linear":
        lin = LinearSegHead(dims, LinearHeadConfig(k, head_cfg.stages, head_cfg.window)).to(dev)
        last = max(head_cfg.stages)
        feats = _Features(lambda x: [lin.features(backbone.forward_intermediates(x, list(range(last)),
                                                                                 intermediates_only=True))],
                          [OutputSpec("features", head_cfg.feature_dim(dims), SCORE_STRIDE)])
    else:
        need = sum(4 * c * it.height * it.width // s ** 2 for it in ds.items for c, s in zip(dims, STAGE_STRIDES))
        if need > FPN_MAX_MAP_BYTES:
            raise ParameterError(f"`head=fpn` keeps the stage maps of all training images in memory "
                                 f"({need / 2**30:.1f} GB here, limit {FPN_MAX_MAP_BYTES / 2**30:.0f} GB); "
                                 "use the linear head, or fewer/smaller images")
        stage_specs = stage_outputs(backbone.config, (1, 2, 3, 4))
        feats = _Features(stage_maps_fn(backbone, stage_specs), stage_specs)

    total_tiles = sum(len(TileGrid(it.height, it.width, tile=tile, overlap=overlap)) for it in ds.items)
    done_tiles = [0]

    def on_tile(done: int, total: int) -> None:
        done_tiles[0] += 1
        if progress is not None:
            progress("features", done_tiles[0], total_tiles)

    maps: list[list[np.ndarray]] = []
    for item, s in zip(ds.items, samples):
        with open_image(item.image, max_pixels=max_pixels) as reader:
            grid = TileGrid(reader.height, reader.width, tile=tile, overlap=overlap)
            sink: RowSink = CellSampler(s.cells, s.grid[1]) if head == "linear" else MemorySink()
            run_dense(feats.fn, reader, grid, feats.outputs, sink, mean=pre["mean"], std=pre["std"], device=dev,
                      on_tile=on_tile)
            if isinstance(sink, CellSampler):
                s.features = sink.out
            else:
                assert isinstance(sink, MemorySink)
                maps.append([sink.array(o.name) for o in feats.outputs])
    t_features = time.perf_counter()

    def fit_progress(done: int, total: int) -> None:
        if progress is not None:
            progress("fit", done, total)

    if head == "linear":
        x, y, w = _stack(samples, val=False)
        fit = fit_linear(x, y, k, sample_weight=w, l2=l2, device=dev, on_step=fit_progress)
        with torch.no_grad():
            lin.classifier.weight.copy_(fit.weight[:, :, None, None])
            assert lin.classifier.bias is not None
            lin.classifier.bias.copy_(fit.bias)
        seg_head: torch.nn.Module = lin.cpu()

        def predict(xb: Tensor) -> Tensor:
            return (xb @ fit.weight.T + fit.bias).argmax(1)

        train_scores = _score(predict, samples, False, k, ds.class_names)
        val_scores = _score(predict, samples, True, k, ds.class_names)
        solver = {"solver": "lbfgs", "iterations": fit.iterations, "loss": fit.loss, "l2": l2}
    else:
        fpn = SemanticFPNHead(dims, HeadConfig(k, fpn_channels=64, channels=64, groups=8))
        solver = _train_fpn(fpn, maps, samples, k, steps=steps, seed=seed, crop_cells=max(8, tile // SCORE_STRIDE),
                            device=dev, on_step=fit_progress)
        seg_head = fpn.cpu().eval()
        train_scores, val_scores = _score_fpn(fpn, maps, samples, k, ds.class_names)
    t_fit = time.perf_counter()

    model = SoftSegmenter(backbone.cpu(), seg_head)  # type: ignore[arg-type]
    record = fit_record(data, seed, val, images=len(ds.items), held_out=held_out, head=head,
                        **({"val_scores": {"accuracy": val_scores["accuracy"], "mean_iou": val_scores["mean_iou"]}}
                           if val_scores else {}))
    save_segmenter(model, out, ds.class_names, ds.palette, pretrained_cfg=pre,
                   backbone_ref=None if bundle else bb.reference, extra={"fit": record, **fit_extra(bb)})
    return {"task": "segmentation", "out": str(out), "head": {"type": getattr(seg_head, "head_type", "semantic_fpn"),
                                                               **seg_head.config.to_dict()},  # type: ignore
            "classes": ds.class_names, "palette": ds.palette,
            "backbone": {**bb.reference, "bundled": bundle}, "device": str(dev),
            "landmarks": str(bb.model.landmark_policy),
            "images": len(ds.items), "held_out": held_out, "labelled_pixels": ds.pixel_counts,
            "samples": {"train": int(sum((~s.is_val).sum() for s in samples)),
                        "val": int(sum(s.is_val.sum() for s in samples))},
            "fit": solver, "train": train_scores, "val": val_scores, "seed": seed,
            "seconds": {"features": round(t_features - t0, 3), "fit": round(t_fit - t_features, 3),
                        "total": round(time.perf_counter() - t0, 3)}}


# -- the FPN head ---------------------------------------------------------------------------------

def _crop(stage_maps: Sequence[np.ndarray], y0: int, x0: int, h: int, w: int, dev: torch.device) -> list[Tensor]:
    """A crop of the four stage maps: ``h`` x ``w`` stride-4 cells at cell (y0, x0), all multiples of 8."""
    out = []
    for m, s in zip(stage_maps, STAGE_STRIDES):
        f = s // SCORE_STRIDE
        part = m[:, y0 // f:(y0 + h) // f, x0 // f:(x0 + w) // f]
        out.append(torch.from_numpy(np.ascontiguousarray(part))[None].to(dev))
    return out


def _train_fpn(head: SemanticFPNHead, maps: Sequence[Sequence[np.ndarray]], samples: Sequence[CellSamples],
               k: int, *, steps: int, seed: int, crop_cells: int, device: torch.device,
               on_step: Callable[[int, int], None]) -> dict[str, Any]:
    """AdamW, one inference-tile-sized crop per step around a random labelled cell; class-balanced cross-entropy.

    Crops are as large as the tiles ``soft segment`` will run (the whole image
    when it is smaller): GroupNorm then sees the same statistics in training
    as in use. A small crop of one texture would normalise the texture away.
    """
    gen = np.random.default_rng(seed + 1)
    torch.manual_seed(seed)
    head.to(device).train()
    opt = torch.optim.AdamW(head.parameters(), lr=FPN_LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    pools = [[(i, np.nonzero((s.classes == c) & ~s.is_val)[0]) for i, s in enumerate(samples)] for c in range(k)]
    pools = [[(i, idx) for i, idx in p if len(idx)] for p in pools]
    totals = torch.zeros(k)
    for s in samples:
        totals.index_add_(0, torch.from_numpy(s.classes[~s.is_val].astype(np.int64)),
                          torch.from_numpy(s.counts[~s.is_val]))
    class_w = (totals.sum() / (k * totals.clamp_min(1))).to(device)
    last = 0.0
    with torch.enable_grad():
        for step in range(steps):
            c = step % k  # classes take turns choosing where the crop goes
            i, idx = pools[c][int(gen.integers(len(pools[c])))]
            s = samples[i]
            gh, gw = s.grid
            size_y, size_x = min(crop_cells, gh // 8 * 8), min(crop_cells, gw // 8 * 8)
            cell = int(s.cells[idx[int(gen.integers(len(idx)))]])
            cy, cx = cell // gw, cell % gw
            y0 = int(np.clip((cy - int(gen.integers(size_y))) // 8 * 8, 0, (gh - size_y) // 8 * 8))
            x0 = int(np.clip((cx - int(gen.integers(size_x))) // 8 * 8, 0, (gw - size_x) // 8 * 8))
            ry, rx = s.cells // gw - y0, s.cells % gw - x0
            inside = (ry >= 0) & (ry < size_y) & (rx >= 0) & (rx < size_x) & ~s.is_val
            logits = head(_crop(maps[i], y0, x0, size_y, size_x, device))[0]
            picked = logits[:, torch.from_numpy(ry[inside]).to(device), torch.from_numpy(rx[inside]).to(device)].T
            target = torch.from_numpy(s.classes[inside].astype(np.int64)).to(device)
            weight = torch.from_numpy(s.counts[inside]).to(device) * class_w[target]
            loss = (F.cross_entropy(picked, target, reduction="none") * weight).sum() / weight.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            last = float(loss.detach())
            on_step(step + 1, steps)
    head.eval()
    return {"solver": "adamw", "steps": steps, "loss": last, "lr": FPN_LR, "crop": crop_cells * SCORE_STRIDE}


def _score_fpn(head: SemanticFPNHead, maps: Sequence[Sequence[np.ndarray]], samples: Sequence[CellSamples], k: int,
               names: Sequence[str]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Train and held-out scores of the FPN head, run on each whole image's stage maps."""
    preds = []
    with torch.inference_mode():
        for m, s in zip(maps, samples):
            logits = head([torch.from_numpy(a)[None] for a in m])[0]
            flat = logits.argmax(0).flatten().numpy()
            gw = s.grid[1]
            h4, w4 = logits.shape[-2:]
            r, c = s.cells // gw, s.cells % gw
            preds.append(flat[np.minimum(r, h4 - 1) * w4 + np.minimum(c, w4 - 1)])
    out = []
    for val in (False, True):
        p = np.concatenate([pr[s.is_val == val] for pr, s in zip(preds, samples)])
        t = np.concatenate([s.classes[s.is_val == val] for s in samples])
        w = np.concatenate([s.counts[s.is_val == val] for s in samples])
        out.append(scores(confusion(p, t, k, w), names) if len(t) else None)
    return out[0], out[1]
