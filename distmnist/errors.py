"""Every way a command ends early, as an exception type with its exit code, and the exit path that
prints it as one line.

Exit codes (the README's table):
    0            done (also: a finished run resumed again, nothing to train)
    1            the run failed: a rank hung or died, training diverged, replicas drifted apart
    2            bad input: flags, config, data files, checkpoints, an output folder that is taken or unwritable
    128 + N      stopped by signal N after saving its position (SIGINT 130, SIGUSR1 138, SIGTERM 143);
                 ``--resume auto`` continues
"""

from __future__ import annotations

import functools
import gc
import signal
import sys
from typing import Callable

EXIT_FAILURE = 1  # the run itself failed
EXIT_USAGE = 2  # bad input
EXIT_SIGNAL_BASE = 128  # + the signal number, as shells report a death by signal


class DistmnistError(Exception):
    """An error the user can fix (bad flag, missing file, corrupt checkpoint): one line, no traceback.

    ``silent``: another rank reports this same error (the main process, or the rank it happened on);
    this rank only exits with the same code, so the console shows the message once.
    """

    exit_code = EXIT_USAGE

    def __init__(self, message: str = "", *, silent: bool = False, exit_code: int | None = None):
        super().__init__(message)
        self.silent = silent
        if exit_code is not None:
            self.exit_code = exit_code


class RunFailed(DistmnistError):
    """The run broke while training (a collective timed out, a peer vanished, the loss diverged): exit 1."""

    exit_code = EXIT_FAILURE


class RunStopped(DistmnistError):
    """Stopped by a signal at a step boundary, position saved: exit 128 + the signal number."""

    def __init__(self, message: str, signum: int, *, silent: bool = False):
        super().__init__(message, silent=silent, exit_code=EXIT_SIGNAL_BASE + signum)
        self.signum = signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def leave_process_group() -> None:
    """Tear the process group down, and free what still holds on to it (DDP's reducer, gloo's pending
    work), while the interpreter is fully alive. Left to interpreter exit, gloo's C++ objects are
    destroyed during finalization and abort the process (SIGABRT, "terminate called without an active
    exception"), and the launcher then reports a crash instead of the exit code."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available():
        return
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a broken group (a peer died): nothing left to tear down cleanly
            pass
    gc.collect()  # reference cycles (modules with hooks) would otherwise wait for finalization


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command's main(): a DistmnistError becomes one line on stderr and its exit code; an
    interrupt that the command did not handle itself becomes one line and exit 130."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            code = main(*args, **kwargs) or 0
            leave_process_group()  # after a clean shutdown: only what still references the group
            return code
        except DistmnistError as err:
            if not err.silent:
                prefix = "distmnist: " if isinstance(err, RunStopped) else "distmnist: error: "
                print(f"{prefix}{err}", file=sys.stderr, flush=True)
            leave_process_group()
            raise SystemExit(err.exit_code) from None
        except KeyboardInterrupt:
            print("distmnist: interrupted", file=sys.stderr, flush=True)
            leave_process_group()
            raise SystemExit(EXIT_SIGNAL_BASE + signal.SIGINT) from None

    return run
