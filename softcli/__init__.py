"""softcli: SOFT (softmax-free linear-attention) vision transformers on images of any size.

The public API is loaded lazily (module ``__getattr__``): ``import softcli`` and
``soft --help`` stay fast because torch is imported only when a name that needs
it (``softcli.load_model``, ``softcli.SoftModel``...) is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_attributes

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


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_ATTRIBUTES, globals())
