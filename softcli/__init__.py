"""softcli: SOFT (softmax-free linear-attention) vision transformers on images of any size."""

from __future__ import annotations

__version__ = "0.1.0"

from .api import create_model, load_model, resolve_device  # noqa: E402
from .checkpoint import read_checkpoint, save_pretrained  # noqa: E402
from .errors import SoftError  # noqa: E402
from .models import LandmarkPolicy, SoftConfig, SoftModel  # noqa: E402

__all__ = [
    "__version__",
    "create_model",
    "load_model",
    "resolve_device",
    "read_checkpoint",
    "save_pretrained",
    "SoftError",
    "LandmarkPolicy",
    "SoftConfig",
    "SoftModel",
]
