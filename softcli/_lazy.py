"""Lazy package attributes (PEP 562), so that importing a package does not import torch.

``soft --help`` must stay fast: a package lists its public names with the submodule
that defines each, and the submodule is imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, attributes: Mapping[str, str],
                    namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose ``attributes`` map a name to its
    submodule (relative, e.g. ``".api"``); a loaded value is cached in ``namespace``."""

    def __getattr__(name: str) -> Any:
        module = attributes.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(attributes))

    return __getattr__, __dir__
