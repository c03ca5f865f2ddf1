"""Errors a user can cause: each message names the key or file and the fix.

A `UserError` is the user's to fix; `biasdd.cli.run_stage` prints it as one line. Anything else is a bug.
"""

from __future__ import annotations


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
