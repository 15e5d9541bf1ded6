"""Classify image files with a SOFT model: paths in, ranked predictions out (nothing printed).

Each input succeeds or fails on its own: a missing, empty, truncated or
non-image file yields a :class:`ClassifyResult` with ``error`` set and the
rest go on. Results come out in input order, as a generator, so a caller can
show progress and stream output.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .context import ContextChoice, TensorSource, choose_context, memory_budget, plan_global, run_global
from .errors import CheckpointError, InputError, UsageError, render_params
from .io.image import DEFAULT_MAX_PIXELS, load_image, pixel_limit
from .io.inputs import InputItem, display_path, expand_inputs, path_bytes
from .io.slide import load_for_crop
from .labels import labels_for
from .preprocess import Preprocess, batch_same_size, eval_transform, full_res_size, full_res_transform, min_side
from .resources import device_memory_available, format_bytes
from .tiling import estimate_memory


@dataclass(frozen=True)
class Prediction:
    rank: int  # 1 = most probable
    index: int  # class index in the model's output
    label: str
    prob: float  # softmax probability over all classes


@dataclass
class ClassifyResult:
    """What happened to one input: ``predictions`` on success, ``error`` otherwise."""

    image: str
    predictions: list[Prediction] | None = None
    input_size: tuple[int, int] | None = None  # (H, W) of the tensor the model saw
    seconds: float = 0.0  # decode + preprocess + this image's share of its batch's forward pass
    error: str | None = None
    context: str | None = None  # full-res only: "whole" or "global" (softcli.context), with the reason
    #: ``error`` with the parameters it names in backticks (softcli.errors), for the command line's wording.
    error_template: str | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def display_name(self) -> str:
        """``image`` as valid UTF-8 text (undecodable bytes of the file name as ``\\xNN``)."""
        return display_path(self.image)

    def to_dict(self, model_name: str) -> dict[str, Any]:
        """The ``--json`` object for this input; ``path_bytes`` (hex) only when the name is not UTF-8."""
        out: dict[str, Any] = {"image": self.display_name}
        raw = path_bytes(self.image)
        if raw is not None:
            out["path_bytes"] = raw
        if self.error is None:
            out["predictions"] = [asdict(p) for p in self.predictions or []]
        else:
            out["error"] = self.error
        out["model"] = model_name
        out["input_size"] = list(self.input_size) if self.input_size else None  # (height, width), as shapes
        out["input_width"] = self.input_size[1] if self.input_size else None
        out["input_height"] = self.input_size[0] if self.input_size else None
        out["seconds"] = round(self.seconds, 4)
        if self.context is not None:
            out["context"] = self.context
        return out


def _failed(path: str, seconds: float, reason: str) -> ClassifyResult:
    """A failed input; ``reason`` may name parameters in backticks (:mod:`softcli.errors`), kept for the CLI."""
    return ClassifyResult(path, seconds=seconds, error=render_params(reason), error_template=reason)


def _reason(exc: InputError | UsageError, path: str) -> str:
    """The message (parameters in backticks) without its ``path: `` prefix (the result names the path already)."""
    msg = exc.template
    prefix = f"{path}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def full_res_memory_error(model: Any, hw: tuple[int, int]) -> str | None:
    """Why the model cannot run on a whole (H, W) image here (estimated memory above what is available), or None."""
    need = estimate_memory(hw[0] * hw[1], model.config, sum(p.numel() for p in model.parameters()))
    device = next(model.parameters()).device
    free = device_memory_available(device)
    if free is None or need <= free:
        return None
    where = "" if device.type == "cpu" else f" on {device}"
    return (f"at full resolution ({hw[1]}x{hw[0]} = {hw[0] * hw[1]:,} pixels) the model needs about "
            f"{format_bytes(need)} of memory, more than the {format_bytes(free)} available{where}; "
            "classify it without full resolution")


#: What each prepared image carries: its path, seconds so far, an error, and with ``full_res`` the
#: context it will run in (chosen once, from its size).
PreparedKey = tuple[str, float, str | None, ContextChoice | None]


def _prepare(items: Sequence[InputItem], pre: Preprocess, full_res: bool, smallest: int,
             max_pixels: int | None, model: Any, context: str, budget: int, params: int, mpp: float | None = None,
             magnification: float | None = None) -> Iterator[tuple[PreparedKey, torch.Tensor | None]]:
    """Decode and preprocess lazily: one image in memory at a time (plus the batch being filled)."""
    for item in items:
        start = time.perf_counter()
        if item.error is not None:
            yield (item.path, 0.0, item.error, None), None
            continue
        try:
            image = load_for_crop(item.path, None if full_res else min(pre.resize_size), mpp=mpp,
                                  magnification=magnification, max_pixels=max_pixels)
            if image is None:
                image = load_image(item.path, max_pixels=max_pixels)
        except (InputError, UsageError) as exc:
            yield (item.path, time.perf_counter() - start, _reason(exc, item.path), None), None
            continue
        choice = None
        if full_res:
            hw = full_res_size(image.shape[:2], smallest)  # the size full_res_transform gives
            choice = choose_context(context, hw[0], hw[1], model.config, params, budget)
            too_big = None if choice.mode == "global" else full_res_memory_error(model, hw)  # global bounds memory
            if too_big is not None:
                del image
                yield (item.path, time.perf_counter() - start, too_big, None), None
                continue
        tensor = full_res_transform(image, pre, smallest) if full_res else eval_transform(image, pre)
        del image
        yield (item.path, time.perf_counter() - start, None, choice), tensor


def _full_res_logits(model: Any, x: torch.Tensor, choice: ContextChoice, params: int,
                     max_memory: int) -> tuple[torch.Tensor, str]:
    """Logits of one whole image and the context that ran: one pass when it fits, else global (exact)."""
    cfg = model.config
    if choice.mode == "whole":
        return model(x), f"whole: {choice.reason}"
    tile, spill = plan_global(int(x.shape[-2]), int(x.shape[-1]), cfg, params, max_memory, cfg.embed_dims)
    with run_global(model, TensorSource(x), upto=4, keep=(), tile=tile,
                    spill_dir=tempfile.gettempdir() if spill else None) as res:
        assert res.cls is not None
        return model.forward_head(res.cls), f"global: {choice.reason}"


def classify_paths(model: Any, inputs: Sequence[str | os.PathLike[str]] | Sequence[InputItem], *, top_k: int = 5,
                   batch_size: int = 1, full_res: bool = False,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS, context: str = "auto",
                   max_memory: int | None = None, mpp: float | None = None,
                   magnification: float | None = None) -> Iterator[ClassifyResult]:
    """Top-``top_k`` predictions for each input (files, folders or globs), in input order.

    Preprocessing follows ``model.pretrained_cfg`` (resize + centre crop at the
    model's input size); ``full_res`` feeds every image whole, at its own size,
    one at a time. Same-size tensors are batched ``batch_size`` at a time. The
    model runs on whatever device its parameters are on. Whole slides are read at
    the pyramid level the crop needs (or at ``mpp``/``magnification`` with
    ``full_res``), never level 0 whole (:func:`~softcli.io.slide.load_for_crop`).

    With ``full_res``, ``context`` says how (:mod:`softcli.context`): ``auto``
    runs one pass when the image fits ``max_memory`` (default: half the
    available RAM), else ``global``: the same numbers streamed over tiles, the
    class token seeing the whole image. There is no tiled classification.
    """
    if top_k < 1:
        raise ValueError("top_k must be at least 1")
    max_pixels = pixel_limit(max_pixels)
    if context not in ("auto", "global"):
        raise UsageError(f"classification takes context auto or global, not {context!r}: "
                         "the class token needs the whole image, so there is no tiled mode")
    budget = memory_budget(max_memory)
    items = list(inputs) if all(isinstance(i, InputItem) for i in inputs) else expand_inputs(inputs)  # type: ignore[arg-type]
    source = getattr(model, "source", "the model")
    if not model.config.num_classes:
        raise CheckpointError(f"{source}: has no classification head (num_classes = 0); "
                              "it gives features, not classes")
    try:
        pre = Preprocess.for_model(model)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{source}: unusable pretrained_cfg ({exc})") from exc
    labels = labels_for(model)
    k = min(top_k, len(labels))
    device = next(model.parameters()).device
    params = sum(p.numel() for p in model.parameters())
    prepared = _prepare(items, pre, full_res, min_side(model), max_pixels, model,  # type: ignore[arg-type]
                        context, budget, params, mpp, magnification)
    for keys, batch in batch_same_size(prepared, 1 if full_res else batch_size):
        if batch is None:
            path, seconds, error, _ = keys[0]
            yield _failed(path, seconds, error or "")
            continue
        start = time.perf_counter()
        ran = None
        try:
            with torch.inference_mode():
                if full_res:
                    choice = keys[0][3]
                    assert choice is not None  # _prepare chose it for every full-resolution image
                    logits, ran = _full_res_logits(model, batch.to(device), choice, params, budget)
                else:
                    logits = model(batch.to(device))
                probs = torch.softmax(logits.float(), dim=-1)
                top_p, top_i = probs.topk(k, dim=-1)
            top_probs, top_ids = top_p.cpu().tolist(), top_i.cpu().tolist()
        except torch.OutOfMemoryError:
            share = (time.perf_counter() - start) / len(keys)
            h, w = batch.shape[-2:]
            for path, seconds, _, _ in keys:
                yield _failed(path, seconds + share, f"out of memory running the model on {w}x{h} (batch of "
                                                     f"{len(keys)}); try a smaller `batch_size` or no `full_res`")
            continue
        share = (time.perf_counter() - start) / len(keys)
        size = (int(batch.shape[-2]), int(batch.shape[-1]))
        for (path, seconds, _, _), ps, idx in zip(keys, top_probs, top_ids):
            preds = [Prediction(rank=r + 1, index=int(i), label=labels[i], prob=float(p))
                     for r, (p, i) in enumerate(zip(ps, idx))]
            yield ClassifyResult(path, preds, size, seconds + share, context=ran)


def classify(model: Any, inputs: Sequence[str | os.PathLike[str]], **kwargs: Any) -> list[ClassifyResult]:
    """:func:`classify_paths` as a list."""
    return list(classify_paths(model, inputs, **kwargs))
