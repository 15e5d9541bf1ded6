"""Stage numbers as users write them (``"1,2,3,4"``, ``"4"``): one parser for ``--stages`` and ``--cluster-stages``."""

from __future__ import annotations

from collections.abc import Sequence

from .constants import STAGE_STRIDES
from .errors import UsageError


def parse_stages(text: str | Sequence[int] | None, *, default: Sequence[int] | None = None,
                 what: str = "stages") -> tuple[int, ...]:
    """``"4,1, 2"`` or ``[4, 1, 2]`` → (1, 2, 4): sorted, each once, each in 1..4; None → ``default``.

    ``what`` names the value in the error (e.g. "cluster stages"); a repeated
    stage is harmless and kept once.
    """
    if text is None and default is not None:
        return tuple(sorted(set(default)))
    items = str(text or "").replace(" ", "").split(",") if isinstance(text, str) or text is None else list(text)
    valid = range(1, len(STAGE_STRIDES) + 1)
    try:
        stages = tuple(sorted({int(s) for s in items if str(s) != ""}))
    except ValueError:
        stages = ()
    if not stages or any(s not in valid for s in stages):
        raise UsageError(f"{what} are numbers 1-{len(STAGE_STRIDES)} separated by commas, not {text!r}")
    return stages
