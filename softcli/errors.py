"""Errors a user can cause and fix.

Everything the command line should report as one ``error: ...`` line (instead of
a traceback) derives from :class:`SoftError`. Library code raises these with a
message that names the file or value at fault and, where possible, what to do.

The library never names a command-line flag (the Python API has none). A
message names a parameter in backticks instead: ``"`overlap` must be a multiple
of 32, not 48"``, or with a value, ``"pass `clusters=K`"``. ``str(exc)`` reads
``overlap must be ...`` / ``clusters=K`` (the Python names); the command line
renders the same error through one parameter → option mapping
(:func:`softcli.cli.advice.cli_message`): ``--overlap must be ...`` /
``--clusters K``. Only lower-case identifiers in backticks are parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable

#: A parameter named in a message: `name` or `name=VALUE`.
_PARAM = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")


def render_params(template: str, option: Callable[[str, str | None], str] | None = None) -> str:
    """``template`` with each `name` / `name=VALUE` written by ``option(name, value)``; default: the Python form."""
    if option is None:
        return _PARAM.sub(lambda m: m.group(0)[1:-1], template)
    return _PARAM.sub(lambda m: option(m.group(1), m.group(2)), template)


def param_names(template: str) -> tuple[str, ...]:
    """The parameters a message names, in order, each once."""
    return tuple(dict.fromkeys(m.group(1) for m in _PARAM.finditer(template)))


class SoftError(Exception):
    """Base class for user-facing errors (bad input, bad checkpoint, no network).

    ``template`` is the message as raised, parameters in backticks (see the
    module docstring); ``str()`` is its Python-API reading.
    """

    exit_code: int = 1

    def __init__(self, message: object = "", *args: object) -> None:
        self.template = message if isinstance(message, str) else str(message)
        super().__init__(render_params(self.template), *args)


class CheckpointError(SoftError):
    """A checkpoint cannot be read, is unsafe, or does not fit the architecture."""


class SegmentationCheckpoint(CheckpointError):
    """A segmentation checkpoint given where a classifier or backbone is loaded (use segment/load_segmenter)."""


class InputError(SoftError):
    """An input image is missing, unreadable, too large or of an unsupported kind."""


class OutputError(SoftError):
    """An output path cannot be written (missing folder, unwritable, would overwrite an input)."""


class UsageError(SoftError):
    """Options that contradict each other or are out of range."""

    exit_code = 2


class ParameterError(UsageError):
    """A parameter out of range or contradicting another; ``params`` are the Python names the message gives.

    ``ParameterError("`tile` must be at least 64, not 32")``: ``str()`` reads
    ``tile must be at least 64, not 32``, the command line ``--tile must be ...``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.params = param_names(message)
        if not self.params:
            raise ValueError(f"a ParameterError names its parameter in backticks: {message!r}")

    def __reduce__(self) -> tuple[type[ParameterError], tuple[str]]:  # pickled (a worker's error): keep the template
        return type(self), (self.template,)

    @property
    def param(self) -> str:
        """The parameter at fault (the first one the message names)."""
        return self.params[0]


class NoSegmentationModel(UsageError):
    """Segmentation was asked for with neither a segmentation checkpoint nor a number of clusters."""


# Weights: the registry, the Hub, official releases (softcli.weights) --------------------
# Messages say what happened; the CLI adds what to type next (softcli.cli.advice), so the
# library never names a command-line flag. ``spec`` is the model spec at fault, when known.


class WeightsError(SoftError):
    """Weights cannot be found, downloaded or verified."""

    def __init__(self, message: str, *, spec: str | None = None) -> None:
        super().__init__(message)
        self.spec = spec


class RegistryError(SoftError):
    """The registry file is missing or malformed, or does not know a name."""


class UnknownModel(RegistryError, WeightsError):
    """A name that is neither a registry model, a Hub spec nor an existing path; ``suggestions`` are close names."""

    def __init__(self, message: str, *, spec: str, suggestions: list[str]) -> None:
        WeightsError.__init__(self, message, spec=spec)
        self.suggestions = suggestions


class WeightsNotCached(WeightsError):
    """The weights are not in the cache and cannot be downloaded now (offline, or the download failed)."""


class HubUnavailable(WeightsError):
    """The Hub repo is missing, or unreachable with nothing cached: a registry model may fall back to its origin."""

    def __init__(self, message: str, reason: str, *, spec: str | None = None) -> None:
        super().__init__(message, spec=spec)
        self.reason = reason


class HubNotCached(HubUnavailable, WeightsNotCached):
    """The Hub cannot be reached (or downloads are off) and nothing usable is cached."""


class TamperedFile(WeightsError):
    """A downloaded or cached file does not have the hash it should; it has been deleted (download it again)."""


class UnverifiableFile(WeightsError):
    """A cached file has no recorded hash to check it against (download it again, verified)."""


class OriginUnavailable(WeightsError):
    """A registry model's official release cannot be downloaded by softcli (no id recorded, unknown kind)."""


class NotASoftcliFolder(WeightsError):
    """A folder that should hold softcli weights (model.safetensors + config.json) does not."""


class HubAuthError(WeightsError):
    """The Hub refused a write: no token, or one without write access."""
