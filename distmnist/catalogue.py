"""A run folder as the reading commands see it: its layout, its checkpoints in order, its weights; read-only.

    runs/mnist/
      .lock.json              held (flock) by the main process of the live run; names pid, host, run id
      config.json             the config that runs now, with its run id
      metrics.jsonl           one record per finished epoch
      run.json                versions, device, config history, final metrics, where the time went
      model.safetensors       the final weights
      best.safetensors        --val-size: the best epoch's weights
      checkpoints/epoch-0003/             end of epoch 3
      checkpoints/epoch-0004-step-0217/   stopped in epoch 4 after 217 of its steps
      logs/RUN_ID/            file-based trackers (tensorboard ...), one folder per run id

evaluate, predict, plot and serve read runs through here; the live run's owner (rundir.py) uses the
same listing. Checkpoints are ordered by the epoch and step recorded inside them, never by name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, load_checkpoint, read_state
from .checkpoint import load_weights as load_weights_file
from .errors import DistmnistError
from .state import TrainState

LOCK = ".lock.json"
CONFIG, METRICS, SUMMARY, FINAL, BEST, CHECKPOINTS, LOGS = (
    "config.json", "metrics.jsonl", "run.json", "model.safetensors", "best.safetensors", "checkpoints", "logs")
RUN_FILES = (CONFIG, METRICS, SUMMARY, FINAL, BEST, CHECKPOINTS, LOGS)  # what --overwrite deletes


def checkpoint_name(epoch: int, mid_step: int | None = None) -> str:
    """epoch-0003 (end of epoch 3) or epoch-0004-step-0217 (stopped in epoch 4 after 217 steps)."""
    return f"epoch-{epoch:04d}" if mid_step is None else f"epoch-{epoch:04d}-step-{mid_step:04d}"


@dataclass
class Entry:
    """A folder under checkpoints/: its parsed (unverified) state, or why that could not be read."""

    path: Path
    state: TrainState | None
    error: str | None = None

    @property
    def run_id(self) -> str | None:
        return self.state.run_id if self.state else None

    @property
    def position(self) -> tuple[int, int, int]:
        return self.state.position if self.state else (-1, -1, -1)


def scan(output_dir: str | Path) -> list[Entry]:
    """Every checkpoint folder of OUTPUT_DIR, newest recorded position first (temp folders excluded;
    symlinks and unreadable folders listed with their error, last)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    entries = []
    for path in root.iterdir():
        if path.name.startswith(".tmp-") or not (path.is_dir() or path.is_symlink()):
            continue
        try:
            if path.is_symlink():
                raise DistmnistError("checkpoint folder is a symlink; distmnist reads only real folders")
            entries.append(Entry(path, read_state(path)))
        except DistmnistError as err:
            entries.append(Entry(path, None, str(err)))
    return sorted(entries, key=lambda e: (e.position, e.path.name), reverse=True)


def newest_valid(output_dir: str | Path, run_id: str | None, warn: Callable[[str], None]) -> Checkpoint | None:
    """The newest checkpoint of run ``run_id`` (any run if None) that verifies. Every checkpoint passed
    over is reported through ``warn``, saying why, and so is every folder that cannot be placed in the
    order at all (a symlink, an unreadable state), wherever it would have stood."""
    entries = scan(output_dir)
    for entry in entries:
        if entry.state is None:
            warn(f"skipping invalid checkpoint {entry.path}: {entry.error}")
    for entry in entries:
        if entry.state is None:
            continue
        if run_id is not None and entry.run_id != run_id:
            warn(f"skipping checkpoint {entry.path}: it belongs to run {entry.run_id}, this folder's run is {run_id}")
            continue
        try:
            return load_checkpoint(entry.path)
        except DistmnistError as err:
            warn(f"skipping invalid checkpoint {entry.path}: {err}")
    return None


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


def recorded_run_id(path: Path) -> str | None:
    """The run id in a run folder's config.json, if any."""
    run_id = (read_config(path) or {}).get("run_id")
    return run_id if isinstance(run_id, str) and run_id else None


def load_weights(path: str | Path, warn: Callable[[str], None] = lambda _: None) -> dict[str, torch.Tensor]:
    """Weights from a model.safetensors file, a checkpoint folder or a run folder (its model.safetensors,
    or while the run is unfinished its newest valid checkpoint); verified and checked against Net."""
    path = Path(path)
    if not is_run_folder(path):
        return load_weights_file(path)
    if (path / FINAL).is_file():
        return load_weights_file(path / FINAL)
    ckpt = newest_valid(path, recorded_run_id(path), warn)
    if ckpt is None:
        raise DistmnistError(f"{path}: a run folder with neither {FINAL} nor a valid checkpoint")
    warn(f"{path / FINAL} not found (run unfinished?): using {ckpt.path}")
    return ckpt.model
