"""How a command ends: the exception types with their exit codes, and the one boundary every command
runs inside (``cli``), which turns any ending into its exit code and at most one line on stderr.

Exit codes (docs/reference/exit-codes.md):
    0            done (also: a finished run resumed again, nothing to train)
    1            the run failed: a rank hung or died, training diverged, replicas drifted apart
    2            bad input: flags, config, data files, checkpoints, an output folder that is taken or unwritable
    128 + N      stopped by signal N after saving its position (SIGINT 130, SIGUSR1 138, SIGTERM 143);
                 ``--resume auto`` continues
"""

from __future__ import annotations

import atexit
import functools
import gc
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType, ModuleType
from typing import Any, NoReturn, TypeAlias

from . import stdio

EXIT_FAILURE = 1  # the run itself failed
EXIT_USAGE = 2  # bad input
EXIT_SIGNAL_BASE = 128  # + the signal number, as shells report a death by signal
EXIT_INTERRUPTED = EXIT_SIGNAL_BASE + signal.SIGINT  # 130, Ctrl-C
LATE_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # the stop requests (signals.py) a command outlives

# what signal.getsignal() and signal.signal() return: a Python function, SIG_DFL / SIG_IGN, or None for a
# handler set outside Python
SignalHandler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


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


def leave_process_group(collect: bool = True) -> None:
    """Tear the process group down, and free what still holds on to it (DDP's reducer, gloo's pending
    work), while the interpreter is fully alive. Left to interpreter exit, gloo's C++ objects are
    destroyed during finalization and abort the process (SIGABRT, "terminate called without an active
    exception"), and the launcher then reports a crash instead of the exit code. ``collect=False``:
    the process ends without finalization (exit_process), so the collection, a walk over the whole
    heap, has nothing to prevent."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available():
        return
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a broken group (a peer died): nothing left to tear down cleanly
            pass
    if collect:
        gc.collect()  # reference cycles (modules with hooks) would otherwise wait for finalization




def os_error_message(err: OSError) -> str:
    """'PATH: reason' (both paths of a rename or a link), or the reason alone when there is no path."""
    reason = err.strerror or str(err) or type(err).__name__
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


# ---------------------------------------------------------------- the boundary


@dataclass
class Ending:
    """How a command ends: its exit code, and the line stderr gets (None: nothing to say)."""

    code: int
    line: str | None = None


def ending(outcome: BaseException | int) -> Ending | None:
    """The exit code and the line for what main() returned or raised; None for an exception that is a
    bug in distmnist (its traceback is then the report)."""
    if isinstance(outcome, int):
        return Ending(outcome)
    if isinstance(outcome, SystemExit):  # argparse's exit (it has printed its own line), --help
        if outcome.code is None or isinstance(outcome.code, int):
            return Ending(outcome.code or 0)
        return Ending(EXIT_FAILURE, str(outcome.code))  # sys.exit("text"), as Python reports it
    if isinstance(outcome, KeyboardInterrupt):
        earlier = outcome.__context__  # what was already ending the command when the Ctrl-C came
        while earlier is not None and not isinstance(earlier, DistmnistError):
            earlier = earlier.__context__
        return ending(earlier) if earlier is not None else Ending(EXIT_INTERRUPTED, "distmnist: interrupted")
    if isinstance(outcome, DistmnistError):
        prefix = "distmnist: " if isinstance(outcome, RunStopped) else "distmnist: error: "
        return Ending(outcome.exit_code, None if outcome.silent else f"{prefix}{outcome}")
    if isinstance(outcome, OSError):  # a file operation without a message of its own
        return Ending(EXIT_USAGE, f"distmnist: error: {os_error_message(outcome)}")
    if isinstance(outcome, MemoryError):
        return Ending(EXIT_FAILURE, "distmnist: error: out of memory")
    return None


class Signals:
    """The boundary's signal handling, for one command.

    While main() runs, the first Ctrl-C raises KeyboardInterrupt and later ones do nothing: the first
    is already ending the command, and a second must not break into its way out with a traceback
    (signals.StopRequests, installed on top of this by train, hands its second SIGINT down to here).
    From ``close()`` on the outcome is decided: SIGINT, SIGTERM and SIGUSR1 change nothing, and once
    its line is out (``exit_code`` set) they end a process that runs the command at once, with that code.
    """

    def __init__(self):
        self.active = threading.current_thread() is threading.main_thread()  # only it may set handlers
        self.saved: dict[int, SignalHandler] = {}
        self.closing = False
        self.interrupted = False
        self.exit_code: int | None = None

    def install(self) -> Signals:
        if self.active:
            self.saved = {sig: signal.getsignal(sig) for sig in LATE_SIGNALS}
            signal.signal(signal.SIGINT, self._interrupt)
        return self

    def _interrupt(self, signum: int, frame) -> None:
        if not (self.closing or self.interrupted):
            self.interrupted = True
            raise KeyboardInterrupt

    def close(self) -> None:
        self.closing = True
        if self.active:
            for sig in LATE_SIGNALS:
                signal.signal(sig, self._late)

    def _late(self, signum: int, frame) -> None:
        if self.exit_code is not None:
            stdio.flush()
            os._exit(self.exit_code)

    def restore(self) -> None:
        for sig, handler in self.saved.items():
            if handler is not None:  # None: a handler set outside Python, which Python cannot put back
                signal.signal(sig, handler)


def exit_process(code: int) -> NoReturn:
    """End this process with ``code`` as Python's own exit would (non-daemon threads joined, atexit
    callbacks run, streams flushed), minus the interpreter's teardown. With torch loaded that teardown
    takes a second or more, and Python has put every signal's default action back before it: a
    launcher's late SIGTERM there turned a finished run into a death by signal, a second Ctrl-C
    into a death without its line. (It is also where gloo's threads abort, see leave_process_group.)"""
    # the interpreter's own exit steps, in its order: threading's exit hooks (they stop idle executor
    # workers) and the join of non-daemon threads, then the atexit callbacks (logging, multiprocessing,
    # trackers)
    threading._shutdown()  # type: ignore[attr-defined]  # typeshed leaves out this private hook of CPython's exit
    atexit._run_exitfuncs()
    stdio.flush()
    os._exit(code)


def import_command(name: str) -> ModuleType:
    """Import a command's module for a process of its own (``distmnist CMD``, ``python -m distmnist.CMD``).
    Its imports (torch's) take seconds, before the command's boundary (``cli``) is up: a Ctrl-C then ends
    the process with the interrupt's line and exit 130, as it does later, instead of Python's traceback."""
    try:
        return importlib.import_module(name)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C cannot cut the line short
        stdio.say("distmnist: interrupted")
        exit_process(EXIT_INTERRUPTED)


def cli(main: Callable[[Sequence[str] | None], int | None]) -> Callable[..., int]:
    """Wrap a command's main(argv): the boundary every command runs inside.

    Whatever ends the command becomes its exit code and at most one line on stderr (``ending``);
    stdout and stderr are guarded (stdio.py: a reader that goes away stops the output, not the
    command); signals are handled as ``Signals`` says. ``own_process`` (by default: when argv is
    None, i.e. the command line is the process's own, as in ``python -m distmnist.train``): the
    process ends right after the command, with its code (``exit_process``). Otherwise (a call from
    Python: tests, notebooks) it returns 0 or raises SystemExit(code), with the signal handlers and
    streams it found put back.
    """

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None, *, own_process: bool | None = None) -> int:
        own = argv is None if own_process is None else own_process
        restore_streams = stdio.guard()
        signals = Signals().install()
        outcome: BaseException | int | None = None
        try:
            try:
                outcome = main(argv) or 0
            except BaseException as err:  # every ending is sorted out below; a bug is raised again
                outcome = err
            finally:
                signals.close()
        except KeyboardInterrupt as late:  # the one Ctrl-C, landing as main() ended: what ended it wins
            outcome = late if outcome is None else outcome
        signals.close()  # again, in case the Ctrl-C above cut the first call short; none can come now
        end = ending(outcome)
        if end is None:
            assert isinstance(outcome, BaseException)  # ending() has an Ending for every exit code
            signals.restore()
            restore_streams()
            raise outcome
        if end.line:
            stdio.say(end.line)
        if own:
            signals.exit_code = end.code
        leave_process_group(collect=not own)
        if own:
            exit_process(end.code)
        signals.restore()
        restore_streams()
        if end.code or isinstance(outcome, SystemExit):
            raise SystemExit(end.code) from None
        return 0

    return run
