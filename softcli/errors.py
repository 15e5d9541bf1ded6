"""Errors a user can cause and fix.

Everything the command line should report as one ``error: ...`` line (instead of
a traceback) derives from :class:`SoftError`. Library code raises these with a
message that names the file or value at fault and, where possible, what to do.
"""

from __future__ import annotations


class SoftError(Exception):
    """Base class for user-facing errors (bad input, bad checkpoint, no network)."""

    exit_code: int = 1


class CheckpointError(SoftError):
    """A checkpoint cannot be read, is unsafe, or does not fit the architecture."""


class InputError(SoftError):
    """An input image is missing, unreadable, too large or of an unsupported kind."""


class OutputError(SoftError):
    """An output path cannot be written (missing folder, unwritable, would overwrite an input)."""


class UsageError(SoftError):
    """Options that contradict each other or are out of range."""

    exit_code = 2


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
