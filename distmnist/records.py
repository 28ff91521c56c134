"""What a training run writes while it runs: its config and metrics, epoch and mid-epoch checkpoints,
the best and final weights, run.json.

A checkpoint gathers the run's components, each with its own state: the model and optimizer, the
fp16 GradScaler, the schedule, the data order (TrainOrder), every rank's random generators and the
global batch's dropout generator, the progress (Progress) and the config history; state.py owns
the JSON, checkpoint.py the files. Every rank calls every method (each one holds collectives: the
finiteness and replica checks, the RNG gather); only the main process, the one holding the run
folder (rundir.RunFolder), writes. A write that fails there ends every rank together
(distributed.on_main), and nothing non-finite or drifted apart is ever saved.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import __version__
from .checkpoint import nonfinite, save_weights, write_checkpoint
from .config import Interval
from .distributed import disagreeing_ranks, gather_rng, on_main, tensors_digest
from .errors import RunFailed
from .rundir import RunFolder, Start, prune, prune_superseded
from .schedule import saveable_state_dict
from .state import DataOrder, MidEpoch, RandomInfo, RunProgress, TrainState
from .timing import seconds_since_process_start


def versions(accelerator) -> dict[str, str]:
    """What ran where: package versions and the device's name."""
    import accelerate

    cuda = accelerator.device.type == "cuda"
    device = torch.cuda.get_device_name(accelerator.device) if cuda else platform.processor() or "cpu"
    return {
        "distmnist": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
        "python": platform.python_version(), "device": device,
    }


@dataclass
class Progress:
    """What the loop advances: the run's history so far and where it stands."""

    history: list[dict[str, Any]]
    step: int  # optimizer steps so far (during an epoch: up to its start)
    newest: str | None  # the newest checkpoint written or resumed from (for messages)
    timings: dict[str, float] = field(default_factory=dict)  # this launch's seconds: setup, train, checkpoint
    best: dict[str, Any] | None = None  # --val-size: {"epoch", "val_accuracy", "val_loss"} of the best epoch so far
    early_stopped: bool = False
    epoch_start: int = 0  # optimizer steps before the epoch under way

    def state_dict(self) -> RunProgress:
        return RunProgress(list(self.history), self.best, self.early_stopped)


@dataclass
class Position:
    """Where an epoch stopped in its middle, and this rank's running sums there."""

    epoch: int
    step: int  # steps done in the epoch
    steps: int  # steps per epoch
    train_seconds: float
    loss_sum: torch.Tensor  # this rank's, on the device
    samples: int


@dataclass
class Components:
    """The run's parts whose state a checkpoint holds, besides the progress."""

    model: Any  # prepared by Accelerate
    optimizer: Any
    order: Any  # batches.TrainOrder
    schedule: Any  # schedule.LRSchedule
    scaler: Any = None  # torch.amp.GradScaler of an fp16 run
    dropout: Any = None  # masks.GlobalDropout of a global batch


class Recorder:
    """The run's writer. ``folder`` is the main process's hold on the run folder, None on other ranks."""

    def __init__(self, accelerator, folder: RunFolder | None, start: Start, versions: dict[str, str],
                 parts: Components, validation: bool):
        self.accelerator, self.folder, self.start, self.cfg = accelerator, folder, start, start.config
        self.versions, self.parts, self.validation = versions, parts, validation

    def diverged(self, progress: Progress, what: str) -> RunFailed:
        newest = f"newest finite checkpoint: {progress.newest}" if progress.newest else "no checkpoint was written"
        hint = "try a lower --lr" + (" or --weight-decay" if self.cfg.weight_decay > 0 else "")
        return RunFailed(f"training diverged: {what}; nothing of it was saved; {newest} ({hint})",
                         silent=not self.accelerator.is_main_process)

    def config_history(self) -> list[dict[str, Any]]:
        return self.start.config_history or [{"from_epoch": 1, "from_step": 0, "config": self.cfg.to_dict()}]

    def begin(self, progress: Progress) -> None:
        """Record the config that runs now and the history it continues (main process), then meet."""
        self._write(lambda folder: (folder.write_config(self.cfg.to_dict(), self.start.run_id),
                                    folder.write_metrics(progress.history)), "writing config.json")

    def save_epoch(self, record: dict[str, Any], progress: Progress, best: bool = False) -> None:
        """The epoch's checkpoint and metrics (with best: also best.safetensors); the epoch's mid-epoch
        checkpoints are then superseded and removed."""
        started = time.perf_counter()
        weights, optimizer = self._checked_state(progress, f"after epoch {record['epoch']}")
        rng = gather_rng(self.accelerator, self._dropout_generator())
        state = self.state(progress, record["epoch"])

        def write(folder: RunFolder) -> None:
            path = folder.checkpoint_path(record["epoch"])
            write_checkpoint(path, weights, optimizer, rng, state)
            folder.write_metrics(progress.history)
            if best:
                save_weights(weights, folder.best_weights())
            prune_superseded(folder.path, self.start.run_id, record["epoch"])
            prune(folder.path, self.start.run_id, self.cfg.keep_checkpoints, path)  # only once it is complete
            progress.newest = str(path)

        self._write(write, f"writing the checkpoint of epoch {record['epoch']}")
        progress.timings["checkpoint"] = progress.timings.get("checkpoint", 0.0) + time.perf_counter() - started

    def save_position(self, position: Position, progress: Progress) -> None:
        """A mid-epoch checkpoint: the position, every rank's RNG state and running sums."""
        started = time.perf_counter()
        accelerator = self.accelerator
        weights, optimizer = self._checked_state(progress, f"at epoch {position.epoch} step {position.step}")
        rng = gather_rng(accelerator, self._dropout_generator())
        sums = accelerator.gather(position.loss_sum.float().reshape(1)).cpu()
        samples = torch.tensor([position.samples], dtype=torch.int64, device=accelerator.device)
        counts = accelerator.gather(samples).cpu()
        state = self.state(progress, position.epoch, MidEpoch(position.step, position.steps, position.train_seconds))

        def write(folder: RunFolder) -> None:
            path = folder.checkpoint_path(position.epoch, position.step)
            write_checkpoint(path, weights, optimizer, rng, state, {"loss_sum": sums, "samples": counts})
            prune(folder.path, self.start.run_id, self.cfg.keep_checkpoints, path)
            progress.newest = str(path)

        self._write(write, f"writing the checkpoint at epoch {position.epoch} step {position.step}")
        progress.timings["checkpoint"] = progress.timings.get("checkpoint", 0.0) + time.perf_counter() - started

    def state(self, progress: Progress, epoch: int, mid: MidEpoch | None = None) -> TrainState:
        """The checkpoint's TrainState at this point of the run (the same on every rank)."""
        parts, cfg = self.parts, self.cfg
        order = parts.order
        order.set_epoch(epoch)
        data = DataOrder(seed=cfg.seed, world_size=self.accelerator.num_processes, batch_size=order.batch_size,
                         global_batch_size=order.global_batch, train_images=order.n, val_size=cfg.val_size,
                         limit_train=cfg.limit_train, digest=order.digest())
        return TrainState(
            run_id=self.start.run_id, epoch=epoch, step=progress.epoch_start + mid.step if mid else progress.step,
            data=data,
            mid_epoch=mid, progress=progress.state_dict(),
            random=RandomInfo(self.accelerator.device.type, parts.dropout is not None),
            scaler=parts.scaler.state_dict() if parts.scaler is not None else None,
            schedule=parts.schedule.state_dict(), config=cfg.to_dict(), config_history=self.config_history(),
            versions=self.versions)

    def finish(self, progress: Progress, first_epoch: int, started: float, setup: dict[str, float]) -> None:
        """The final weights and run.json (``started``: when main() began; ``setup``: its phases, seconds)."""
        model = self.accelerator.unwrap_model(self.parts.model)
        self._write(lambda folder: (save_weights(model.state_dict(), folder.final_weights()),
                                    folder.write_summary(self.summary(progress, first_epoch, started, setup))),
                    "writing the final weights and run.json")

    def summary(self, progress: Progress, first_epoch: int, started: float, setup: dict[str, float]) -> dict[str, Any]:
        """run.json: what ran where, with which config over which epochs, and where the wall time went
        (this launch's parts; the run's training time over every launch apart)."""
        new = [r for r in progress.history if r["epoch"] >= first_epoch]
        return {
            "run_id": self.start.run_id,
            "versions": self.versions,
            "world_size": self.accelerator.num_processes,
            "config": self.cfg.to_dict(),
            "config_history": self.config_history(),
            "epochs_run": len(new),
            "final": progress.history[-1] if progress.history else None,
            **({"best": progress.best, "early_stopped": progress.early_stopped} if self.validation else {}),
            "seconds": {
                "process": seconds_since_process_start(),  # interpreter start -> now, imports included
                "main": time.perf_counter() - started,  # main() -> now
                "setup": progress.timings.get("setup", 0.0),  # config, Accelerator, folder, data, model, resume
                **setup,  # its parts (setup_accelerator, setup_data, ...)
                "train": progress.timings.get("train", 0.0),  # this launch's training
                "capture": sum(r["capture_seconds"] for r in new),
                "eval": sum(r["eval_seconds"] for r in new),
                "checkpoint": progress.timings.get("checkpoint", 0.0),
                "run_train": sum(r["train_seconds"] for r in progress.history),  # the run's, every launch
            },
        }

    def _dropout_generator(self):
        return self.parts.dropout.generator if self.parts.dropout is not None else None

    def _write(self, write, what: str) -> None:
        """The main process writes; every rank leaves together if that failed."""
        on_main(self.accelerator, lambda: write(self.folder), what)

    def _checked_state(self, progress: Progress, when: str) -> tuple[dict, dict]:
        """Weights and optimizer state, after checking that they are finite and identical on every rank."""
        accelerator = self.accelerator
        weights = accelerator.unwrap_model(self.parts.model).state_dict()
        optimizer = saveable_state_dict(self.parts.optimizer)  # a tensor lr (the schedule's) as a float
        bad = nonfinite(weights)
        if bad:  # the same on every rank: DDP keeps the replicas equal
            raise self.diverged(progress, f"the weights became non-finite ({', '.join(bad)}) {when}")
        state = optimizer["state"]  # keyed by parameter index; its order depends on how it was loaded, so sort
        tensors = list(weights.values()) + [state[i][name] for i in sorted(state) for name in sorted(state[i])
                                            if isinstance(state[i][name], torch.Tensor)]
        drifted = disagreeing_ranks(accelerator, tensors_digest(tensors))
        if drifted:
            names = ", ".join(f"rank {r} on {h}" for r, h in drifted)
            raise RunFailed(f"replicas drifted apart {when}: the weights or optimizer state of {names} differ from "
                            "rank 0's; nothing was saved", silent=not accelerator.is_main_process)
        return weights, optimizer


class MidEpochCheckpoints:
    """--checkpoint-every: when a mid-epoch checkpoint is due, and writing it (engine.Checkpoints).

    A step count is due on every rank alike (the global step is the same everywhere); minutes are
    measured by the main process's clock, and the ranks agree on them with the stop requests."""

    def __init__(self, interval: Interval, recorder: Recorder, engine: Any, steps: int):
        self.interval, self.recorder, self.engine, self.steps = interval, recorder, engine, steps
        self.last = time.monotonic()
        self.epoch = 0
        self.progress: Progress | None = None  # set by begin_epoch, before the epoch's first step

    def begin_epoch(self, epoch: int, progress: Progress) -> None:
        self.epoch, self.progress = epoch, progress

    def saved(self) -> None:
        self.last = time.monotonic()

    def step_due(self, epoch_step: int) -> bool:
        every = self.interval.steps
        if not every:  # a time interval
            return False
        assert self.progress is not None, "begin_epoch() first"
        return (self.progress.epoch_start + epoch_step) % every == 0

    def time_due(self) -> bool:
        return (self.interval.seconds is not None and self.recorder.accelerator.is_main_process
                and time.monotonic() - self.last >= self.interval.seconds)

    def save(self, epoch_step: int, train_seconds: float) -> None:
        assert self.progress is not None, "begin_epoch() first"
        self.recorder.save_position(Position(self.epoch, epoch_step, self.steps, train_seconds, self.engine.loss_sum,
                                             self.engine.samples), self.progress)
        self.saved()

