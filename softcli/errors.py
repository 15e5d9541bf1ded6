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
