"""``soft fit``: heads for the user's own classes on frozen SOFT features, from a few labels.

- :func:`fit_segmenter` (``soft fit segment``): scribbles or masks → a linear
  (or small FPN) segmentation head; ``soft segment --model DIR`` runs it.
- :func:`fit_classifier` (``soft fit classify``): an ImageFolder → a linear
  probe on the pooled features; ``soft classify --model DIR`` runs it.

Both write a softcli checkpoint folder whose backbone is referenced by sha256
(:mod:`softcli.backbone_ref`) unless bundled.
"""

from .classify import fit_classifier
from .segment import fit_segmenter

__all__ = ["fit_classifier", "fit_segmenter"]
