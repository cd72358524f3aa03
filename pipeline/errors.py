"""The two kinds of error: what the user can fix, and bugs.

The CLI prints a `DeryError` as one line. Anything else, `InternalError`
included, is a bug: the CLI shows its traceback and asks for a report.
"""
from __future__ import annotations

USAGE = 2
FAILED = 1


class DeryError(Exception):
    """A user-facing error: what was wrong, with what value, and what to do.

    `exit_code` is 2 for bad usage (arguments, files the user gave us) and 1
    for a run that failed (infeasible budget, missing hardware).
    """

    def __init__(self, message: str, *, exit_code: int = FAILED, pass_name: str | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.pass_name = pass_name

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{self.pass_name}: {msg}" if self.pass_name else msg

    def in_pass(self, name: str) -> DeryError:
        """Return this error tagged with the pass it came from (keeps an existing tag)."""
        if self.pass_name is None:
            self.pass_name = name
        return self


class InternalError(RuntimeError):
    """A broken invariant inside dery: a bug, never the user's input."""
