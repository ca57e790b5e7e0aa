"""The one base class for errors a person can act on: stages print them without a traceback;
and `exit_with`, the end of every command-line tool that prints."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn


class PipelineError(Exception):
    """Bad input, config or state that the message explains; not a bug in the pipeline."""


def exit_with(main: Callable[[], int | None]) -> NoReturn:
    """Run a command-line tool's `main` and exit with its status. A reader that stops early
    (`python -m lorapipe.compare a b | head`) ends the tool quietly, as it ends `cat`, instead of
    with a BrokenPipeError traceback: Python's own recipe (the `signal` module's docs, "Note on
    SIGPIPE"), stdout pointed at /dev/null so the interpreter's last flush cannot fail again."""
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 1
    sys.exit(status)
