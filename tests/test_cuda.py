"""GPU checks (skipped without CUDA): CUDA-graph training matches eager training.

Run on a GPU host with the real data set:
    DISTMNIST_TEST_MNIST=/path/to/mnist pytest tests/test_cuda.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import pairwise

import pytest
import torch

from conftest import ROOT

# training runs on the real data set, on a GPU
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class FirstBatches(list):
    """An epoch's first batches, in the form the engine iterates (``batches.epoch(start_step)``)."""

    def epoch(self, start_step: int = 0):
        return iter(self[start_step:])


def first_steps(data_dir, lr: float, steps: int):
    """(accelerator, prepared model and optimizer, the first `steps` resident batches of epoch 1), seeded
    alike for an eager and a graphed run."""
    from distmnist.batches import TrainOrder, train_batches
    from distmnist.data import load_mnist
    from distmnist.distributed import make_accelerator
    from distmnist.engine import make_sgd, tune_for_device
    from distmnist.model import Net

    accelerator = make_accelerator(False, "no")
    train, _ = load_mnist(data_dir, allow_download=False)
    torch.manual_seed(1)
    model = tune_for_device(Net(), accelerator.device)
    torch.backends.cudnn.benchmark = False  # the same convolution algorithms in both runs
    optimizer = make_sgd(model, lr, 0.9, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    torch.manual_seed(1)
    order = TrainOrder(len(train), 1, 0, seed=1, batch_size=100)
    order.set_epoch(1)
    batches = FirstBatches(list(train_batches(train, order, accelerator.device, resident=True))[:steps])
    return accelerator, model, optimizer, batches


def per_step_losses(data_dir, graphs: bool, steps: int = 12) -> list[float]:
    from distmnist.engine import Engine

    accelerator, model, optimizer, batches = first_steps(data_dir, 0.01, steps)
    cumulative = []

    class Record:
        def update(self, step, running_loss):
            cumulative.append(running_loss() * step * 100)

    Engine(accelerator, model, optimizer, cuda_graphs=graphs).train_epoch(batches, Record())
    return [b - a for a, b in pairwise([0.0, *cumulative])]


def test_first_steps_losses_match_eager(real_mnist):
    eager = per_step_losses(real_mnist, graphs=False)
    graphed = per_step_losses(real_mnist, graphs=True)
    print("eager  ", [f"{x:.6f}" for x in eager])
    print("graphed", [f"{x:.6f}" for x in graphed])
    assert graphed == pytest.approx(eager, rel=1e-4, abs=1e-5)


def train(real_mnist, tmp_path, name, *flags) -> list[dict]:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "distmnist.train", "--data-dir", str(real_mnist), "--output-dir", str(out),
           "--progress", "plain", *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ten_epochs_graph_matches_eager_accuracy(real_mnist, tmp_path):
    eager = train(real_mnist, tmp_path, "eager", "--cuda-graphs", "off")
    graphed = train(real_mnist, tmp_path, "graph", "--cuda-graphs", "on")
    assert len(eager) == len(graphed) == 10
    assert graphed[0]["capture_seconds"] > 0 and eager[0]["capture_seconds"] == 0
    a, b = eager[-1]["test_accuracy"], graphed[-1]["test_accuracy"]
    print(f"eager {100 * a:.2f}%  graph {100 * b:.2f}%")
    assert a >= 0.985 and b >= 0.985
    assert abs(a - b) <= 0.0015


def test_bf16_graph_and_fp16_eager(real_mnist, tmp_path):
    bf16 = train(real_mnist, tmp_path, "bf16", "--mixed-precision", "bf16", "--epochs", "1")
    assert bf16[0]["capture_seconds"] > 0 and bf16[0]["test_accuracy"] >= 0.95
    fp16 = train(real_mnist, tmp_path, "fp16", "--mixed-precision", "fp16", "--epochs", "1")
    assert fp16[0]["capture_seconds"] == 0 and fp16[0]["test_accuracy"] >= 0.95


def test_loader_path_on_gpu(real_mnist, tmp_path):
    rows = train(real_mnist, tmp_path, "loader", "--data-path", "loader", "--epochs", "1", "--cuda-graphs", "off")
    assert rows[0]["test_samples"] == 10000 and rows[0]["test_accuracy"] >= 0.95


def scheduled_steps(data_dir, graphs: bool, steps: int = 40):
    """(each step's loss, the lr tensor and the step counter at the end) of `steps` onecycle steps."""
    from distmnist.engine import Engine
    from distmnist.schedule import LRSchedule, ScheduleSpec

    accelerator, model, optimizer, batches = first_steps(data_dir, 0.05, steps)
    schedule = LRSchedule(ScheduleSpec("onecycle", 0.05, steps, warmup_steps=10), accelerator.device)
    engine = Engine(accelerator, model, optimizer, cuda_graphs=graphs, schedule=schedule, record_step_losses=True)
    stats = engine.train_epoch(batches)
    return stats.step_losses, schedule.lr.item(), schedule.step.item()


def test_the_graph_replays_the_schedule_without_recapture(real_mnist):
    """Captured at step 4, replayed for 36 steps whose lr all differ: the losses follow eager
    training only if every replay reads the lr the device counter gives it."""
    from distmnist.schedule import ScheduleSpec

    eager_losses, eager_lr, eager_steps = scheduled_steps(real_mnist, graphs=False)
    graph_losses, graph_lr, graph_steps = scheduled_steps(real_mnist, graphs=True)
    expected_lr = torch.tensor(ScheduleSpec("onecycle", 0.05, 40, warmup_steps=10).value_at(39)).float().item()
    assert eager_steps == graph_steps == 40
    assert eager_lr == graph_lr == expected_lr
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)


def weights_of(out) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def test_an_fp16_run_resumes_exactly_with_its_loss_scale(real_mnist, tmp_path):
    """fp16 trains eagerly with a GradScaler whose scale a checkpoint keeps: stopped after epoch 1 and
    resumed, the run ends bit-identical to an uninterrupted one."""
    flags = ("--mixed-precision", "fp16", "--limit-train", "20000")
    train(real_mnist, tmp_path, "whole", *flags, "--epochs", "2")
    train(real_mnist, tmp_path, "cut", *flags, "--epochs", "1")
    state = json.loads((tmp_path / "cut" / "checkpoints" / "epoch-0001" / "state.json").read_text())
    assert state["scaler"] is not None and state["scaler"]["scale"] > 0
    out = tmp_path / "cut"
    proc = subprocess.run([sys.executable, "-m", "distmnist.train", "--output-dir", str(out), "--resume", "auto",
                           "--epochs", "2"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss scale" not in proc.stdout  # restored, not restarted
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_a_global_batch_trains_in_the_cuda_graph_as_it_does_eagerly(real_mnist, tmp_path):
    """--global-batch-size draws its dropout masks from a generator registered with the CUDA graph: the
    graph's replays must draw what eager steps draw."""
    flags = ("--global-batch-size", "100", "--epochs", "2")
    eager = train(real_mnist, tmp_path, "eager", *flags, "--cuda-graphs", "off")
    graphed = train(real_mnist, tmp_path, "graph", *flags, "--cuda-graphs", "on")
    assert graphed[0]["capture_seconds"] > 0
    assert graphed[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], rel=1e-3)
    assert abs(graphed[-1]["test_accuracy"] - eager[-1]["test_accuracy"]) <= 0.002


def test_a_global_batch_resumes_exactly_on_the_gpu(real_mnist, tmp_path):
    """A graphed global-batch run resumed at an epoch's end: eager warm-up steps, a new capture, and the
    masks' generator restored; the run ends where the uninterrupted one does."""
    flags = ("--global-batch-size", "100", "--limit-train", "20000")
    train(real_mnist, tmp_path, "whole", *flags, "--epochs", "2")
    train(real_mnist, tmp_path, "cut", *flags, "--epochs", "1")
    out = tmp_path / "cut"
    proc = subprocess.run([sys.executable, "-m", "distmnist.train", "--output-dir", str(out), "--resume", "auto",
                           "--epochs", "2"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, theirs = weights_of(out), weights_of(tmp_path / "whole")
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-5
