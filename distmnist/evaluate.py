"""Evaluate saved weights on the MNIST test set, on one process or many, each image counted once.

    python -m distmnist.evaluate --checkpoint runs/mnist/model.safetensors --data-dir ../shared/mnist
    torchrun --nproc_per_node 2 -m distmnist.evaluate --checkpoint runs/mnist/checkpoints/epoch-0010
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from .checkpoint import load_weights
from .config import TrainConfig
from .console import Console, resolve_mode
from .data import eval_batches
from .distributed import make_accelerator
from .engine import Engine
from .errors import DistmnistError, cli
from .model import Net
from .train import load_data


def build_parser(prog: str = "distmnist evaluate") -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog=prog, description="Test loss and accuracy of saved weights on MNIST's test set.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a model.safetensors file or a checkpoint folder (verified against its manifest)")
    p.add_argument("--data-dir", default=defaults.data_dir, metavar="DIR", help="MNIST folder (default: %(default)s)")
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
    return p


@cli
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.test_batch_size < 1:
        raise DistmnistError(f"--test-batch-size must be >= 1, got {args.test_batch_size}")
    if args.limit_test is not None and args.limit_test < 1:
        raise DistmnistError(f"--limit-test must be >= 1, got {args.limit_test}")
    weights = load_weights(args.checkpoint)  # every rank verifies; bad files fail before any collective
    accelerator = make_accelerator(args.cpu, args.mixed_precision)
    console = Console(resolve_mode(args.progress, accelerator.is_main_process))
    cfg = TrainConfig(data_dir=args.data_dir, no_download=args.no_download, limit_test=args.limit_test)
    _, test = load_data(cfg, accelerator)

    model = Net()
    model.load_state_dict(weights)
    model = accelerator.prepare(model)
    engine = Engine(accelerator, model, optimizer=None)
    batches = eval_batches(test, accelerator.num_processes, accelerator.process_index, args.test_batch_size,
                           accelerator.device)
    result = engine.evaluate(batches)
    console.print(
        f"{args.checkpoint}: test loss {result.loss:.4f}, test accuracy {100 * result.accuracy:.2f}% "
        f"({result.correct}/{result.samples}) on {accelerator.num_processes} process(es)"
    )
    if accelerator.is_main_process and args.output_json:
        Path(args.output_json).write_text(json.dumps({
            "checkpoint": str(args.checkpoint),
            "test_accuracy": result.accuracy,
            "test_loss": result.loss,
            "test_correct": result.correct,
            "test_samples": result.samples,
            "world_size": accelerator.num_processes,
        }, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    main()
