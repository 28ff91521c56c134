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
