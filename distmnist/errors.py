"""One exception type for every user-facing error, and the exit path that prints it cleanly."""

from __future__ import annotations

import functools
import sys
from typing import Callable

EXIT_USAGE = 2  # bad input: flags, config, data files, checkpoints
EXIT_FAILURE = 1  # the run itself failed (a rank hung or died)


class DistmnistError(Exception):
    """An error the user can fix (bad flag, missing file, corrupt checkpoint): no traceback."""

    exit_code = EXIT_USAGE


class RunFailed(DistmnistError):
    """The run broke while training (a collective timed out, a peer vanished): exit 1, no traceback."""

    exit_code = EXIT_FAILURE


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command's main(): a DistmnistError becomes one line on stderr and exit code 2."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except DistmnistError as err:
            print(f"distmnist: error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(err.exit_code) from None

    return run
