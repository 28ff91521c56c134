"""The benchmark runs end to end on small data and reports what it promises."""

from __future__ import annotations

import json

from conftest import run_module


def test_bench_reports_rows_ratio_and_a_full_run(mnist_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_module("bench", "--data-dir", mnist_dir, "--tutorial-epochs", "2", "--fast-epochs", "2",
                      "--output-json", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["tutorial", "resident-eager"]  # no CUDA: no graph row
    for row in rows.values():
        assert len(row["epoch_seconds"]) == 2 and all(s > 0 for s in row["epoch_seconds"])
        assert row["steady_seconds"] == row["epoch_seconds"][1]  # the first epoch is warm-up, not steady state
        assert row["images_per_second"] == 600 / row["steady_seconds"]
        assert 0 <= row["test_accuracy"] <= 1
    assert "x tutorial" in proc.stdout and "resident-eager" in proc.stdout
    (run,) = report["full_runs"]
    assert run["launcher"] == "python" and run["epochs"] == 10
    phases = run["phases"]
    assert run["wall_seconds"] >= phases["main"] >= phases["setup"] + phases["train"] > 0


def test_bench_times_the_stop_check_on_one_and_two_processes(mnist_dir, tmp_path):
    """The agreement on a signal (issue 9): measured against the step, per world size (no figure asserted)."""
    out = tmp_path / "bench.json"
    proc = run_module("bench", "--data-dir", mnist_dir, "--tutorial-epochs", "1", "--fast-epochs", "1",
                      "--no-full-run", "--stop-check", "--output-json", out)
    assert proc.returncode == 0, proc.stderr
    checks = json.loads(out.read_text())["stop_checks"]
    assert [(c["world_size"], c["check_every"]) for c in checks] == [(1, 1), (2, 20)]
    for c in checks:
        assert c["check_seconds"] > 0 and c["step_seconds"] > 0
        assert c["fraction_of_step"] == c["check_seconds"] / (c["check_every"] * c["step_seconds"])
        assert len(c["epoch_seconds_with"]) == len(c["epoch_seconds_without"]) == 2
    assert "% of step time" in proc.stdout
