"""Many images in one run: input lists, output naming, a resumable manifest and scale-out with torch.distributed.

- :mod:`.inputs`: files, folders, globs and list files → input items; input stems → output names.
- :mod:`.manifest`: ``manifest.jsonl`` (one line per input), the settings key that decides resume.
- :mod:`.distributed`: ranks from ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), splitting by pixels.
- :mod:`.runner`: :func:`run_cohort`, one single-image job per input with a failure policy.
- :mod:`.tasks`: the single-image jobs of ``soft segment`` and ``soft features``.
"""

from __future__ import annotations

from .distributed import DistContext, split_by_pixels
from .inputs import gather_inputs, output_names
from .manifest import MANIFEST_NAME, Manifest, settings_key, weights_sha256
from .runner import CohortEvents, CohortReport, CohortTask, run_cohort

__all__ = ["MANIFEST_NAME", "CohortEvents", "CohortReport", "CohortTask", "DistContext", "Manifest",
           "gather_inputs", "output_names", "run_cohort", "settings_key", "split_by_pixels", "weights_sha256"]
