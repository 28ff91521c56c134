"""The console: widths 80 and 160 on rich's recording console, time estimates, blank cells instead of
placeholders, the plain mode's timestamped lines at a steady interval, and the final summary."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console as RichConsole

from distmnist import console as console_module
from distmnist.clock import RunClock
from distmnist.console import Console, Outputs, live_rows, run_header, summary_lines
from distmnist.model import Net, layer_summary

FILES = ("model.safetensors", "checkpoints/", "metrics.jsonl", "run.json", "config.json")
PLACEHOLDERS = re.compile(r"(^|\s)-(\s|$)|-:--|\bnan\b|None")


class FakeTime:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def record(epoch: int, accuracy: float, loss: float = 0.1) -> dict:
    return {"epoch": epoch, "train_loss": 2 * loss, "test_loss": loss, "test_accuracy": accuracy,
            "test_correct": round(accuracy * 10000), "test_samples": 10000, "train_samples_per_second": 21630.4,
            "train_seconds": 2.7, "eval_seconds": 0.2, "step": 600 * epoch}


def recording(width: int) -> RichConsole:
    return RichConsole(record=True, width=width, file=io.StringIO(), force_terminal=True, color_system=None,
                       highlight=False)


def simulate(con: Console, time: FakeTime, epochs: int = 10, done: int = 2, steps: int = 600,
             step_s: float = 0.0045, overhead_s: float = 0.3, loss: float = 0.2345) -> None:
    """`done` finished epochs with their rows, then the next epoch two thirds through (left open)."""
    for epoch in range(1, done + 1):
        with con.progress(epoch, epochs, steps, 100) as progress:
            for step in range(1, steps + 1):
                time.t += step_s
                progress.update(step, lambda: loss)
        time.t += overhead_s  # test set and checkpoint
        con.epoch_done(record(epoch, 0.97 + epoch / 1000), epochs)


def screen(width: int) -> tuple[str, Console, FakeTime]:
    """Everything a run prints, rendered at `width` columns (the live rows frozen mid-epoch)."""
    time = FakeTime()
    rc = recording(width)
    con = Console("rich", rich_console=rc, now=time)
    con.plan([("device", "1 x cpu (cpu)"), ("learning rate", "onecycle 0.002 -> 0.05 -> 2e-07, rising over "
                                                             "30% of 1,800 steps"),
              ("data", "60,000 train / 10,000 test images from /a/rather/long/path/to/the/mnist/folder")],
             layer_summary(Net()))
    simulate(con, time)
    progress = con.progress(3, 10, 600, 100)
    progress.begin()  # as entering it does, without starting the live display
    for step in range(1, 401):
        time.t += 0.0045
        progress.update(step, lambda: 0.2345)
    rc.print(live_rows(con.clock, progress.loss, progress.rate))
    con.summary([record(1, 0.9801), record(2, 0.9905), record(3, 0.9899)], 1, 31.2,
                {"setup": 4.2, "checkpoint": 0.3}, Outputs("runs/mnist", FILES, "tensorboard, runs/mnist/distmnist"))
    return rc.export_text(), con, time


@pytest.mark.parametrize("width", [80, 160])
def test_everything_fits_the_width_without_placeholders(width):
    text, _, _ = screen(width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    assert not [line for line in lines if PLACEHOLDERS.search(line)], text
    # the run table's header is one line, labelled, and the rows line up under it
    header = run_header()
    assert header in lines and len(header) <= 80
    for label in ("epoch", "train loss", "test loss", "test accuracy", "images/s", "time", "left"):
        assert label in header
    row = next(line for line in lines if line.lstrip().startswith("2/10") and "97.20%" in line)
    assert row.index("97.20%") + len("97.20%") == header.index("test accuracy") + len("test accuracy")
    # the model as a table, not the Net(...) repr
    assert "Net(" not in text
    assert re.search(r"conv1\s+Conv2d\s+10 x 24 x 24\s+260", text)
    assert re.search(r"total\s+38,390", text)


@pytest.mark.parametrize("width", [80, 160])
def test_the_live_rows_show_the_epoch_and_the_run_with_their_estimates(width):
    time = FakeTime()
    con = Console("rich", rich_console=recording(width), now=time)
    simulate(con, time)  # two epochs of 600 steps x 4.5 ms + 0.3 s
    progress = con.progress(3, 10, 600, 100)
    progress.begin()
    for step in range(1, 401):
        time.t += 0.0045
        progress.update(step, lambda: 0.2345)
    rc = recording(width)
    rc.print(live_rows(con.clock, progress.loss, progress.rate))
    epoch_row, run_row = rc.export_text().splitlines()
    assert max(len(epoch_row), len(run_row)) <= 80
    assert epoch_row.split()[:3] == ["3/10", "0.2345", epoch_row.split()[2]] and "400/600" in epoch_row
    assert "22,222" in epoch_row  # 100 images a step, 4.5 ms a step
    # epoch: 400 steps in 1.8 s, 200 to go: 0:01 left; run: that + the 0.3 s overhead + 7 epochs of 3 s
    assert epoch_row.rstrip().endswith("0:02    0:01")
    assert con.clock.run_left() == pytest.approx(0.9 + 0.3 + 7 * (600 * 0.0045 + 0.3))
    assert run_row.rstrip().endswith("0:08    0:22") and "27%" in run_row
    # the two bars start under "test loss", and their counts end under the end of "test accuracy"
    bars = [re.search(r"[━╸╺]+", row) for row in (epoch_row, run_row)]
    assert bars[0].start() == bars[1].start() == run_header().index("test loss")
    end = run_header().index("test accuracy") + len("test accuracy")
    assert epoch_row.index("400/600") + len("400/600") == run_row.index("27%") + len("27%") == end


def test_a_cell_stays_blank_until_its_value_is_known():
    time = FakeTime()
    con = Console("rich", rich_console=recording(80), now=time)
    progress = con.progress(1, 3, 600, 100)
    progress.begin()
    rc = recording(80)
    rc.print(live_rows(con.clock, progress.loss, progress.rate))
    first = rc.export_text().splitlines()[0]
    assert first.split() == ["1/3", "0/600", "0:00"]  # no loss, no rate, no estimate yet
    time.t += 0.6
    progress.update(100, lambda: 0.5)
    rc.print(live_rows(con.clock, progress.loss, progress.rate))
    later = rc.export_text().splitlines()[0]
    assert "0.5000" in later and "16,667" in later and later.rstrip().endswith("0:03")


def test_run_clock_uses_later_epochs_once_there_are_some():
    time = FakeTime()
    run = RunClock(5, time)
    assert run.run_left() is None and run.epoch_left() is None
    for epoch, seconds in ((1, 10.0), (2, 4.0), (3, 4.0)):  # the first epoch carries the warm-up
        run.begin_epoch(epoch, 100)
        time.t += seconds
        run.update(100)
        run.end_training()
        time.t += 1.0
        run.end_epoch()
    assert run.run_left() == pytest.approx(2 * 5.0)  # two epochs of 4 + 1 s, not of the first's 11 s
    assert run.fraction() == pytest.approx(0.6)


def test_a_resumed_run_counts_from_its_first_epoch():
    time = FakeTime()
    run = RunClock(10, time)
    run.begin_epoch(9, 100)
    time.t += 2.0
    run.update(50)
    assert run.fraction() == pytest.approx(0.25)  # half of epoch 9 of the epochs 9-10 this run trains
    assert run.run_left() == pytest.approx(2.0 + 4.0)


def test_plain_lines_carry_a_timestamp_percentage_and_estimates_at_a_steady_interval(capsys):
    """Epochs of 0.5 s with a 1.2 s interval: the lines keep coming across epochs."""
    time = FakeTime()
    con = Console("plain", interval=1.2, now=time)
    simulate(con, time, epochs=6, done=6, steps=100, step_s=0.005, overhead_s=0.0)
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if re.match(r"\d\d:\d\d:\d\d  epoch \d+/6: \d+% \(\d+/100 steps\)", line)]
    done = [line for line in lines if re.match(r"\d\d:\d\d:\d\d  epoch \d+/6  train loss", line)]
    assert len(done) == 6
    assert len(progress) == 2  # at 1.2 s and 2.4 s of the 3 s: none were in epochs 1, 2 or 4 alone
    for line in progress:
        assert "loss 0.2345" in line and "images/s" in line and "epoch left" in line and "run left" in line
    assert "run left" in done[0] and "run left" not in done[-1]


def test_the_summary_says_what_the_rows_do_not_and_never_calls_a_test_maximum_best():
    lines = summary_lines([record(1, 0.9801), record(2, 0.9905), record(3, 0.9899)], 2, 31.2,
                          {"setup": 4.2, "checkpoint": 0.3}, Outputs("runs/mnist", FILES))
    text = "\n".join(lines)
    assert "best" not in text.lower()
    assert "98.99% after the last epoch (3), 9,899/10,000; highest 99.05% after epoch 2" in text
    # epochs 2-3 ran in this invocation: 5.4 s training, 0.4 s testing
    assert "0:31 for epochs 2-3: set-up 4.2 s, training 5.4 s, testing 0.4 s, checkpoints 0.3 s, other 20.9 s" in text
    assert "runs/mnist/ model.safetensors, checkpoints/, metrics.jsonl, run.json, config.json" in text
    single = summary_lines([record(1, 0.98)], 1, 9.0, {}, Outputs("o", FILES))
    assert "after the last epoch (1), 9,800/10,000, the highest of the run" in "\n".join(single)


def test_a_real_run_at_80_columns(mnist_dir, tmp_path, monkeypatch):
    """train with --progress rich on a recording console of 80 columns."""
    from accelerate.state import AcceleratorState

    from distmnist.training import main

    rc = recording(80)
    monkeypatch.setattr(console_module, "RichConsole", lambda **kwargs: rc)

    class NoLive:  # the live rows' frames would pile up in the recording (they are tested above)
        def __init__(self, *args, **kwargs):
            pass

        start = stop = __init__

    monkeypatch.setattr(console_module, "Live", NoLive)
    try:
        assert main(["--data-dir", str(mnist_dir), "--no-download", "--epochs", "2", "--limit-train", "300",
                     "--output-dir", str(tmp_path / "out"), "--progress", "rich"]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    text = rc.export_text()
    lines = text.splitlines()
    assert [line for line in lines if len(line) > 80] == []
    assert run_header() in lines
    for row in ("1/2 ", "2/2 "):  # one row per epoch
        assert any(line.lstrip().startswith(row) for line in lines), row
    assert "Net(" not in text and "38,390" in text
    assert "wall time" in text and "model.safetensors" in text and "best" not in text.lower()
