"""Pure ``nn.Module`` model code: no file or network I/O lives here."""

from .landmarks import DEFAULT_LANDMARK_BUDGET, LandmarkPolicy
from .soft import (
    VARIANTS,
    SoftAttention,
    SoftConfig,
    SoftModel,
    checkpoint_filter_fn,
    create_soft,
    infer_config,
    is_official_layout,
)

__all__ = [
    "DEFAULT_LANDMARK_BUDGET",
    "LandmarkPolicy",
    "VARIANTS",
    "SoftAttention",
    "SoftConfig",
    "SoftModel",
    "checkpoint_filter_fn",
    "create_soft",
    "infer_config",
    "is_official_layout",
]
