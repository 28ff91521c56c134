"""Stopping on request: SIGTERM, SIGUSR1 and the first SIGINT become a flag, and the ranks agree on
it at step boundaries, so that they all stop after the same step and save that exact position.

The handler only records the signal (nothing that could deadlock or tear a write). A second SIGINT
raises KeyboardInterrupt at once: the user really wants out. The loop asks ``StopRequests.agreed()``
every CHECK_EVERY steps (outside any CUDA graph) and at epoch boundaries: with one process that is a
read of a Python int; with several, one all-reduce of one integer (the maximum of every rank's
code), which also carries "the loss became non-finite" from the rank that saw it.

torchrun and accelerate launch forward SIGTERM and SIGINT to every worker (and SIGKILL them 30 s
later); SLURM sends its warning signal where ``--signal`` says. A signal that reaches one rank only
is enough: the all-reduce tells the others.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time

import torch

from .errors import EXIT_FAILURE, EXIT_SIGNAL_BASE, SignalHandler

CHECK_EVERY = 20  # steps between agreements with several processes (its cost: docs/benchmarks.md)
DIVERGED = 1000  # a code above every signal number: a diverged run stops without saving its weights
HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
SETUP_GRACE_S = 5.0  # the set-up guard acts this long after --setup-timeout


class StopRequests:
    """The flag the signal handlers set, and the agreement of the ranks on it."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.code = 0  # this process: 0, a signal number, or DIVERGED
        self.settled = False  # every file of the run is written: a late signal changes nothing
        self._previous: dict[int, SignalHandler] = {}

    # ------------------------------------------------------------ this process

    def install(self) -> StopRequests:
        """Handle the signals (only the main thread can; elsewhere, e.g. in a notebook worker thread, no-op)."""
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(sig, handler)
        self._previous.clear()

    def settle(self) -> None:
        """The run's records are complete: from now on signals are ignored until the process returns."""
        self.settled = True

    def _handle(self, signum: int, frame) -> None:
        if self.settled:
            return
        if signum == signal.SIGINT and self.code:  # the second request, and a Ctrl-C: abort now
            self._interrupt(signum, frame)
        elif not self.code:
            self.code = signum

    def _interrupt(self, signum: int, frame) -> None:
        """Whatever Ctrl-C did before these handlers: a command's boundary (errors.cli) raises
        KeyboardInterrupt once and ignores the Ctrl-C after it, Python's default raises it each time."""
        previous = self._previous.get(signal.SIGINT)
        if callable(previous):
            previous(signum, frame)
        else:  # SIG_DFL or SIG_IGN: neither is a Python function to call
            raise KeyboardInterrupt

    def diverged(self) -> None:
        """Called where the loss reaches the host and is not finite."""
        self.code = max(self.code, DIVERGED)

    # ------------------------------------------------------------ every rank

    def agreed(self) -> int:
        """The code every rank acts on: the largest any rank holds (every rank must call this together)."""
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return self.code
        flag = torch.tensor([self.code], dtype=torch.int64, device=self.accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # Accelerate's reduce has no max
        return int(flag.item())  # a host sync: hence only every CHECK_EVERY steps

    def agreed_with(self, wanted: bool) -> tuple[int, bool]:
        """agreed(), and whether any rank ``wanted`` something (a mid-epoch checkpoint by the main process's
        clock), in the same all-reduce."""
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return self.code, wanted
        flags = torch.tensor([self.code, int(wanted)], dtype=torch.int64, device=self.accelerator.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        code, any_wanted = flags.tolist()
        return int(code), bool(any_wanted)


class SetupGuard:
    """Set-up's signals and time limit. Until training starts, SIGTERM, SIGINT and SIGUSR1 end the process
    at once with one line (there is no position to save yet), and so does set-up running past
    --setup-timeout: also while the main thread waits inside a rendezvous or a collective, where no
    Python signal handler can run. A watcher thread acts instead, woken by the byte that Python's C-level
    handler writes for every signal to the file descriptor given to ``signal.set_wakeup_fd``.

        with SetupGuard(cfg.setup_timeout) as guard:
            guard.phase = "loading the data"
            ...
    """

    def __init__(self, timeout_s: float, rank: int = 0):
        self.timeout_s, self.rank = timeout_s, rank
        self.phase = "starting"
        self._pipe: tuple[int, int] | None = None
        self._previous: dict[int, SignalHandler] = {}
        self._old_wakeup = -1
        self._watcher: threading.Thread | None = None
        self._done = threading.Event()

    def __enter__(self) -> SetupGuard:
        if threading.current_thread() is threading.main_thread():
            read, write = os.pipe()
            os.set_blocking(write, False)
            self._pipe = (read, write)
            self._old_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, lambda signum, frame: None)  # the watcher acts
        self._watcher = threading.Thread(target=self._watch, name="distmnist-setup-guard", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            for sig, handler in self._previous.items():
                if handler is not None:
                    signal.signal(sig, handler)
            os.write(self._pipe[1], b"\0")  # wakes the watcher, which closes the pipe
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    def _watch(self) -> None:
        # a little after the process group's own timeout (the same --setup-timeout), which ends a wait in a
        # collective more gracefully when it can: this is the backstop for what nothing else times out
        deadline = time.monotonic() + self.timeout_s + SETUP_GRACE_S
        try:
            while not self._done.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    self._exit(EXIT_FAILURE, f"rank {self.rank}: set-up did not finish within --setup-timeout "
                                             f"{self.timeout_s:g} s (still {self.phase}); raise --setup-timeout if "
                                             "set-up is slow here", always=True)
                if self._pipe is None:
                    self._done.wait(min(left, 1.0))
                    continue
                ready, _, _ = select.select([self._pipe[0]], [], [], min(left, 1.0))
                if ready:
                    for signum in os.read(self._pipe[0], 64):
                        if signum in HANDLED and not self._done.is_set():
                            self._exit(EXIT_SIGNAL_BASE + signum, f"stopped by {signal.Signals(signum).name} during "
                                                                  f"set-up ({self.phase}); nothing was trained")
        finally:
            if self._pipe is not None:
                for fd in self._pipe:
                    try:
                        os.close(fd)
                    except OSError:
                        pass

    def _exit(self, code: int, message: str, always: bool = False) -> None:
        """One line (from the main process only, but for a timeout), then out: no Python unwinding, which
        could wait on the very thing that is stuck. The kernel releases the run folder's lock."""
        if always or self.rank == 0:
            try:
                os.write(2, f"distmnist: {'error: ' if code == EXIT_FAILURE else ''}{message}\n".encode())
            except OSError:
                pass
        os._exit(code)
