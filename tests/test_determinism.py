"""Determinism and load. The same seed and world size give bit-identical weights in two runs on the CPU; 4
processes on a 2-core machine (oversubscribed) still finish, and count every test image exactly once (251 test
images: not a multiple of 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import ROOT, env, torchrun, write_mnist
from distmnist.data import load_mnist
from distmnist.model import Net, to_input

N_TEST = 251


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("determinism") / "mnist", n_train=600, n_test=N_TEST)


@pytest.mark.slow
def test_same_seed_and_world_size_give_bit_identical_weights(data, tmp_path):
    runs = {"a": 3, "b": 3}  # side by side: two cores, two processes
    procs = {name: subprocess.Popen([sys.executable, "-m", "distmnist.train", "--data-dir", str(data),
                                     "--output-dir", str(tmp_path / name), "--epochs", "2", "--seed", str(seed),
                                     "--progress", "none"], cwd=ROOT, env=env(), stderr=subprocess.PIPE, text=True)
             for name, seed in runs.items()}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, stderr)
    a, b = (tmp_path / name for name in runs)
    files = ["model.safetensors"] + [f"checkpoints/epoch-000{e}/{n}" for e in (1, 2)
                                     for n in ("model.safetensors", "optimizer.safetensors", "rng.safetensors")]
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # and they did train: the weights moved between the epochs
    assert (a / "model.safetensors").read_bytes() != (a / "checkpoints/epoch-0001/model.safetensors").read_bytes()


@pytest.mark.slow
def test_four_processes_on_two_cores_finish_and_count_each_test_image_once(data, tmp_path):
    out = tmp_path / "out"
    result = torchrun(4, "train", "--data-dir", data, "--output-dir", out, "--epochs", "2", "--progress", "plain")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["world_size"], r["test_samples"]) for r in records] == [(4, N_TEST)] * 2

    # the same weights evaluated here, in one plain process, image by image
    net = Net()
    net.load_state_dict(load_file(out / "model.safetensors"))
    net.eval()
    _, test = load_mnist(data, allow_download=False)
    with torch.no_grad():
        logp = net(to_input(test.images))
    correct = int((logp.argmax(1) == test.labels).sum())
    assert records[-1]["test_correct"] == correct
    assert records[-1]["test_accuracy"] == correct / N_TEST
    assert records[-1]["test_loss"] == pytest.approx(float(F.nll_loss(logp, test.labels)), rel=1e-5)
