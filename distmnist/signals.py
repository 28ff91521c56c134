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

import signal
import threading

import torch

CHECK_EVERY = 20  # steps between agreements with several processes; see the README's Speed section for its cost
DIVERGED = 1000  # a code above every signal number: a diverged run stops without saving its weights
HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequests:
    """The flag the signal handlers set, and the agreement of the ranks on it."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.code = 0  # this process: 0, a signal number, or DIVERGED
        self._previous: dict[int, object] = {}

    # ------------------------------------------------------------ this process

    def install(self) -> "StopRequests":
        """Handle the signals (only the main thread can; elsewhere, e.g. in a notebook worker thread, no-op)."""
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
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
