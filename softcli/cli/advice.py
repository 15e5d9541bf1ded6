"""What to type next, added to a library error on the command line.

Library errors say what went wrong and never name command-line flags (the
Python API has none); :func:`with_advice` appends the CLI's wording by error
type, so ``error: ...`` lines still end with a next step.
"""

from __future__ import annotations

from ..errors import (
    NotASoftcliFolder,
    OriginUnavailable,
    SoftError,
    TamperedFile,
    UnknownModel,
    UnverifiableFile,
    WeightsNotCached,
)

#: For weights that are not cached and cannot be downloaded now.
OFFLINE_ADVICE = ("pull it on a connected machine ('soft weights pull {spec}') and copy the cache folder, "
                  "point HF_HOME at a copied cache, or pass --weights FILE")


def advice(exc: SoftError) -> str | None:
    """The next step for ``exc`` in CLI terms, or None when its message already says it."""
    spec = getattr(exc, "spec", None) or "MODEL"
    if isinstance(exc, UnknownModel):
        return "see 'soft weights list'"
    if isinstance(exc, (TamperedFile, UnverifiableFile)):
        return f"run 'soft weights pull {spec} --force' where the Hub can be reached to download it again, verified"
    if isinstance(exc, OriginUnavailable):
        return "pass --weights FILE, or make a softcli folder with 'soft weights convert FILE --out DIR'"
    if isinstance(exc, NotASoftcliFolder):
        return "make one with 'soft weights convert CHECKPOINT --out DIR'"
    if isinstance(exc, WeightsNotCached):
        return OFFLINE_ADVICE.format(spec=spec)
    return None


def with_advice(exc: SoftError) -> str:
    """``str(exc)``, then the CLI's next step when there is one."""
    text = str(exc)
    hint = advice(exc)
    if not hint:
        return text
    return f"{text} {hint[0].upper()}{hint[1:]}" if text.endswith(("?", ".")) else f"{text}; {hint}"
