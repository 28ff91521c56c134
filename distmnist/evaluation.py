"""Evaluate saved weights on the MNIST test set, on one process or many, each image counted once.

    python -m distmnist.evaluate --checkpoint runs/mnist/model.safetensors --data-dir ../shared/mnist
    python -m distmnist.evaluate --checkpoint runs/mnist          # a run folder: its weights and its data
    torchrun --nproc_per_node 2 -m distmnist.evaluate --checkpoint runs/mnist/checkpoints/epoch-0010
    distmnist evaluate --checkpoint runs/mnist/model.safetensors --mistakes mistakes.png

Besides loss and accuracy it reports per-class accuracy and the confusion matrix (each rank counts
its own shard, one reduce sums them) and, with --mistakes, a grid of the most confident mistakes.
From Python, ``distmnist.evaluate(checkpoint, ...)`` returns the same numbers as an EvalReport
(evaluate_checkpoint; distmnist.api).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console as RichConsole

from .args import ArgumentParser
from .batches import eval_batches, eval_shard
from .catalogue import is_run_folder, load_weights, read_config
from .config import TrainConfig
from .console import Console, resolve_mode
from .data import load_data
from .distributed import agree, make_accelerator, shutdown
from .engine import Engine
from .errors import DistmnistError, cli
from .files import check_file, write_json
from .model import Net
from .plot import mistakes_figure, require_matplotlib, save
from .report import (
    Mistake,
    confusion_matrix,
    confusion_table,
    local_mistakes,
    per_class_accuracy,
    per_class_table,
    top_mistakes,
)

PRECISIONS = ("no", "fp16", "bf16")
PROGRESS = ("auto", "rich", "plain", "none")


def build_parser(prog: str = "distmnist evaluate") -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = ArgumentParser(prog=prog, description="Test loss and accuracy of saved weights on MNIST's test set.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a model.safetensors file, a checkpoint folder (verified against its manifest) or a run "
                   "folder (its model.safetensors, or its newest valid checkpoint) (required)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="MNIST folder (default: the run's own when --checkpoint is a run folder, else "
                        f"{defaults.data_dir})")
    p.add_argument("--no-download", action="store_true", help="never download MNIST (default: False)")
    p.add_argument("--output-json", metavar="FILE", help="also write the results as JSON (default: none)")
    p.add_argument("--test-batch-size", type=int, default=defaults.test_batch_size,
                   help="test images per process per batch (default: %(default)s)")
    p.add_argument("--limit-test", type=int, metavar="N", help="only the first N test images (default: all)")
    p.add_argument("--mixed-precision", choices=PRECISIONS, default="no",
                   help="autocast precision (default: %(default)s)")
    p.add_argument("--cpu", action="store_true", help="evaluate on the CPU even if a GPU is present (default: False)")
    p.add_argument("--progress", choices=PROGRESS, default="auto",
                   help="console output (default: %(default)s)")
    p.add_argument("--mistakes", metavar="FILE.png",
                   help="save a grid of the most confident mistakes with true and predicted digits (needs "
                   'matplotlib: pip install "distmnist[plot]") (default: none)')
    p.add_argument("--mistakes-count", type=int, default=25, metavar="N",
                   help="how many mistakes the grid shows (default: %(default)s)")
    return p


def show(console: Console, table) -> None:
    """A rich table on the terminal; the same table as plain text where there is none."""
    if console.rich is not None:
        console.rich.print(table)
    elif console.enabled:
        RichConsole(highlight=False, width=100).print(table)


@dataclass
class EvalReport:
    """What an evaluation measured; ``to_dict()`` is the JSON of ``--output-json``."""

    checkpoint: str
    loss: float  # mean NLL over the test images
    accuracy: float  # a fraction
    correct: int
    samples: int  # test images counted, each exactly once whatever the world size
    world_size: int
    per_class_accuracy: list[float | None]  # index = digit; None for a digit without test images
    confusion_matrix: list[list[int]]  # [true digit][predicted digit]
    mistakes: list[Mistake] | None = None  # the most confident mistakes, when asked for
    mistake_images: torch.Tensor | None = field(default=None, repr=False, compare=False)  # uint8 (n, 28, 28)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "test_accuracy": self.accuracy,
            "test_loss": self.loss,
            "test_correct": self.correct,
            "test_samples": self.samples,
            "world_size": self.world_size,
            "per_class_accuracy": self.per_class_accuracy,
            "confusion_matrix": self.confusion_matrix,
            **({"mistakes": [vars(m) for m in self.mistakes]} if self.mistakes is not None else {}),
        }


def check_options(test_batch_size: int, limit_test: int | None, mistakes: int, mixed_precision: str,
                  progress: str) -> None:
    """Every option's range, named by its flag, before any work."""
    if test_batch_size < 1:
        raise DistmnistError(f"--test-batch-size must be >= 1, got {test_batch_size}")
    if limit_test is not None and limit_test < 1:
        raise DistmnistError(f"--limit-test must be >= 1, got {limit_test}")
    if mistakes < 0:
        raise DistmnistError(f"mistakes must be >= 0 (0: none), got {mistakes}")
    for flag, value, choices in (("mixed-precision", mixed_precision, PRECISIONS), ("progress", progress, PROGRESS)):
        if value not in choices:
            raise DistmnistError(f"--{flag} must be one of {', '.join(choices)}, got {value!r}")


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path | None = None, *, no_download: bool = False,
                        test_batch_size: int = 1000, limit_test: int | None = None, mixed_precision: str = "no",
                        cpu: bool = False, progress: str = "auto", mistakes: int = 0,
                        on_main: Callable[[EvalReport, Console], None] | None = None) -> EvalReport:
    """Evaluate weights on the test set on every rank of the launch; the report, the same on every rank.

    ``mistakes``: how many of the most confident mistakes to report (0: none). ``on_main``: called on
    the main process with the report and the console before the ranks part (what the command writes;
    its DistmnistError ends every rank together)."""
    check_options(test_batch_size, limit_test, mistakes, mixed_precision, progress)
    if data_dir is None:
        data_dir = (read_config(Path(checkpoint)) or {}).get("data_dir") if is_run_folder(Path(checkpoint)) else None
        data_dir = data_dir or TrainConfig().data_dir
    notes: list[str] = []
    weights = load_weights(checkpoint, notes.append)  # every rank verifies; bad files fail before any collective
    accelerator = make_accelerator(cpu, mixed_precision)
    console = Console(resolve_mode(progress, accelerator.is_main_process))
    for note in notes:
        console.notice(note)
    _, test = load_data(accelerator, data_dir, no_download, limit_test=limit_test)
    # more than the test set holds means the whole test set (and keeps sizes within what torch indexes)
    test_batch_size, mistakes = min(test_batch_size, len(test)), min(mistakes, len(test))

    model = Net()
    model.load_state_dict(weights)
    model = accelerator.prepare(model)
    engine = Engine(accelerator, model, optimizer=None)
    batches = eval_batches(test, accelerator.num_processes, accelerator.process_index, test_batch_size,
                           accelerator.device)
    result = engine.evaluate(batches, keep_outputs=True)

    # this rank's shard, counted here; one reduce sums the counts (each image counted once)
    shard = eval_shard(len(test), accelerator.num_processes, accelerator.process_index)
    labels = test.labels[shard].to(accelerator.device)
    log_probs = result.log_probs if result.log_probs is not None else torch.zeros(0, 10, device=accelerator.device)
    confusion = accelerator.reduce(confusion_matrix(labels, log_probs.argmax(dim=1)), reduction="sum").cpu()
    worst = None
    if mistakes:  # every rank offers its k most confident; k x 4 numbers per rank, no images
        worst = top_mistakes(accelerator.gather(local_mistakes(log_probs, labels, shard, mistakes)), mistakes)
    report = EvalReport(
        checkpoint=str(checkpoint), loss=result.loss, accuracy=result.accuracy, correct=result.correct,
        samples=result.samples, world_size=accelerator.num_processes, per_class_accuracy=per_class_accuracy(confusion),
        confusion_matrix=confusion.tolist(), mistakes=worst,
        mistake_images=test.images[[m.index for m in worst]].clone() if worst is not None else None)
    console.print(
        f"{checkpoint}: test loss {result.loss:.4f}, test accuracy {100 * result.accuracy:.2f}% "
        f"({result.correct}/{result.samples}) on {accelerator.num_processes} process(es)"
    )
    show(console, per_class_table(confusion))
    show(console, confusion_table(confusion))
    error = None
    if accelerator.is_main_process and on_main is not None:  # the only writer; a failed write ends every rank
        try:
            on_main(report, console)
        except DistmnistError as err:
            error = err
    agree(accelerator, error)
    shutdown(accelerator)
    return report


@cli
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mistakes_count < 1:
        raise DistmnistError(f"--mistakes-count must be >= 1, got {args.mistakes_count}")
    if args.mistakes:
        require_matplotlib()  # fail before any work, on every rank
    check_file(args.checkpoint, "--checkpoint", folder=True,
               advice="give a model.safetensors file, a checkpoint folder or a run folder")
    for flag, target in (("--output-json", args.output_json), ("--mistakes", args.mistakes)):
        if target:  # what would be replaced, checked before the evaluation rather than after it
            check_file(target, flag, advice="give a file name")

    def write(report: EvalReport, console: Console) -> None:
        if args.mistakes:
            assert report.mistakes is not None and report.mistake_images is not None  # asked for: mistakes >= 1
            save(mistakes_figure(report.mistake_images, report.mistakes), Path(args.mistakes), "--mistakes")
            console.print(f"wrote {args.mistakes} ({len(report.mistakes)} mistakes)")
        if args.output_json:
            write_json(args.output_json, report.to_dict(), "--output-json")

    evaluate_checkpoint(args.checkpoint, args.data_dir, no_download=args.no_download,
                        test_batch_size=args.test_batch_size, limit_test=args.limit_test,
                        mixed_precision=args.mixed_precision, cpu=args.cpu, progress=args.progress,
                        mistakes=args.mistakes_count if args.mistakes else 0, on_main=write)
    return 0
