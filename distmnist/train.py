"""Train the MNIST CNN.

    python -m distmnist.train --data-dir ../shared/mnist
    accelerate launch -m distmnist.train --data-dir ../shared/mnist
    torchrun --nproc_per_node 2 -m distmnist.train --data-dir ../shared/mnist

Wires the pieces, data flowing one way: command line -> config -> Accelerator -> data ->
epoch loop (engine) -> checkpoint and console. Only the main process writes files or prints.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from . import __version__
from .checkpoint import (
    Checkpoint,
    checkpoint_dir,
    load_checkpoint,
    newest_valid,
    prune,
    save_weights,
    unflatten_optimizer,
    write_checkpoint,
)
from .config import TrainConfig, parse_config
from .console import Console, Outputs, resolve_mode
from .data import Split, eval_batches, load_mnist, missing_files, train_batches, train_sampler, download
from .distributed import gather_rng, make_accelerator, restore_rng, shutdown
from .engine import Engine, make_sgd, match_param_layout, tune_for_device
from .errors import DistmnistError, RunFailed, cli
from .model import Net, layer_summary, parameter_count
from .schedule import LRSchedule, ScheduleSpec, saveable_state_dict
from . import tracking

RESIDENT_HEADROOM = 4  # keep the data set on the GPU only if 4x its size is free
OUTPUT_FILES = ("model.safetensors", "checkpoints/", "metrics.jsonl", "run.json", "config.json")  # for the summary


def load_data(cfg: TrainConfig, accelerator) -> tuple[Split, Split]:
    """Read MNIST on every rank; if it must be downloaded, the main process does it first."""
    data_dir = Path(cfg.data_dir)
    if missing_files(data_dir):
        if cfg.no_download:
            load_mnist(data_dir, allow_download=False)  # raises, naming the missing files, on every rank
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                download(data_dir)
    train, test = load_mnist(data_dir, allow_download=False)
    return train.head(cfg.limit_train), test.head(cfg.limit_test)


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


def resume_from(cfg: TrainConfig, console: Console) -> Checkpoint | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        ckpt = newest_valid(cfg.output_dir, console.notice)
        if ckpt is None:
            console.notice(f"--resume auto: no valid checkpoint in {cfg.output_dir}, starting fresh")
        return ckpt
    if not Path(cfg.resume).exists():
        raise DistmnistError(f"--resume: no such checkpoint folder: {cfg.resume}")
    return load_checkpoint(cfg.resume)


def versions(accelerator) -> dict[str, str]:
    import accelerate

    device = torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else platform.processor() or "cpu"
    return {
        "distmnist": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
        "python": platform.python_version(), "device": device,
    }


@dataclass
class Run:
    """Everything one training run holds once set up; the epoch loop only reads and advances it."""

    cfg: TrainConfig
    accelerator: Any
    console: Console
    model: Any
    optimizer: Any
    engine: Engine
    sampler: Any
    batches: Any
    test_batches: list
    output_dir: Path
    versions: dict[str, str]
    start_epoch: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)  # when main() began, for run.json
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, summed over epochs


def setup(cfg: TrainConfig) -> Run:
    marks = [time.perf_counter()]  # phase boundaries, reported in run.json
    accelerator = make_accelerator(cfg.cpu, cfg.mixed_precision, cfg.dist_timeout, cfg.log_with, cfg.output_dir)
    console = Console(resolve_mode(cfg.progress, accelerator.is_main_process), interval=cfg.log_interval)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device

    marks.append(time.perf_counter())
    train, test = load_data(cfg, accelerator)
    resident, graphs, notices = choose_paths(cfg, accelerator, train)
    ckpt = resume_from(cfg, console)
    marks.append(time.perf_counter())

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = Net()
    model = tune_for_device(model, device)
    optimizer = make_sgd(model, cfg.lr, cfg.momentum, device, cfg.weight_decay, cfg.nesterov)
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
    model, optimizer = accelerator.prepare(model, optimizer)
    torch.manual_seed(cfg.seed + rank)  # distinct dropout masks per rank
    if ckpt is not None:
        state = unflatten_optimizer(ckpt.optimizer, ckpt.state["optimizer_param_groups"])
        for group in state["param_groups"]:  # the kernel choice belongs to this device, not the checkpoint's
            group.update(fused=optimizer.param_groups[0]["fused"], foreach=optimizer.param_groups[0]["foreach"])
        optimizer.load_state_dict(state)
        match_param_layout(optimizer)
        if not restore_rng(accelerator, ckpt.rng):
            notices.append(f"checkpoint was written by {ckpt.rng['cpu'].shape[0]} processes, this run has {world}: "
                           "random streams restart from the seed (weights and optimizer state are restored)")

    marks.append(time.perf_counter())
    sampler = train_sampler(len(train), world, rank, cfg.seed)
    batches = train_batches(train, sampler, cfg.batch_size, device, resident)
    # the schedule is a function of the global optimizer step over the run's total
    done_epochs, done_steps = (ckpt.epoch, int(ckpt.state["step"])) if ckpt is not None else (0, 0)
    spec = ScheduleSpec.from_config(cfg, len(batches), done_steps + max(cfg.epochs - done_epochs, 0) * len(batches))
    if cfg.epochs > done_epochs:
        spec.check()
    run = Run(
        cfg=cfg, accelerator=accelerator, console=console, model=model, optimizer=optimizer,
        engine=Engine(accelerator, model, optimizer, cuda_graphs=graphs, schedule=LRSchedule(spec, device, done_steps),
                      record_step_losses=cfg.log_every > 0),
        sampler=sampler,
        batches=batches,
        test_batches=eval_batches(test, world, rank, cfg.test_batch_size, device),
        output_dir=Path(cfg.output_dir),
        versions=versions(accelerator),
    )
    marks.append(time.perf_counter())
    run.timings.update({f"setup_{name}": b - a for name, a, b in
                        zip(("accelerator", "data", "model", "batches"), marks, marks[1:])})
    if ckpt is not None:
        run.start_epoch, run.global_step, run.history = ckpt.epoch, int(ckpt.state["step"]), list(ckpt.state["metrics"])

    console.plan(
        [
            ("device", f"{world} x {run.versions['device']} ({device.type})"),
            ("world size", str(world)),
            ("precision", cfg.mixed_precision),
            ("batch", f"{cfg.batch_size} per process, {cfg.batch_size * world} global"),
            ("learning rate", spec.describe()),
            ("steps per epoch", str(len(run.batches))),
            ("data", f"{len(train):,} train / {len(test):,} test images from {cfg.data_dir}"),
            ("data path", "resident on device" if resident else "DataLoader"),
            ("CUDA graphs", "on" if graphs else "off"),
            ("epochs", f"{run.start_epoch + 1}..{cfg.epochs}" + (f" (resumed from {ckpt.path})" if ckpt else "")),
            ("model", f"Net, {parameter_count(model):,} parameters"),
            ("output", cfg.output_dir),
            *([("tracker", f"{cfg.log_with} -> {tracking.destination(cfg.log_with, cfg.output_dir)} "
                           f"({tracking.what(cfg.log_every)})")] if cfg.log_with else []),
        ],
        layer_summary(accelerator.unwrap_model(model)),
    )
    for notice in notices:
        console.notice(notice)
    return run


def train_one_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """Train, evaluate and return the epoch's metrics record (global numbers, same on every rank)."""
    cfg, world = run.cfg, run.accelerator.num_processes
    run.sampler.set_epoch(epoch)
    with run.console.progress(epoch, cfg.epochs, len(run.batches), cfg.batch_size * world, ranks=world) as progress:
        stats = run.engine.train_epoch(run.batches, progress)
    # --log-every: the step records go before the epoch's (one x axis, optimizer steps, for every tracker)
    tracking.log_steps(run.accelerator, stats.step_losses, run.global_step, cfg.log_every, run.engine.schedule.spec)
    eval_start = time.perf_counter()
    result = run.engine.evaluate(run.test_batches)  # ends in a host read: the time is complete
    eval_seconds = time.perf_counter() - eval_start
    run.global_step += stats.steps
    return {
        "epoch": epoch,
        "step": run.global_step,
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
        "world_size": world,
    }


def save_epoch(run: Run, record: dict[str, Any]) -> None:
    """Every rank gathers RNG state and meets at the barriers; only the main process writes."""
    accelerator = run.accelerator
    start = time.perf_counter()
    rng = gather_rng(accelerator)  # a collective: every rank
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"epoch": record["epoch"], "step": run.global_step, "world_size": accelerator.num_processes,
                 "config": run.cfg.to_dict(), "metrics": run.history, "versions": run.versions}
        write_checkpoint(checkpoint_dir(run.output_dir, record["epoch"]),
                         accelerator.unwrap_model(run.model).state_dict(), saveable_state_dict(run.optimizer), rng, state)
        with open(run.output_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        prune(run.output_dir, run.cfg.keep_checkpoints)  # only once the new checkpoint is complete
    accelerator.wait_for_everyone()
    run.timings["checkpoint"] = run.timings.get("checkpoint", 0.0) + time.perf_counter() - start


def fit(run: Run) -> None:
    cfg, accelerator = run.cfg, run.accelerator
    if accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        (run.output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        # metrics.jsonl always matches the checkpoint the run continues from
        (run.output_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run.history))
    run.timings["setup"] = time.perf_counter() - run.started
    accelerator.init_trackers(tracking.RUN_NAME, config=cfg.to_dict())  # main process only; no-op without --log-with
    for epoch in range(run.start_epoch + 1, cfg.epochs + 1):
        record = train_one_epoch(run, epoch)
        run.history.append(record)
        save_epoch(run, record)
        accelerator.log(record, step=record["step"])  # x axis: optimizer steps, as the step records
        run.console.epoch_done(record, cfg.epochs)
    if accelerator.is_main_process:
        save_weights(accelerator.unwrap_model(run.model).state_dict(), run.output_dir / "model.safetensors")
        write_run_summary(run)
    accelerator.wait_for_everyone()


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process was started (interpreter and imports included); Linux only."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def write_run_summary(run: Run) -> None:
    """OUTPUT_DIR/run.json: what ran where, and where the wall time of this invocation went."""
    new = [r for r in run.history if r["epoch"] > run.start_epoch]
    summary = {
        "versions": run.versions,
        "world_size": run.accelerator.num_processes,
        "config": run.cfg.to_dict(),
        "epochs_run": len(new),
        "final": run.history[-1] if run.history else None,
        "seconds": {
            "process": seconds_since_process_start(),  # interpreter start -> now, imports included
            "main": time.perf_counter() - run.started,  # main() -> now
            "setup": run.timings.get("setup", 0.0),  # config, Accelerator, data, model, resume
            **{k: v for k, v in run.timings.items() if k.startswith("setup_")},  # its parts
            "train": sum(r["train_seconds"] for r in new),
            "capture": sum(r["capture_seconds"] for r in new),
            "eval": sum(r["eval_seconds"] for r in new),
            "checkpoint": run.timings.get("checkpoint", 0.0),
        },
    }
    (run.output_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")


def is_collective_failure(err: BaseException) -> bool:
    """A timed-out or broken collective (a peer hung or died), as gloo and NCCL report it."""
    if isinstance(err, torch.distributed.DistError):
        return True
    text = str(err).lower()
    return any(s in text for s in ("timed out", "timeout", "connection closed", "connection reset", "broken pipe"))


@cli
def main(argv: Sequence[str] | None = None) -> int:
    wall_start = time.perf_counter()
    cfg = parse_config(argv)
    try:
        run = setup(cfg)  # inside: a peer can already die in the collectives of set-up (DDP's broadcast)
        run.started = wall_start
        fit(run)
    except (RuntimeError, torch.distributed.DistError) as err:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and is_collective_failure(err):
            raise RunFailed(
                f"rank {dist.get_rank()}: a collective with the other ranks failed or did not finish "
                f"within --dist-timeout {cfg.dist_timeout:g} s (a rank hung or died): {str(err).splitlines()[0]}"
            ) from None
        raise
    tracker = f"{cfg.log_with}, {tracking.destination(cfg.log_with, cfg.output_dir)}" if cfg.log_with else None
    run.console.summary(run.history, run.start_epoch + 1, time.perf_counter() - run.started, run.timings,
                        Outputs(str(run.output_dir), OUTPUT_FILES, tracker))
    shutdown(run.accelerator)
    return 0


if __name__ == "__main__":
    main()
