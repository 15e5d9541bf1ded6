"""Class names for a model's outputs.

The ImageNet-1k names ship with the package (``softcli/data/imagenet_classes.txt``:
the short names torchvision uses, see the file's header for provenance), because
the official SOFT checkpoints carry no labels of their own.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any

IMAGENET_NUM_CLASSES = 1000


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index 0 ("tench") to 999 ("toilet tissue")."""
    text = resources.files("softcli.data").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
    if len(names) != IMAGENET_NUM_CLASSES:  # a packaging fault, not a user error
        raise RuntimeError(f"imagenet_classes.txt holds {len(names)} names, expected {IMAGENET_NUM_CLASSES}")
    return names


def labels_for(model: Any) -> list[str]:
    """One name per output class.

    The model's own ``labels`` (from its ``config.json``) win; a 1000-class model
    without labels is taken to be an ImageNet-1k classifier; anything else gets
    ``class N``. Labels shorter than the class count are padded with ``class N``.
    """
    num_classes = int(model.config.num_classes)
    own = getattr(model, "labels", None)
    if own:
        own = list(own)[:num_classes]
        return own + [f"class {i}" for i in range(len(own), num_classes)]
    if num_classes == IMAGENET_NUM_CLASSES:
        return list(imagenet_classes())
    return [f"class {i}" for i in range(num_classes)]
