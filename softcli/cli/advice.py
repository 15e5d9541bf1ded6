"""A library error in command-line words: its parameters as options, and what to type next.

Library errors say what went wrong and never name command-line flags (the
Python API has none): they name parameters in backticks (:mod:`softcli.errors`).
:func:`cli_message` writes those as the options that set them, through one
mapping (:data:`OPTION_FOR_PARAM`), and :func:`with_advice` appends the CLI's
next step by error type, so ``error: ...`` lines still end with one.
"""

from __future__ import annotations

from ..errors import (
    NotASoftcliFolder,
    OriginUnavailable,
    SegmentationCheckpoint,
    SoftError,
    TamperedFile,
    UnknownModel,
    UnverifiableFile,
    WeightsNotCached,
    render_params,
)

#: Python parameter → the option that sets it, where that is not ``--`` + the name with ``_`` → ``-``.
OPTION_FOR_PARAM: dict[str, str] = {
    "weights": "--weights/--model",  # segment/fit(weights=...): either option gives it
    "timeout_s": "--timeout",
    "max_memory_bytes": "--max-memory",
}


def option_for(param: str) -> str:
    """The command-line option for a Python parameter name."""
    return OPTION_FOR_PARAM.get(param, "--" + param.replace("_", "-"))


def _option(param: str, value: str | None) -> str:
    return option_for(param) if value is None else f"{option_for(param)} {value}"


def cli_text(template: str) -> str:
    """A library message with each parameter it names written as its option (`clusters=K` → ``--clusters K``)."""
    return render_params(template, _option)


def cli_message(exc: SoftError) -> str:
    """``str(exc)`` in command-line words (:func:`cli_text` of the message as raised)."""
    return cli_text(getattr(exc, "template", None) or str(exc))

#: For weights that are not cached and cannot be downloaded now.
OFFLINE_ADVICE = ("pull it on a connected machine ('soft weights pull {spec}') and copy the cache folder, "
                  "point HF_HOME at a copied cache, or pass --weights FILE")


def advice(exc: SoftError) -> str | None:
    """The next step for ``exc`` in CLI terms, or None when its message already says it."""
    spec = getattr(exc, "spec", None) or "MODEL"
    if isinstance(exc, SegmentationCheckpoint):
        return "label pixels with 'soft segment --model'"
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
    """:func:`cli_message`, then the CLI's next step when there is one."""
    text = cli_message(exc)
    hint = advice(exc)
    if not hint:
        return text
    return f"{text} {hint[0].upper()}{hint[1:]}" if text.endswith(("?", ".")) else f"{text}; {hint}"
