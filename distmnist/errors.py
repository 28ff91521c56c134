"""One exception type for every user-facing error, and the exit path that prints it cleanly."""

from __future__ import annotations

import functools
import sys
from typing import Callable

EXIT_USAGE = 2  # bad input: flags, config, data files, checkpoints


class DistmnistError(Exception):
    """An error the user can fix (bad flag, missing file, corrupt checkpoint): no traceback."""


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command's main(): a DistmnistError becomes one line on stderr and exit code 2."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except DistmnistError as err:
            print(f"distmnist: error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USAGE) from None

    return run
