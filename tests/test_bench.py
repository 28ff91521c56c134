"""The benchmark runs end to end on small data and reports what it promises: every row, a full run and the
cost of the stop check, each figure inside the wall time measured here and printed as the JSON says."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from conftest import run_module, write_mnist
from distmnist.signals import CHECK_EVERY

pytestmark = pytest.mark.slow  # every row, the full run and the stop check run in processes of their own

N_TRAIN = 600  # images of one epoch; the bench's batch is 100


def within(values: list[float]) -> tuple[float, float]:
    """The range of values, widened by float rounding."""
    return min(values) * (1 - 1e-9), max(values) * (1 + 1e-9)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> SimpleNamespace:
    """One `python -m distmnist.bench` with the full run and the stop check, 3 epochs per row."""
    root = tmp_path_factory.mktemp("bench")
    data = write_mnist(root / "mnist", n_train=N_TRAIN, n_test=250)
    out = root / "bench.json"
    started = time.monotonic()
    proc = run_module("bench", "--data-dir", data, "--tutorial-epochs", "3", "--fast-epochs", "3", "--stop-check",
                      "--output-json", out)
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    return SimpleNamespace(proc=proc, wall=wall, report=json.loads(out.read_text()))


def test_bench_reports_rows_ratio_and_a_full_run(bench):
    rows = {r["name"]: r for r in bench.report["rows"]}
    assert list(rows) == ["tutorial", "resident-eager"]  # no CUDA: no graph row
    table = bench.proc.stdout.splitlines()
    for row in rows.values():
        epochs = row["epoch_seconds"]
        assert len(epochs) == 3 and 0 < sum(epochs) < bench.wall  # timed inside the process measured here
        # the steady figure comes from the epochs after the warm-up, the rate from the 600 images of one
        low, high = within(epochs[1:])
        assert low <= row["steady_seconds"] <= high
        assert N_TRAIN / high <= row["images_per_second"] <= N_TRAIN / low
        assert 0 <= row["test_accuracy"] <= 1
        # the console's table shows the figures of the JSON report
        (line,) = [line for line in table if line.startswith(row["name"] + " ")]
        assert f"{row['steady_seconds']:.3f}" in line and f"{row['images_per_second']:,.0f}" in line
    header = next(line for line in table if line.startswith("pipeline "))
    assert "x tutorial" in header
    (tutorial_line,) = [line for line in table if line.startswith("tutorial ")]
    assert tutorial_line.split()[3] == "1.00"  # the tutorial against itself
    (run,) = bench.report["full_runs"]
    assert run["launcher"] == "python" and run["epochs"] == 10
    phases = run["phases"]
    assert bench.wall > run["wall_seconds"] >= phases["main"] >= phases["setup"] + phases["train"] > 0
    assert f"full default run (python): {run['wall_seconds']:.1f} s wall, 10 epochs" in bench.proc.stdout


def test_bench_times_the_stop_check_on_one_and_two_processes(bench):
    """The ranks' agreement on a signal, measured against the step, per world size (no figure asserted)."""
    checks = bench.report["stop_checks"]
    assert [(c["world_size"], c["check_every"]) for c in checks] == [(1, 1), (2, CHECK_EVERY)]
    for c in checks:
        # every step of an epoch: 600 images in batches of 100, shared by the processes
        assert c["steps_per_epoch"] == N_TRAIN // 100 // c["world_size"]
        assert len(c["epoch_seconds_with"]) == len(c["epoch_seconds_without"]) == 2
        low, high = within(c["epoch_seconds_without"])
        assert low <= c["step_seconds"] * c["steps_per_epoch"] <= high  # the step of the epochs without checks
        assert 0 < c["check_seconds"] < c["step_seconds"] and 0 < c["fraction_of_step"] < 1
        line = next(line for line in bench.proc.stdout.splitlines() if f"world size {c['world_size']}:" in line)
        assert f"{100 * c['fraction_of_step']:.3f}% of step time" in line
        assert f"every {c['check_every']} step(s)" in line
