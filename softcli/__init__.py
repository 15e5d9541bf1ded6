"""softcli: SOFT (softmax-free linear-attention) vision transformers on images of any size.

The public API is loaded lazily (module ``__getattr__``): ``import softcli`` and
``soft --help`` stay fast because torch is imported only when a name that needs
it (``softcli.load_model``, ``softcli.SoftModel``...) is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name → the submodule that defines it (imported on first access).
_LAZY_ATTRIBUTES: dict[str, str] = {
    "create_model": ".api",
    "load_model": ".api",
    "resolve_device": ".api",
    "read_checkpoint": ".checkpoint",
    "save_pretrained": ".checkpoint",
    "SoftError": ".errors",
    "LandmarkPolicy": ".models",
    "SoftConfig": ".models",
    "SoftModel": ".models",
}

if TYPE_CHECKING:  # type checkers and IDEs see the real names
    from .api import create_model, load_model, resolve_device
    from .checkpoint import read_checkpoint, save_pretrained
    from .errors import SoftError
    from .models import LandmarkPolicy, SoftConfig, SoftModel

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


def __getattr__(name: str) -> Any:
    module = _LAZY_ATTRIBUTES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES))
