"""Typed errors. Each carries the process exit code the CLI uses for it (documented in README)."""

from __future__ import annotations


class MoetoolError(Exception):
    """Base class: a failure moetool explains in one line, without a traceback."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class SourceNotFoundError(MoetoolError):
    """The checkpoint path or hub id does not exist."""

    exit_code = 3


class CheckpointFormatError(MoetoolError):
    """A weights file or index is malformed, truncated or unsafe."""

    exit_code = 4


class ConfigError(MoetoolError):
    """config.json is missing, unreadable or self-contradictory."""

    exit_code = 5


class ProblemsFoundError(MoetoolError):
    """The checkpoint was read, but disagrees with its config (or --strict found warnings)."""

    exit_code = 6


class UnsupportedError(MoetoolError):
    """The request is valid but moetool cannot do it for this checkpoint."""

    exit_code = 7


class OutputExistsError(MoetoolError):
    """The output path exists and --force was not given."""

    exit_code = 8


class UsageError(MoetoolError):
    """Options that contradict each other or the checkpoint (like typer's own usage errors)."""

    exit_code = 2


class OutputWriteError(MoetoolError):
    """Writing the output failed (disk full, permissions); nothing partial is left behind."""

    exit_code = 9
