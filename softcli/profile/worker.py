"""A worker process that measures one configuration: ``python -m softcli.profile.worker '<job and settings JSON>'``.

:func:`softcli.profile.sweep.run_job` starts one per configuration and reads the
one line tagged :data:`~softcli.profile.settings.RESULT_TAG` from its stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from .harness import measure
from .settings import RESULT_TAG, ProfileJob, ProfileSettings

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Measure the job described by ``argv[0]`` (JSON: ``{"job": ..., "settings": ...}``); result on stdout."""
    args = sys.argv[1:] if argv is None else list(argv)
    spec = json.loads(args[0])
    job = ProfileJob(**{**spec["job"], "grid": tuple(spec["job"]["grid"])})
    settings = ProfileSettings(**spec["settings"])
    result = measure(job, settings)
    sys.stdout.write(RESULT_TAG + json.dumps(result.to_dict()) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
