"""Train one epoch and evaluate: rank-agnostic, typed results, no host syncs inside the step.

The training loss accumulates on the device; it reaches the host only when the console asks for
it (at its refresh interval) and at the end of the epoch. The learning rate is a device tensor
that the schedule (schedule.py) advances inside the step; with --log-every, each step's loss is
also written into a device buffer, read once with the epoch's totals. On one CUDA process the
whole step (forward, backward, lr update, optimizer step, loss accumulation) is captured once as a
CUDA graph after a few real eager steps and replayed from then on; a short last batch runs eagerly.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from .masks import GlobalDropout
from .model import to_input
from .schedule import LRSchedule
from .signals import CHECK_EVERY, StopRequests

GRAPH_WARMUP_STEPS = 3  # real training steps run eagerly (on a side stream) before capture


@dataclass
class EpochStats:
    loss: float  # mean training loss over every image of every rank
    samples: int  # training images seen by all ranks together
    steps: int  # optimizer steps per rank
    seconds: float  # wall time of the training part, device work included
    capture_seconds: float  # time spent capturing the CUDA graph (part of `seconds`), 0 if none
    step_losses: list[float] = field(default_factory=list)  # each step's loss this call, mean over ranks (if recorded)
    stop: int = 0  # the agreed stop code (a signal number, signals.DIVERGED) when the epoch ended early
    epoch_step: int = 0  # steps done in the epoch by each rank, resumed ones included
    resumed_seconds: float = 0.0  # part of `seconds` spent before this launch (a resumed epoch)
    checkpoint_seconds: float = 0.0  # mid-epoch checkpoints written during the epoch (not in `seconds`)


@dataclass
class Carry:
    """Where an interrupted epoch resumes: this rank's running sums at its position."""

    step: int  # steps already done in the epoch
    loss_sum: float  # this rank's sum of the training loss over its images so far (float32, exact)
    samples: int  # this rank's images so far
    seconds: float  # training wall time spent on the epoch before the interruption


@dataclass
class EvalStats:
    loss: float  # mean NLL over the test images counted
    accuracy: float  # fraction correct
    correct: int
    samples: int  # test images counted, each exactly once across ranks
    log_probs: torch.Tensor | None = None  # this rank's outputs (its shard, in order) if asked for


class Checkpoints(Protocol):
    """--checkpoint-every, as the loop sees it (train.py's MidEpochCheckpoints)."""

    def step_due(self, epoch_step: int) -> bool: ...  # a step count: the same answer on every rank, no collective

    def time_due(self) -> bool: ...  # minutes: the main process's clock, agreed on with the stop requests

    def save(self, epoch_step: int, train_seconds: float) -> None: ...  # every rank calls


class StepProgress(Protocol):
    def update(self, step: int, running_loss: Callable[[], float]) -> None: ...


def make_sgd(model: torch.nn.Module, lr: float, momentum: float, device: torch.device, weight_decay: float = 0.0,
             nesterov: bool = False) -> torch.optim.SGD:
    """The tutorial's SGD with the fused kernel: one launch per step on CUDA instead of one per tensor
    op, and on the CPU less time per epoch than the per-parameter loop (docs/benchmarks.md). weight_decay (L2, added
    to the gradient) and nesterov are the fused kernel's own options."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov, fused=True)


def tune_for_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Settings that pay for this small network (measured: docs/benchmarks.md).

    channels_last everywhere: cuDNN's and oneDNN's convolution and max-pool kernels are NHWC-native
    (an epoch takes markedly less on a CPU too). On CUDA also TF32 matrix products, as
    convolutions already use by default, and cuDNN autotuning, worth it because every step has the
    same shapes.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    return model.to(memory_format=torch.channels_last)


def match_param_layout(optimizer) -> None:
    """Give loaded optimizer state the memory layout of its parameter (fused kernels assume it)."""
    for param, state in optimizer.state.items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                state[name] = torch.empty_like(param).copy_(value)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engine:
    """Owns the step: receives a prepared model and optimizer from outside.

    ``dropout`` (a global batch, masks.GlobalDropout): every step's masks come from it, and the loss is
    the sum over this rank's images scaled by world / (images in the global batch), so that DDP's
    average over ranks is the mean over the global batch however its images are shared out. Without
    it, the loss is the mean over this rank's batch, as the tutorial's (and DDP averages those)."""

    def __init__(self, accelerator, model, optimizer, cuda_graphs: bool = False, schedule: LRSchedule | None = None,
                 record_step_losses: bool = False, dropout: GlobalDropout | None = None):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.device = accelerator.device
        self.cuda_graphs = cuda_graphs
        # Accelerate's optimizer wrapper looks up an optional package with importlib on every step()
        # and inspects zero_grad's signature on every zero_grad() (a cost per step: docs/benchmarks.md).
        # Without a GradScaler it only forwards both calls, so the step calls the wrapped optimizer.
        inner = getattr(optimizer, "optimizer", optimizer)
        self._opt = inner if getattr(optimizer, "scaler", None) is None else optimizer
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss_sum = torch.zeros((), device=self.device)  # sum over images of the training loss
        self.samples = 0  # this rank's images so far in the epoch
        self.steps_done = 0  # optimizer steps since the start of training (this process)
        self.stop: StopRequests | None = None  # set by the caller: signals and divergence end an epoch early
        self.schedule = schedule  # None: the optimizer's own (float) lr, as bench.py uses it
        if schedule is not None:
            schedule.install(inner)
        # --log-every: loss of each step of the epoch, written at a device-side index (graph-safe)
        self.record_step_losses = record_step_losses
        self.step_losses: torch.Tensor | None = None
        self.epoch_step = torch.zeros(1, dtype=torch.long, device=self.device)
        self.dropout = dropout
        # the network inside DDP's wrapper, where the step sets the dropout mask; looked up once, since
        # Accelerate's unwrap_model costs about 0.1 ms a call (2-core CPU), as much as a small step's kernels
        self.net = accelerator.unwrap_model(model)
        self.step_images: int | None = None  # a global batch: images in this step's global batch
        self.graph_step_images: int | None = None  # step_images when the graph was captured (baked into it)
        self.checkpoints: Checkpoints | None = None  # set by the caller: --checkpoint-every

    # ------------------------------------------------------------ the step

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self._opt.zero_grad(set_to_none=True)
        if self.dropout is None:
            loss = F.nll_loss(self.model(to_input(images)), labels)
            total = None
        else:
            assert self.step_images is not None  # set by train_epoch from the global batch's order
            self.net.drop2D.mask = self.dropout.rows(self.step_images)
            total = F.nll_loss(self.model(to_input(images)), labels, reduction="sum")
            loss = total * (self.accelerator.num_processes / self.step_images)
        self.accelerator.backward(loss)
        if self.schedule is not None:
            self.schedule.advance()  # device ops: this step's lr from the device step counter
        self._opt.step()
        loss = loss.detach()
        if total is None:
            self.loss_sum.add_(loss, alpha=labels.shape[0])  # one kernel, no host sync
        else:
            self.loss_sum.add_(total.detach())
        if self.step_losses is not None:
            self.step_losses.index_copy_(0, self.epoch_step, loss.float().reshape(1))
            self.epoch_step.add_(1)

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> torch.cuda.CUDAGraph:
        """Record one step with static buffers; nothing runs until the first replay."""
        self.static_images, self.static_labels = images.clone(), labels.clone()
        self.graph_step_images = self.step_images  # the loss scale N / step_images is a constant of the graph
        self.graph = graph = torch.cuda.CUDAGraph()
        if self.dropout is not None:  # each replay advances the mask generator as an eager step would
            graph.register_generator_state(self.dropout.generator)
        self.optimizer.zero_grad(set_to_none=True)  # grads are then allocated from the graph's pool
        with torch.cuda.graph(graph):
            self._step(self.static_images, self.static_labels)
        return graph

    def _graph_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One training step on the CUDA-graph path; returns seconds spent capturing (0 mostly)."""
        # a short last global batch can leave this rank's share at the captured shape (98 images on 4
        # ranks: 25, 25, 24, 24): its loss scale differs from the graph's, so it runs eagerly too
        if (self.graph is not None and images.shape == self.static_images.shape
                and self.step_images == self.graph_step_images):
            self.static_images.copy_(images)
            self.static_labels.copy_(labels)
            self.graph.replay()
            return 0.0
        if self.graph is None and self.steps_done >= GRAPH_WARMUP_STEPS:
            start = time.perf_counter()
            graph = self._capture(images, labels)
            synchronize(self.device)
            seconds = time.perf_counter() - start
            self.static_images.copy_(images)
            self.static_labels.copy_(labels)
            graph.replay()
            return seconds
        if self.graph is None:
            # warm-up steps are real steps, run on a side stream as capture requires
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._step(images, labels)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return 0.0
        self._step(images, labels)  # a short last batch: eager, same parameters and optimizer state
        return 0.0

    # ------------------------------------------------------------ epochs

    def running_loss(self, samples: int) -> float:
        """Mean loss of this process so far in the epoch. A host sync: call it rarely. A non-finite
        value (divergence) is reported to the stop requests, which end the epoch at the next check."""
        loss = self.loss_sum.item() / max(samples, 1)
        if not math.isfinite(loss) and self.stop is not None:
            self.stop.diverged()
        return loss

    def train_epoch(self, batches, progress: StepProgress | None = None, carry: Carry | None = None) -> EpochStats:
        """Train over ``batches.epoch(start)`` from step ``carry.step`` (0: the whole epoch).

        Every CHECK_EVERY steps (every step with one process) the ranks agree on the stop requests;
        if one is set, every rank stops after the same step and the stats say so (``stop``).
        """
        self.model.train()
        start_step = carry.step if carry else 0
        self.loss_sum.fill_(carry.loss_sum if carry else 0.0)
        self.samples = carry.samples if carry else 0
        if self.record_step_losses:
            if self.step_losses is None:  # allocated before any capture, so the graph writes into it
                self.step_losses = torch.zeros(len(batches), device=self.device)
            self.step_losses.zero_()
            self.epoch_step.fill_(start_step)
        single = self.accelerator.num_processes == 1
        steps, capture, stop, paused = start_step, 0.0, 0, 0.0
        before = carry.seconds if carry else 0.0  # the epoch's training time in earlier launches
        synchronize(self.device)
        start = time.perf_counter()
        order = getattr(batches, "order", None)
        for images, labels in batches.epoch(start_step):
            self.step_images = order.step_images(steps) if order is not None else None
            if self.cuda_graphs:
                capture += self._graph_step(images, labels)
            else:
                self._step(images, labels)
            self.samples += labels.shape[0]
            steps += 1
            self.steps_done += 1
            if progress is not None:
                progress.update(steps, functools.partial(self.running_loss, self.samples))
            if self.stop is not None and (single or steps % CHECK_EVERY == 0) and steps < len(batches):
                due = self.checkpoints is not None and self.checkpoints.time_due()
                stop, save = self.stop.agreed_with(due)  # outside any CUDA graph: between replays
                if stop:
                    break
            else:
                save = False
            if self.checkpoints is not None and steps < len(batches) and (save or self.checkpoints.step_due(steps)):
                saving = time.perf_counter()
                self.checkpoints.save(steps, saving - start - paused + before)
                paused += time.perf_counter() - saving  # checkpoint time, not training time
        synchronize(self.device)
        seconds = time.perf_counter() - start - paused + before
        parts = [self.loss_sum.double().reshape(1), torch.tensor([float(self.samples)], device=self.device).double()]
        if self.step_losses is not None:
            parts.append(self.step_losses[start_step:steps].double())
        totals = self.accelerator.reduce(torch.cat(parts), reduction="sum").tolist()  # one collective, one read
        global_loss, global_samples = totals[:2]
        world = self.accelerator.num_processes
        step_losses = [loss / world for loss in totals[2:]]  # each rank's loss weighs 1 / world in the gradient
        return EpochStats(global_loss / max(global_samples, 1), int(global_samples), steps - start_step, seconds,
                          capture, step_losses, stop, steps, resumed_seconds=before, checkpoint_seconds=paused)

    @torch.no_grad()
    def evaluate(self, batches: Iterable, keep_outputs: bool = False) -> EvalStats:
        """Sum loss and hits over this rank's disjoint shard, then one all-reduce of the sums."""
        model = self.accelerator.unwrap_model(self.model)  # plain forward: no DDP hooks at eval
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        kept = []
        for images, labels in batches:
            with self.accelerator.autocast():
                out = model(to_input(images)).float()
            if keep_outputs:
                kept.append(out)
            totals[0] += F.nll_loss(out, labels, reduction="sum")
            totals[1] += (out.argmax(dim=1) == labels).sum()
            totals[2] += labels.shape[0]
        loss_sum, correct, count = self.accelerator.reduce(totals, reduction="sum").tolist()
        count = int(count)
        outputs = torch.cat(kept) if kept else None
        return EvalStats(loss_sum / max(count, 1), correct / max(count, 1), int(correct), count, outputs)
