"""The attention methods ``soft profile`` measures and its default sweep.

Kept apart from :mod:`softcli.profile` (which imports torch) so that the
command's ``--help`` can list them without importing torch.
"""

from __future__ import annotations

METHODS = ("soft", "soft-official", "softmax", "softmax-math", "nystromformer")
DEFAULT_METHODS = ("soft", "soft-official", "softmax", "nystromformer")
#: Finishes in well under a minute on a 2-core laptop CPU.
DEFAULT_TOKENS = (1024, 4096, 16384)
