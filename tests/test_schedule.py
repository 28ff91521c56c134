"""Learning-rate schedules: step by step against torch.optim.lr_scheduler, device-only updates,
exact resume, and the steps that reach the trackers."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim import lr_scheduler

from distmnist.config import parse_config
from distmnist.errors import DistmnistError
from distmnist.schedule import LRSchedule, ScheduleSpec, saveable_state_dict

LR = 0.05
TOTAL = 250  # optimizer steps of the compared runs


def torch_lrs(make, total: int = TOTAL) -> list[float]:
    """The lr each optimizer step uses under a torch scheduler stepped once per optimizer step."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=LR, momentum=0.9)
    scheduler = make(optimizer)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def warm(optimizer, w: int):
    return lr_scheduler.LinearLR(optimizer, start_factor=1 / w, end_factor=1.0, total_iters=w - 1)


def ours(spec: ScheduleSpec) -> list[float]:
    return spec.lrs(torch.arange(spec.total_steps, dtype=torch.float64)).tolist()


CASES = {
    "constant": (ScheduleSpec("constant", LR, TOTAL), lambda o: lr_scheduler.LambdaLR(o, lambda t: 1.0)),
    "constant+warmup": (ScheduleSpec("constant", LR, TOTAL, warmup_steps=40), lambda o: warm(o, 40)),
    "step": (ScheduleSpec("step", LR, TOTAL, step_size=60, gamma=0.5),
             lambda o: lr_scheduler.StepLR(o, step_size=60, gamma=0.5)),
    "step+warmup": (ScheduleSpec("step", LR, TOTAL, warmup_steps=25, step_size=30, gamma=0.7),
                    lambda o: lr_scheduler.SequentialLR(o, [warm(o, 25), lr_scheduler.StepLR(o, 30, gamma=0.7)],
                                                        milestones=[25])),
    "cosine": (ScheduleSpec("cosine", LR, TOTAL), lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=TOTAL)),
    "cosine+warmup+floor": (
        ScheduleSpec("cosine", LR, TOTAL, warmup_steps=50, min_lr=1e-3),
        lambda o: lr_scheduler.SequentialLR(
            o, [warm(o, 50), lr_scheduler.CosineAnnealingLR(o, T_max=TOTAL - 50, eta_min=1e-3)], milestones=[50])),
    "onecycle (pct_start 0.3)": (ScheduleSpec("onecycle", LR, TOTAL),
                                 lambda o: lr_scheduler.OneCycleLR(o, max_lr=LR, total_steps=TOTAL,
                                                                   cycle_momentum=False)),
    "onecycle, 40 rising steps": (ScheduleSpec("onecycle", LR, TOTAL, warmup_steps=40),
                                  lambda o: lr_scheduler.OneCycleLR(o, max_lr=LR, total_steps=TOTAL,
                                                                    pct_start=40 / TOTAL, cycle_momentum=False)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's notes about SequentialLR and step order
@pytest.mark.parametrize("name", list(CASES))
def test_every_step_matches_torch_lr_scheduler(name):
    spec, make = CASES[name]
    expected, got = torch_lrs(make), ours(spec)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15), name
    assert len(set(round(x, 12) for x in got)) > (1 if spec.varies else 0)  # a schedule that moves, where it should


def test_warmup_starts_above_zero_and_reaches_the_peak_at_step_w_minus_1():
    spec = ScheduleSpec("cosine", LR, 100, warmup_steps=10)
    lrs = ours(spec)
    assert lrs[0] == pytest.approx(LR / 10) and lrs[9] == pytest.approx(LR) and lrs[10] == pytest.approx(LR)
    assert all(b > a for a, b in pairwise(lrs[:10]))


def test_device_schedule_advances_without_reading_anything_back():
    """advance() is what the step (and so the CUDA graph) runs: tensor ops only, and no
    _local_scalar_dense (the op behind .item(), float() and bool() of a tensor: a host sync on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    for spec, _ in CASES.values():
        schedule = LRSchedule(spec, torch.device("cpu"), start_step=0)
        seen, ops = [], Ops()
        with ops:
            for _ in range(spec.total_steps):
                schedule.advance()
                seen.append(schedule.lr.clone())
        assert not [n for n in ops.names if "_local_scalar_dense" in n], spec
        expected = torch.tensor(ours(spec), dtype=torch.float32)
        assert torch.equal(torch.stack(seen), expected), spec  # float32, what the fused kernel reads
        assert schedule.lr.data_ptr() == schedule.lr.data_ptr() and schedule.lr.shape == ()  # updated in place


def test_a_schedule_started_at_a_step_continues_exactly():
    spec = CASES["onecycle, 40 rising steps"][0]
    schedule = LRSchedule(spec, torch.device("cpu"), start_step=123)
    schedule.advance()
    assert schedule.lr.item() == torch.tensor(ours(spec)[123], dtype=torch.float32).item()
    assert schedule.step.item() == 124


def test_the_optimizer_reads_the_tensor_and_a_checkpoint_holds_a_float():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=LR, momentum=0.9, fused=True)
    schedule = LRSchedule(ScheduleSpec("step", LR, 10, step_size=1, gamma=0.5), torch.device("cpu"))
    schedule.install(optimizer)
    for expected_lr in (LR, LR / 2):
        param.grad = torch.ones(3)
        before = param.detach().clone()
        schedule.advance()
        optimizer.step()
        # the first step (empty momentum buffer) moves by lr x grad
        if expected_lr == LR:
            assert torch.allclose(before - param.detach(), torch.full((3,), LR))
    state = saveable_state_dict(optimizer)
    assert state["param_groups"][0]["lr"] == pytest.approx(LR / 2) and isinstance(state["param_groups"][0]["lr"], float)
    json.dumps(state["param_groups"])  # what checkpoint.py writes into state.json
    assert optimizer.param_groups[0]["lr"] is schedule.lr  # the live optimizer keeps the tensor


@pytest.mark.parametrize("argv,message", [
    (["--warmup-steps", "-1"], "--warmup-steps must be between 0 and "),
    (["--lr-gamma", "0"], "--lr-gamma must be a finite number > 0"),
    (["--min-lr", "0.5", "--lr", "0.1"], "--min-lr must be in [0, --lr)"),
    (["--log-every", "10"], "--log-every needs a tracker"),
    (["--log-interval", "0"], "--log-interval must be a finite number > 0"),
    (["--lr-schedule", "linear"], "invalid choice: 'linear'"),
])
def test_impossible_schedule_flags_are_refused(argv, message, capsys):
    with pytest.raises((DistmnistError, SystemExit)) as err:
        parse_config(argv)
    text = str(err.value) if isinstance(err.value, DistmnistError) else capsys.readouterr().err
    assert message in text


@pytest.mark.parametrize("kind", ["constant", "step", "cosine", "onecycle"])
def test_a_warmup_as_long_as_the_run_is_refused_for_every_schedule(kind):
    with pytest.raises(DistmnistError, match="--warmup-steps 100 must be less than the run's 100 optimizer steps"):
        ScheduleSpec(kind, LR, 100, warmup_steps=100).check()
    ScheduleSpec(kind, LR, 100, warmup_steps=99).check()


# ---------------------------------------------------------------- in real runs


@pytest.fixture
def fresh_accelerate():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def train(data: Path, out: Path, *extra: str) -> int:
    from accelerate.state import AcceleratorState

    from distmnist.training import main

    try:
        return main(["--data-dir", str(data), "--no-download", "--output-dir", str(out), "--progress", "none",
                     "--batch-size", "50", "--limit-train", "300", "--lr", "0.05", *extra])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_a_resumed_onecycle_run_ends_bit_identical(mnist_dir, tmp_path, fresh_accelerate):
    """The schedule depends on the global step alone (and on --epochs, which sets its length): a run
    resumed from the first epoch's checkpoint ends where the uninterrupted run does."""
    recipe = ["--lr-schedule", "onecycle", "--warmup-steps", "5", "--epochs", "3"]
    assert train(mnist_dir, tmp_path / "straight", *recipe) == 0
    first = tmp_path / "straight" / "checkpoints" / "epoch-0001"
    assert train(mnist_dir, tmp_path / "split", "--resume", str(first), *recipe) == 0
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "split" / "checkpoints" / "epoch-0003" / "state.json").read_text())
    spec = ScheduleSpec("onecycle", 0.05, 18, warmup_steps=5)  # 3 epochs x 6 steps of 50 images
    assert state["optimizer_param_groups"][0]["lr"] == pytest.approx(spec.value_at(17), rel=1e-6)
