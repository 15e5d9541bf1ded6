"""Measure time and memory of linear vs softmax attention, and of whole SOFT models, per size.

Methods, all at identical dims (``dim`` channels, ``heads`` heads, tokens on an
H x W grid):

- ``soft``: :class:`softcli.models.soft.SoftAttention` itself, the module the
  model runs, at the default landmark policy (or ``landmarks``);
- ``soft-official``: the same module with ``LandmarkPolicy("official")`` as
  :class:`~softcli.profile.methods.OfficialOrderAttention` (materialised K1, m = N / r² landmarks);
- ``softmax``: the model's own stage-4 softmax attention
  (``scaled_dot_product_attention``: what a user has today);
- ``softmax-math``: the same under the ``MATH`` SDPA backend (the N x N matrix
  materialised, as naive implementations do);
- ``nystromformer``: :class:`softcli.models.nystromformer.NystromAttention` for context.

Modules: :mod:`.settings` (settings, jobs and results as dataclasses),
:mod:`.jobs` (which configurations), :mod:`.estimate` (FLOPs, landmarks, memory
before measuring), :mod:`.methods` (the measured modules), :mod:`.harness` (the
one timing harness), :mod:`.sweep` (worker processes, timeouts, OOM) and
:mod:`.worker` (``python -m softcli.profile.worker``). Nothing here prints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

#: Public name -> the submodule defining it. Loaded on first use, so that ``soft profile --help``
#: (which needs only :mod:`.names`) does not import torch.
_LAZY_ATTRIBUTES: dict[str, str] = {
    "estimate_flops": ".estimate",
    "landmark_count": ".estimate",
    "measure": ".harness",
    "attention_jobs": ".jobs",
    "grid_for": ".jobs",
    "model_jobs": ".jobs",
    "stage_input_sizes": ".jobs",
    "build_attention": ".methods",
    "OfficialOrderAttention": ".methods",
    "DEFAULT_METHODS": ".names",
    "DEFAULT_THREADS": ".names",
    "DEFAULT_TOKENS": ".names",
    "METHODS": ".names",
    "MIN_REPEATS": ".names",
    "STATUSES": ".settings",
    "ProfileJob": ".settings",
    "ProfileReport": ".settings",
    "ProfileResult": ".settings",
    "ProfileSettings": ".settings",
    "run_job": ".sweep",
    "run_sweep": ".sweep",
}

if TYPE_CHECKING:  # type checkers and IDEs see the real names
    from .estimate import estimate_flops, landmark_count
    from .harness import measure
    from .jobs import attention_jobs, grid_for, model_jobs, stage_input_sizes
    from .methods import OfficialOrderAttention, build_attention
    from .names import DEFAULT_METHODS, DEFAULT_THREADS, DEFAULT_TOKENS, METHODS, MIN_REPEATS
    from .settings import STATUSES, ProfileJob, ProfileReport, ProfileResult, ProfileSettings
    from .sweep import run_job, run_sweep

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_THREADS",
    "DEFAULT_TOKENS",
    "METHODS",
    "MIN_REPEATS",
    "OfficialOrderAttention",
    "ProfileJob",
    "ProfileReport",
    "ProfileResult",
    "ProfileSettings",
    "STATUSES",
    "attention_jobs",
    "build_attention",
    "estimate_flops",
    "grid_for",
    "landmark_count",
    "measure",
    "model_jobs",
    "run_job",
    "run_sweep",
    "stage_input_sizes",
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_ATTRIBUTES, globals())
