"""The weights being served: loaded and verified once, then swapped only for newer weights that verify.

The source is RUN_DIR/model.safetensors once the run has finished, or the newest checkpoint that
verifies while it is still going (or was resumed after it finished). A cheap fingerprint (stat of
model.safetensors and of the checkpoints folder) tells when to look again; whatever is found is
verified in full before it replaces what is served, and a failure leaves the served weights alone.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..catalogue import newest_valid, read_config
from ..checkpoint import load_weights
from ..errors import DistmnistError
from ..model import Net, to_input

FINAL = "model.safetensors"


@dataclass
class Weights:
    """One verified set of weights and where it came from."""

    source: Path
    model: Net
    key: str  # SHA-256 of the weights: identifies them for the report cache
    epoch: int | None = None  # None for the final model.safetensors
    versions: dict[str, str] = field(default_factory=dict)  # a checkpoint's: what trained it (run.json's later)

    def describe(self, run_dir: Path) -> dict[str, Any]:
        return {"source": str(self.source.relative_to(run_dir)), "epoch": self.epoch, "key": self.key[:12]}

    @torch.no_grad()
    def log_probabilities(self, digits: torch.Tensor) -> torch.Tensor:
        """uint8 (n, 28, 28) -> log-probabilities (n, 10)."""
        return self.model(to_input(digits))


def as_served(source: Path, tensors: dict[str, torch.Tensor], epoch: int | None, versions: dict) -> Weights:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    model = Net()
    model.load_state_dict(tensors)
    return Weights(source, model.eval(), digest.hexdigest(), epoch, versions)


def newest_weights(run_dir: Path, warn) -> Weights | None:
    """The run's newest verified weights, or None if it has none yet. The one place that picks them."""
    final = run_dir / FINAL
    checkpoints = run_dir / "checkpoints"
    final_is_newest = final.is_file() and (
        not checkpoints.is_dir() or final.stat().st_mtime_ns >= checkpoints.stat().st_mtime_ns)
    if final_is_newest:
        return as_served(final, load_weights(final), None, {})
    ckpt = newest_valid(run_dir, (read_config(run_dir) or {}).get("run_id"), warn)  # this run's own only
    if ckpt is not None:
        return as_served(ckpt.path, ckpt.model, ckpt.epoch, ckpt.state.versions)
    if final.is_file():
        return as_served(final, load_weights(final), None, {})
    return None


def fingerprint(run_dir: Path) -> tuple:
    """Changes whenever model.safetensors is written or a checkpoint folder appears, goes or is replaced."""
    marks: list[tuple[int, int, int] | None] = []
    for path in (run_dir / FINAL, run_dir / "checkpoints"):
        try:
            st = os.stat(path)
            marks.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            marks.append(None)
    return tuple(marks)


class ServedWeights:
    """Holds the current Weights; ``refresh()`` (from a worker thread) swaps in newer ones that verify."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.problem: str | None = None  # why the newest weights on disk are not the ones served
        self._seen = fingerprint(run_dir)
        self._lock = threading.Lock()
        self.current = newest_weights(run_dir, self._warn)  # at start-up a bad file is an error, as in evaluate

    def _warn(self, message: str) -> None:
        self.problem = message

    def refresh(self) -> bool:
        """Look again if anything changed on disk; True if other weights are now served."""
        with self._lock:
            now = fingerprint(self.run_dir)
            if now == self._seen:
                return False
            self._seen = now
            self.problem = None
            try:
                found = newest_weights(self.run_dir, self._warn)
            except (DistmnistError, OSError) as err:  # a file that does not verify, or went while read: keep serving
                self.problem = f"not loaded, still serving the previous weights: {err}"
                return False
            if found is None or (self.current is not None and found.key == self.current.key
                                 and found.source == self.current.source):
                return False
            self.current = found
            return True
