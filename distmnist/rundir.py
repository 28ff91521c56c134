"""The run folder (``--output-dir``): who owns it, which run it holds, what a fresh start or a resume
may do with it, and its checkpoints' names, order and pruning. Every command that writes a run,
and every command that reads one, goes through here; only the main process calls it.

    runs/mnist/
      .lock.json              held (flock) by the main process of the live run; names pid, host, run id
      config.json             the config that runs now, with its run id
      metrics.jsonl           one record per finished epoch
      run.json                versions, device, config history, final metrics, where the time went
      model.safetensors       the final weights
      checkpoints/epoch-0003/             end of epoch 3
      checkpoints/epoch-0004-step-0217/   stopped in epoch 4 after 217 of its steps
      logs/RUN_ID/            file-based trackers (tensorboard ...), one folder per run id

The rules:
- One live run per folder: a second one exits 2 at once, naming who holds it. The lock is an
  flock, so a lock left by a dead process never blocks anyone.
- A fresh run (no ``--resume``) refuses a folder that holds a run; ``--resume auto`` continues it;
  ``--overwrite`` deletes the old run's files first. Nothing is ever mixed.
- Each run has an id, written into config.json, run.json and every checkpoint. Resuming considers
  only this run's checkpoints, ordered by the epoch and step recorded inside them (never by name);
  another run's checkpoint is skipped with a notice and never pruned. The checkpoint just written
  is never pruned.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import Checkpoint, load_checkpoint, load_weights as load_weights_file, position, read_state
from .errors import DistmnistError
from .files import json_line, json_text, make_dirs, write_json, write_text

LOCK = ".lock.json"
CONFIG, METRICS, SUMMARY, FINAL, BEST, CHECKPOINTS, LOGS = (
    "config.json", "metrics.jsonl", "run.json", "model.safetensors", "best.safetensors", "checkpoints", "logs")
RUN_FILES = (CONFIG, METRICS, SUMMARY, FINAL, BEST, CHECKPOINTS, LOGS)  # what --overwrite deletes
IGNORED_CONFIG_CHANGES = ("resume", "overwrite")  # how a run was started, not what it trains


def new_run_id() -> str:
    """Sortable and readable: the start time, plus randomness so two runs of the same second differ."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def checkpoint_name(epoch: int, mid_step: int | None = None) -> str:
    """epoch-0003 (end of epoch 3) or epoch-0004-step-0217 (stopped in epoch 4 after 217 steps)."""
    return f"epoch-{epoch:04d}" if mid_step is None else f"epoch-{epoch:04d}-step-{mid_step:04d}"


@dataclass
class Entry:
    """A folder under checkpoints/: its parsed (unverified) state.json, or why that could not be read."""

    path: Path
    state: dict[str, Any] | None
    error: str | None = None

    @property
    def run_id(self) -> str | None:
        return self.state.get("run_id") if self.state else None

    @property
    def position(self) -> tuple[int, int, int]:
        return position(self.state) if self.state else (-1, -1, -1)


def scan(output_dir: str | Path) -> list[Entry]:
    """Every checkpoint folder of OUTPUT_DIR, newest recorded position first (temp folders excluded)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    entries = []
    for path in root.iterdir():
        if path.name.startswith(".tmp-") or not (path.is_dir() or path.is_symlink()):
            continue
        try:
            if path.is_symlink():
                raise DistmnistError(f"{path}: checkpoint folder is a symlink; distmnist reads only real folders")
            entries.append(Entry(path, read_state(path)))
        except DistmnistError as err:
            entries.append(Entry(path, None, str(err)))
    return sorted(entries, key=lambda e: (e.position, e.path.name), reverse=True)


def newest_valid(output_dir: str | Path, run_id: str | None, warn: Callable[[str], None]) -> Checkpoint | None:
    """The newest checkpoint of run ``run_id`` (any run if None) that verifies; every checkpoint
    passed over is reported through ``warn``, saying why."""
    for entry in scan(output_dir):
        if entry.error is not None:
            warn(f"skipping invalid checkpoint {entry.path}: {entry.error}")
            continue
        if run_id is not None and entry.run_id != run_id:
            warn(f"skipping checkpoint {entry.path}: it belongs to run {entry.run_id or '(no id)'}, this folder's "
                 f"run is {run_id}")
            continue
        try:
            return load_checkpoint(entry.path)
        except DistmnistError as err:
            warn(f"skipping invalid checkpoint {entry.path}: {err}")
    return None


def prune(output_dir: str | Path, run_id: str, keep: int, just_written: Path) -> list[Path]:
    """Delete this run's checkpoints but ``just_written`` and the ``keep - 1`` newest before it
    (keep <= 0: keep all). Other runs' checkpoints and unreadable folders are never touched."""
    if keep <= 0:
        return []
    mine = [e for e in scan(output_dir) if e.run_id == run_id and e.path != just_written]
    newest = Entry(just_written, read_state(just_written)).position
    older = [e for e in mine if e.position < newest][: keep - 1]
    doomed = [e.path for e in mine if e not in older]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def is_run_folder(path: Path) -> bool:
    """A folder a run writes, not a checkpoint folder: it has checkpoints/ or config.json, and no state.json."""
    return path.is_dir() and not (path / "state.json").exists() and any(
        (path / name).exists() for name in (CHECKPOINTS, CONFIG))


def read_config(path: Path) -> dict[str, Any] | None:
    """A run folder's config.json, or None if it has none that parses."""
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def load_weights(path: str | Path, warn: Callable[[str], None] = lambda _: None) -> dict[str, torch.Tensor]:
    """Weights from a model.safetensors file, a checkpoint folder or a run folder (its model.safetensors,
    or while the run is unfinished its newest valid checkpoint); verified and checked against Net."""
    path = Path(path)
    if not is_run_folder(path):
        return load_weights_file(path)
    if (path / FINAL).is_file():
        return load_weights_file(path / FINAL)
    ckpt = newest_valid(path, (read_config(path) or {}).get("run_id"), warn)
    if ckpt is None:
        raise DistmnistError(f"{path}: a run folder with neither {FINAL} nor a valid checkpoint")
    warn(f"{path / FINAL} not found (run unfinished?): using {ckpt.path}")
    return ckpt.model


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (checkpoint's value, this run's value)} for every setting that differs."""
    return {k: (old.get(k), v) for k, v in new.items()
            if k not in IGNORED_CONFIG_CHANGES and k in old and old[k] != v}


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())


# ---------------------------------------------------------------- the folder of a live run


@dataclass
class Start:
    """What the main process decided about the run folder; sent as is to every rank."""

    run_id: str
    checkpoint: Checkpoint | None = None  # to resume from; None = fresh start
    complete: bool = False  # resumed at or past --epochs: nothing to train
    notices: list[str] = field(default_factory=list)
    config_history: list[dict[str, Any]] = field(default_factory=list)  # [{"from_epoch", "from_step", "config"}]


TENSOR_GROUPS = ("model", "optimizer", "rng", "progress")


def share_start(accelerator, start: Start | None) -> Start:
    """The main process's Start on every rank, checkpoint content included (JSON and safetensors bytes
    over the process group: ranks on machines that share no filesystem resume from the same state,
    and nothing is pickled)."""
    from safetensors.torch import load, save

    from .distributed import broadcast_bytes

    if accelerator.num_processes == 1:
        return start
    meta = tensors = None
    if accelerator.is_main_process:
        ckpt = start.checkpoint
        meta = json.dumps({"run_id": start.run_id, "complete": start.complete, "notices": start.notices,
                           "config_history": start.config_history,
                           "checkpoint": {"path": str(ckpt.path), "state": ckpt.state} if ckpt else None}).encode()
        groups = {g: getattr(ckpt, g) for g in TENSOR_GROUPS} if ckpt else {}
        tensors = save({f"{g}/{k}": v.contiguous() for g, part in groups.items() if part for k, v in part.items()})
    meta = json.loads(broadcast_bytes(accelerator, meta))
    tensors = load(broadcast_bytes(accelerator, tensors))
    ckpt = None
    if meta["checkpoint"] is not None:
        parts: dict[str, dict[str, torch.Tensor]] = {g: {} for g in TENSOR_GROUPS}
        for key, value in tensors.items():
            group, name = key.split("/", 1)
            parts[group][name] = value
        ckpt = Checkpoint(Path(meta["checkpoint"]["path"]), parts["model"], parts["optimizer"], parts["rng"],
                          meta["checkpoint"]["state"], parts["progress"] or None)
    return Start(meta["run_id"], ckpt, meta["complete"], meta["notices"], meta["config_history"])


class RunFolder:
    """The output folder of one live run, held by its main process from start to exit."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._created: list[Path] = []  # folders this run made, deepest first: a start that fails removes them again

    # ------------------------------------------------------------ ownership

    def acquire(self) -> None:
        """Create the folder if needed and take its lock, or fail at once naming who holds it."""
        self._created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        make_dirs(self.path, "--output-dir")
        lock = self.path / LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise DistmnistError(f"--output-dir {self.path} is not writable: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DistmnistError(f"--output-dir {self.path} is in use by another run ({self._holder(lock)}); wait for "
                                 "it to end or choose another --output-dir") from None
        self._lock_fd = fd

    def describe_holder(self, run_id: str) -> None:
        """Write who holds the lock (pid, host, run id, since) into the lock file, for the next comer's message."""
        info = json_text({"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                          "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        try:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, info, 0)
        except OSError as err:
            raise DistmnistError(f"--output-dir {self.path} is not writable: {err.strerror or err}") from None

    @staticmethod
    def _holder(lock: Path) -> str:
        try:
            info = json.loads(lock.read_text())
            return f"pid {info['pid']} on {info['host']}, run {info['run_id'] or '(starting)'}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self, failed_start: bool = False) -> None:
        """Let go of the lock; after a start that failed, remove the folders again that this run created
        (``runs/`` too, for the default ``runs/mnist``)."""
        if self._lock_fd is None:
            return
        if failed_start and self._created:
            (self.path / LOCK).unlink(missing_ok=True)
            for folder in self._created:
                try:
                    folder.rmdir()  # only if empty: never deletes anything else
                except OSError:
                    break
        os.close(self._lock_fd)  # closing the descriptor releases the flock
        self._lock_fd = None

    # ------------------------------------------------------------ what it holds

    def holds_run(self) -> bool:
        root = self.path / CHECKPOINTS
        return any((self.path / name).exists() for name in (CONFIG, METRICS, SUMMARY, FINAL)) or (
            root.is_dir() and any(root.iterdir()))

    def run_id(self) -> str | None:
        """The id of the run this folder holds: config.json's, else the newest checkpoint's."""
        config = read_config(self.path)
        if config and isinstance(config.get("run_id"), str):
            return config["run_id"]
        for entry in scan(self.path):
            if entry.run_id:
                return entry.run_id
        return None

    def describe(self) -> str:
        run_id = self.run_id()
        done = [e for e in scan(self.path) if e.run_id == run_id and e.state and not e.state.get("mid_epoch")]
        epochs = f", {done[0].state['epoch']} epoch(s) done" if done else ""
        return f"run {run_id or '(no id)'}{epochs}"

    def clear(self) -> list[str]:
        """--overwrite: delete the old run's files (only distmnist's own; anything else stays)."""
        removed = []
        for name in RUN_FILES:
            path = self.path / name
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
                else:
                    continue
            except OSError as err:
                raise DistmnistError(f"--overwrite: cannot delete {path}: {err.strerror or err}") from None
            removed.append(name)
        return removed

    # ------------------------------------------------------------ deciding how the run starts

    def start(self, resume: str | None, overwrite: bool, epochs: int, config: dict[str, Any]) -> Start:
        """Apply the folder rules to --resume / --overwrite / --epochs; see the module docstring."""
        notices: list[str] = []
        if overwrite and self.holds_run():
            notices.append(f"--overwrite: deleted {self.describe()} from {self.path} ({', '.join(self.clear())})")
        current = self.run_id() if self.holds_run() else None
        if resume is None:
            if self.holds_run():
                raise DistmnistError(
                    f"--output-dir {self.path} already holds {self.describe()}: continue it with --resume auto, "
                    "start elsewhere with another --output-dir, or delete it and start over with --overwrite")
            return Start(new_run_id(), notices=notices)
        if resume == "auto":
            if not self.holds_run():
                notices.append(f"--resume auto: no run in {self.path} yet, starting fresh")
                return Start(new_run_id(), notices=notices)
            if current is None:
                raise DistmnistError(f"--output-dir {self.path} holds files of a run without an id: start over with "
                                     "--overwrite or choose another --output-dir")
            ckpt = newest_valid(self.path, current, notices.append)
            if ckpt is None:
                notices.append(f"--resume auto: run {current} has no valid checkpoint yet, starting it from the "
                               "beginning")
                return Start(current, notices=notices)
        else:
            ckpt = self._explicit(Path(resume), notices)
            if current is not None and ckpt.run_id != current:
                raise DistmnistError(
                    f"--resume {resume}: that checkpoint belongs to run {ckpt.run_id or '(no id)'}, but --output-dir "
                    f"{self.path} holds {self.describe()}: choose another --output-dir, or --overwrite to replace it")
        return self._resume(ckpt, epochs, config, notices)

    def _explicit(self, path: Path, notices: list[str]) -> Checkpoint:
        """--resume PATH: a checkpoint folder, or a run folder (its newest valid checkpoint)."""
        if path.is_file():
            raise DistmnistError(
                f"--resume {path}: expects a checkpoint folder (RUN/checkpoints/epoch-NNNN) or a run folder; a "
                f"{path.suffix or 'plain'} file holds no optimizer or RNG state to continue from")
        if not path.exists() and not path.is_symlink():
            raise DistmnistError(f"--resume: no such checkpoint or run folder: {path}")
        if is_run_folder(path):
            ckpt = newest_valid(path, (read_config(path) or {}).get("run_id"), notices.append)
            if ckpt is None:
                raise DistmnistError(f"--resume {path}: this run folder has no valid checkpoint")
            return ckpt
        return load_checkpoint(path)

    def _resume(self, ckpt: Checkpoint, epochs: int, config: dict[str, Any], notices: list[str]) -> Start:
        if ckpt.epochs_done > epochs or (ckpt.mid_epoch and ckpt.epoch > epochs):
            raise DistmnistError(f"--epochs {epochs} is below the {ckpt.epochs_done} epoch(s) the checkpoint {ckpt.path} "
                                 f"has already trained; --epochs is the total, so pass at least {ckpt.epochs_done}")
        run_id = ckpt.run_id or new_run_id()
        history = list(ckpt.state.get("config_history") or [{"from_epoch": 1, "from_step": 0,
                                                               "config": ckpt.state.get("config", {})}])
        changes = config_changes(ckpt.state.get("config", {}), config)
        if changes:
            notices.append(f"resuming with changed settings: {describe_changes(changes)}")
            history.append({"from_epoch": ckpt.epochs_done + 1, "from_step": int(ckpt.state["step"]), "config": config})
        stale = [e.path for e in scan(self.path) if e.run_id == run_id and e.position > position(ckpt.state)]
        if stale:
            for path in stale:
                shutil.rmtree(path)
            notices.append(f"continuing from {ckpt.path.name}: discarded this run's later checkpoints "
                           f"{', '.join(p.name for p in stale)}")
        # finished: all its epochs done, or stopped early (--early-stop) for want of a better validation result
        complete = ckpt.mid_epoch is None and (ckpt.epoch >= epochs or bool(ckpt.state.get("early_stopped")))
        return Start(run_id, ckpt, complete, notices, history)

    # ------------------------------------------------------------ the run's records

    def checkpoint_path(self, epoch: int, mid_step: int | None = None) -> Path:
        return self.path / CHECKPOINTS / checkpoint_name(epoch, mid_step)

    def write_config(self, config: dict[str, Any], run_id: str) -> None:
        write_json(self.path / CONFIG, {"run_id": run_id, **config})

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """The whole file, atomically: it always matches the newest checkpoint of the run."""
        write_text(self.path / METRICS, "".join(json_line(r) for r in history))

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / SUMMARY, summary)

    def final_weights(self) -> Path:
        return self.path / FINAL

    def best_weights(self) -> Path:
        return self.path / BEST
