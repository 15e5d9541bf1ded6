"""Reading and writing SOFT checkpoints, safely.

Formats read:

- official ``.pth`` / ``.pth.tar`` as the training script saves them: a dict
  with ``state_dict`` (or ``model``), maybe ``state_dict_ema``, maybe ``module.``
  prefixes, and an ``argparse.Namespace`` under ``args``; or a bare state dict.
  Read with ``torch.load(weights_only=True)`` and only ``argparse.Namespace``
  allowed beyond plain data, so a pickle that would run code is refused.
- ``.safetensors`` in the official or our key layout; the architecture from a
  ``config`` JSON in the metadata when present.
- a softcli folder (the Hub layout): ``model.safetensors`` + ``config.json``.

Formats written: the softcli folder (:func:`save_pretrained`).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .constants import IMAGENET_MEAN, IMAGENET_STD
from .errors import CheckpointError
from .io.atomic import atomic_dir
from .models import VARIANTS, SoftConfig, SoftModel, checkpoint_filter_fn, create_soft, infer_config, is_official_layout
from .resources import available_memory, format_bytes

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_TAG = "softcli"
PICKLE_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".bin")
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors spec's own limit
#: A ``.pth`` zip may inflate to at most this many times its own size (torch stores members uncompressed;
#: a re-zipped float checkpoint shrinks by ~10%, a pruned one a few times): more is a zip bomb.
MAX_ZIP_INFLATION = 20
#: ... unless it inflates to less than this in total, which is harmless whatever the ratio.
ZIP_INFLATION_FLOOR = 64 * 2**20
#: Python-side memory one block costs beyond its weights (modules, parameter objects), measured ~33 KiB.
BLOCK_OVERHEAD_BYTES = 48 * 2**10

#: Preprocessing of the ImageNet checkpoints (DeiT-style evaluation).
IMAGENET_PRETRAINED_CFG: dict[str, Any] = {
    "input_size": [3, 224, 224],
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}


@dataclass
class Checkpoint:
    """Weights in our layout plus everything needed to use them."""

    state_dict: dict[str, Tensor]
    config: SoftConfig
    source: str
    format: str  # "official-pth", "official-safetensors", "softcli"
    labels: list[str] | None = None
    pretrained_cfg: dict[str, Any] = field(default_factory=lambda: dict(IMAGENET_PRETRAINED_CFG))
    extra: dict[str, Any] = field(default_factory=dict)


def _fail(path: Path | str, reason: str) -> CheckpointError:
    return CheckpointError(f"{path}: {reason}")


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    """Validate the header ourselves so a corrupt file gives one clear line."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _fail(path, "not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise _fail(path, "corrupt or truncated safetensors file (header length past the end of the file)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _fail(path, "corrupt safetensors header (not JSON)") from exc
    if not isinstance(header, dict):
        raise _fail(path, "corrupt safetensors header")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise _fail(path, f"corrupt safetensors header (entry {key!r})") from exc
    if 8 + n + end > size:
        raise _fail(path, f"truncated safetensors file ({size} bytes, header needs {8 + n + end})")
    return header


def _load_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = _read_safetensors_header(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _fail(path, f"cannot read safetensors file ({exc})") from exc
    return tensors, dict(header.get("__metadata__") or {})


def _check_zip_sizes(path: Path) -> None:
    """Refuse a zip whose members would inflate far beyond the file (a zip bomb), from its directory alone."""
    try:
        with zipfile.ZipFile(path) as zf:
            inflated = sum(info.file_size for info in zf.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _fail(path, f"cannot read PyTorch checkpoint, truncated or corrupt ({exc})") from exc
    size = path.stat().st_size
    if inflated > max(ZIP_INFLATION_FLOOR, MAX_ZIP_INFLATION * size):
        raise _fail(path, f"refusing to inflate: its zip members add up to {format_bytes(inflated)} from a "
                          f"{format_bytes(size)} file (over {MAX_ZIP_INFLATION}x; a zip bomb, not a checkpoint)")
    free = available_memory()
    if free is not None and inflated > free:
        raise _fail(path, f"needs {format_bytes(inflated)} of memory to load, more than the "
                          f"{format_bytes(free)} available")


def _load_pickle(path: Path) -> Any:
    """``torch.load`` restricted to tensors, plain data and ``argparse.Namespace``."""
    if zipfile.is_zipfile(path):
        _check_zip_sizes(path)
    else:
        with open(path, "rb") as fh:
            magic = fh.read(2)
        if magic[:1] != b"\x80":  # legacy (non-zip) torch files start with a pickle protocol byte
            raise _fail(path, "not a PyTorch checkpoint (neither a zip archive nor a pickle); truncated or corrupt?")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise _fail(path, "refusing to unpickle: the file holds Python objects that could run code, "
                          f"not just tensors and plain data ({detail[:160]})") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(path, f"cannot read PyTorch checkpoint, truncated or corrupt ({msg[:160]})") from exc


_STATE_KEYS = ("state_dict", "model", "module", "net")
_EMA_KEYS = ("state_dict_ema", "model_ema")


def _pick_state_dict(obj: Any, path: Path, use_ema: bool) -> tuple[Mapping[str, Tensor], Any]:
    """The weights inside a training checkpoint dict, and its ``args`` if any."""
    if not isinstance(obj, Mapping):
        raise _fail(path, f"unexpected checkpoint content ({type(obj).__name__}, expected a dict)")
    args = obj.get("args")
    order = (_EMA_KEYS + _STATE_KEYS) if use_ema else (_STATE_KEYS + _EMA_KEYS)
    for key in order:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            return inner, args
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj, args
    raise _fail(path, "no state dict found (looked for " + ", ".join(order) + ")")


def _config_from_sources(sd: Mapping[str, Tensor], meta_config: Any, args: Any, path: Path) -> SoftConfig:
    try:
        if isinstance(meta_config, Mapping):
            return SoftConfig.from_dict(meta_config)
        variant = getattr(args, "model", None) if args is not None else None
        if isinstance(variant, str) and variant in VARIANTS:
            cfg = SoftConfig.from_dict({"variant": variant})
            inferred = infer_config(sd)
            if inferred.num_classes != cfg.num_classes:
                cfg = SoftConfig.from_dict({"variant": variant, "num_classes": inferred.num_classes})
            return cfg
        return infer_config(sd)
    except ValueError as exc:
        raise _fail(path, str(exc)) from exc


def read_checkpoint(path: str | os.PathLike[str], use_ema: bool = False) -> Checkpoint:
    """Read any supported checkpoint into our key layout, without building a model."""
    p = Path(path)
    if p.is_dir():
        return _read_folder(p)
    if not p.exists():
        raise _fail(p, "no such file")
    if p.stat().st_size == 0:
        raise _fail(p, "empty file")
    name = p.name.lower()
    if name.endswith(".safetensors"):
        tensors, meta = _load_safetensors(p)
        meta_cfg = _parse_json(meta.get("config"), p, "metadata 'config'")
        fmt = "official-safetensors" if is_official_layout(tensors) else FORMAT_TAG
        sd = checkpoint_filter_fn(tensors)
        cfg = _config_from_sources(sd, meta_cfg, None, p)
        ck = Checkpoint(sd, cfg, str(p), fmt)
        sidecar = p.with_name(CONFIG_NAME)
        if sidecar.is_file():
            _apply_project_config(ck, _parse_json(sidecar.read_text(), sidecar, "file"), sidecar)
        return ck
    if name.endswith(PICKLE_SUFFIXES) or zipfile.is_zipfile(p):
        obj = _load_pickle(p)
        raw, args = _pick_state_dict(obj, p, use_ema)
        sd = checkpoint_filter_fn(raw)
        cfg = _config_from_sources(sd, None, args, p)
        return Checkpoint(sd, cfg, str(p), "official-pth")
    raise _fail(p, "unknown checkpoint type; expected .safetensors, .pth/.pth.tar or a softcli folder")


def _parse_json(text: Any, path: Path, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(path, f"invalid JSON in {what} ({exc.msg})") from exc


def _apply_project_config(ck: Checkpoint, data: Any, path: Path) -> None:
    if not isinstance(data, Mapping):
        raise _fail(path, "config.json is not a JSON object")
    if data.get("architecture") != "soft" and data.get("format") != FORMAT_TAG:
        return  # someone else's config.json beside the weights; not ours to read
    if isinstance(data.get("model_config"), Mapping):
        try:
            ck.config = SoftConfig.from_dict(data["model_config"])
        except (TypeError, ValueError) as exc:
            raise _fail(path, f"bad model_config ({exc})") from exc
    labels = data.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise _fail(path, "'labels' must be a list of strings")
        if len(labels) != ck.config.num_classes:
            raise _fail(path, f"'labels' has {len(labels)} names but the model has {ck.config.num_classes} "
                              "classes; they must match")
        ck.labels = labels
    if isinstance(data.get("pretrained_cfg"), Mapping):
        ck.pretrained_cfg = {**IMAGENET_PRETRAINED_CFG, **data["pretrained_cfg"]}
    ck.extra = {k: v for k, v in data.items() if k not in ("model_config", "labels", "pretrained_cfg")}


def model_files(source: str | os.PathLike[str] | None) -> list[Path]:
    """The files a loaded model came from (weights file, and the config.json beside it), which no output may replace."""
    if not source:
        return []
    weights = Path(source)
    return [weights, weights.with_name(CONFIG_NAME)]


def _read_folder(folder: Path) -> Checkpoint:
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        candidates = sorted(folder.glob("*.safetensors")) + sorted(
            f for f in folder.iterdir() if f.name.lower().endswith(PICKLE_SUFFIXES))
        if len(candidates) != 1:
            raise _fail(folder, f"folder holds no {WEIGHTS_NAME}" + (
                f" and {len(candidates)} candidate weight files" if candidates else ""))
        weights = candidates[0]
    return read_checkpoint(weights)


def estimate_model_bytes(config: SoftConfig) -> int:
    """Memory to build ``config`` in float32, from its sizes alone (within ~10% of the real parameter count)."""
    params, prev = 0, 3
    for dim, depth in zip(config.embed_dims, config.depths):
        params += max(depth, 0) * 12 * dim * dim + 9 * prev * dim  # blocks (attention + 4x MLP) + patch embedding
        prev = dim
    params += config.pretrain_grid[0] * config.pretrain_grid[1] * config.embed_dims[0]
    params += config.embed_dims[-1] * config.num_classes
    return 4 * params + BLOCK_OVERHEAD_BYTES * sum(max(d, 0) for d in config.depths)


def check_model_size(config: SoftConfig, source: str) -> None:
    """Refuse, before building anything, an architecture that would not fit in the memory there is."""
    need = estimate_model_bytes(config)
    free = available_memory()
    if free is not None and need > free:
        raise _fail(source, f"its architecture (embed_dims {list(config.embed_dims)}, depths {list(config.depths)}) "
                            f"needs about {format_bytes(need)} of memory, more than the {format_bytes(free)} "
                            "available; refusing to build it")


def _check_dtypes(ck: Checkpoint) -> None:
    """Weights must be real floating point: a complex or integer tensor would be silently cast into garbage."""
    for key, value in ck.state_dict.items():
        if value.is_complex() or not (value.is_floating_point() or key.endswith("num_batches_tracked")):
            raise _fail(ck.source, f"{key} holds {str(value.dtype).replace('torch.', '')} values; "
                                   "SOFT weights are real floating point")


def build_model(ck: Checkpoint, device: str | torch.device = "cpu") -> SoftModel:
    """Instantiate the architecture and load the weights, checking sizes, dtypes and every shape first."""
    check_model_size(ck.config, ck.source)
    _check_dtypes(ck)
    model = create_soft(ck.config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in ck.state_dict]
    unexpected = [k for k in ck.state_dict if k not in expected]
    wrong = [(k, tuple(ck.state_dict[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in ck.state_dict and tuple(ck.state_dict[k].shape) != tuple(v.shape)]
    arch = ck.config.variant or "the architecture in its config"
    if wrong:
        k, got, exp = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise _fail(ck.source, f"does not fit {arch}: {k} has shape {got}, expected {exp}{more}")
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise _fail(ck.source, f"does not fit {arch}: missing {missing[0]}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise _fail(ck.source, f"does not fit {arch}: unexpected {unexpected[0]}{more}")
    bad = [k for k, v in ck.state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise _fail(ck.source, f"weights contain NaN or infinity ({bad[0]})")
    # Weights stored in float16/bfloat16 load into the float32 model (copy_ casts).
    model.load_state_dict(ck.state_dict, strict=True)
    model.pretrained_cfg = dict(ck.pretrained_cfg)  # type: ignore[assignment]
    model.labels = ck.labels  # type: ignore[assignment]
    model.source = ck.source  # type: ignore[assignment]
    return model.to(device).eval()


def save_pretrained(model: SoftModel, out_dir: str | os.PathLike[str], labels: list[str] | None = None,
                    pretrained_cfg: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None, keep: Callable[[str], bool] | None = None) -> Path:
    """Write the softcli Hub layout (``model.safetensors`` + ``config.json``), atomically.

    ``keep(key)`` chooses the tensors written (all by default; ``soft fit`` keeps
    only ``head.*`` when the backbone is referenced by sha256 in ``extra``).
    """
    from safetensors.torch import save_file

    cfg = model.config.to_dict()
    labels = labels if labels is not None else getattr(model, "labels", None)
    pre = dict(pretrained_cfg or getattr(model, "pretrained_cfg", None) or IMAGENET_PRETRAINED_CFG)
    if labels is not None and len(labels) != model.config.num_classes:
        raise ValueError(f"{len(labels)} labels for {model.config.num_classes} classes")
    config = {"architecture": "soft", "format": FORMAT_TAG, "model_config": cfg, "labels": labels,
              "pretrained_cfg": pre, **dict(extra or {})}
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if keep is None or keep(k)}
    with atomic_dir(out_dir) as tmp:
        # One metadata key: safetensors orders its keys randomly, and the file should hash the same every time.
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"config": json.dumps(cfg)})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)
