"""The configurations of a sweep: method x token grid, or the parts of a whole model."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ParameterError, UsageError
from ..models.soft import VARIANTS
from ..resources import format_bytes
from .estimate import memory_limit, min_attention_bytes
from .settings import METHODS, ProfileJob, ProfileSettings

__all__ = ["attention_jobs", "grid_for", "model_jobs", "stage_input_sizes"]


def grid_for(tokens: int) -> tuple[int, int]:
    """The most square H x W with H·W = tokens (H <= W)."""
    if tokens < 1:
        raise UsageError(f"token counts must be positive, not {tokens}")
    h = math.isqrt(tokens)
    while tokens % h:
        h -= 1
    return h, tokens // h


def attention_jobs(methods: Sequence[str], tokens: Sequence[int], settings: ProfileSettings) -> list[ProfileJob]:
    """Method x size jobs, sizes ascending; refuses grids the SOFT landmark conv cannot take."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")
    if not methods or not tokens:
        raise UsageError("give at least one method and one token count")
    limit = memory_limit(settings)
    jobs: list[ProfileJob] = []
    for n in sorted(set(tokens)):
        need = min_attention_bytes(n, settings)
        if limit is not None and need > limit:
            raise ParameterError(f"`tokens` {n}: the inputs and outputs alone of one attention call at {n:,} tokens "
                             f"need {format_bytes(need)}, more than the {format_bytes(limit)} "
                             f"{'`max_memory_bytes` allows' if settings.max_memory_bytes else 'available'}")
        grid = grid_for(n)
        if any(m.startswith("soft-") or m == "soft" for m in methods) and grid[0] < settings.sr_ratio:
            raise ParameterError(
                f"{n} tokens make a {grid[0]}x{grid[1]} grid, narrower than `sr_ratio` {settings.sr_ratio}; "
                f"SOFT needs both sides >= the sr ratio (square counts work, e.g. {(4 * settings.sr_ratio) ** 2})")
        jobs.extend(ProfileJob(method=m, grid=grid) for m in dict.fromkeys(methods))
    return jobs


def _conv_out(size: int) -> int:
    return (size - 1) // 2 + 1  # 3x3, stride 2, padding 1


def stage_input_sizes(image_size: int) -> list[int]:
    """Input side of each stage for a square image (stage 1 has two stride-2 stem convs)."""
    sizes = [image_size]
    s = _conv_out(_conv_out(image_size))
    for _ in range(3):
        sizes.append(s)
        s = _conv_out(s)
    return sizes


def model_jobs(model: str, image_size: int) -> list[ProfileJob]:
    """One job per stage (random activations of the stage's input shape) and one whole forward."""
    if model not in VARIANTS:
        raise UsageError(f"unknown model {model!r}; known: {', '.join(VARIANTS)}")
    if image_size < 32:
        raise ParameterError("`image_size` must be at least 32 (four stride-2 levels below the stem)")
    sizes = stage_input_sizes(image_size)
    outs = sizes[1:] + [_conv_out(sizes[3])]  # each stage's token grid side
    jobs = [ProfileJob(method=model, grid=(o, o), model=model, part=f"stage{i + 1}", image_size=image_size)
            for i, o in enumerate(outs)]
    jobs.append(ProfileJob(method=model, grid=(outs[0], outs[0]), model=model, part="model", image_size=image_size))
    return jobs
