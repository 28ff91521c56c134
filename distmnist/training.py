"""Train the MNIST CNN.

    python -m distmnist.train --data-dir ../shared/mnist
    accelerate launch -m distmnist.train --data-dir ../shared/mnist
    torchrun --nproc_per_node 2 -m distmnist.train --data-dir ../shared/mnist --global-batch-size 100

Wires the pieces, data flowing one way: command line -> request -> process group -> run folder (the
main process decides how the run starts, with which config, and sends that, checkpoint included,
to every rank) -> Accelerator -> data -> order and batches -> model -> epoch loop (engine) ->
records (checkpoints, metrics) and console. Only the main process touches the output folder or
prints; every collective runs on every rank, and whatever ends the run early (a bad folder, a
failed write, a signal, divergence) ends it on every rank together. Set-up runs under a guard of
its own (signals.SetupGuard: a time limit, and signals that end it at once); the training loop
under the stop requests (signals.StopRequests: signals that save the exact position first).
From Python, ``distmnist.train(**options)`` runs the same run_training (distmnist.api).
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch

from . import tracking
from .batches import TrainOrder, eval_batches, split_validation, train_batches
from .catalogue import RUN_FILES
from .checkpoint import save_weights
from .config import Request, TrainConfig, checkpoint_interval, parse_request
from .console import Console, Outputs, resolve_mode
from .data import Split, load_data
from .distributed import (
    collective_failure,
    make_accelerator,
    on_main,
    set_collective_timeout,
    share_checkpoint,
    share_json,
    shutdown,
    start_processes,
    tensors_digest,
)
from .engine import Carry, Engine, make_sgd, tune_for_device
from .errors import DistmnistError, RunStopped, cli, signal_name
from .masks import GlobalDropout
from .model import Net, layer_summary, parameter_count
from .records import Components, MidEpochCheckpoints, Position, Progress, Recorder, versions
from .resume import load_training_state, restore_dropout, resume_point
from .rundir import RunFolder, Start
from .schedule import LRSchedule, ScheduleSpec
from .signals import DIVERGED, SetupGuard, StopRequests
from .threads import choose_threads

RESIDENT_HEADROOM = 4  # keep the data set on the GPU only if 4x its size is free


@dataclass
class Data:
    """The run's splits, the same on every rank; ``key`` identifies the training images (their digest)."""

    train: Split
    val: Split | None
    test: Split
    key: bytes


@dataclass
class Run:
    """What set-up builds; the epoch loop reads it and owns everything that changes."""

    cfg: TrainConfig
    accelerator: Any
    console: Console
    folder: RunFolder | None  # the main process's hold on the output folder; None on other ranks
    start: Start
    engine: Engine
    schedule: LRSchedule  # the engine's: a run always has one
    order: TrainOrder
    batches: Any
    test_batches: list
    val_batches: list | None  # --val-size: this rank's share of the held-out training images
    carry: Carry | None  # an epoch interrupted in its middle, resumed at its exact step
    recorder: Recorder  # what the run writes as it goes (every rank calls, the main process writes)
    periodic: MidEpochCheckpoints | None = None  # --checkpoint-every
    timings: dict[str, float] = field(default_factory=dict)  # set-up phases, seconds

    @property
    def first_epoch(self) -> int:
        ckpt = self.start.checkpoint
        return 1 if ckpt is None else ckpt.epochs_done + 1


@dataclass
class Outcome:
    """What a run leaves its caller (the Python API, distmnist.api), the same on every rank."""

    run_id: str
    history: list[dict[str, Any]]  # every epoch's metrics record, resumed ones included
    trained: bool = True  # False: the run was already complete and nothing was trained
    config: dict[str, Any] = field(default_factory=dict)  # the config it ran with (a resumed run's own recipe)


# ---------------------------------------------------------------- set-up, step by step


def claim_folder(request: Request, processes, hold: contextlib.ExitStack) -> tuple[RunFolder | None, Start]:
    """The main process takes the output folder (held until ``hold`` closes) and decides how the run
    starts and with which config; every rank gets the decision, checkpoint content included, or every
    rank exits with its error."""
    folder: RunFolder | None = None

    def decide() -> Start:
        nonlocal folder
        folder = hold.enter_context(RunFolder(request.cfg.output_dir))
        start = folder.start(request)
        if not start.complete:  # a finished run resumed again rewrites nothing, not even this
            folder.describe_holder(start.run_id)
        return start

    start = on_main(processes, decide, f"--output-dir {request.cfg.output_dir}")
    meta = share_json(processes, None if start is None else {
        "run_id": start.run_id, "config": start.config.to_dict(), "complete": start.complete,
        "notices": start.notices, "config_history": start.config_history})
    checkpoint = share_checkpoint(processes, start.checkpoint if start is not None else None)
    config = request.on_this_machine(TrainConfig(**meta["config"]))
    return folder, Start(meta["run_id"], config, checkpoint, meta["complete"], meta["notices"], meta["config_history"])


def already_complete(accelerator, console: Console, folder: RunFolder | None, start: Start) -> Outcome:
    """A finished run resumed again (a requeued job, a rerun script): train nothing, rewrite nothing."""
    ckpt = start.checkpoint
    assert ckpt is not None  # a run is complete by its checkpoint
    how = " (stopped early: no better validation accuracy)" if ckpt.state.progress.early_stopped else ""
    console.print(f"run {start.run_id} is already complete at epoch {ckpt.epoch}{how}, nothing trained")

    def write_missing() -> None:
        assert folder is not None  # on_main runs this on the main process, which holds the folder
        if not folder.final_weights().exists():  # it stopped after its last checkpoint, before its final weights
            console.notice(f"writing the missing {folder.final_weights()} from {ckpt.path}")
            save_weights(ckpt.model, folder.final_weights())

    on_main(accelerator, write_missing, "writing the final weights")
    shutdown(accelerator)
    return Outcome(start.run_id, list(ckpt.state.progress.metrics), trained=False, config=start.config.to_dict())


def load_splits(cfg: TrainConfig, accelerator) -> Data:
    """The training, validation and test images, checked to be the same on every rank."""
    train, test = load_data(accelerator, cfg.data_dir, cfg.no_download, cfg.limit_train, cfg.limit_test)
    val = None
    if cfg.val_size:  # the same on every rank: the data digests agreed and the seed is the same
        train, val = split_validation(train, cfg.val_size, cfg.seed)
    return Data(train, val, test, tensors_digest([train.images, train.labels]))


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
    elif cfg.global_batch_size and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        why_not = f"this torch {torch.__version__} cannot replay the global batch's dropout generator in a graph"
    if cfg.cuda_graphs == "on" and why_not:
        raise DistmnistError(f"--cuda-graphs on: {why_not}")
    graphs = cfg.cuda_graphs != "off" and why_not is None
    if cfg.cuda_graphs == "auto" and why_not and cuda:
        notices.append(why_not)
    return resident, graphs, notices


def build_model(cfg: TrainConfig, accelerator, start: Start):
    """(model, optimizer, scaler, notices): the tutorial's Net and SGD, prepared, with a checkpoint's state."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = tune_for_device(Net(), accelerator.device)
    optimizer = make_sgd(model, cfg.lr, cfg.momentum, accelerator.device, cfg.weight_decay, cfg.nesterov)
    ckpt = start.checkpoint
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.global_batch_size is None:
        torch.manual_seed(cfg.seed + accelerator.process_index)  # distinct dropout masks per rank
    notices = []
    if ckpt is not None:
        notices = load_training_state(ckpt, cfg, accelerator, model, optimizer, accelerator.scaler)
    return model, optimizer, accelerator.scaler, notices


def build_order(cfg: TrainConfig, accelerator, data: Data) -> TrainOrder:
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.global_batch_size and cfg.global_batch_size % world:
        raise DistmnistError(f"--global-batch-size {cfg.global_batch_size} is not divisible by the {world} processes "
                             f"of this launch (each takes G / {world} images): choose a multiple of {world}",
                             silent=not accelerator.is_main_process)
    return TrainOrder(len(data.train), world, rank, cfg.seed, cfg.batch_size, cfg.global_batch_size, data.key)


def build_schedule(cfg: TrainConfig, start: Start, carry: Carry | None, steps: int, device) -> LRSchedule:
    """The lr schedule over the run's global optimizer steps: the same for an uninterrupted run and a resumed one."""
    ckpt = start.checkpoint
    epoch_start = 0 if ckpt is None else ckpt.state.step - (ckpt.state.mid_epoch.step if ckpt.state.mid_epoch else 0)
    done = 0 if ckpt is None else ckpt.epochs_done
    spec = ScheduleSpec.from_config(cfg, steps, epoch_start + (cfg.epochs - done) * steps)
    spec.check()
    return LRSchedule(spec, device, epoch_start + (carry.step if carry else 0))


def plan_rows(run: Run, data: Data, resident: bool, graphs: bool) -> list[tuple[str, str]]:
    cfg, ckpt, device = run.cfg, run.start.checkpoint, run.accelerator.device
    interval = checkpoint_interval(cfg.checkpoint_every) if cfg.checkpoint_every else None
    world = run.accelerator.num_processes
    resumed = ((f" (resumed from {ckpt.path}" + (f" at step {run.carry.step}" if run.carry else "") + ")") if ckpt
               else "")
    return [
        ("run", f"{run.start.run_id}" + (" (continued)" if ckpt else "")),
        ("device", f"{world} x {run.recorder.versions['device']} ({device.type})"),
        ("world size", str(world)),
        ("precision", cfg.mixed_precision),
        ("batch", run.order.describe()),
        ("learning rate", run.schedule.spec.describe()),
        ("steps per epoch", str(len(run.batches))),
        ("data", f"{len(data.train):,} train" + (f" / {len(data.val):,} validation" if data.val is not None else "")
         + f" / {len(data.test):,} test images from {cfg.data_dir}"),
        *([("early stop", f"after {cfg.early_stop} epoch(s) without a better validation accuracy")]
          if cfg.early_stop else []),
        ("data path", "resident on device" if resident else "DataLoader"),
        ("CUDA graphs", "on" if graphs else "off"),
        ("epochs", f"{run.first_epoch}..{cfg.epochs}{resumed}"),
        *([("checkpoints", f"at each epoch's end and {interval.describe()}")] if interval else []),
        ("model", f"Net, {parameter_count(run.engine.model):,} parameters"),
        ("output", cfg.output_dir),
        *([("tracker", f"{cfg.log_with} -> {tracking.destination(cfg.log_with, cfg.output_dir, run.start.run_id)} "
                       f"({tracking.what(cfg.log_every)})")] if cfg.log_with else []),
    ]


def setup(request: Request, stop: StopRequests, hold: contextlib.ExitStack) -> Run | Outcome:
    """Everything the loop needs; or, for a run that is already complete, its outcome (nothing to set up)."""
    marks = [time.perf_counter()]  # phase boundaries, reported in run.json
    with SetupGuard(request.cfg.setup_timeout, rank=int(os.environ.get("RANK", "0") or 0)) as guard:
        guard.phase = "joining the process group"
        processes = start_processes(request.cfg.cpu, request.cfg.setup_timeout)
        guard.phase = "reading the run folder"
        folder, start = claim_folder(request, processes, hold)
        cfg = start.config
        guard.phase = "starting Accelerate"
        accelerator = make_accelerator(cfg.cpu, cfg.mixed_precision, cfg.log_with,
                                       project_dir=str(tracking.logs_dir(cfg.output_dir)))
        stop.accelerator = accelerator
        console = Console(resolve_mode(cfg.progress, accelerator.is_main_process), interval=cfg.log_interval,
                          validation=cfg.val_size > 0)
        threads = choose_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)) \
            if accelerator.device.type == "cpu" else None
        marks.append(time.perf_counter())
        if start.complete:
            return already_complete(accelerator, console, folder, start)
        guard.phase = "loading the data"
        data = load_splits(cfg, accelerator)
        resident, graphs, notices = choose_paths(cfg, accelerator, data.train)
        marks.append(time.perf_counter())
        guard.phase = "building the model"
        model, optimizer, scaler, resumed = build_model(cfg, accelerator, start)
        notices = start.notices + notices + resumed + ([threads.notice] if threads and threads.notice else [])
        marks.append(time.perf_counter())
        run = assemble(cfg, accelerator, console, folder, start, data, model, optimizer, scaler, resident, graphs,
                       notices)
        run.engine.stop = stop
        marks.append(time.perf_counter())
        phases = ("accelerator", "data", "model", "batches")
        run.timings.update({f"setup_{name}": b - a for name, (a, b) in zip(phases, pairwise(marks), strict=True)})
        rows = plan_rows(run, data, resident, graphs)
        if threads is not None:
            rows.insert(2, ("threads", threads.describe()))
        console.plan(rows, layer_summary(accelerator.unwrap_model(model)))
        for notice in notices:
            console.notice(notice)
    set_collective_timeout(cfg.dist_timeout)
    return run


def assemble(cfg, accelerator, console, folder, start, data: Data, model, optimizer, scaler, resident, graphs,
             notices: list[str]) -> Run:
    """Order, batches, resume point, dropout masks, schedule, engine and recorder."""
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    ckpt = start.checkpoint
    order = build_order(cfg, accelerator, data)
    batches = train_batches(data.train, order, device, resident)
    carry = None
    if ckpt is not None and ckpt.state.mid_epoch:
        carry, why = resume_point(ckpt, order, cfg, rank)
        if carry is None:
            notices.append(f"{ckpt.path.name} stopped in the middle of epoch {ckpt.epoch}, but {why}: epoch "
                           f"{ckpt.epoch} restarts from its first step (not an exact resume)")
    dropout = None
    if cfg.global_batch_size:
        dropout = GlobalDropout(Net().drop2D.p, cfg.global_batch_size, world, rank, cfg.seed, device)
        if ckpt is not None:
            notices += [n for n in [restore_dropout(ckpt, dropout, cfg, carry)] if n]
    elif ckpt is not None and ckpt.state.data.global_batch_size:
        notices.append("the checkpoint was trained with a global batch and this launch uses per-process batches "
                       "(no --global-batch-size): the order and dropout masks now depend on the world size")
    schedule = build_schedule(cfg, start, carry, len(batches), device)
    engine = Engine(accelerator, model, optimizer, cuda_graphs=graphs, schedule=schedule,
                    record_step_losses=cfg.log_every > 0, dropout=dropout)
    described = versions(accelerator)
    recorder = Recorder(accelerator, folder, start, described, Components(model, optimizer, order, schedule, scaler,
                                                                         dropout), validation=data.val is not None)
    run = Run(cfg=cfg, accelerator=accelerator, console=console, folder=folder, start=start, engine=engine,
              schedule=schedule, order=order, batches=batches, carry=carry,
              test_batches=eval_batches(data.test, world, rank, cfg.test_batch_size, device),
              val_batches=(None if data.val is None
                           else eval_batches(data.val, world, rank, cfg.test_batch_size, device)),
              recorder=recorder)
    interval = checkpoint_interval(cfg.checkpoint_every)
    if interval is not None:
        run.periodic = MidEpochCheckpoints(interval, recorder, engine, len(batches))
        engine.checkpoints = run.periodic
    return run


# ---------------------------------------------------------------- the loop


def improves(record: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """A better validation result: higher accuracy, or the same accuracy at a lower loss."""
    return best is None or (record["val_accuracy"], -record["val_loss"]) > (best["val_accuracy"], -best["val_loss"])


def continue_command(output_dir: str, world: int, global_batch: bool) -> str:
    """The command that continues this run: the same launch, told only where the run is."""
    tail = f"-m distmnist.train --output-dir {shlex.quote(str(output_dir))} --resume auto"
    if world == 1:
        return f"distmnist train --output-dir {shlex.quote(str(output_dir))} --resume auto"
    if "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("LOCAL_WORLD_SIZE") == str(world):
        return f"torchrun --nproc_per_node {world} {tail}"
    any_size = " (any number of processes that divides the global batch)" if global_batch else ""
    return f"your launcher with {world} processes{any_size} and {tail}"


def stopped(run: Run, code: int, where: str, progress: Progress) -> RunStopped:
    command = continue_command(run.cfg.output_dir, run.accelerator.num_processes, bool(run.cfg.global_batch_size))
    return RunStopped(f"stopped by {signal_name(code)} {where}; checkpoint {progress.newest}; continue with: {command}",
                      code, silent=not run.accelerator.is_main_process)


def train_epoch(run: Run, epoch: int, progress: Progress) -> dict[str, Any]:
    """Train and evaluate one epoch; the metrics record (global numbers, same on every rank). Raises
    RunStopped if the ranks agreed to stop in its middle (its position saved first)."""
    cfg, world = run.cfg, run.accelerator.num_processes
    run.order.set_epoch(epoch)
    carry = run.carry if epoch == run.first_epoch else None
    progress.epoch_start = progress.step - (carry.step if carry else 0)
    if run.periodic is not None:
        run.periodic.begin_epoch(epoch, progress)
    images_per_step = cfg.global_batch_size or cfg.batch_size * world
    with run.console.progress(epoch, cfg.epochs, len(run.batches), images_per_step, ranks=world) as bar:
        stats = run.engine.train_epoch(run.batches, bar, carry)
    # --log-every: the step records go before the epoch's (one x axis, optimizer steps, for every tracker)
    tracking.log_steps(run.accelerator, stats.step_losses, progress.step, cfg.log_every, run.schedule.spec)
    progress.step = progress.epoch_start + stats.epoch_step
    progress.timings["train"] = progress.timings.get("train", 0.0) + stats.seconds - stats.resumed_seconds
    if stats.stop == DIVERGED or not math.isfinite(stats.loss):
        raise run.recorder.diverged(progress, f"the training loss became non-finite in epoch {epoch}"
                                    + (f" (by step {stats.epoch_step} of {len(run.batches)})" if stats.stop else ""))
    if stats.stop:
        run.recorder.save_position(Position(epoch, stats.epoch_step, len(run.batches), stats.seconds,
                                            run.engine.loss_sum, run.engine.samples), progress)
        raise stopped(run, stats.stop, f"at epoch {epoch} step {stats.epoch_step}/{len(run.batches)}", progress)
    return epoch_record(run, epoch, progress, stats)


def epoch_record(run: Run, epoch: int, progress: Progress, stats) -> dict[str, Any]:
    eval_start = time.perf_counter()
    result = run.engine.evaluate(run.test_batches)  # ends in a host read: the time is complete
    val = None if run.val_batches is None else run.engine.evaluate(run.val_batches)
    eval_seconds = time.perf_counter() - eval_start
    return {
        "epoch": epoch,
        "step": progress.step,
        "lr": run.schedule.spec.value_at(progress.step - 1),  # the lr of the epoch's last step
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
        "world_size": run.accelerator.num_processes,
    }


def starting_progress(run: Run) -> Progress:
    ckpt = run.start.checkpoint
    if ckpt is None:
        return Progress(history=[], step=0, newest=None)
    state = ckpt.state
    step = state.step - (state.mid_epoch.step if state.mid_epoch and run.carry is None else 0)
    return Progress(history=list(state.progress.metrics), step=step, newest=str(ckpt.path), best=state.progress.best)


def fit(run: Run, stop: StopRequests, started: float) -> Progress:
    """The epoch loop; returns where the run ended: its history (every epoch's record, resumed ones
    included) and the time spent on set-up and checkpoints."""
    cfg, accelerator = run.cfg, run.accelerator
    progress = starting_progress(run)
    run.recorder.begin(progress)
    on_main(accelerator, lambda: tracking.init(accelerator, cfg.log_with, run.start.run_id, cfg.to_dict()),
            f"--log-with {cfg.log_with}")  # Accelerate starts trackers on the main process only
    progress.timings["setup"] = time.perf_counter() - started
    epoch = run.first_epoch
    try:
        for epoch in range(run.first_epoch, cfg.epochs + 1):
            record = train_epoch(run, epoch, progress)
            progress.history.append(record)
            better = run.val_batches is not None and improves(record, progress.best)
            if better:  # every rank decides alike: the record holds global numbers
                progress.best = {k: record[k] for k in ("epoch", "val_accuracy", "val_loss")}
            best = progress.best  # set after the first epoch: --early-stop needs --val-size
            if cfg.early_stop and best is not None and epoch - best["epoch"] >= cfg.early_stop and epoch < cfg.epochs:
                progress.early_stopped = True
            run.recorder.save_epoch(record, progress, best=better)
            if run.periodic is not None:
                run.periodic.saved()
            accelerator.log(record, step=record["step"])  # x axis: optimizer steps, as the step records
            run.console.epoch_done(record, cfg.epochs)
            if progress.early_stopped and best is not None:
                run.console.print(f"early stop after epoch {epoch}: no better validation accuracy for "
                                  f"{cfg.early_stop} epoch(s); the best was epoch {best['epoch']} "
                                  f"({100 * best['val_accuracy']:.2f}%), kept as best.safetensors")
                break
            code = stop.agreed() if epoch < cfg.epochs else 0  # a signal during evaluation or the save
            if code == DIVERGED:
                raise run.recorder.diverged(progress, f"the loss became non-finite in epoch {epoch}")
            if code:
                raise stopped(run, code, f"at the end of epoch {epoch}", progress)
    except KeyboardInterrupt:  # the second SIGINT: out at once, from wherever the loop was
        command = continue_command(cfg.output_dir, accelerator.num_processes, bool(cfg.global_batch_size))
        newest = (f"newest checkpoint {progress.newest}; continue with: {command}" if progress.newest
                  else "no checkpoint was written yet")
        raise RunStopped(f"aborted by a second SIGINT in epoch {epoch}; {newest}", signal.SIGINT,
                         silent=not accelerator.is_main_process) from None
    run.recorder.finish(progress, run.first_epoch, started, run.timings)
    stop.settle()  # every file is written: a late signal must not turn this into a stopped run
    return progress


def report(run: Run, progress: Progress, started: float) -> None:
    """The summary, on the main process (the only one that prints)."""
    if run.folder is None:
        return
    cfg = run.cfg
    tracker = (f"{cfg.log_with}, {tracking.destination(cfg.log_with, cfg.output_dir, run.start.run_id)}"
               if cfg.log_with else None)
    files = [name + ("/" if (run.folder.path / name).is_dir() else "") for name in RUN_FILES
             if (run.folder.path / name).exists()]
    run.console.summary(progress.history, run.first_epoch, time.perf_counter() - started, progress.timings,
                        Outputs(str(cfg.output_dir), files, tracker))


def run_training(request: Request | TrainConfig, started: float | None = None,
                 stop: StopRequests | None = None) -> Outcome:
    """Set up, train, tear down; the run's id and history of epoch records. Errors are DistmnistError subclasses.

    ``request``: the command's config and the fields it set (a bare TrainConfig sets them all).
    ``stop``: signal handling owned by the caller (the command keeps it until the process exits, so a
    launcher's late SIGTERM during exit cannot turn a clean exit code into a death by signal);
    without it the handlers are installed for the run and restored after it.
    """
    if isinstance(request, TrainConfig):
        request = Request(request, frozenset(request.to_dict()))
    started = time.perf_counter() if started is None else started
    own = stop is None
    if stop is None:
        stop = StopRequests().install()
    try:
        with contextlib.ExitStack() as hold:  # the run folder, released however set-up or training ends
            run = setup(request, stop, hold)
            if isinstance(run, Outcome):
                return run
            progress = fit(run, stop, started)
            report(run, progress, started)
            shutdown(run.accelerator)
            return Outcome(run.start.run_id, progress.history, config=run.cfg.to_dict())
    except (RuntimeError, torch.distributed.DistError) as err:
        failed = collective_failure(err, request.cfg.dist_timeout)
        if failed:
            raise failed from None
        raise
    finally:
        if own:
            stop.uninstall()


@cli
def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    run_training(parse_request(argv), started, StopRequests().install())
    return 0
