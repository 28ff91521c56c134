"""The Python API: the command line's engine called from a script, a notebook or a function under
``accelerate.notebook_launcher``, returning typed results and raising distmnist's own exceptions.

    import distmnist
    result = distmnist.train(data_dir="../shared/mnist", epochs=3, output_dir="runs/py")
    result.final.test_accuracy, result.weights
    report = distmnist.evaluate(result.weights, data_dir="../shared/mnist", mistakes=8)
    distmnist.predict(result.weights, ["docs/my-digit.png"])[0].digit
    distmnist.load_run("runs/py")  # what a run wrote: under notebook_launcher, the way back to the caller

Each function is a thin layer over its command's own code: train() validates its options with
config.py (the command line's checks and messages) and runs training.run_training; evaluate() is
evaluation.evaluate_checkpoint; predict() uses prediction.py's model loading and classification.
Errors are DistmnistError (bad input), RunFailed (the run broke) and RunStopped (a signal, e.g.
interrupting the kernel: the position is saved); nothing calls sys.exit.
"""

from __future__ import annotations

import functools
import inspect
import json
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch
from PIL import Image

from . import stdio
from .args import did_you_mean
from .catalogue import BEST, CONFIG, FINAL, METRICS, SUMMARY, read_config
from .config import _coerce, request_from
from .digits import MAX_PIXELS, MNIST_SIZE, mnist_digit, quiet_pillow_bomb_warning, read_digit
from .distributed import state_reset
from .errors import DistmnistError, RunFailed, RunStopped, leave_process_group
from .evaluation import EvalReport, evaluate_checkpoint
from .prediction import Prediction, load_model
from .prediction import predict as classify
from .report import Mistake
from .training import run_training

__all__ = ["train", "evaluate", "predict", "load_run", "TrainResult", "EpochRecord", "EvalReport", "Prediction",
           "Mistake", "DistmnistError", "RunFailed", "RunStopped"]


@dataclass(frozen=True)
class EpochRecord:
    """One line of metrics.jsonl: one finished epoch, global numbers (the same on every rank)."""

    epoch: int
    step: int  # optimizer steps so far
    lr: float
    train_loss: float
    train_samples: int
    train_seconds: float  # wall time of the training part of the epoch
    train_samples_per_second: float
    capture_seconds: float  # CUDA-graph capture, inside train_seconds
    eval_seconds: float
    test_loss: float
    test_accuracy: float  # a fraction
    test_correct: int
    test_samples: int  # test images counted, each once whatever the world size
    world_size: int
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they are

    @classmethod
    def from_dict(cls, record: dict[str, Any], source: str = "metrics record") -> EpochRecord:
        names = [f.name for f in fields(cls) if f.name != "extra"]
        missing = [name for name in names if name not in record]
        if missing:
            raise DistmnistError(f"{source}: missing {', '.join(missing)}")
        return cls(**{name: record[name] for name in names},
                   extra={k: v for k, v in record.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        """The record as metrics.jsonl holds it."""
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}, **self.extra}


@dataclass
class TrainResult:
    """A training run: what distmnist.train() returns and distmnist.load_run() reads back."""

    run_id: str
    output_dir: Path
    config: dict[str, Any]  # the resolved config (defaults < config file < options), as config.json holds it
    history: list[EpochRecord]  # every finished epoch, resumed ones included
    weights: Path | None  # OUTPUT_DIR/model.safetensors, the last epoch's; None while the run has not finished
    best: Path | None  # OUTPUT_DIR/best.safetensors, the best epoch's by validation accuracy (val_size > 0)
    finished: bool  # trained to its `epochs` (or stopped early, early_stop) and wrote its final weights

    @property
    def final(self) -> EpochRecord | None:
        return self.history[-1] if self.history else None


P = ParamSpec("P")
R = TypeVar("R")


def checked(function: Callable[P, R]) -> Callable[P, R]:
    """The API's argument check: a wrong call (an unknown keyword, a missing or extra argument) is a
    DistmnistError naming the function and what it most likely meant, as the command line does."""
    signature = inspect.signature(function)
    names = list(signature.parameters)

    @functools.wraps(function)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as err:
            unknown = [k for k in kwargs if k not in signature.parameters]
            if unknown and not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
                hint = did_you_mean(unknown[0], names)
                raise DistmnistError(f"distmnist.{function.__name__}(): unknown argument '{unknown[0]}'{hint} (its "
                                     f"arguments: {', '.join(names)})") from None
            raise DistmnistError(f"distmnist.{function.__name__}(): {err} (its arguments: {', '.join(names)})") \
                from None
        return function(*args, **kwargs)

    call.__signature__ = signature  # type: ignore[attr-defined]  # mypy knows no attributes set on a function
    return call


def path_argument(value: Any, name: str, function: str) -> str:
    """A path given to the API: a non-empty str or os.PathLike, as a str."""
    if isinstance(value, (str, os.PathLike)) and os.fspath(value):
        return os.fspath(value)
    raise DistmnistError(f"distmnist.{function}(): '{name}' must be a path (a str or os.PathLike), got "
                         f"{type(value).__name__} {value!r}")


TRAINING = threading.Lock()  # one train() at a time in a process


@contextmanager
def one_run_at_a_time() -> Iterator[None]:
    """A second train() while one runs in this process (another thread) is refused: the process group,
    Accelerate's state, the global RNG and the signal handlers belong to the whole process."""
    if not TRAINING.acquire(blocking=False):
        raise DistmnistError("distmnist.train(): another train() is running in this process; a process trains one "
                             "run at a time (its process group, random state and signal handlers are the "
                             "process's): start the other run in a process of its own")
    try:
        yield
    finally:
        TRAINING.release()


@contextmanager
def _session() -> Iterator[None]:
    """One use of the engine. On an error the process group is torn down (as the command's exit path
    does). Afterwards Accelerate's process-wide state is cleared again if this call created it, so the
    next call may choose other settings (--cpu, --mixed-precision) and a later notebook_launcher still
    finds no Accelerator in the notebook's process."""
    reset = state_reset()  # None: the state was there before this call, and stays
    fork_safe_threads()
    restore_streams = stdio.guard()  # a closed stdout (a script piped to head) stops the output, not the run
    try:
        yield
    except BaseException:
        leave_process_group()
        raise
    finally:
        restore_streams()
        if reset is not None:
            reset()


def fork_safe_threads() -> None:
    """One thread per process in a process started by fork (accelerate.notebook_launcher does that).

    A forked child whose parent had already run multi-threaded torch code (an earlier cell that
    trained) hangs in its first parallel region with more than one thread: GNU OpenMP, which torch's
    Linux builds use, is not fork-safe. Accelerate would set cores / processes threads for several CPU
    processes unless OMP_NUM_THREADS is set, hence both lines."""
    fork = getattr(multiprocessing.context, "ForkProcess", None)
    if fork is not None and isinstance(multiprocessing.current_process(), fork):
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


@checked
def train(**options: Any) -> TrainResult:
    """Train as ``python -m distmnist.train`` does, in this process and the others of its launch.

        distmnist.train(data_dir="../shared/mnist", epochs=3, output_dir="runs/py", overwrite=True)
        distmnist.train(config="configs/default.yaml", data_dir=Path("data"), resume="auto")

    Options are the flags' names in snake_case (``batch_size`` for ``--batch-size``) and ``config``
    (a YAML file, like ``--config``; the other options win over it). They are checked as the command
    line checks its flags, with the same messages, raised as DistmnistError. With ``resume``, the run
    continues its recorded recipe and only the options passed here override it, as on the command
    line. The run writes the same run folder (``output_dir``, default runs/mnist) and prints the same
    console (``progress``: auto, rich, plain or none). Under several processes (torchrun, accelerate
    launch, notebook_launcher) every process calls this and gets the same result.
    """
    request = request_from(options)
    with one_run_at_a_time(), _session():
        outcome = run_training(request)
    out = Path(request.cfg.output_dir)
    return TrainResult(
        run_id=outcome.run_id, output_dir=out, config=outcome.config,
        history=[EpochRecord.from_dict(r) for r in outcome.history], weights=out / FINAL,
        best=out / BEST if outcome.config.get("val_size") else None, finished=True,
    )


@checked
def evaluate(checkpoint: str | os.PathLike, data_dir: str | os.PathLike | None = None, *, mistakes: int = 0,
             test_batch_size: int = 1000, limit_test: int | None = None, no_download: bool = False,
             mixed_precision: str = "no", cpu: bool = False, progress: str = "none") -> EvalReport:
    """Evaluate as ``python -m distmnist.evaluate`` does; the report of its ``--output-json``.

        report = distmnist.evaluate("runs/mnist")   # a run folder: its weights and its data_dir
        report.accuracy, report.per_class_accuracy, report.confusion_matrix

    ``checkpoint``: a model.safetensors file, a checkpoint folder or a run folder. ``mistakes``: how
    many of the most confident mistakes to report, with their images (``report.mistake_images``).
    ``progress``: none prints nothing (the default here); auto, rich or plain print what the command
    prints.
    """
    source = "distmnist.evaluate()"
    checkpoint = path_argument(checkpoint, "checkpoint", "evaluate")
    data_dir = None if data_dir is None else path_argument(data_dir, "data_dir", "evaluate")
    options = {name: _coerce(name, value, source) for name, value in (
        ("test_batch_size", test_batch_size), ("limit_test", limit_test), ("no_download", no_download),
        ("mixed_precision", mixed_precision), ("cpu", cpu), ("progress", progress))}
    if isinstance(mistakes, bool) or not isinstance(mistakes, int):
        raise DistmnistError(f"{source}: 'mistakes' must be int, got {mistakes!r}")
    with _session():
        return evaluate_checkpoint(checkpoint, data_dir, mistakes=mistakes, **options)


Images = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


@checked
def predict(checkpoint: str | os.PathLike, images: Images | Sequence[Images], *,
            max_pixels: int = MAX_PIXELS) -> list[Prediction]:
    """Classify images as ``python -m distmnist.predict`` does; one Prediction per image, in order.

        distmnist.predict("runs/mnist/model.safetensors", ["docs/my-digit.png"])[0].digit
        distmnist.predict("runs/mnist", test_images[:8])   # uint8 (n, 28, 28) MNIST digits as they are

    ``images``: image files (any size, either polarity) and PIL images, turned into MNIST digits
    like predict's; uint8 arrays or tensors of shape (28, 28), or (n, 28, 28), are taken as MNIST
    digits already (white ink on black) and used as they are. One image or a list of them.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise DistmnistError(f"distmnist.predict(): 'max_pixels' must be a whole number >= 1, got {max_pixels!r}")
    checkpoint = path_argument(checkpoint, "checkpoint", "predict")
    quiet_pillow_bomb_warning()
    fork_safe_threads()
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
        images = [images]
    elif not isinstance(images, (list, tuple)):
        raise DistmnistError(f"distmnist.predict(): 'images' must be an image (a file name, a PIL image, a uint8 "
                             f"array of 28 x 28 digits) or a list of them, got {type(images).__name__} {images!r}")
    model = load_model(checkpoint)
    digits, names = [], []
    for i, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            digits.append(read_digit(image, max_pixels=max_pixels))
            names.append(os.fspath(image))
        elif isinstance(image, Image.Image):
            digits.append(mnist_digit(image, f"images[{i}]", max_pixels))
            names.append(f"images[{i}]")
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            batch = as_digits(image, f"images[{i}]")
            digits += list(batch)
            names += [f"images[{i}]"] if image.ndim == 2 else [f"images[{i}][{j}]" for j in range(len(batch))]
        else:
            raise DistmnistError(f"images[{i}]: a file name, a PIL image or a uint8 array of 28 x 28 digits, "
                                 f"got {type(image).__name__}")
    if not digits:
        return []
    return classify(model, torch.stack(digits), names)


def as_digits(array: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """A uint8 (28, 28) or (n, 28, 28) array of MNIST digits -> a (n, 28, 28) uint8 tensor on the CPU."""
    tensor = torch.as_tensor(np.asarray(array.detach().cpu() if isinstance(array, torch.Tensor) else array))
    shape = tuple(tensor.shape)
    if tensor.dtype != torch.uint8 or tensor.ndim not in (2, 3) or shape[-2:] != (MNIST_SIZE, MNIST_SIZE):
        raise DistmnistError(f"{name}: arrays must be uint8 MNIST digits of shape (28, 28) or (n, 28, 28) (0 = "
                             f"background, 255 = ink), got {tensor.dtype} {shape}; pass other images as PIL images")
    return tensor.reshape(-1, MNIST_SIZE, MNIST_SIZE)


@checked
def load_run(output_dir: str | os.PathLike) -> TrainResult:
    """Read what a run wrote into its folder (config.json, metrics.jsonl, model.safetensors): the
    TrainResult its train() returned, also for a run of the command line or one still training.

        notebook_launcher(work, num_processes=2)   # work() calls distmnist.train(output_dir="runs/two")
        distmnist.load_run("runs/two").history
    """
    path = Path(path_argument(output_dir, "output_dir", "load_run"))
    if path.exists() and not path.is_dir():
        raise DistmnistError(f"distmnist.load_run(): {path} is a file, not a run folder: give the run's --output-dir")
    if not path.is_dir():
        raise DistmnistError(f"distmnist.load_run(): no such folder: {path}")
    config = read_config(path)
    if config is None or not isinstance(config.get("run_id"), str):
        raise DistmnistError(f"{path}: no readable {CONFIG} with a run id; is it a distmnist run's --output-dir?")
    run_id = config.pop("run_id")
    history = []
    metrics = path / METRICS
    lines = metrics.read_text().splitlines() if metrics.is_file() else []  # none yet: the first epoch is running
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError as err:
            raise DistmnistError(f"{metrics}:{number}: not valid JSON ({err})") from None
        if not isinstance(record, dict):
            raise DistmnistError(f"{metrics}:{number}: not a record (a JSON object)")
        history.append(EpochRecord.from_dict(record, f"{metrics}:{number}"))
    weights = path / FINAL if (path / FINAL).is_file() else None
    # finished: run.json (written with the final weights) ends where metrics.jsonl ends, at --epochs or
    # stopped early; a run resumed for more epochs has rewritten config.json and is not finished yet
    summary = read_json(path / SUMMARY)
    finished = (weights is not None and bool(history) and summary.get("final") == history[-1].to_dict()
                and (history[-1].epoch >= config.get("epochs", 0) or summary.get("early_stopped") is True))
    return TrainResult(run_id=run_id, output_dir=path, config=config, history=history, weights=weights,
                       best=path / BEST if (path / BEST).is_file() else None, finished=finished)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; {} when it is missing or not one."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
