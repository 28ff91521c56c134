"""What the Run page shows: the epochs of metrics.jsonl, the run's plan, and a test-set report per checkpoint.

Everything is read from RUN_DIR as training writes it (config.json at the start, one line of
metrics.jsonl per epoch, run.json at the end), so the page can follow a run that is still going.
The report (confusion matrix, per-digit accuracy, most confident mistakes) is a plain CPU forward
over the test set, computed when asked for and cached per set of weights.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..data import Split, load_mnist
from ..errors import DistmnistError
from ..report import confusion_matrix, local_mistakes, per_class_accuracy, top_mistakes
from .weights import Weights

MISTAKES = 24  # most confident mistakes shown
BATCH = 1000  # test images per forward pass
CACHED_REPORTS = 8  # reports kept, newest last


def read_json(path: Path) -> Any:
    """A JSON file, or None while it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_epochs(path: Path) -> list[dict[str, Any]]:
    """The complete lines of metrics.jsonl (a line still being written, or a broken one, is left out)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    records = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def plan(config: dict | None, summary: dict | None, served: Weights | None, epochs: list[dict]) -> dict[str, Any]:
    """World size, device and the recipe, from run.json when the run is done, else from its newest checkpoint."""
    config = config or {}
    versions = (summary or {}).get("versions") or (served.versions if served else None) or {}
    world = (summary or {}).get("world_size") or (epochs[-1].get("world_size") if epochs else None)
    batch = config.get("batch_size")
    return {
        "world size": world,
        "device": versions.get("device"),
        "precision": config.get("mixed_precision"),
        "batch": f"{batch} per process" + (f", {batch * world} global" if batch and world else "") if batch else None,
        "epochs": config.get("epochs"),
        "learning rate": config.get("lr"),
        "momentum": config.get("momentum"),
        "seed": config.get("seed"),
        "data": config.get("data_dir"),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items() if k != "device") or None,
    }


def run_state(run_dir: Path, served: Weights | None, problem: str | None) -> dict[str, Any]:
    """Everything /api/run returns: cheap to build, polled every few seconds."""
    config = read_json(run_dir / "config.json")
    summary = read_json(run_dir / "run.json")
    epochs = read_epochs(run_dir / "metrics.jsonl")
    finished = summary is not None and bool(epochs) and (summary.get("final") or {}).get("epoch") == epochs[-1]["epoch"]
    return {
        "run_dir": str(run_dir),
        "epochs": epochs,
        "planned_epochs": (config or {}).get("epochs"),
        "finished": finished,
        "config": config,
        "plan": plan(config, summary, served, epochs),
        "model": served.describe(run_dir) if served else None,
        "model_problem": problem,
    }


class Reports:
    """Test-set reports, one per set of weights, computed on demand (one at a time) and cached."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self._test: Split | None = None
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def test_set(self) -> Split:
        if self._test is None:
            try:
                self._test = load_mnist(self.data_dir, allow_download=False)[1]
            except DistmnistError as err:
                raise DistmnistError(f"{err} (start serve with --data-dir DIR)") from None
        return self._test

    def get(self, weights: Weights, run_dir: Path) -> dict[str, Any]:
        """The report of these weights; blocks while it is computed (call from a worker thread)."""
        with self._lock:
            if weights.key not in self._cache:
                self._cache[weights.key] = {"model": weights.describe(run_dir), **self.compute(weights)}
                while len(self._cache) > CACHED_REPORTS:
                    self._cache.popitem(last=False)
            return self._cache[weights.key]

    def compute(self, weights: Weights) -> dict[str, Any]:
        test = self.test_set()
        log_probs = torch.cat([weights.log_probabilities(test.images[i : i + BATCH])
                               for i in range(0, len(test), BATCH)])
        predicted = log_probs.argmax(dim=1)
        confusion = confusion_matrix(test.labels, predicted)
        indices = torch.arange(len(test))
        mistakes = top_mistakes(local_mistakes(log_probs, test.labels, indices, MISTAKES), MISTAKES)
        correct = int(confusion.diagonal().sum())
        return {
            "samples": len(test),
            "correct": correct,
            "accuracy": correct / len(test),
            "confusion_matrix": confusion.tolist(),  # [true digit][predicted digit]
            "per_class_accuracy": per_class_accuracy(confusion),
            "mistakes": [{**vars(m), "image": test.images[m.index].tolist()} for m in mistakes],
        }
