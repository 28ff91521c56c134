"""What a person sees: rich on a terminal, plain periodic lines elsewhere, nothing on other ranks.

Only the main process builds a Console with a mode other than "none"; the training code calls it
unconditionally.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from rich.console import Console as RichConsole
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

PLAIN_INTERVAL_S = 10.0  # seconds between progress lines where stdout is not a terminal
RICH_LOSS_INTERVAL_S = 0.5  # how often the live bar reads the loss from the device (a host sync)


def resolve_mode(mode: str, is_main: bool) -> str:
    if not is_main:
        return "none"
    if mode == "auto":
        return "rich" if sys.stdout.isatty() else "plain"
    return mode


class _NoProgress:
    def update(self, step: int, running_loss: Callable[[], float]) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class _PlainProgress(_NoProgress):
    """A line every PLAIN_INTERVAL_S seconds: epoch, step, loss, images/s."""

    def __init__(self, out: "Console", epoch: int, epochs: int, steps: int, images_per_step: int):
        self.out, self.epoch, self.epochs, self.steps, self.images_per_step = out, epoch, epochs, steps, images_per_step
        self.start = self.last = time.perf_counter()

    def update(self, step: int, running_loss: Callable[[], float]) -> None:
        now = time.perf_counter()
        if now - self.last < PLAIN_INTERVAL_S or step == self.steps:
            return
        self.last = now
        rate = step * self.images_per_step / (now - self.start)
        self.out.print(
            f"epoch {self.epoch}/{self.epochs} step {step}/{self.steps} loss {running_loss():.4f} {rate:,.0f} images/s"
        )


class _RichProgress(_NoProgress):
    def __init__(self, console: RichConsole, epoch: int, epochs: int, steps: int, images_per_step: int):
        self.images_per_step = images_per_step
        self.progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} images/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task = self.progress.add_task("train", total=steps, loss="-", rate="-")
        self.start = self.last = time.perf_counter()

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, step: int, running_loss: Callable[[], float]) -> None:
        now = time.perf_counter()
        fields = {}
        if now - self.last >= RICH_LOSS_INTERVAL_S:
            self.last = now
            fields = {"loss": f"{running_loss():.4f}", "rate": f"{step * self.images_per_step / (now - self.start):,.0f}"}
        self.progress.update(self.task, completed=step, **fields)


class Console:
    def __init__(self, mode: str):
        self.mode = mode
        self.rich = RichConsole(highlight=False) if mode == "rich" else None

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def print(self, text: str = "") -> None:
        if self.rich is not None:
            self.rich.print(text)
        elif self.enabled:
            print(text, flush=True)

    def notice(self, text: str) -> None:
        """Something the user should know (a fallback, a skipped checkpoint); always shown on main."""
        if self.rich is not None:
            self.rich.print(f"[yellow]notice:[/] {text}")
        elif self.enabled:
            print(f"notice: {text}", flush=True)

    def plan(self, rows: list[tuple[str, str]], model_repr: str) -> None:
        if not self.enabled:
            return
        if self.rich is None:
            self.print("distmnist run plan")
            for key, value in rows:
                self.print(f"  {key}: {value}")
            self.print(model_repr)
            return
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan")
        table.add_column()
        for key, value in rows:
            table.add_row(key, value)
        self.rich.print(Panel(table, title="distmnist", expand=False))
        self.rich.print(model_repr)

    def progress(self, epoch: int, epochs: int, steps: int, images_per_step: int):
        if self.mode == "rich":
            return _RichProgress(self.rich, epoch, epochs, steps, images_per_step)
        if self.mode == "plain":
            return _PlainProgress(self, epoch, epochs, steps, images_per_step)
        return _NoProgress()

    def epoch_done(self, record: dict[str, Any], epochs: int) -> None:
        line = (
            f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f}  "
            f"test loss {record['test_loss']:.4f}  test accuracy {100 * record['test_accuracy']:.2f}% "
            f"({record['test_correct']}/{record['test_samples']})  {record['train_seconds']:.2f} s  "
            f"{record['train_samples_per_second']:,.0f} images/s"
        )
        self.print(line)

    def summary(self, records: list[dict[str, Any]], output_dir: str, wall_seconds: float) -> None:
        if not self.enabled or not records:
            return
        if self.rich is None:
            best = max(records, key=lambda r: r["test_accuracy"])
            self.print(
                f"done: {len(records)} epochs, final test accuracy {100 * records[-1]['test_accuracy']:.2f}%, "
                f"best {100 * best['test_accuracy']:.2f}% (epoch {best['epoch']}), {wall_seconds:.1f} s; "
                f"outputs in {output_dir}"
            )
            return
        table = Table(title="summary")
        for col in ("epoch", "train loss", "test loss", "test accuracy", "train s", "images/s"):
            table.add_column(col, justify="right")
        for r in records:
            table.add_row(
                str(r["epoch"]), f"{r['train_loss']:.4f}", f"{r['test_loss']:.4f}",
                f"{100 * r['test_accuracy']:.2f}%", f"{r['train_seconds']:.2f}", f"{r['train_samples_per_second']:,.0f}",
            )
        self.rich.print(table)
        self.rich.print(f"wall time {wall_seconds:.1f} s; outputs in [bold]{output_dir}[/]")
