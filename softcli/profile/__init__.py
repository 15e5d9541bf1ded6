"""Measure time and memory of linear vs softmax attention, and of whole SOFT models, per size.

Methods, all at identical dims (``dim`` channels, ``heads`` heads, tokens on an
H x W grid):

- ``soft``: :class:`softcli.models.soft.SoftAttention` itself, the module the
  model runs, at the default landmark policy (or ``landmarks``);
- ``soft-official``: the same module with ``LandmarkPolicy("official")`` and
  ``official_order = True`` (materialised K1, m = N / r² landmarks);
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

from .estimate import estimate_flops, landmark_count
from .harness import measure
from .jobs import attention_jobs, grid_for, model_jobs, stage_input_sizes
from .methods import build_attention
from .settings import (
    DEFAULT_METHODS,
    DEFAULT_THREADS,
    DEFAULT_TOKENS,
    METHODS,
    MIN_REPEATS,
    STATUSES,
    ProfileJob,
    ProfileReport,
    ProfileResult,
    ProfileSettings,
    parse_bytes,
)
from .sweep import run_job, run_sweep

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_THREADS",
    "DEFAULT_TOKENS",
    "METHODS",
    "MIN_REPEATS",
    "STATUSES",
    "ProfileJob",
    "ProfileReport",
    "ProfileResult",
    "ProfileSettings",
    "attention_jobs",
    "build_attention",
    "estimate_flops",
    "grid_for",
    "landmark_count",
    "measure",
    "model_jobs",
    "parse_bytes",
    "run_job",
    "run_sweep",
    "stage_input_sizes",
]
