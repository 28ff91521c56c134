"""Train the MNIST CNN.

    python -m distmnist.train --data-dir ../shared/mnist
    accelerate launch -m distmnist.train --data-dir ../shared/mnist
    torchrun --nproc_per_node 2 -m distmnist.train --data-dir ../shared/mnist

Wires the pieces, data flowing one way: command line -> config -> Accelerator -> run folder (the
main process decides how the run starts and sends that, checkpoint included, to every rank) ->
data -> batches -> model -> epoch loop (engine) -> records (checkpoints, metrics) and console. Only
the main process touches the output folder or prints; every collective runs on every rank, and
whatever ends the run early (a bad folder, a failed write, a signal, divergence) ends it on every
rank together.
From Python, ``distmnist.train(**options)`` runs the same run_training (distmnist.api).
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from . import command_module
from . import tracking
from .checkpoint import Checkpoint, save_weights, unflatten_optimizer
from .config import TrainConfig, parse_config
from .console import Console, Outputs, resolve_mode
from .batches import eval_batches, split_validation, train_batches, train_sampler
from .data import Split, load_data
from .distributed import agree, collective_failure, make_accelerator, restore_rng, shutdown
from .engine import Carry, Engine, make_sgd, match_param_layout, tune_for_device
from .errors import DistmnistError, RunStopped, cli, signal_name
from .model import Net, layer_summary, parameter_count
from .records import Position, Progress, Recorder, versions
from .rundir import RUN_FILES, RunFolder, Start, share_start
from .schedule import LRSchedule, ScheduleSpec
from .signals import DIVERGED, StopRequests

RESIDENT_HEADROOM = 4  # keep the data set on the GPU only if 4x its size is free


def choose_paths(cfg: TrainConfig, accelerator, train: Split) -> tuple[bool, bool, list[str]]:
    """(resident data, CUDA graphs, notices) from the flags and what the hardware allows."""
    notices = []
    cuda = accelerator.device.type == "cuda"
    resident = cfg.data_path != "loader"
    if cfg.data_path == "auto" and cuda:
        free, _ = torch.cuda.mem_get_info(accelerator.device)
        if free < RESIDENT_HEADROOM * train.images.numel():
            resident = False
            notices.append("training set does not fit comfortably on the GPU: using the DataLoader path")
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", cfg.mixed_precision)
    if launcher_precision != cfg.mixed_precision:  # accelerate launch --mixed_precision / its config file
        notices.append(f"the launcher asked for mixed precision '{launcher_precision}'; distmnist follows its own "
                       f"--mixed-precision ({cfg.mixed_precision}): set that flag instead")
    why_not = None
    if not cuda:
        why_not = "CUDA graphs need a CUDA device"
    elif accelerator.num_processes > 1:
        why_not = "CUDA graphs are used with one process only; several processes train eagerly"
    elif cfg.mixed_precision == "fp16":
        why_not = "fp16 (GradScaler) trains eagerly; use bf16 for CUDA graphs"
    if cfg.cuda_graphs == "on" and why_not:
        raise DistmnistError(f"--cuda-graphs on: {why_not}")
    graphs = cfg.cuda_graphs != "off" and why_not is None
    if cfg.cuda_graphs == "auto" and why_not and cuda:
        notices.append(why_not)
    return resident, graphs, notices


def claim_folder(cfg: TrainConfig, accelerator) -> tuple[RunFolder | None, Start]:
    """The main process takes the output folder and decides how the run starts; every rank gets the
    decision (and the checkpoint's whole content) from it, or every rank exits with its error."""
    folder, start, error = None, None, None
    if accelerator.is_main_process:
        folder = RunFolder(cfg.output_dir)
        try:
            folder.acquire()
            start = folder.start(cfg.resume, cfg.overwrite, cfg.epochs, cfg.to_dict())
            if not start.complete:  # a finished run resumed again rewrites nothing, not even this
                folder.describe_holder(start.run_id)
        except DistmnistError as err:
            folder.release(failed_start=True)
            error = err
    agree(accelerator, error)
    return folder, share_start(accelerator, start)


@dataclass
class Run:
    """What set-up builds; the epoch loop reads it and owns everything that changes."""

    cfg: TrainConfig
    accelerator: Any
    console: Console
    folder: RunFolder | None  # the main process's hold on the output folder; None on other ranks
    start: Start
    model: Any
    optimizer: Any
    engine: Engine
    sampler: Any
    batches: Any
    test_batches: list
    val_batches: list | None  # --val-size: this rank's share of the held-out training images
    carry: Carry | None  # an epoch interrupted in its middle, resumed at its exact step
    versions: dict[str, str]
    recorder: Recorder  # what the run writes as it goes (every rank calls, the main process writes)
    timings: dict[str, float] = field(default_factory=dict)  # set-up phases, seconds


@dataclass
class Outcome:
    """What a run leaves its caller (the Python API, distmnist.api), the same on every rank."""

    run_id: str
    history: list[dict[str, Any]]  # every epoch's metrics record, resumed ones included
    trained: bool = True  # False: the run was already complete and nothing was trained


def already_complete(accelerator, console: Console, folder: RunFolder | None, start: Start) -> Outcome:
    """A finished run resumed again (a requeued job, a rerun script): train nothing, rewrite nothing."""
    ckpt = start.checkpoint
    how = " (stopped early: no better validation accuracy)" if ckpt.state.get("early_stopped") else ""
    console.print(f"run {start.run_id} is already complete at epoch {ckpt.epoch}{how}, nothing trained")
    error = None
    if folder is not None:
        try:
            if not folder.final_weights().exists():  # it stopped after its last checkpoint, before its final weights
                console.notice(f"writing the missing {folder.final_weights()} from {ckpt.path}")
                save_weights(ckpt.model, folder.final_weights())
        except DistmnistError as err:
            error = err
        folder.release()
    agree(accelerator, error)
    shutdown(accelerator)
    return Outcome(start.run_id, list(ckpt.state["metrics"]), trained=False)


def setup(cfg: TrainConfig, stop: StopRequests) -> Run | Outcome:
    """Everything the loop needs; or, for a run that is already complete, its outcome (nothing to set up)."""
    marks = [time.perf_counter()]  # phase boundaries, reported in run.json
    accelerator = make_accelerator(cfg.cpu, cfg.mixed_precision, cfg.dist_timeout, cfg.log_with,
                                   project_dir=str(tracking.logs_dir(cfg.output_dir)))
    stop.accelerator = accelerator
    console = Console(resolve_mode(cfg.progress, accelerator.is_main_process), interval=cfg.log_interval,
                      validation=cfg.val_size > 0)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device

    marks.append(time.perf_counter())
    folder, start = claim_folder(cfg, accelerator)
    if start.complete:
        return already_complete(accelerator, console, folder, start)
    try:
        train, test = load_data(accelerator, cfg.data_dir, cfg.no_download, cfg.limit_train, cfg.limit_test)
        val = None
        if cfg.val_size:  # the same on every rank: the data digests agreed and the seed is the same
            train, val = split_validation(train, cfg.val_size, cfg.seed)
        resident, graphs, notices = choose_paths(cfg, accelerator, train)
    except DistmnistError:
        if folder is not None:
            folder.release(failed_start=not folder.holds_run())
        raise
    notices = start.notices + notices
    ckpt = start.checkpoint
    marks.append(time.perf_counter())

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = tune_for_device(Net(), device)
    optimizer = make_sgd(model, cfg.lr, cfg.momentum, device, cfg.weight_decay, cfg.nesterov)
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
    model, optimizer = accelerator.prepare(model, optimizer)
    torch.manual_seed(cfg.seed + rank)  # distinct dropout masks per rank
    same_world = True
    if ckpt is not None:
        state = unflatten_optimizer(ckpt.optimizer, ckpt.state["optimizer_param_groups"])
        for group in state["param_groups"]:
            # the kernel choice belongs to this device, and the command line wins over the checkpoint
            group.update(fused=optimizer.param_groups[0]["fused"], foreach=optimizer.param_groups[0]["foreach"],
                         lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        optimizer.load_state_dict(state)
        match_param_layout(optimizer)
        same_world = restore_rng(accelerator, ckpt.rng)
        if not same_world:
            notices.append(f"checkpoint was written by {ckpt.rng['cpu'].shape[0]} processes, this run has {world}: "
                           "random streams restart from the seed (weights and optimizer state are restored)")

    marks.append(time.perf_counter())
    sampler = train_sampler(len(train), world, rank, cfg.seed)
    batches = train_batches(train, sampler, cfg.batch_size, device, resident)
    carry = None
    if ckpt is not None and ckpt.mid_epoch:
        carry, why = resume_point(ckpt, cfg, world, rank, len(batches))
        if carry is None:
            notices.append(f"{ckpt.path.name} stopped in the middle of epoch {ckpt.epoch}, but {why}: epoch "
                           f"{ckpt.epoch} restarts from its first step")
    # the schedule is a function of the global optimizer step over the run's total (the same for an
    # uninterrupted run and a resumed one)
    epoch_start_step = 0 if ckpt is None else int(ckpt.state["step"]) - (ckpt.mid_epoch or {}).get("step", 0)
    epochs_done = 0 if ckpt is None else ckpt.epochs_done
    spec = ScheduleSpec.from_config(cfg, len(batches), epoch_start_step + (cfg.epochs - epochs_done) * len(batches))
    spec.check()
    schedule = LRSchedule(spec, device, epoch_start_step + (carry.step if carry else 0))
    described = versions(accelerator)
    engine = Engine(accelerator, model, optimizer, cuda_graphs=graphs, schedule=schedule,
                    record_step_losses=cfg.log_every > 0)
    run = Run(
        cfg=cfg, accelerator=accelerator, console=console, folder=folder, start=start, model=model,
        optimizer=optimizer, engine=engine, sampler=sampler, batches=batches,
        test_batches=eval_batches(test, world, rank, cfg.test_batch_size, device), carry=carry,
        val_batches=None if val is None else eval_batches(val, world, rank, cfg.test_batch_size, device),
        versions=described,
        recorder=Recorder(accelerator, folder, start, cfg, described, model, optimizer,
                          validation=val is not None),
    )
    run.engine.stop = stop
    marks.append(time.perf_counter())
    run.timings.update({f"setup_{name}": b - a for name, a, b in
                        zip(("accelerator", "data", "model", "batches"), marks, marks[1:])})

    first = first_epoch(run)
    resumed = f" (resumed from {ckpt.path}" + (f" at step {carry.step}" if carry else "") + ")" if ckpt else ""
    console.plan(
        [
            ("run", f"{start.run_id}" + (" (continued)" if ckpt else "")),
            ("device", f"{world} x {run.versions['device']} ({device.type})"),
            ("world size", str(world)),
            ("precision", cfg.mixed_precision),
            ("batch", f"{cfg.batch_size} per process, {cfg.batch_size * world} global"),
            ("learning rate", spec.describe()),
            ("steps per epoch", str(len(run.batches))),
            ("data", f"{len(train):,} train" + (f" / {len(val):,} validation" if val is not None else "")
             + f" / {len(test):,} test images from {cfg.data_dir}"),
            *([("early stop", f"after {cfg.early_stop} epoch(s) without a better validation accuracy")]
              if cfg.early_stop else []),
            ("data path", "resident on device" if resident else "DataLoader"),
            ("CUDA graphs", "on" if graphs else "off"),
            ("epochs", f"{first}..{cfg.epochs}{resumed}"),
            ("model", f"Net, {parameter_count(model):,} parameters"),
            ("output", cfg.output_dir),
            *([("tracker", f"{cfg.log_with} -> {tracking.destination(cfg.log_with, cfg.output_dir, start.run_id)} "
                           f"({tracking.what(cfg.log_every)})")] if cfg.log_with else []),
        ],
        layer_summary(accelerator.unwrap_model(model)),
    )
    for notice in notices:
        console.notice(notice)
    return run


def resume_point(ckpt: Checkpoint, cfg: TrainConfig, world: int, rank: int, steps: int) -> tuple[Carry | None, str]:
    """Where a mid-epoch checkpoint resumes: its exact step, or (None, why not) when the batches differ."""
    mid = ckpt.mid_epoch
    if mid["world_size"] != world:
        return None, f"it ran with {mid['world_size']} processes and this run has {world}"
    if mid["batch_size"] != cfg.batch_size or mid["steps"] != steps:
        return None, (f"its epoch had {mid['steps']} steps of {mid['batch_size']} images per process and this one "
                      f"has {steps} of {cfg.batch_size}")
    return Carry(step=mid["step"], loss_sum=float(ckpt.progress["loss_sum"][rank]),
                 samples=int(ckpt.progress["samples"][rank]), seconds=float(mid.get("train_seconds", 0.0))), ""


def first_epoch(run: Run) -> int:
    ckpt = run.start.checkpoint
    return 1 if ckpt is None else ckpt.epochs_done + 1


# ---------------------------------------------------------------- the loop


def improves(record: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """A better validation result: higher accuracy, or the same accuracy at a lower loss."""
    return best is None or (record["val_accuracy"], -record["val_loss"]) > (best["val_accuracy"], -best["val_loss"])


def train_epoch(run: Run, epoch: int, progress: Progress) -> dict[str, Any] | None:
    """Train and evaluate one epoch; the metrics record (global numbers, same on every rank), or None
    if the ranks agreed to stop in the middle (then its position has been saved)."""
    cfg, world = run.cfg, run.accelerator.num_processes
    run.sampler.set_epoch(epoch)
    carry = run.carry if epoch == first_epoch(run) else None
    with run.console.progress(epoch, cfg.epochs, len(run.batches), cfg.batch_size * world, ranks=world) as bar:
        stats = run.engine.train_epoch(run.batches, bar, carry)
    # --log-every: the step records go before the epoch's (one x axis, optimizer steps, for every tracker)
    tracking.log_steps(run.accelerator, stats.step_losses, progress.step, cfg.log_every, run.engine.schedule.spec)
    progress.step += stats.steps
    if stats.stop == DIVERGED or not math.isfinite(stats.loss):
        raise run.recorder.diverged(progress, f"the training loss became non-finite in epoch {epoch}"
                       + (f" (by step {stats.epoch_step} of {len(run.batches)})" if stats.stop else ""))
    if stats.stop:
        run.recorder.save_position(Position(epoch, stats.epoch_step, len(run.batches), stats.seconds,
                                            run.engine.loss_sum, run.engine.samples), progress)
        raise RunStopped(f"stopped by {signal_name(stats.stop)} at epoch {epoch} step {stats.epoch_step}/"
                         f"{len(run.batches)}; checkpoint {progress.newest}; `--resume auto` continues",
                         stats.stop, silent=not run.accelerator.is_main_process)
    eval_start = time.perf_counter()
    result = run.engine.evaluate(run.test_batches)  # ends in a host read: the time is complete
    val = None if run.val_batches is None else run.engine.evaluate(run.val_batches)
    eval_seconds = time.perf_counter() - eval_start
    return {
        "epoch": epoch,
        "step": progress.step,
        "lr": run.engine.schedule.spec.value_at(progress.step - 1),  # the lr of the epoch's last step
        "train_loss": stats.loss,
        "train_samples": stats.samples,
        "train_seconds": stats.seconds,
        "train_samples_per_second": stats.samples / stats.seconds,
        "capture_seconds": stats.capture_seconds,
        "eval_seconds": eval_seconds,
        "test_loss": result.loss,
        "test_accuracy": result.accuracy,
        "test_correct": result.correct,
        "test_samples": result.samples,
        **({} if val is None else {"val_loss": val.loss, "val_accuracy": val.accuracy, "val_correct": val.correct,
                                   "val_samples": val.samples}),
        "world_size": world,
    }


def fit(run: Run, stop: StopRequests, started: float) -> Progress:
    """The epoch loop; returns where the run ended: its history (every epoch's record, resumed ones
    included) and the time spent on set-up and checkpoints."""
    cfg, accelerator, ckpt = run.cfg, run.accelerator, run.start.checkpoint
    progress = Progress(history=list(ckpt.state["metrics"]) if ckpt else [], step=int(ckpt.state["step"]) if ckpt else 0,
                        newest=str(ckpt.path) if ckpt else None, best=ckpt.state.get("best") if ckpt else None)
    if run.carry is None and ckpt is not None and ckpt.mid_epoch:
        progress.step -= ckpt.mid_epoch["step"]  # the interrupted epoch restarts from its first step
    run.recorder.begin(progress)
    tracking.init(accelerator, cfg.log_with, run.start.run_id, cfg.to_dict())
    progress.timings["setup"] = time.perf_counter() - started
    epoch = first_epoch(run)
    try:
        for epoch in range(first_epoch(run), cfg.epochs + 1):
            record = train_epoch(run, epoch, progress)
            progress.history.append(record)
            better = run.val_batches is not None and improves(record, progress.best)
            if better:  # every rank decides alike: the record holds global numbers
                progress.best = {k: record[k] for k in ("epoch", "val_accuracy", "val_loss")}
            if cfg.early_stop and epoch - progress.best["epoch"] >= cfg.early_stop and epoch < cfg.epochs:
                progress.early_stopped = True
            run.recorder.save_epoch(record, progress, best=better)
            accelerator.log(record, step=record["step"])  # x axis: optimizer steps, as the step records
            run.console.epoch_done(record, cfg.epochs)
            if progress.early_stopped:
                run.console.print(f"early stop after epoch {epoch}: no better validation accuracy for "
                                  f"{cfg.early_stop} epoch(s); the best was epoch {progress.best['epoch']} "
                                  f"({100 * progress.best['val_accuracy']:.2f}%), kept as best.safetensors")
                break
            code = stop.agreed() if epoch < cfg.epochs else 0  # a signal during evaluation or the save
            if code == DIVERGED:
                raise run.recorder.diverged(progress, f"the loss became non-finite in epoch {epoch}")
            if code:
                raise RunStopped(f"stopped by {signal_name(code)} at the end of epoch {epoch}; checkpoint "
                                 f"{progress.newest}; `--resume auto` continues", code,
                                 silent=not accelerator.is_main_process)
    except KeyboardInterrupt:  # the second SIGINT: out at once, from wherever the loop was
        newest = f"newest checkpoint {progress.newest}; `--resume auto` continues from it" if progress.newest else \
            "no checkpoint was written yet"
        raise RunStopped(f"aborted by a second SIGINT in epoch {epoch}; {newest}", signal.SIGINT,
                         silent=not accelerator.is_main_process) from None
    run.recorder.finish(progress, first_epoch(run), started, run.timings)
    return progress


def run_training(cfg: TrainConfig, started: float | None = None, stop: StopRequests | None = None) -> Outcome:
    """Set up, train, tear down; the run's id and history of epoch records. Errors are DistmnistError subclasses.

    ``stop``: signal handling owned by the caller (the command keeps it until the process exits, so a
    launcher's late SIGTERM during exit cannot turn a clean exit code into a death by signal);
    without it the handlers are installed for the run and restored after it.
    """
    started = time.perf_counter() if started is None else started
    own = stop is None
    stop = StopRequests().install() if own else stop
    run = None
    try:
        run = setup(cfg, stop)  # inside: a peer can already die in the collectives of set-up (DDP's broadcast)
        if not isinstance(run, Run):
            return run  # already complete
        progress = fit(run, stop, started)
        if run.folder is not None:  # the main process: the only one that prints
            tracker = (f"{cfg.log_with}, {tracking.destination(cfg.log_with, cfg.output_dir, run.start.run_id)}"
                       if cfg.log_with else None)
            files = [name + ("/" if (run.folder.path / name).is_dir() else "") for name in RUN_FILES
                     if (run.folder.path / name).exists()]
            run.console.summary(progress.history, first_epoch(run), time.perf_counter() - started, progress.timings,
                                Outputs(str(cfg.output_dir), files, tracker))
        history = progress.history
        shutdown(run.accelerator)
        return Outcome(run.start.run_id, history)
    except (RuntimeError, torch.distributed.DistError) as err:
        failed = collective_failure(err, cfg.dist_timeout)
        if failed:
            raise failed from None
        raise
    finally:
        if own:
            stop.uninstall()
        if isinstance(run, Run) and run.folder is not None:
            run.folder.release()


@cli
def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    run_training(parse_config(argv), started, StopRequests().install())
    return 0


command_module(__name__)  # distmnist.train(...) runs distmnist.api.train

if __name__ == "__main__":
    main()
