"""The errors a user can fix: each prints as one line and exits with code 2 (`cli.main`). Anything else is a bug
(exit 1, with its traceback).
"""
from __future__ import annotations


class UserError(Exception):
    """A problem the user fixes: one line, exit code 2. `label` is the word after `trinity:`."""

    label = "error"


class ConfigError(UserError, ValueError):
    """The configuration: a key, a value, a path, or a run that cannot fit on its devices."""


class DataError(UserError, ValueError):
    """The user's data: a file that cannot be read, a row that cannot be used (with its line or row number)."""


class RunFolderError(UserError):
    """The run folder: held by another run, not empty where a fresh run was asked for, not shared by every process,
    or holding a file edited by hand."""


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from or saved (a full disk); an earlier checkpoint is intact."""

    label = "stopped"


class NumericError(UserError):
    """Training diverged: too many steps in a row with a non-finite loss or gradient norm."""

    label = "stopped"


def one_line(e: BaseException) -> str:
    """An exception's reason as one line: its message's first line, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
