"""A validation split and an honest best model. --val-size holds out training images, the same on every
rank; each epoch reports validation accuracy, the best epoch's weights are kept as best.safetensors, and
--early-stop ends a run that stopped improving. Real runs on synthetic data (one process through the
session's in-process driver, two under torchrun).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_ok, in_process, torchrun, write_mnist
from distmnist.batches import split_validation
from distmnist.data import Split

RECIPE = ["--batch-size", "50", "--lr", "0.02", "--no-download", "--progress", "plain"]
FROZEN = ["--lr", "1e-30", "--momentum", "0"]  # updates underflow: the weights, hence every result, never change


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("val") / "mnist", n_train=600, n_test=120)


def test_the_split_is_disjoint_covering_and_a_function_of_the_seed():
    labels = torch.arange(1000) % 10
    split = Split(torch.arange(1000).reshape(1000, 1, 1).expand(1000, 28, 28).to(torch.int64), labels)
    train, val = split_validation(split, 100, seed=3)
    ids = lambda s: s.images[:, 0, 0].tolist()  # noqa: E731 - each image carries its index
    assert len(val) == 100 and len(train) == 900
    assert sorted(ids(train) + ids(val)) == list(range(1000))
    assert ids(train) == sorted(ids(train)) and ids(val) == sorted(ids(val))  # file order kept
    assert ids(split_validation(split, 100, seed=3)[1]) == ids(val)  # every rank draws the same
    assert ids(split_validation(split, 100, seed=4)[1]) != ids(val)
    assert torch.equal(train.labels, torch.tensor(ids(train)) % 10)  # images and labels stay paired


def test_a_run_reports_validation_and_keeps_the_best_epochs_weights(data, tmp_path):
    out = tmp_path / "run"
    proc = in_process("train", "--data-dir", data, "--output-dir", out, *RECIPE, "--epochs", "3", "--val-size", "101")
    assert_ok(proc)
    recs = records(out)
    assert [r["train_samples"] for r in recs] == [499] * 3 and [r["val_samples"] for r in recs] == [101] * 3
    for r in recs:
        assert r["val_accuracy"] == r["val_correct"] / 101 and r["test_samples"] == 120
    best = max(recs, key=lambda r: (r["val_accuracy"], -r["val_loss"], -r["epoch"]))
    kept = load_file(str(out / "best.safetensors"))
    at_best = load_file(str(out / "checkpoints" / f"epoch-{best['epoch']:04d}" / "model.safetensors"))
    assert set(kept) == set(at_best) and all(torch.equal(kept[k], at_best[k]) for k in kept)
    summary = json.loads((out / "run.json").read_text())
    assert summary["best"]["epoch"] == best["epoch"] and summary["early_stopped"] is False
    assert f"validation: best {100 * best['val_accuracy']:.2f}% after epoch {best['epoch']} (best.safetensors)" \
        in proc.stdout
    assert "val accuracy" in proc.stdout and "highest" not in proc.stdout


def test_early_stop_ends_a_run_that_stopped_improving_and_a_rerun_trains_nothing(data, tmp_path):
    out = tmp_path / "run"
    args = ["--data-dir", data, "--output-dir", out, *RECIPE, *FROZEN, "--epochs", "8", "--val-size", "101",
            "--early-stop", "2"]
    proc = in_process("train", *args)
    assert_ok(proc)
    assert [r["epoch"] for r in records(out)] == [1, 2, 3]  # epoch 1 was the best; 2 and 3 were not better
    assert "early stop after epoch 3: no better validation accuracy for 2 epoch(s); the best was epoch 1" in proc.stdout
    assert json.loads((out / "run.json").read_text())["early_stopped"] is True
    assert (out / "model.safetensors").exists() and (out / "best.safetensors").exists()
    again = in_process("train", *args, "--resume", "auto")
    assert_ok(again)
    assert "already complete at epoch 3 (stopped early: no better validation accuracy), nothing trained" in again.stdout


def test_early_stop_needs_a_validation_set(data, tmp_path):
    proc = in_process("train", "--data-dir", data, "--output-dir", tmp_path / "run", "--early-stop", "2")
    assert proc.returncode == 2 and "--early-stop needs a validation set" in proc.stderr
    proc = in_process("train", "--data-dir", data, "--output-dir", tmp_path / "run", "--val-size", "600")
    assert proc.returncode == 2 and "--val-size 600 must be between 1 and 599" in proc.stderr


def test_patience_and_the_best_epoch_survive_a_resume(data, tmp_path):
    """Interrupted after epoch 2 and resumed: the same epochs, the same best and the same early stop."""
    common = ["--data-dir", data, *RECIPE, *FROZEN, "--val-size", "101", "--early-stop", "3"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert_ok(in_process("train", *common, "--output-dir", whole, "--epochs", "9"))
    assert_ok(in_process("train", *common, "--output-dir", split, "--epochs", "2"))
    assert_ok(in_process("train", *common, "--output-dir", split, "--epochs", "9", "--resume", "auto"))
    assert [r["epoch"] for r in records(whole)] == [r["epoch"] for r in records(split)] == [1, 2, 3, 4]
    a, b = (json.loads((o / "run.json").read_text()) for o in (whole, split))
    assert a["best"] == b["best"] and a["early_stopped"] is b["early_stopped"] is True
    assert (whole / "best.safetensors").read_bytes() == (split / "best.safetensors").read_bytes()


@pytest.mark.slow
def test_two_ranks_count_every_validation_image_once(data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--data-dir", data, *RECIPE, "--epochs", "1", "--val-size", "101"]
    assert_ok(in_process("train", *common, "--output-dir", one))
    proc = torchrun(2, "train", *common, "--output-dir", two)
    assert_ok(proc)
    (r1,), (r2,) = records(one), records(two)
    assert r2["world_size"] == 2 and r2["val_samples"] == 101 and r2["train_samples"] == 500  # 499 padded to 2 x 250
    assert r1["val_samples"] == 101
    # recount here, in one plain process, on the split the seed gives: the ranks held out the same
    # images and counted each exactly once
    from distmnist.data import load_mnist
    from distmnist.model import Net, to_input

    train, _ = load_mnist(data, allow_download=False)
    _, val = split_validation(train, 101, seed=1)
    net = Net()
    net.load_state_dict(load_file(str(two / "model.safetensors")))
    with torch.no_grad():
        correct = int((net.eval()(to_input(val.images)).argmax(1) == val.labels).sum())
    assert correct == r2["val_correct"]
