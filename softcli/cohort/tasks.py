"""The single-image jobs of ``soft segment`` and ``soft features`` as :class:`~.runner.CohortTask` objects.

Each calls the existing one-image library function per input
(:func:`softcli.segment.segment`, :func:`softcli.features.extract_features`)
and checks the options once, before the first input, so an option error is one
usage error rather than a failure per input.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import model_files
from ..errors import ParameterError
from .manifest import weights_sha256
from .runner import CohortTask, JobResult, TileProgress

#: ``--out-format`` choices → file suffix.
MASK_FORMATS = {"tif": ".tif", "png": ".png", "npy": ".npy"}
FEATURE_FORMATS = {"safetensors": ".safetensors", "npz": ".npz", "npy": ".npy", "ome.tif": ".ome.tif",
                   "ome.zarr": ".ome.zarr"}  # a folder, renamed into place when complete (io.atomic.atomic_dir)


def _suffix(formats: dict[str, str], fmt: str) -> str:
    if fmt not in formats:
        raise ParameterError(f"`out_format` must be one of {', '.join(formats)}, not {fmt!r}")
    return formats[fmt]


def _checkpoint_files(path: Path) -> list[Path]:
    """The files of a checkpoint folder (regular, not hidden) or of a checkpoint file and its config.json."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return [p for p in model_files(path) if p.is_file()]


def segment_task(weights: str | os.PathLike[str] | None, *, model_name: str, out_format: str = "tif",
                 clusters: int | None = None,
                 cluster_stages: str | Sequence[int] | None = None, seed: int = 0, level: int = 0,
                 tile: int | None = None,
                 overlap: int = 64, landmarks: str | None = None, device: str | torch.device = "cpu",
                 max_pixels: int | None = None, max_memory: int | None = None,
                 extra: Mapping[str, Any] | None = None) -> CohortTask:
    """``soft segment`` per input: a mask ``NAME.<format>`` and its ``NAME.legend.json``.

    ``extra``: further keyword arguments of :func:`~softcli.segment.segment` that change the output
    (JSON values); passed on and recorded in the settings, so new options join cohorts in one place.
    """
    from ..io.masks import legend_path
    from ..segment import check_model_request, segment
    from ..weights import resolve_weights

    suffix = _suffix(MASK_FORMATS, out_format)
    stages = check_model_request(weights, clusters, cluster_stages)
    if landmarks is not None:
        from ..api import landmark_policy

        landmark_policy(landmarks)
    resolved = resolve_weights(weights)  # once: a Hub spec is not looked up again per input
    checkpoint = Path(resolved.path)

    def run_one(path: str, out: Path, progress: TileProgress) -> JobResult:
        summary = segment(path, out, weights=resolved, clusters=clusters, cluster_stages=cluster_stages,
                          level=level, tile=tile, overlap=overlap, device=device, landmarks=landmarks, seed=seed,
                          max_pixels=max_pixels, max_memory=max_memory, progress=progress, **dict(extra or {}))
        return JobResult([out, legend_path(out)], tuple(summary["size"]), summary.get("mpp"),
                         summary.get("resumed_rows", 0) + summary.get("resumed_passes", 0))

    settings: dict[str, Any] = {"format": out_format, "clusters": clusters, "cluster_stages": stages if clusters
                                else None, "seed": seed, "level": level, "tile": tile, "overlap": overlap,
                                "landmarks": landmarks, **dict(extra or {})}
    return CohortTask("segment", suffix, settings, model_name, weights_sha256(_checkpoint_files(checkpoint)),
                      run_one, weights_path=str(checkpoint))


def check_features_options(out_format: str, stages: str | Sequence[int], pool: bool, blend: str
                           ) -> tuple[str, tuple[int, ...]]:
    """(suffix, stage list) of a features cohort, or the usage error its options deserve (before any model loads)."""
    from ..features import check_blend
    from ..io.writers import check_feature_request
    from ..stages import parse_stages

    suffix = _suffix(FEATURE_FORMATS, out_format)
    stage_list = parse_stages(stages)
    check_feature_request(f"x{suffix}", len(stage_list), pool)
    check_blend(blend)
    return suffix, stage_list


def features_task(model: torch.nn.Module, *, model_name: str, out_format: str = "safetensors",
                  stages: str | Sequence[int] = "1,2,3,4", tile: int | None = None, overlap: int | None = None,
                  level: int = 0,
                  max_memory: int | None = None, blend: str = "linear", pool: bool = False,
                  max_pixels: int | None = None, extra: Mapping[str, Any] | None = None) -> CohortTask:
    """``soft features`` per input with a model loaded once: ``NAME.<format>``.

    ``extra``: further keyword arguments of :func:`~softcli.features.extract_features` that change the
    output (JSON values); passed on and recorded in the settings.
    """
    from ..features import extract_features
    from ..io.writers import feature_outputs

    suffix, stage_list = check_features_options(out_format, stages, pool, blend)
    source = getattr(model, "source", None)

    def run_one(path: str, out: Path, progress: TileProgress) -> JobResult:
        result = extract_features(model, path, out, stages=stage_list, tile=tile, overlap=overlap, level=level,
                                  max_memory=max_memory, blend=blend, pool=pool, max_pixels=max_pixels,
                                  on_tile=lambda done, total: progress("tiles", done, total), **dict(extra or {}))
        return JobResult(feature_outputs(out), result.image_size, result.mpp,  # .npy: + its metadata sidecar
                         result.resumed_rows + result.resumed_passes)

    settings = {"format": out_format, "stages": stage_list, "tile": tile, "overlap": overlap, "level": level,
                "max_memory": max_memory, "blend": blend, "pool": pool,
                "landmarks": str(getattr(model, "landmark_policy", "")), **dict(extra or {})}
    files = _checkpoint_files(Path(source)) if source else []
    return CohortTask("features", suffix, settings, model_name, weights_sha256(files) if files else "unknown",
                      run_one, weights_path=str(source) if source else None)
