"""Evaluate saved weights on the MNIST test set, on one process or many, each image counted once.

    python -m distmnist.evaluate --checkpoint runs/mnist/model.safetensors --data-dir ../shared/mnist
    python -m distmnist.evaluate --checkpoint runs/mnist          # a run folder: its weights and its data
    torchrun --nproc_per_node 2 -m distmnist.evaluate --checkpoint runs/mnist/checkpoints/epoch-0010
    distmnist evaluate --checkpoint runs/mnist/model.safetensors --mistakes mistakes.png

Besides loss and accuracy it reports per-class accuracy and the confusion matrix (each rank counts
its own shard, one reduce sums them) and, with --mistakes, a grid of the most confident mistakes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch
from rich.console import Console as RichConsole

from .args import ArgumentParser
from .config import TrainConfig
from .console import Console, resolve_mode
from .data import eval_batches, eval_shard, load_data
from .distributed import agree, make_accelerator, shutdown
from .engine import Engine
from .errors import DistmnistError, cli
from .files import write_json
from .model import Net
from .plot import mistakes_figure, require_matplotlib, save
from .report import confusion_matrix, confusion_table, local_mistakes, per_class_accuracy, per_class_table, top_mistakes
from .rundir import is_run_folder, load_weights, read_config


def build_parser(prog: str = "distmnist evaluate") -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = ArgumentParser(prog=prog, description="Test loss and accuracy of saved weights on MNIST's test set.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a model.safetensors file, a checkpoint folder (verified against its manifest) or a run "
                   "folder (its model.safetensors, or its newest valid checkpoint) (required)")
    p.add_argument("--data-dir", metavar="DIR",
                   help=f"MNIST folder (default: the run's own when --checkpoint is a run folder, else {defaults.data_dir})")
    p.add_argument("--no-download", action="store_true", help="never download MNIST (default: False)")
    p.add_argument("--output-json", metavar="FILE", help="also write the results as JSON (default: none)")
    p.add_argument("--test-batch-size", type=int, default=defaults.test_batch_size,
                   help="test images per process per batch (default: %(default)s)")
    p.add_argument("--limit-test", type=int, metavar="N", help="only the first N test images (default: all)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="autocast precision (default: %(default)s)")
    p.add_argument("--cpu", action="store_true", help="evaluate on the CPU even if a GPU is present (default: False)")
    p.add_argument("--progress", choices=("auto", "rich", "plain", "none"), default="auto",
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


@cli
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.test_batch_size < 1:
        raise DistmnistError(f"--test-batch-size must be >= 1, got {args.test_batch_size}")
    if args.limit_test is not None and args.limit_test < 1:
        raise DistmnistError(f"--limit-test must be >= 1, got {args.limit_test}")
    if args.mistakes_count < 1:
        raise DistmnistError(f"--mistakes-count must be >= 1, got {args.mistakes_count}")
    if args.mistakes:
        require_matplotlib()  # fail before any work, on every rank
    for option in ("output_json", "mistakes"):
        target = getattr(args, option)
        if target and Path(target).is_dir():
            raise DistmnistError(f"--{option.replace('_', '-')} {target} is a folder; give a file name")
    run_folder = is_run_folder(Path(args.checkpoint))
    if args.data_dir is None:
        args.data_dir = (read_config(Path(args.checkpoint)) or {}).get("data_dir") if run_folder else None
        args.data_dir = args.data_dir or TrainConfig().data_dir
    notes: list[str] = []
    weights = load_weights(args.checkpoint, notes.append)  # every rank verifies; bad files fail before any collective
    accelerator = make_accelerator(args.cpu, args.mixed_precision)
    console = Console(resolve_mode(args.progress, accelerator.is_main_process))
    for note in notes:
        console.notice(note)
    _, test = load_data(accelerator, args.data_dir, args.no_download, limit_test=args.limit_test)

    model = Net()
    model.load_state_dict(weights)
    model = accelerator.prepare(model)
    engine = Engine(accelerator, model, optimizer=None)
    batches = eval_batches(test, accelerator.num_processes, accelerator.process_index, args.test_batch_size,
                           accelerator.device)
    result = engine.evaluate(batches, keep_outputs=True)

    # this rank's shard, counted here; one reduce sums the counts (each image counted once)
    shard = eval_shard(len(test), accelerator.num_processes, accelerator.process_index)
    labels = test.labels[shard].to(accelerator.device)
    log_probs = result.log_probs if result.log_probs is not None else torch.zeros(0, 10, device=accelerator.device)
    confusion = accelerator.reduce(confusion_matrix(labels, log_probs.argmax(dim=1)), reduction="sum").cpu()
    if args.mistakes:  # every rank offers its k most confident; k x 4 numbers per rank, no images
        mistakes = top_mistakes(accelerator.gather(local_mistakes(log_probs, labels, shard, args.mistakes_count)),
                                args.mistakes_count)
    console.print(
        f"{args.checkpoint}: test loss {result.loss:.4f}, test accuracy {100 * result.accuracy:.2f}% "
        f"({result.correct}/{result.samples}) on {accelerator.num_processes} process(es)"
    )
    show(console, per_class_table(confusion))
    show(console, confusion_table(confusion))
    error = None
    if accelerator.is_main_process:  # the only writer; a failed write ends every rank together
        try:
            if args.mistakes:
                save(mistakes_figure(test.images[[m.index for m in mistakes]], mistakes), Path(args.mistakes))
                console.print(f"wrote {args.mistakes} ({len(mistakes)} mistakes)")
            if args.output_json:
                write_json(args.output_json, {
                    "checkpoint": str(args.checkpoint),
                    "test_accuracy": result.accuracy,
                    "test_loss": result.loss,
                    "test_correct": result.correct,
                    "test_samples": result.samples,
                    "world_size": accelerator.num_processes,
                    "per_class_accuracy": per_class_accuracy(confusion),  # index = digit; null if no images
                    "confusion_matrix": confusion.tolist(),  # [true digit][predicted digit]
                    **({"mistakes": [vars(m) for m in mistakes]} if args.mistakes else {}),
                })
        except DistmnistError as err:
            error = err
        except OSError as err:
            error = DistmnistError(f"cannot write {args.mistakes}: {err.strerror or err}")
    agree(accelerator, error)
    shutdown(accelerator)
    return 0


if __name__ == "__main__":
    main()
