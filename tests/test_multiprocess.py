"""Real multi-process runs on the CPU (gloo): torchrun and accelerate launch with 2 and 3 processes.

The synthetic test set has 251 images, a prime: no world size divides it, so any padding duplicate
or dropped image in the evaluation would change ``test_samples``. The training set (301) does not
divide either, so DistributedSampler pads it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, accelerate_launch, assert_ok, env, run_module, torchrun, write_mnist

pytestmark = pytest.mark.slow

N_TRAIN, N_TEST = 301, 251
RECIPE = ["--lr", "0.02", "--batch-size", "50", "--no-download", "--progress", "plain"]
LAUNCHERS = {"torchrun": torchrun, "accelerate": accelerate_launch}


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert set(wa) == set(wb)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs between {a} and {b}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("mp") / "mnist", n_train=N_TRAIN, n_test=N_TEST)


@pytest.fixture(scope="module")
def full2(data, tmp_path_factory) -> SimpleNamespace:
    """torchrun, 2 processes, 2 epochs uninterrupted."""
    out = tmp_path_factory.mktemp("full2") / "out"
    proc = torchrun(2, "train", "--data-dir", data, "--output-dir", out, "--epochs", "2", *RECIPE)
    assert_ok(proc)
    return SimpleNamespace(out=out, proc=proc, metrics=read_metrics(out))


def test_torchrun_2_processes_train_together(full2):
    assert [m["world_size"] for m in full2.metrics] == [2, 2]
    assert [m["test_samples"] for m in full2.metrics] == [N_TEST, N_TEST]
    assert [m["train_samples"] for m in full2.metrics] == [302, 302]  # 301 padded to 2 x 151
    assert [m["step"] for m in full2.metrics] == [4, 8]  # ceil(151 / 50) steps per rank per epoch
    for m in full2.metrics:
        assert m["test_accuracy"] == m["test_correct"] / N_TEST
    # only the main process prints: each epoch line appears once, not once per rank
    assert full2.proc.stdout.count("epoch 1/2 ") == 1 and full2.proc.stdout.count("epoch 2/2 ") == 1
    rng = load_file(str(full2.out / "checkpoints" / "epoch-0002" / "rng.safetensors"))
    assert rng["cpu"].shape[0] == 2  # the RNG state of every rank
    assert not torch.equal(rng["cpu"][0], rng["cpu"][1])  # ranks draw distinct dropout masks


@pytest.mark.parametrize(
    "launcher, nproc, n_test",
    [("torchrun", 3, 2), ("accelerate", 2, N_TEST), ("accelerate", 3, N_TEST)],
    ids=["torchrun-3-tiny-test-set", "accelerate-2", "accelerate-3"],
)
def test_launchers_really_run_n_processes(data, tmp_path, launcher, nproc, n_test):
    """n_test 2 < 3 processes: one rank evaluates nothing and must still join the reduction."""
    out = tmp_path / "out"
    proc = LAUNCHERS[launcher](nproc, "train", "--data-dir", data, "--output-dir", out, "--epochs", "1",
                               "--limit-test", str(n_test), *RECIPE)
    assert_ok(proc)
    (m,) = read_metrics(out)
    assert m["world_size"] == nproc
    assert m["test_samples"] == n_test
    assert m["train_samples"] == nproc * -(-N_TRAIN // nproc)
    assert m["test_accuracy"] == m["test_correct"] / n_test
    assert proc.stdout.count("epoch 1/1 ") == 1
    assert load_file(str(out / "checkpoints" / "epoch-0001" / "rng.safetensors"))["cpu"].shape[0] == nproc


def test_evaluation_counts_each_image_once_for_any_world_size(full2, data, tmp_path):
    """The same weights evaluated by 1, 2 and 3 processes: identical counts, equal to the training run's."""
    weights = full2.out / "model.safetensors"
    results = {}
    for nproc, launch in ((1, None), (2, torchrun), (3, accelerate_launch)):
        report = tmp_path / f"eval-{nproc}.json"
        args = ["--checkpoint", weights, "--data-dir", data, "--no-download", "--progress", "plain",
                "--output-json", report]
        proc = run_module("evaluate", *args) if launch is None else launch(nproc, "evaluate", *args)
        assert_ok(proc)
        results[nproc] = json.loads(report.read_text())
        assert results[nproc]["world_size"] == nproc
    last = full2.metrics[-1]
    for nproc, r in results.items():
        assert r["test_samples"] == N_TEST, nproc
        assert r["test_correct"] == last["test_correct"], nproc
        assert r["test_accuracy"] == last["test_accuracy"], nproc
        assert r["test_loss"] == pytest.approx(last["test_loss"], rel=1e-6), nproc
    assert 0.1 < last["test_accuracy"] < 1  # the counts above could tell a miscount apart


def test_resume_auto_is_bit_identical_with_2_processes(full2, data, tmp_path):
    """1 epoch, then --resume auto to 2 epochs, ends with exactly the uninterrupted run's weights."""
    out = tmp_path / "out"
    first = torchrun(2, "train", "--data-dir", data, "--output-dir", out, "--epochs", "1", *RECIPE)
    assert_ok(first)
    assert not (out / "checkpoints" / "epoch-0002").exists()
    second = torchrun(2, "train", "--data-dir", data, "--output-dir", out, "--epochs", "2", "--resume", "auto", *RECIPE)
    assert_ok(second)
    assert second.stdout.count("epoch 1/2 ") == 0  # epoch 1 was not trained again
    assert_same_weights(out / "model.safetensors", full2.out / "model.safetensors")
    assert_same_weights(out / "checkpoints" / "epoch-0002" / "optimizer.safetensors",
                        full2.out / "checkpoints" / "epoch-0002" / "optimizer.safetensors")
    for a, b in zip(read_metrics(out), full2.metrics, strict=True):
        assert (a["epoch"], a["train_loss"], a["test_loss"], a["test_correct"]) == \
            (b["epoch"], b["train_loss"], b["test_loss"], b["test_correct"])


@pytest.mark.parametrize("rendezvous", [False, True], ids=["no-master-addr", "peer-never-comes"])
def test_world_size_without_a_process_group_does_not_train_alone(data, tmp_path, rendezvous):
    """WORLD_SIZE=2 in the environment but one plain process: it must stop, never train an independent copy."""
    from conftest import free_port

    extra = {"WORLD_SIZE": "2", "RANK": "0"}
    if rendezvous:  # a reachable address: the process waits for rank 1, which never comes
        extra.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "distmnist.train", "--data-dir", str(data), "--output-dir", str(out), "--epochs", "1",
         "--setup-timeout", "3", *RECIPE],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env(**extra),
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "WORLD_SIZE=2" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "model.safetensors").exists()
    assert "epoch 1/1" not in proc.stdout
