"""Choosing a context mode and planning a global run within a memory budget."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..constants import DEFAULT_MAX_MEMORY, STAGE_STRIDES
from ..errors import ParameterError, UsageError
from ..resources import available_memory
from ..tiling import ALIGN, FIXED_OVERHEAD_BYTES, choose_tile_size, estimate_memory

CONTEXT_MODES = ("auto", "global", "tile")


def check_context_mode(requested: str) -> None:
    """A usage error for a context that is not one of :data:`CONTEXT_MODES`, before any work."""
    if requested not in CONTEXT_MODES:
        raise ParameterError(f"`context` must be one of {', '.join(CONTEXT_MODES)}, not {requested!r}")
#: Largest default tile side (pixels at stride 1) of the global mode: big tiles cost
#: nothing in exactness, only working memory, and amortise the per-tile overhead.
GLOBAL_TILE_CAP = 2048


def default_max_memory(fallback: int = DEFAULT_MAX_MEMORY) -> int:
    """Half of the RAM available now (at least 1 GB); ``fallback`` when that cannot be read."""
    avail = available_memory()
    return fallback if avail is None else max(2**30, avail // 2)


def memory_budget(max_memory: int | None) -> int:
    """The one default of every ``max_memory=`` parameter: ``None`` (or 0) is :func:`default_max_memory`."""
    return max_memory or default_max_memory()


@dataclass(frozen=True)
class ContextChoice:
    """Which context mode runs and why (for ``--json`` and the summary line)."""

    mode: str  # "whole", "global" or "tile"
    reason: str
    estimated_whole_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "reason": self.reason,
                "estimated_whole_gb": round(self.estimated_whole_bytes / 2**30, 2)}


def choose_context(requested: str, height: int, width: int, model_config: Any, params: int,
                   max_memory: int) -> ContextChoice:
    """``auto``: the whole image in one pass when its estimated peak fits ``max_memory``, else ``global``."""
    if requested not in CONTEXT_MODES:
        raise ValueError(f"context must be one of {', '.join(CONTEXT_MODES)}, not {requested!r}")
    pad_h, pad_w = -(-height // ALIGN) * ALIGN, -(-width // ALIGN) * ALIGN
    est = estimate_memory(pad_h * pad_w, model_config, params)
    gb = f"{est / 2**30:.1f} GB"
    if requested == "global":
        return ContextChoice("global", "asked for: exact whole-image context, streamed over tiles", est)
    if requested == "tile":
        return ContextChoice("tile", "asked for: each tile sees only itself; tiles blended at the seams", est)
    if est <= max_memory:
        return ContextChoice("whole", f"the whole image fits the memory limit in one pass (about {gb})", est)
    return ContextChoice("global", f"one pass would need about {gb}, over the memory limit: "
                                   "exact whole-image context streamed over tiles", est)


def tissue_context(choice: ContextChoice, masking: bool) -> ContextChoice:
    """The context to run when tiles without tissue are skipped: global context computes every token
    (its sums run over the whole image), so it has nothing to skip; ``auto`` takes tiles instead."""
    if not masking or choice.mode != "global":
        return choice
    if choice.reason.startswith("asked for"):
        raise UsageError("global context computes every token, so it cannot skip tiles without tissue; "
                         "turn tissue masking off or use tile context")
    return ContextChoice("tile", "the whole image does not fit the memory limit in one pass and tissue masking "
                                 "skips tiles without tissue: tiles", choice.estimated_whole_bytes)


def plan_global(height: int, width: int, model_config: Any, params: int, max_memory: int,
                stage_channels: Sequence[int], tile: int | None = None) -> tuple[int, bool]:
    """(tile side in pixels, spill activations to disk?) for a global run within ``max_memory``.

    Activations: the largest stage holds up to three maps at once (input, output,
    a kept stage map); they stay in memory when that takes at most a third of the
    budget. Tiles get the rest, sized with the same per-pixel model as whole passes.
    """
    held = max(3 * 4 * c * -(-height // s) * -(-width // s) for c, s in zip(stage_channels, STAGE_STRIDES))
    spill = held > max_memory // 3
    room = max_memory - (0 if spill else held)
    if tile is None:
        tile = choose_tile_size(max(room, FIXED_OVERHEAD_BYTES), model_config, params, cap=GLOBAL_TILE_CAP)
    return tile, spill
