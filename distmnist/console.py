"""What a person sees: rich on a terminal, plain timestamped lines elsewhere, nothing on other ranks.

Only the main process builds a Console with a mode other than "none"; the training code calls it
unconditionally.

Rich (a terminal): the plan and a model summary table, then one table for the whole run whose
header is printed once. Each finished epoch adds a row; below the rows, two live rows show the
epoch under way and the run as a whole (elapsed and estimated time left for each). Every line fits
in 80 columns, and a cell shows nothing until its value is known (no placeholder text).

Plain (logs, SLURM, CI): self-describing lines with a timestamp. A progress line comes every
--log-interval seconds on a clock that runs across epochs (so short epochs are covered too), and
one line per finished epoch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console as RichConsole
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .clock import RunClock, clock
from .model import Layer

PLAIN_INTERVAL_S = 10.0  # default seconds between progress lines where stdout is not a terminal
RICH_LOSS_INTERVAL_S = 0.5  # how often the live rows read the loss from the device (a host sync)
RICH_REFRESH_PER_S = 4  # redraws of the live rows (a rich thread; no device access)

# The run table: (header, width). Finished epochs fill every column; the live rows put their bar
# under "test loss" and "test accuracy". 72 columns with the gaps.
COLUMNS = (("epoch", 6), ("train loss", 10), ("test loss", 9), ("test accuracy", 13), ("images/s", 9),
           ("time", 7), ("left", 6))
VALIDATION_COLUMNS = (COLUMNS[0], COLUMNS[1], ("val acc", 9), *COLUMNS[3:])  # --val-size: same widths
GAP = 2
BAR_SPAN = COLUMNS[2][1] + GAP + COLUMNS[3][1]  # the live bar and its count fill these two columns


def resolve_mode(mode: str, is_main: bool) -> str:
    if not is_main:
        return "none"
    if mode == "auto":
        return "rich" if is_terminal(sys.stdout) else "plain"
    return mode


def is_terminal(stream) -> bool:
    """A terminal: not a pipe, not a file, not a closed or missing stdout (None when started with ``>&-``)."""
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):  # ValueError: a closed stream
        return False


class _NoProgress:
    def update(self, step: int, running_loss: Callable[[], float]) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class _Tracked(_NoProgress):
    """Feeds the run clock; the rate and the loss are read at most every `interval` seconds."""

    def __init__(self, clock: RunClock, epoch: int, epochs: int, steps: int, images_per_step: int):
        self.clock, self.epoch, self.epochs, self.steps = clock, epoch, epochs, steps
        self.images_per_step = images_per_step
        self.loss: float | None = None
        self.rate: float | None = None

    def __enter__(self):
        self.begin()
        return self

    def __exit__(self, *exc) -> None:
        self.clock.end_training()

    def begin(self) -> None:
        self.clock.begin_epoch(self.epoch, self.steps)
        self.last_read = self.clock.now()

    def measure(self, step: int, running_loss: Callable[[], float]) -> None:
        elapsed = self.clock.epoch_elapsed()
        self.loss = running_loss()  # a host sync: callers keep it rare
        if elapsed > 0:
            self.rate = step * self.images_per_step / elapsed


class _PlainProgress(_Tracked):
    """A timestamped line every `interval` seconds of the run, whichever epoch it falls in."""

    def __init__(self, out: Console, clock_: RunClock, *args):
        super().__init__(clock_, *args)
        self.out = out

    def update(self, step: int, running_loss: Callable[[], float]) -> None:
        self.clock.update(step)
        now = self.clock.now()
        if now - self.out.last_line < self.out.interval or step == self.steps:
            return
        self.out.last_line = now
        self.measure(step, running_loss)
        parts = [f"epoch {self.epoch}/{self.epochs}: {100 * step / self.steps:.0f}% ({step}/{self.steps} steps)",
                 f"loss {self.loss:.4f}", f"{self.rate:,.0f} images/s"]
        epoch_left, run_left = self.clock.epoch_left(), self.clock.run_left()
        if epoch_left is not None:
            parts.append(f"epoch left {clock(epoch_left)}")
        if run_left is not None:
            parts.append(f"run left {clock(run_left)}")
        self.out.line("  ".join(parts))


class _RichProgress(_Tracked):
    """Two live rows under the run table: this epoch, and the run."""

    def __init__(self, console: RichConsole, *args, ranks: int = 1):
        super().__init__(*args)
        self.ranks = ranks
        self.live = Live(self, console=console, transient=True, refresh_per_second=RICH_REFRESH_PER_S)

    def __enter__(self):
        super().__enter__()
        self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        self.live.stop()
        super().__exit__(*exc)

    def update(self, step: int, running_loss: Callable[[], float]) -> None:
        self.clock.update(step)
        now = self.clock.now()
        if now - self.last_read >= RICH_LOSS_INTERVAL_S:
            self.last_read = now
            self.measure(step, running_loss)

    def __rich__(self) -> Table:
        return live_rows(self.clock, self.loss, self.rate, self.ranks)


def live_rows(clock_: RunClock, loss: float | None, rate: float | None, ranks: int = 1) -> Table:
    """The epoch row and the run row, aligned with the run table (blank cells until known)."""
    grid = _grid()
    label_width = max(len(f"{clock_.steps}/{clock_.steps}"), 4)  # both bars the same length
    epoch_bar = _bar(clock_.step, clock_.steps, f"{clock_.step}/{clock_.steps}", label_width)
    # a running loss is this process's share of the epoch: say so when there are several
    loss_text = "" if loss is None else (f"{loss:.4f}" if ranks == 1 else f"r0 {loss:.4f}")
    grid.add_row(f"{clock_.epoch}/{clock_.epochs}", loss_text, epoch_bar, "" if rate is None else f"{rate:,.0f}",
                 clock(clock_.epoch_elapsed()), clock(clock_.epoch_left()))
    fraction = clock_.fraction()
    grid.add_row("run", "", _bar(round(1000 * fraction), 1000, f"{100 * fraction:.0f}%", label_width), "",
                 clock(clock_.run_elapsed()), clock(clock_.run_left()))
    return grid


def _grid() -> Table:
    """A borderless table with the run table's column widths, the bar spanning two of them."""
    grid = Table.grid(padding=(0, GAP))
    widths = [w for _, w in COLUMNS[:2]] + [BAR_SPAN] + [w for _, w in COLUMNS[4:]]
    for width in widths:
        grid.add_column(justify="right", width=width, no_wrap=True)
    return grid


def _bar(completed: int, total: int, label: str, label_width: int) -> Table:
    width = BAR_SPAN - 1 - label_width
    cell = Table.grid(padding=(0, 1))
    cell.add_column(width=width, no_wrap=True)
    cell.add_column(justify="right", width=label_width, no_wrap=True)
    cell.add_row(ProgressBar(total=total, completed=completed, width=width), label)
    return cell


# ---------------------------------------------------------------- the console


@dataclass
class Outputs:
    """Where a run's files are, for the final summary."""

    output_dir: str
    files: Sequence[str]  # names inside output_dir
    tracker: str | None = None  # tracker name and where it writes


class Console:
    def __init__(self, mode: str, interval: float = PLAIN_INTERVAL_S, rich_console: RichConsole | None = None,
                 now: Callable[[], float] = time.perf_counter, validation: bool = False):
        self.mode = mode
        self.validation = validation  # a validation set: its accuracy takes the test loss's column
        self.rich = (rich_console or RichConsole(highlight=False)) if mode == "rich" else None
        self.interval = interval  # plain mode: seconds between progress lines
        self.now = now
        self.clock: RunClock | None = None
        self.last_line = now()  # plain mode: when the last progress line was printed
        self.header_shown = False

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def print(self, text: Any = "") -> None:
        if self.rich is not None:
            self.rich.print(text)
        elif self.enabled:
            print(text, flush=True)

    def line(self, text: str) -> None:
        """A plain-mode log line with a timestamp."""
        self.print(f"{time.strftime('%H:%M:%S')}  {text}")

    def notice(self, text: str) -> None:
        """Something the user should know (a fallback, a skipped checkpoint); always shown on main."""
        if self.rich is not None:
            self.rich.print(f"[yellow]notice:[/] {text}")
        elif self.enabled:
            print(f"notice: {text}", flush=True)

    # ------------------------------------------------------------ before training

    def plan(self, rows: list[tuple[str, str]], layers: list[Layer]) -> None:
        if not self.enabled:
            return
        rows = [("started", time.strftime("%Y-%m-%d %H:%M:%S")), *rows]
        if self.rich is None:
            self.print("distmnist run plan")
            for key, value in rows:
                self.print(f"  {key}: {value}")
            self.print("layers, in the order the forward pass calls them:")
            for line in model_lines(layers):
                self.print(f"  {line}")
            return
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column(overflow="fold")  # long paths wrap whole instead of ending in an ellipsis
        for key, value in rows:
            table.add_row(key, value)
        self.rich.print(Panel(table, title="distmnist", expand=False))
        self.rich.print(model_table(layers))

    # ------------------------------------------------------------ training

    def progress(self, epoch: int, epochs: int, steps: int, images_per_step: int, ranks: int = 1):
        if not self.enabled:
            return _NoProgress()
        if self.clock is None:
            self.clock = RunClock(epochs, self.now)
        if self.rich is not None:  # rich mode
            if not self.header_shown:
                self.rich.print(Text(run_header(VALIDATION_COLUMNS if self.validation else COLUMNS), style="bold"))
                self.header_shown = True
            return _RichProgress(self.rich, self.clock, epoch, epochs, steps, images_per_step, ranks=ranks)
        return _PlainProgress(self, self.clock, epoch, epochs, steps, images_per_step)

    def epoch_done(self, record: dict[str, Any], epochs: int) -> None:
        if not self.enabled:
            return
        if self.clock is not None:
            self.clock.end_epoch()
        run_left = None if self.clock is None else self.clock.run_left()
        accuracy = f"{100 * record['test_accuracy']:.2f}%"
        val = f"{100 * record['val_accuracy']:.2f}%" if "val_accuracy" in record else None
        if self.rich is None:
            self.line(
                f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f}  "
                + (f"val accuracy {val}  " if val else f"test loss {record['test_loss']:.4f}  ")
                + f"test accuracy {accuracy}  "
                f"{record['train_samples_per_second']:,.0f} images/s"
                + (f"  run left {clock(run_left)}" if record["epoch"] < epochs and run_left is not None else "")
            )
            return
        wall = None if self.clock is None or not self.clock.walls else self.clock.walls[-1]
        grid = _grid_full()
        grid.add_row(f"{record['epoch']}/{epochs}", f"{record['train_loss']:.4f}", val or f"{record['test_loss']:.4f}",
                     accuracy, f"{record['train_samples_per_second']:,.0f}", clock(wall), "")
        self.rich.print(grid)

    # ------------------------------------------------------------ after training

    def summary(self, records: list[dict[str, Any]], first_epoch: int, wall_seconds: float,
                timings: dict[str, float], outputs: Outputs) -> None:
        """What the epoch rows do not say: where the time went, last and highest test accuracy, the files.

        records: every epoch of the run (a resumed run's earlier ones too); first_epoch: the first
        one this invocation trained. Without a validation set the highest test accuracy is only
        that: choosing an epoch by it would be choosing on the test set, so it is not called best.
        """
        if not self.enabled or not records:
            return
        lines = summary_lines(records, first_epoch, wall_seconds, timings, outputs)
        if self.rich is None:
            for line in lines:
                self.print(line)
            return
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold cyan", no_wrap=True)
        grid.add_column(overflow="fold")
        for line in lines:
            key, _, value = line.partition(": ")
            grid.add_row(key, value)
        self.rich.print(Panel(grid, title="done", expand=False))


def _grid_full() -> Table:
    grid = Table.grid(padding=(0, GAP))
    for _, width in COLUMNS:
        grid.add_column(justify="right", width=width, no_wrap=True)
    return grid


def run_header(columns=COLUMNS) -> str:
    return (" " * GAP).join(f"{name:>{width}}" for name, width in columns)


def model_lines(layers: list[Layer]) -> list[str]:
    """The model summary as fixed-width text (plain mode)."""
    out = [f"{'layer':<8}  {'type':<10}  {'output shape':>14}  {'parameters':>10}"]
    for layer in layers:
        out.append(f"{layer.name:<8}  {layer.kind:<10}  {shape(layer.output_shape):>14}  {layer.parameters:>10,}")
    out.append(f"{'total':<8}  {'':<10}  {'':>14}  {sum(layer.parameters for layer in layers):>10,}")
    return out


def model_table(layers: list[Layer]) -> Table:
    total = sum(layer.parameters for layer in layers)
    table = Table(title="layers, in the order the forward pass calls them", show_footer=True, title_justify="left",
                  box=box.SIMPLE_HEAD)
    table.add_column("layer", footer="total")
    table.add_column("type")
    table.add_column("output shape", justify="right")
    table.add_column("parameters", justify="right", footer=f"{total:,}")
    for layer in layers:
        table.add_row(layer.name, layer.kind, shape(layer.output_shape), f"{layer.parameters:,}")
    return table


def shape(dims: tuple[int, ...]) -> str:
    return " x ".join(map(str, dims))


def summary_lines(records: list[dict[str, Any]], first_epoch: int, wall_seconds: float, timings: dict[str, float],
                  outputs: Outputs) -> list[str]:
    new = [r for r in records if r["epoch"] >= first_epoch]
    train = timings.get("train", sum(r["train_seconds"] for r in new))  # this launch's share of its epochs
    test = sum(r["eval_seconds"] for r in new)
    setup, checkpoints = timings.get("setup", 0.0), timings.get("checkpoint", 0.0)
    other = max(wall_seconds - setup - train - test - checkpoints, 0.0)
    last = records[-1]
    top = max(records, key=lambda r: (r["test_accuracy"], -r["epoch"]))  # the earliest of equals
    trained = f"epochs {first_epoch}-{last['epoch']}" if len(new) > 1 else f"epoch {last['epoch']}"
    final = (f"{100 * last['test_accuracy']:.2f}% after the last epoch ({last['epoch']}), "
             f"{last['test_correct']:,}/{last['test_samples']:,}")
    if last["test_accuracy"] >= top["test_accuracy"]:
        final += ", the highest of the run"
    else:
        final += f"; highest {100 * top['test_accuracy']:.2f}% after epoch {top['epoch']}"
    if "val_accuracy" in last:  # a validation set chose the best epoch, not the test set
        best = max((r for r in records if "val_accuracy" in r), key=lambda r: (r["val_accuracy"], -r["val_loss"],
                                                                               -r["epoch"]))
        final = (f"{100 * last['test_accuracy']:.2f}% after the last epoch ({last['epoch']}); "
                 f"{100 * best['test_accuracy']:.2f}% after the best one")
    run_train = sum(r["train_seconds"] for r in records)
    lines = [
        f"wall time: {clock(wall_seconds)} for {trained}: set-up {setup:.1f} s, training {train:.1f} s, "
        f"testing {test:.1f} s, checkpoints {checkpoints:.1f} s, other {other:.1f} s",
        *([f"run total: training {run_train:.1f} s over every launch of the run (epochs 1-{last['epoch']})"]
          if first_epoch > 1 or run_train > train + 0.05 else []),
        *([f"validation: best {100 * best['val_accuracy']:.2f}% after epoch {best['epoch']} (best.safetensors), "
           f"{100 * last['val_accuracy']:.2f}% after the last"] if "val_accuracy" in last else []),
        f"test accuracy: {final}",
        f"files: {outputs.output_dir}/ {', '.join(outputs.files)}",
    ]
    if outputs.tracker:
        lines.append(f"tracker: {outputs.tracker}")
    return lines
