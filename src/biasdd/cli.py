"""What every stage script shares: logging to stderr, and the one way it reports a user's error.

A `UserError` (a bad param, a missing or corrupt input file) is the user's to fix: `run_stage` prints
it as one line, `<stage>: error: <message>`, and exits with status 2, without a traceback. Anything
else is a bug and keeps its traceback. `BIASDD_DEBUG=1` keeps the traceback for user errors too.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from biasdd.errors import UserError

DEBUG_ENV = "BIASDD_DEBUG"


def setup_logging(level: int = logging.INFO) -> None:
    """Stage entry points log to stderr with timestamps; library code only calls getLogger."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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
