"""The names and defaults ``soft profile`` offers, without torch.

Kept apart from the measuring modules (which import torch) so that the command's
``--help`` can list them, and ``soft --help`` stays fast.
"""

from __future__ import annotations

METHODS = ("soft", "soft-official", "softmax", "softmax-math", "nystromformer")
DEFAULT_METHODS = ("soft", "soft-official", "softmax", "nystromformer")
#: Finishes in about a minute on a 2-core laptop CPU.
DEFAULT_TOKENS = (1024, 4096, 16384)
#: CPU threads while measuring unless told otherwise. One thread is what a shared or busy machine
#: can reproduce: with several, OpenMP threads wait for each other whenever one is descheduled, and
#: the many small ops of linear attention slow down several-fold while one big softmax matmul barely
#: does, so the load, not the method, decides the comparison (bench/README.md, "Threads").
DEFAULT_THREADS = 1
#: Timed calls a configuration gets even past the time budget (fewer only when ``repeat`` asks for fewer).
MIN_REPEATS = 3
