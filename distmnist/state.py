"""The schema of a checkpoint's state.json: one typed TrainState, written, checked, read and migrated here only.

A checkpoint's JSON part says where the run stands and how it got there; its tensors (weights,
optimizer state, RNG states, mid-epoch running sums) are in safetensors files beside it
(checkpoint.py). Every other module reads and writes the typed objects below, never the keys.

    {"format": "distmnist-checkpoint/2", "run_id", "epoch", "step",
     "mid_epoch": {"step", "steps", "train_seconds"} | null,
     "data": {"seed", "world_size", "batch_size", "global_batch_size", "train_images", "val_size",
              "limit_train", "digest"},
     "random": {"device", "dropout"},
     "scaler": {GradScaler.state_dict()} | null, "schedule": {the ScheduleSpec},
     "progress": {"metrics": [...], "best": {...} | null, "early_stopped"},
     "config", "config_history", "versions", "optimizer_param_groups"}

Format 1 (distmnist 0.1's first checkpoints) is read by migration: the same facts, laid out
differently, without the order's digest, the scaler or the global batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeGuard

from .errors import DistmnistError

FORMAT = "distmnist-checkpoint/2"
FORMAT_V1 = "distmnist-checkpoint/1"
MAX_EPOCH = 1_000_000  # = config.MAX_EPOCHS
MAX_STEP = 2**50  # far above any real run (10^6 epochs of 10^6 steps), far below int64 and float64 exactness
MAX_IMAGES = 10**9  # = config.MAX_LIMIT: no IDX file holds more
MAX_SECONDS = 10**9  # thirty years
METRIC_FIELDS = ("epoch", "step", "train_loss", "train_samples", "train_seconds", "test_loss", "test_accuracy",
                 "test_correct", "test_samples", "world_size")  # what a resumed run reads back from each record


@dataclass
class MidEpoch:
    """Where an epoch stopped in its middle."""

    step: int  # steps done in the epoch, >= 1
    steps: int  # steps per epoch
    train_seconds: float = 0.0  # training wall time of the epoch so far, over every launch


@dataclass
class DataOrder:
    """What decides the batches: equal values give the same batches, step for step."""

    seed: int
    world_size: int
    batch_size: int  # images per process per step (G / world size with a global batch)
    global_batch_size: int | None  # set: the order and the dropout masks do not depend on the world size
    train_images: int | None  # after --val-size and --limit-train (None: migrated from format 1, not recorded)
    val_size: int
    limit_train: int | None
    digest: str | None = None  # of the epoch's order (batches.TrainOrder.digest); None: migrated from format 1

    @property
    def per_process_batch(self) -> bool:
        return self.global_batch_size is None


@dataclass
class RandomInfo:
    """What rng.safetensors holds besides every rank's CPU generator ("cpu", one row per rank)."""

    device: str = "cpu"  # "cuda": it also holds every rank's CUDA generator ("cuda")
    dropout: bool = False  # it holds the global batch's dropout generator ("dropout"), the same on every rank


@dataclass
class RunProgress:
    """The run's history: every finished epoch's metrics record, the best epoch, early stopping."""

    metrics: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # --val-size: {"epoch", "val_accuracy", "val_loss"}
    early_stopped: bool = False


@dataclass
class TrainState:
    """Everything of a checkpoint that is not a tensor."""

    run_id: str
    epoch: int  # the epoch this checkpoint ends, or is in the middle of
    step: int  # optimizer steps of the run so far
    data: DataOrder
    mid_epoch: MidEpoch | None = None
    progress: RunProgress = field(default_factory=RunProgress)
    random: RandomInfo = field(default_factory=RandomInfo)
    scaler: dict[str, Any] | None = None  # torch.amp.GradScaler.state_dict() of an fp16 run
    schedule: dict[str, Any] = field(default_factory=dict)  # schedule.ScheduleSpec: lr(t) is a function of t alone
    config: dict[str, Any] = field(default_factory=dict)  # the config that ran up to this checkpoint
    config_history: list[dict[str, Any]] = field(default_factory=list)  # [{"from_epoch", "from_step", "config"}]
    versions: dict[str, str] = field(default_factory=dict)
    optimizer_param_groups: list[dict[str, Any]] = field(default_factory=list)

    @property
    def epochs_done(self) -> int:
        return self.epoch - 1 if self.mid_epoch else self.epoch

    @property
    def position(self) -> tuple[int, int, int]:
        """Sort key within a run: (epoch, 0 mid-epoch / 1 epoch end, step in the epoch)."""
        return (self.epoch, 0, self.mid_epoch.step) if self.mid_epoch else (self.epoch, 1, 0)

    @property
    def epoch_start_step(self) -> int:
        """The run's optimizer steps before the epoch this checkpoint is in (or ends)."""
        if self.mid_epoch:
            return self.step - self.mid_epoch.step
        return int(self.progress.metrics[-2]["step"]) if len(self.progress.metrics) > 1 else 0

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, raw: Any, source: Path) -> TrainState:
        """Checked and typed; format 1 migrated; anything else refused with one line naming the file."""
        if not isinstance(raw, dict):
            raise DistmnistError(f"{source}: expected a JSON object")
        found = raw.get("format")
        if found == FORMAT_V1:
            raw = migrate_v1(raw, source)
        elif found != FORMAT:
            raise DistmnistError(f"{source}: unknown checkpoint format {found!r}: this distmnist reads {FORMAT} and "
                                 f"{FORMAT_V1} (a checkpoint of a newer distmnist, or not a distmnist checkpoint)")
        return _parse(raw, source)


# ---------------------------------------------------------------- reading


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(obj: dict, key: str, source: Path, low: int, high: int, where: str = "") -> int:
    value = obj.get(key)
    if not _is_int(value) or not low <= value <= high:
        raise DistmnistError(f"{source}: '{where}{key}' must be an integer from {low:,} to {high:,}, got {value!r}")
    return value


def _dict(obj: dict, key: str, source: Path) -> dict[str, Any]:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise DistmnistError(f"{source}: '{key}' must be a JSON object")
    return value


def _optional_dict(obj: dict, key: str, source: Path) -> dict[str, Any] | None:
    return None if obj.get(key) is None else _dict(obj, key, source)


def _parse(raw: dict[str, Any], source: Path) -> TrainState:
    run_id = raw.get("run_id")
    if not (isinstance(run_id, str) and run_id):
        raise DistmnistError(f"{source}: 'run_id' must be a non-empty string")
    state = TrainState(
        run_id=run_id,
        epoch=_int(raw, "epoch", source, 1, MAX_EPOCH),
        step=_int(raw, "step", source, 0, MAX_STEP),
        data=_data(_dict(raw, "data", source), source),
        mid_epoch=_mid_epoch(_optional_dict(raw, "mid_epoch", source), source),
        progress=_progress(_dict(raw, "progress", source), source),
        random=_random(_dict(raw, "random", source), source),
        scaler=_scaler(_optional_dict(raw, "scaler", source), source),
        schedule=_optional_dict(raw, "schedule", source) or {},
        config=_dict(raw, "config", source) or {},
        config_history=_config_history(raw.get("config_history"), source),
        versions={str(k): str(v) for k, v in (_optional_dict(raw, "versions", source) or {}).items()},
        optimizer_param_groups=_param_groups(raw.get("optimizer_param_groups"), source),
    )
    _check_position(state, source)
    return state


def _data(d: dict[str, Any], source: Path) -> DataOrder:
    where = "data."
    global_batch = d.get("global_batch_size")
    limit, images = d.get("limit_train"), d.get("train_images")
    digest = d.get("digest")
    order = DataOrder(
        seed=_int(d, "seed", source, 0, 2**32 - 1, where),
        world_size=_int(d, "world_size", source, 1, 2**20, where),
        batch_size=_int(d, "batch_size", source, 1, MAX_IMAGES, where),
        global_batch_size=None if global_batch is None else _int(d, "global_batch_size", source, 1, MAX_IMAGES, where),
        train_images=None if images is None else _int(d, "train_images", source, 1, MAX_IMAGES, where),
        val_size=_int(d, "val_size", source, 0, MAX_IMAGES, where),
        limit_train=None if limit is None else _int(d, "limit_train", source, 1, MAX_IMAGES, where),
        digest=digest,
    )
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64 and
                                   all(c in "0123456789abcdef" for c in digest)):
        raise DistmnistError(f"{source}: 'data.digest' must be a SHA-256 in hex, got {digest!r}")
    if global_batch is not None and global_batch != order.batch_size * order.world_size:
        raise DistmnistError(f"{source}: 'data.global_batch_size' {global_batch} is not 'data.batch_size' "
                             f"{order.batch_size} x 'data.world_size' {order.world_size}")
    return order


def _mid_epoch(d: dict[str, Any] | None, source: Path) -> MidEpoch | None:
    if d is None:
        return None
    steps = _int(d, "steps", source, 2, MAX_STEP, "mid_epoch.")
    step = _int(d, "step", source, 1, steps - 1, "mid_epoch.")  # step 0 is the epoch's start: not a position
    seconds = d.get("train_seconds", 0.0)
    if not (_is_number(seconds) and 0 <= seconds <= MAX_SECONDS):
        raise DistmnistError(f"{source}: 'mid_epoch.train_seconds' must be a number of seconds >= 0, got {seconds!r}")
    return MidEpoch(step, steps, float(seconds))


def _random(d: dict[str, Any], source: Path) -> RandomInfo:
    device, dropout = d.get("device"), d.get("dropout")
    if device not in ("cpu", "cuda") or not isinstance(dropout, bool):
        raise DistmnistError(f"{source}: 'random' must name the device ('cpu' or 'cuda') and whether a dropout "
                             "generator is saved (true or false)")
    return RandomInfo(device, dropout)


def _scaler(d: dict[str, Any] | None, source: Path) -> dict[str, Any] | None:
    if d is None:
        return None
    scale, tracker = d.get("scale"), d.get("_growth_tracker")
    if not (_is_number(scale) and scale > 0 and _is_int(tracker) and tracker >= 0):
        raise DistmnistError(f"{source}: 'scaler' must hold a finite scale > 0 and a growth tracker >= 0 (a "
                             "GradScaler's state)")
    return d


def _progress(d: dict[str, Any], source: Path) -> RunProgress:
    metrics = d.get("metrics")
    if not isinstance(metrics, list) or not all(isinstance(r, dict) for r in metrics):
        raise DistmnistError(f"{source}: 'progress.metrics' must be a list of epoch records")
    for i, record in enumerate(metrics):
        _check_record(record, i + 1, source)
    best = d.get("best")
    if best is not None and not (isinstance(best, dict) and _is_int(best.get("epoch")) and
                                 _is_number(best.get("val_accuracy")) and _is_number(best.get("val_loss"))):
        raise DistmnistError(f"{source}: 'progress.best' must hold the best epoch's epoch, val_accuracy and val_loss")
    early = d.get("early_stopped", False)
    if not isinstance(early, bool):
        raise DistmnistError(f"{source}: 'progress.early_stopped' must be true or false")
    return RunProgress(metrics, best, early)


def _check_record(record: dict[str, Any], number: int, source: Path) -> None:
    """An epoch's record: finite numbers, losses >= 0, counts >= 0 and correct <= counted."""
    missing = [k for k in METRIC_FIELDS if not _is_number(record.get(k))]
    if missing:
        raise DistmnistError(f"{source}: metrics record {number} lacks {', '.join(missing)} (or they are not finite "
                             "numbers)")
    negative = [k for k in METRIC_FIELDS if record[k] < 0]
    if negative:
        raise DistmnistError(f"{source}: metrics record {number}: {', '.join(negative)} must not be negative "
                             f"(a loss, a count or a time)")
    if record["test_correct"] > record["test_samples"] or record["test_accuracy"] > 1:
        raise DistmnistError(f"{source}: metrics record {number}: more test images correct than counted")
    if record["train_samples"] > MAX_IMAGES or record["test_samples"] > MAX_IMAGES:
        raise DistmnistError(f"{source}: metrics record {number}: more images than any data set holds")


def _config_history(value: Any, source: Path) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(h, dict) and isinstance(h.get("config"), dict)
                                              for h in value):
        raise DistmnistError(f"{source}: 'config_history' must be a list of {{from_epoch, from_step, config}}")
    return value


def _param_groups(value: Any, source: Path) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in value):
        raise DistmnistError(f"{source}: 'optimizer_param_groups' must be a list of groups with 'params'")
    return value


def _check_position(state: TrainState, source: Path) -> None:
    """The step agrees with the epoch and the position: the records are epochs 1, 2, ... in order, each
    ending at a later step, and the checkpoint's step is where the last one ended (plus the steps of the
    interrupted epoch)."""
    metrics = state.progress.metrics
    epochs = [int(r["epoch"]) for r in metrics]
    if epochs != list(range(1, len(metrics) + 1)):
        raise DistmnistError(f"{source}: the metrics records are epochs {epochs[:5]}..., expected 1, 2, 3, ... in "
                             "order")
    steps = [0] + [int(r["step"]) for r in metrics]
    if any(b <= a for a, b in pairwise(steps)):
        raise DistmnistError(f"{source}: the metrics records' steps do not grow from epoch to epoch")
    if len(metrics) != state.epochs_done:
        raise DistmnistError(f"{source}: {len(metrics)} metrics record(s) for a checkpoint after {state.epochs_done} "
                             "finished epoch(s)")
    expected = steps[-1] + (state.mid_epoch.step if state.mid_epoch else 0)
    if state.step != expected:
        where = (f"epoch {state.epoch} step {state.mid_epoch.step}" if state.mid_epoch
                 else f"the end of epoch {state.epoch}")
        raise DistmnistError(f"{source}: 'step' {state.step:,} does not agree with its position ({where} is "
                             f"optimizer step {expected:,} by the metrics records)")
    if state.progress.best is not None and not 1 <= state.progress.best["epoch"] <= max(state.epochs_done, 1):
        raise DistmnistError(f"{source}: 'progress.best' names epoch {state.progress.best['epoch']}, which this "
                             "checkpoint has not finished")


# ---------------------------------------------------------------- format 1


def migrate_v1(raw: dict[str, Any], source: Path) -> dict[str, Any]:
    """Format 1 laid out as format 2. Its data order is described by its config (no digest: a resume
    compares the settings instead); it had no global batch, no scaler state and no dropout generator."""
    recorded = raw.get("config")
    config: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    mid = raw.get("mid_epoch")
    world = raw.get("world_size", mid.get("world_size") if isinstance(mid, dict) else 1)
    batch = mid.get("batch_size") if isinstance(mid, dict) else config.get("batch_size", 100)
    history = raw.get("config_history") or [{"from_epoch": 1, "from_step": 0, "config": config}]
    return {
        "format": FORMAT, "run_id": raw.get("run_id"), "epoch": raw.get("epoch"), "step": raw.get("step"),
        "mid_epoch": None if not isinstance(mid, dict) else {
            "step": mid.get("step"), "steps": mid.get("steps"), "train_seconds": mid.get("train_seconds", 0.0)},
        "data": {"seed": config.get("seed", 1), "world_size": world, "batch_size": batch, "global_batch_size": None,
                 "train_images": None, "val_size": config.get("val_size", 0),
                 "limit_train": config.get("limit_train"), "digest": None},
        "random": {"device": "cpu", "dropout": False},  # checkpoint.py sets "cuda" when rng.safetensors holds it
        "scaler": None, "schedule": {},
        "progress": {"metrics": raw.get("metrics"), "best": raw.get("best"),
                     "early_stopped": raw.get("early_stopped", False)},
        "config": config, "config_history": history, "versions": raw.get("versions") or {},
        "optimizer_param_groups": raw.get("optimizer_param_groups"),
    }

