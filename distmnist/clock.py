"""Time estimates of a run: the elapsed and remaining time of the epoch under way and of the whole
run, and how a duration reads (0:07, 1:02:03). The console (console.py) renders them."""

from __future__ import annotations

import time
from collections.abc import Callable

MIN_ESTIMATE_S = 0.5  # no time estimate before the epoch has run this long (first steps are warm-up)


def clock(seconds: float | None) -> str:
    """0:07, 12:30, 1:02:03; '' for an unknown duration."""
    if seconds is None:
        return ""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RunClock:
    """Elapsed and remaining time of the epoch under way and of the whole run (this invocation).

    Epoch: remaining steps at the epoch's mean step rate so far (at the earlier epochs' pace during
    its first half second, when warm-up dominates). Run: that, plus the epoch's test
    and checkpoint time, plus the epochs still to come at the wall time of the epochs already done
    (test and checkpoint included; the first epoch, with its warm-up, only while it is the only one).
    """

    def __init__(self, epochs: int, now: Callable[[], float] = time.perf_counter):
        self.epochs, self.now = epochs, now
        self.run_start: float | None = None
        self.first_epoch = 1  # the first epoch this invocation trains (later for a resumed run)
        self.epoch = 0
        self.steps = 1
        self.step = 0
        self.epoch_start = self.train_end = 0.0
        self.walls: list[float] = []  # wall time of each finished epoch: train, test, checkpoint
        self.trains: list[float] = []  # the training part of each

    def begin_epoch(self, epoch: int, steps: int) -> None:
        t = self.now()
        if self.run_start is None:
            self.run_start, self.first_epoch = t, epoch
        self.epoch, self.steps, self.step = epoch, max(steps, 1), 0
        self.epoch_start = self.train_end = t

    def update(self, step: int) -> None:
        self.step = step

    def end_training(self) -> None:
        self.train_end = self.now()

    def end_epoch(self) -> None:
        t = self.now()
        self.walls.append(t - self.epoch_start)
        self.trains.append(self.train_end - self.epoch_start)
        self.step = self.steps

    def run_elapsed(self) -> float:
        return 0.0 if self.run_start is None else self.now() - self.run_start

    def epoch_elapsed(self) -> float:
        return self.now() - self.epoch_start

    def _typical(self, values: list[float]) -> float | None:
        later = values[1:] or values  # the first epoch carries the warm-up
        return sum(later) / len(later) if later else None

    def epoch_left(self) -> float | None:
        """Seconds of training left in this epoch; None until measurable."""
        elapsed = self.epoch_elapsed()
        if self.step >= self.steps:
            return 0.0
        if self.step == 0 or elapsed < MIN_ESTIMATE_S:  # too early in this epoch: the earlier ones' pace
            train = self._typical(self.trains)
            return None if train is None else train * (self.steps - self.step) / self.steps
        return elapsed / self.step * (self.steps - self.step)

    def run_left(self) -> float | None:
        """Seconds left in the run; None until measurable."""
        wall = self._typical(self.walls)
        after = self.epochs - self.epoch  # epochs after this one
        if self.step >= self.steps:  # between epochs (test, checkpoint) or at an epoch's end
            return None if wall is None and after else (wall or 0.0) * after
        left = self.epoch_left()
        if left is None:
            return None
        train = self._typical(self.trains)
        overhead = max(wall - train, 0.0) if wall is not None and train is not None else 0.0
        per_epoch = wall if wall is not None else self.epoch_elapsed() + left
        return left + overhead + after * per_epoch

    def fraction(self) -> float:
        """Share of this invocation's training done (from the first epoch it trains)."""
        total = self.epochs - self.first_epoch + 1
        done = self.epoch - self.first_epoch + self.step / self.steps
        return min(max(done / max(total, 1), 0.0), 1.0)
