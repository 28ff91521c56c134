"""Learning-rate schedules: a pure function of the optimizer step, evaluated on the training device.

    python -m distmnist.train --lr-schedule onecycle --lr 0.05 --epochs 2 --data-dir DIR

t is the 0-based index of an optimizer step, T the run's total steps, W = --warmup-steps, and
lr = --lr (the peak). Each schedule is the torch.optim.lr_scheduler one stepped once per
optimizer step (tests/test_schedule.py compares them step by step):

  constant  lr                                            (LambdaLR of 1)
  step      lr * gamma ** floor(s / step_size)            (StepLR)
  cosine    min_lr + (lr - min_lr) * (1 + cos(pi s / (T - W))) / 2   (CosineAnnealingLR, T_max = T - W)
  onecycle  lr / 25 rising to lr over W steps, then down to lr / 25 / 1e4 by step T - 1, both halves
            cosine-shaped (OneCycleLR with pct_start = W / T, or its 0.3 when W = 0; momentum is not
            cycled, as cycle_momentum=False)

where s = t - W. For constant, step and cosine, W > 0 puts a linear warm-up in front:
lr * (t + 1) / W for t < W (LinearLR(start_factor=1/W, total_iters=W-1) then the schedule, as
SequentialLR chains them), so no step runs at lr 0.

Why a device tensor: torch.optim.SGD (fused) accepts a Tensor lr and reads it from device memory at
every step. `advance()` computes lr(t) into that tensor from a step counter that also lives on the
device, with tensor operations only: no host value enters the step, so a CUDA graph captured once
replays the whole schedule (the counter advances inside the graph; nothing is re-captured), no
step waits for the host, and nothing grows with the run's length. Because lr depends on t alone,
a resumed run (the counter restarts at the checkpoint's step) follows exactly the schedule of an
uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .errors import DistmnistError

ONECYCLE_DIV = 25.0  # OneCycleLR's div_factor: the first lr is the peak / 25
ONECYCLE_FINAL_DIV = 1e4  # OneCycleLR's final_div_factor: the last lr is the first / 1e4
ONECYCLE_PCT_START = 0.3  # OneCycleLR's pct_start: the rising part, used when --warmup-steps is 0


@dataclass(frozen=True)
class ScheduleSpec:
    """Everything lr(t) depends on; total_steps is the run's (epochs x steps per epoch)."""

    kind: str
    lr: float  # the peak (constant, step, cosine: the lr after warm-up; onecycle: max_lr)
    total_steps: int
    warmup_steps: int = 0
    step_size: int = 1  # step: optimizer steps between two decays
    gamma: float = 0.7  # step: the factor of each decay
    min_lr: float = 0.0  # cosine: the floor

    @classmethod
    def from_config(cls, cfg, steps_per_epoch: int, total_steps: int) -> ScheduleSpec:
        """cfg: a TrainConfig; --lr-step-size 0 means one epoch."""
        return cls(cfg.lr_schedule, cfg.lr, total_steps, cfg.warmup_steps, cfg.lr_step_size or steps_per_epoch,
                   cfg.lr_gamma, cfg.min_lr)

    def check(self) -> None:
        """Constraints that need the run's length (the flags alone are checked in config.py); the warm-up
        the same way for every schedule: it must end before the run does."""
        if self.warmup_steps >= self.total_steps:
            raise DistmnistError(f"--warmup-steps {self.warmup_steps:,} must be less than the run's "
                                 f"{self.total_steps:,} optimizer steps (--lr-schedule {self.kind})")
        if self.kind == "onecycle" and self.total_steps < 2:
            raise DistmnistError("--lr-schedule onecycle needs at least 2 optimizer steps")

    @property
    def varies(self) -> bool:
        return self.kind != "constant" or self.warmup_steps > 0

    def lrs(self, t: torch.Tensor) -> torch.Tensor:
        """lr at each step index in t (float64, any shape), elementwise; LRSchedule tabulates it once."""
        t = t.double()
        if self.kind == "onecycle":
            return self._onecycle(t)
        w = self.warmup_steps
        s = (t - w).clamp(min=0)
        if self.kind == "constant":
            lr = torch.full_like(t, self.lr)
        elif self.kind == "step":
            decays = torch.div(s, self.step_size, rounding_mode="floor")
            lr = self.lr * torch.pow(torch.full_like(t, self.gamma), decays)
        else:  # cosine
            span = self.total_steps - w
            lr = self.min_lr + (self.lr - self.min_lr) * (1 + torch.cos(math.pi * s.clamp(max=span) / span)) / 2
        if w > 0:
            lr = torch.where(t < w, self.lr * (t + 1) / w, lr)
        return lr

    def _onecycle(self, t: torch.Tensor) -> torch.Tensor:
        """OneCycleLR's two cosine phases; the rising one ends at step W - 1 (a float when W = 0.3 T)."""
        peak, first = self.lr, self.lr / ONECYCLE_DIV
        last = first / ONECYCLE_FINAL_DIV
        rise_end = (self.warmup_steps or ONECYCLE_PCT_START * self.total_steps) - 1
        end = self.total_steps - 1
        t = t.clamp(max=end)

        def anneal(start: float, stop: float, pct: torch.Tensor) -> torch.Tensor:
            return stop + (start - stop) / 2 * (torch.cos(math.pi * pct) + 1)

        rising = anneal(first, peak, t / rise_end) if rise_end > 0 else torch.full_like(t, peak)
        falling = anneal(peak, last, (t - rise_end) / (end - rise_end))
        return torch.where(t <= rise_end, rising, falling)

    def value_at(self, step: int) -> float:
        """lr of step index `step` as a Python float (for logs; computed on the CPU)."""
        return float(self.lrs(torch.tensor(float(step), dtype=torch.float64)))

    def describe(self) -> str:
        """One line for the run plan."""
        warm = f", {self.warmup_steps} warm-up steps" if self.warmup_steps else ""
        if self.kind == "constant":
            return f"constant {self.lr:g}{warm}"
        if self.kind == "step":
            return f"step: {self.lr:g} x {self.gamma:g} every {self.step_size} steps{warm}"
        if self.kind == "cosine":
            return f"cosine {self.lr:g} -> {self.min_lr:g} over {self.total_steps:,} steps{warm}"
        rise = (f"{self.warmup_steps:,} of" if self.warmup_steps else f"{ONECYCLE_PCT_START:.0%} of")
        final = self.lr / ONECYCLE_DIV / ONECYCLE_FINAL_DIV
        return (f"onecycle {self.lr / ONECYCLE_DIV:.3g} -> {self.lr:g} -> {final:.2g}, "
                f"rising over {rise} {self.total_steps:,} steps")


class LRSchedule:
    """The lr tensor the optimizer reads, and the device step counter that drives it.

    lr(t) is computed at every step on the device, from the counter, with tensor operations only (a
    dozen small kernels, inside the CUDA graph when there is one): nothing is tabulated, so memory does
    not depend on the run's length.
    """

    def __init__(self, spec: ScheduleSpec, device: torch.device, start_step: int = 0):
        self.spec = spec
        # float32: the CUDA fused SGD kernel reads the lr through a float pointer (the CPU one via item())
        self.lr = torch.empty((), dtype=torch.float32, device=device)
        self.step = torch.empty(1, dtype=torch.long, device=device)  # index of the next optimizer step
        self.start_at(start_step)

    def start_at(self, step: int) -> None:
        """Put the counter at `step` (a resumed run's global step); outside the step, once."""
        self.step.fill_(step)
        self.lr.copy_(self.spec.lrs(self.step.reshape(())).float())

    def install(self, optimizer) -> None:
        """Make every param group read this tensor (again after a load_state_dict put a float there).

        A constant lr without warm-up stays a plain float: the default recipe's step (and its CUDA
        graph, verified on a GPU before schedules existed) is exactly what it was; only a schedule,
        which needs it, puts a tensor in the optimizer."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr if self.spec.varies else self.spec.lr

    def advance(self) -> None:
        """Inside the step, before optimizer.step(): lr <- lr(counter), counter += 1. Device ops only."""
        if self.spec.varies:
            self.lr.copy_(self.spec.lrs(self.step.reshape(())).float())
            self.step.add_(1)

    def state_dict(self) -> dict[str, Any]:
        """The schedule as a checkpoint records it: its definition (lr(t) is a function of t alone)."""
        return asdict(self.spec)


def saveable_state_dict(optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with a tensor lr as a float (the JSON of a checkpoint; a host read, once)."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
    return state
