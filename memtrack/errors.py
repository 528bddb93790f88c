"""memtrack's error family.

Every error a user can cause (a bad path, a bad config field, an index built with another embedder) is a
:class:`MemtrackError`. The CLI prints its message and hint and exits with :attr:`exit_code`; tracebacks
appear only with ``MEMTRACK_DEBUG=1``. Library code never raises bare ``Exception`` or uses ``assert``
for user input.
"""
from __future__ import annotations


#: Longest message kept; an error quoting a library's exception can carry a whole page of it.
MAX_MESSAGE = 600


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line (whitespace runs, newlines included, become one space), at most ``limit`` chars."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."


class MemtrackError(Exception):
    """Base class. ``message`` is one line naming the file or field; ``hint`` one sentence telling the
    user what to do next. Both are kept to one line here: messages often quote another library's
    exception (torch's, diffusers'), whose text can span many lines, and the CLI prints one error line."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        message = one_line(message)
        hint = one_line(hint) if hint is not None else None
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # message, then the advice
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(MemtrackError):
    """A config file or option is missing, unknown, or of the wrong type."""


class DataError(MemtrackError):
    """A training set or image folder cannot be read, or an entry in it is refused."""


class IndexError_(MemtrackError):
    """A reference index is missing, corrupt, or does not match the requested embedders."""


class FingerprintMismatch(IndexError_):
    """The embedder configured for a scan differs from the one the index was built with."""


class CheckpointError(MemtrackError):
    """A run directory holds no usable checkpoints, or a checkpoint has an unknown layout."""


class StoreError(MemtrackError):
    """The run store cannot be opened or written."""


class GateError(MemtrackError):
    """A ``--fail-on`` expression cannot be parsed or names an unknown metric."""


class DependencyError(MemtrackError):
    """An optional dependency is missing; the message names the extra to install."""


__all__ = [
    "MemtrackError",
    "ConfigError",
    "DataError",
    "IndexError_",
    "FingerprintMismatch",
    "CheckpointError",
    "StoreError",
    "GateError",
    "DependencyError",
    "one_line",
]
