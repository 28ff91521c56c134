"""The output folder of the live run: who owns it, which run it holds, what a fresh start or a resume
may do with it, and the pruning of its checkpoints. Only the main process of a training run uses it;
the layout and the read-only listing are catalogue.py's.

The rules:
- One live run per folder: a second one exits 2 at once, naming who holds it. The lock is an
  flock on ``.lock.json`` (opened without following symlinks), so a lock left by a dead process
  never blocks anyone; a file system without flock support is named in a one-line error.
- A fresh run (no ``--resume``) refuses a folder that holds a run; ``--resume auto`` continues it;
  ``--overwrite`` deletes the old run's files first, and only once the resume source (if any) has
  been read: nothing is deleted for a start that then fails to find its checkpoint.
- A resumed run continues its recorded recipe; only what this command sets overrides it, and
  every override is announced and kept in the config history (config.Request.continuing).
- Each run has an id, written into config.json, run.json and every checkpoint. Resuming considers
  only this run's checkpoints, ordered by the epoch and step recorded inside them (never by name);
  another run's checkpoint is skipped with a notice and never pruned. The checkpoint just written
  is never pruned.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalogue import (
    BEST,
    CHECKPOINTS,
    CONFIG,
    FINAL,
    LOCK,
    METRICS,
    RUN_FILES,
    SUMMARY,
    checkpoint_name,
    is_run_folder,
    newest_valid,
    read_config,
    recorded_run_id,
    scan,
)
from .checkpoint import Checkpoint, load_checkpoint, read_state
from .config import Request, TrainConfig
from .errors import DistmnistError
from .files import json_line, json_text, make_dirs, write_json, write_text


def new_run_id() -> str:
    """Sortable and readable: the start time, plus randomness so two runs of the same second differ."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def prune(output_dir: str | Path, run_id: str, keep: int, just_written: Path) -> list[Path]:
    """Delete this run's checkpoints but ``just_written`` and the ``keep - 1`` newest before it
    (keep <= 0: keep all). Other runs' checkpoints and unreadable folders are never touched."""
    if keep <= 0:
        return []
    mine = [e for e in scan(output_dir) if e.run_id == run_id and e.path != just_written]
    newest = read_state(just_written).position
    older = [e for e in mine if e.position < newest][: keep - 1]
    doomed = [e.path for e in mine if e not in older]
    for path in doomed:
        remove_tree(path)
    return doomed


def prune_superseded(output_dir: str | Path, run_id: str, epoch: int) -> list[Path]:
    """Delete this run's mid-epoch checkpoints of ``epoch`` once its end-of-epoch checkpoint is complete."""
    doomed = [e.path for e in scan(output_dir) if e.run_id == run_id and e.state is not None
              and e.state.mid_epoch is not None and e.state.epoch == epoch]
    for path in doomed:
        remove_tree(path)
    return doomed


def remove_tree(path: Path) -> None:
    """rmtree with a one-line error (an NFS .nfsXXXX file held open elsewhere, a read-only disk)."""
    try:
        shutil.rmtree(path)
    except OSError as err:
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        raise DistmnistError(f"cannot delete {path}{where}: {err.strerror or err}") from None


def filesystem_of(path: Path) -> str:
    """The type of the file system holding ``path`` (from /proc/self/mountinfo), e.g. 'ext4', 'nfs4', 'lustre'."""
    try:
        target, best, kind = os.path.realpath(path), "", "unknown"
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields, _, rest = line.partition(" - ")
            mount = fields.split()[4].replace("\\040", " ")
            if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, rest.split()[0]
        return kind
    except (OSError, IndexError):
        return "unknown"


@dataclass
class Start:
    """What the main process decided about the run folder; sent as is to every rank."""

    run_id: str
    config: TrainConfig  # the config this run trains with: the recorded recipe with this command's overrides
    checkpoint: Checkpoint | None = None  # to resume from; None = fresh start
    complete: bool = False  # resumed at or past --epochs: nothing to train
    notices: list[str] = field(default_factory=list)
    config_history: list[dict[str, Any]] = field(default_factory=list)  # [{"from_epoch", "from_step", "config"}]


class RunFolder:
    """The output folder of one live run, held by its main process from start to exit (a context
    manager: leaving it, however, releases the lock; a start that wrote nothing removes the folders
    it created)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._created: list[Path] = []  # folders this run made, deepest first: a start that fails removes them again

    def __enter__(self) -> RunFolder:
        self.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(failed_start=exc_type is not None and not self.holds_run())

    # ------------------------------------------------------------ ownership

    def acquire(self) -> None:
        """Create the folder if needed and take its lock, or fail at once naming who holds it."""
        self._created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        make_dirs(self.path, "--output-dir")
        lock = self.path / LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise DistmnistError(f"{lock} is a symlink; distmnist never writes through one: remove it") from None
            raise DistmnistError(f"--output-dir {self.path} is not writable: {err.strerror or err}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise DistmnistError(f"{lock} is not a regular file (a folder, a pipe or a device?): remove it")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DistmnistError(f"--output-dir {self.path} is in use by another run ({self._holder(lock)}); wait for "
                                 "it to end or choose another --output-dir") from None
        except OSError as err:
            os.close(fd)
            raise DistmnistError(
                f"--output-dir {self.path}: cannot lock {LOCK} on this {filesystem_of(self.path)} file system "
                f"({err.strerror or err}); use a folder on a local disk, NFSv4, or Lustre mounted with -o flock"
            ) from None
        except DistmnistError:
            os.close(fd)
            raise
        self._lock_fd = fd

    def describe_holder(self, run_id: str) -> None:
        """Write who holds the lock (pid, host, run id, since) into the lock file, for the next comer's message."""
        info = json_text({"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                          "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        assert self._lock_fd is not None, "acquire() first"
        try:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, info, 0)
        except OSError as err:
            raise DistmnistError(f"--output-dir {self.path} is not writable: {err.strerror or err}") from None

    @staticmethod
    def _holder(lock: Path) -> str:
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                info = json.loads(os.read(fd, 4096))
            finally:
                os.close(fd)
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
        try:
            return any((self.path / name).exists() for name in (CONFIG, METRICS, SUMMARY, FINAL)) or (
                root.is_dir() and any(root.iterdir()))
        except OSError:
            return True  # unreadable: treat as taken, never as empty

    def run_id(self) -> str | None:
        """The id of the run this folder holds: config.json's, else the newest checkpoint's."""
        run_id = recorded_run_id(self.path)
        if run_id:
            return run_id
        for entry in scan(self.path):
            if entry.run_id:
                return entry.run_id
        return None

    def describe(self) -> str:
        run_id = self.run_id()
        done = [e for e in scan(self.path) if e.run_id == run_id and e.state and not e.state.mid_epoch]
        epochs = f", {done[0].state.epoch} epoch(s) done" if done and done[0].state else ""
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

    def start(self, request: Request) -> Start:
        """Apply the folder rules to --resume / --overwrite / --epochs; see the module docstring."""
        cfg = request.cfg
        notices: list[str] = []
        if cfg.overwrite and cfg.resume == "auto":
            raise DistmnistError("--overwrite deletes the run that --resume auto would continue: give one of them "
                                 "(--resume PATH --overwrite starts this folder over from another run's checkpoint)")
        if cfg.resume is None:
            if self.holds_run() and not cfg.overwrite:
                raise DistmnistError(
                    f"--output-dir {self.path} already holds {self.describe()}: continue it with --resume auto, "
                    "start elsewhere with another --output-dir, or delete it and start over with --overwrite")
            self._overwrite(cfg, notices)
            return Start(new_run_id(), cfg, notices=notices)
        if cfg.resume == "auto":
            return self._resume_auto(request, notices)
        ckpt = self._explicit(cfg.resume, notices)  # read before anything is deleted
        current = self.run_id() if self.holds_run() else None
        if cfg.overwrite:
            self._overwrite(cfg, notices)
        elif current is not None and ckpt.run_id != current:
            raise DistmnistError(
                f"--resume {cfg.resume}: that checkpoint belongs to run {ckpt.run_id}, but --output-dir {self.path} "
                f"holds {self.describe()}: choose another --output-dir, or --overwrite to replace it")
        return self._resume(ckpt, request, notices)

    def _overwrite(self, cfg: TrainConfig, notices: list[str]) -> None:
        if cfg.overwrite and self.holds_run():
            notices.append(f"--overwrite: deleted {self.describe()} from {self.path} ({', '.join(self.clear())})")

    def _resume_auto(self, request: Request, notices: list[str]) -> Start:
        if not self.holds_run():
            notices.append(f"--resume auto: no run in {self.path} yet, starting fresh")
            return Start(new_run_id(), request.cfg, notices=notices)
        current = self.run_id()
        if current is None:
            raise DistmnistError(f"--output-dir {self.path} holds files of a run without an id: start over with "
                                 "--overwrite or choose another --output-dir")
        ckpt = newest_valid(self.path, current, notices.append)
        if ckpt is not None:
            return self._resume(ckpt, request, notices)
        cfg, changes = request.continuing(read_config(self.path) or {}, str(self.path / CONFIG))
        notices.append(f"--resume auto: run {current} has no valid checkpoint yet, starting it from the beginning"
                       + (f" with changed settings: {describe_changes(changes)}" if changes else ""))
        return Start(current, cfg, notices=notices)

    def _explicit(self, resume: str, notices: list[str]) -> Checkpoint:
        """--resume PATH: a checkpoint folder, or a run folder (its newest valid checkpoint)."""
        path = Path(resume)
        if not resume.strip():
            raise DistmnistError("--resume needs 'auto' or a path: a checkpoint folder (RUN/checkpoints/epoch-NNNN) "
                                 "or a run folder")
        if path.is_file():
            raise DistmnistError(
                f"--resume {path}: expects a checkpoint folder (RUN/checkpoints/epoch-NNNN) or a run folder; a "
                f"{path.suffix or 'plain'} file holds no optimizer or RNG state to continue from")
        if not path.exists() and not path.is_symlink():
            raise DistmnistError(f"--resume: no such checkpoint or run folder: {path}")
        if is_run_folder(path):
            ckpt = newest_valid(path, recorded_run_id(path), notices.append)
            if ckpt is None:
                raise DistmnistError(f"--resume {path}: this run folder has no valid checkpoint")
            return ckpt
        return load_checkpoint(path)

    def _resume(self, ckpt: Checkpoint, request: Request, notices: list[str]) -> Start:
        state = ckpt.state
        cfg, changes = request.continuing(state.config, str(ckpt.path / "state.json"))
        if state.epochs_done > cfg.epochs or (state.mid_epoch and state.epoch > cfg.epochs):
            raise DistmnistError(f"--epochs {cfg.epochs} is below the {state.epochs_done} epoch(s) the checkpoint "
                                 f"{ckpt.path} has already trained; --epochs is the total, so pass at least "
                                 f"{max(state.epochs_done, 1)}")
        history = list(state.config_history or [{"from_epoch": 1, "from_step": 0, "config": state.config}])
        if changes:
            notices.append(f"resuming with changed settings: {describe_changes(changes)}")
            history.append({"from_epoch": state.epochs_done + 1, "from_step": state.step, "config": cfg.to_dict()})
        stale = [e.path for e in scan(self.path) if e.run_id == state.run_id and e.position > state.position]
        if stale:
            for path in stale:
                remove_tree(path)
            notices.append(f"continuing from {ckpt.path.name}: discarded this run's later checkpoints "
                           f"{', '.join(p.name for p in stale)}")
        # finished: all its epochs done, or stopped early (--early-stop) for want of a better validation result
        complete = state.mid_epoch is None and (state.epoch >= cfg.epochs or state.progress.early_stopped)
        return Start(state.run_id, cfg, ckpt, complete, notices, history)

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


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())
