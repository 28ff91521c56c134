"""End to end on the real MNIST beside the project: one full epoch, one process, >= 95% on all 10,000 test images.

Under CI=true a missing data set fails (see the real_mnist fixture); elsewhere it skips.
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import run_module
from distmnist.model import Net

pytestmark = pytest.mark.slow


def test_one_epoch_on_real_mnist_reaches_95_percent(real_mnist, tmp_path):
    out = tmp_path / "out"
    proc = run_module("train", "--data-dir", real_mnist, "--output-dir", out, "--epochs", "1", "--no-download",
                      "--progress", "plain", timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    (m,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert m["epoch"] == 1 and m["world_size"] == 1
    assert m["train_samples"] == 60_000 and m["step"] == 600  # the default batch of 100
    assert m["test_samples"] == 10_000
    assert m["test_accuracy"] >= 0.95, m
    assert m["test_accuracy"] == m["test_correct"] / 10_000
    assert m["test_loss"] < 0.2
    Net().load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
