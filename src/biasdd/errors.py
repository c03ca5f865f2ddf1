"""Errors a user can cause, and the one way a stage script reports them.

A `UserError` (a bad param, a missing or corrupt input file) is the user's to fix: a stage prints it as
one line, `<stage>: error: <message>`, and exits with status 2, without a traceback. Anything else is a
bug and keeps its traceback. `BIASDD_DEBUG=1` keeps the traceback for user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

DEBUG_ENV = "BIASDD_DEBUG"


class UserError(Exception):
    """Something the user can fix; the message names the key or file and the fix."""

    def __str__(self) -> str:  # KeyError would quote its message; every UserError reads the same
        return str(self.args[0]) if self.args else ""


class ConfigError(UserError, ValueError):
    """A params value or key that is not valid; the message names the full key and the valid values."""


class UnknownKeyError(ConfigError, KeyError):
    """A params key that does not exist (or a required one that is missing)."""


class ArtifactError(UserError, FileNotFoundError):
    """An input artifact that is missing, truncated or not what the stage expects."""


def run_stage(main: Callable[[], None], name: str | None = None) -> None:
    """Run a stage's `main`, turning a `UserError` into one line on stderr and exit status 2."""
    try:
        main()
    except UserError as error:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        stage = name or Path(sys.argv[0]).stem
        print(f"{stage}: error: {error} (set {DEBUG_ENV}=1 for a traceback)", file=sys.stderr)
        raise SystemExit(2) from None
