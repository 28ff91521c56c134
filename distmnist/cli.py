"""The ``distmnist`` command: one subcommand per module (``distmnist train ...`` = ``python -m distmnist.train ...``).

    distmnist train --data-dir ../shared/mnist --epochs 3
    distmnist evaluate --checkpoint runs/mnist/model.safetensors --mistakes mistakes.png
    distmnist plot runs/mnist
    distmnist predict --checkpoint runs/mnist/model.safetensors my-digit.png
    distmnist bench --data-dir ../shared/mnist

Each subcommand's module is imported only when it runs, so ``distmnist predict`` does not pay for
what ``train`` imports. Several processes: ``accelerate launch -m distmnist.train`` or ``torchrun``.
"""

from __future__ import annotations

import importlib
import sys

from . import __version__
from .args import did_you_mean
from .errors import import_command

COMMANDS = {
    "train": "train the CNN (same flags as python -m distmnist.train)",
    "evaluate": "test loss, accuracy, per-class accuracy, confusion matrix, most confident mistakes",
    "predict": "classify your own images of digits (PNG, JPEG, any size)",
    "plot": "PNG plots of a run: loss, accuracy, images/s per epoch, first-layer kernels",
    "serve": "web pages: draw a digit and see the model's answer live; watch a run's curves while it trains",
    "bench": "time the tutorial's pipeline against distmnist's on this machine",
}


MODULES = {"train": "distmnist.training", "evaluate": "distmnist.evaluation", "predict": "distmnist.prediction",
           "serve": "distmnist.serve.command"}  # where a command's code lives (the others: distmnist.COMMAND)


def usage() -> str:
    lines = ["usage: distmnist {" + ",".join(COMMANDS) + "} [flags]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    lines += ["", "distmnist COMMAND --help lists the command's flags with their defaults."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    own_process = argv is None  # the `distmnist` script: the command ends the process (errors.cli)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        print(f"distmnist {__version__}")
        return 0
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] not in COMMANDS:
        hint = did_you_mean(argv[0], COMMANDS)
        if not hint and argv[0].startswith("-"):
            hint = f"; flags follow a command, as in: distmnist train {argv[0]}"
        print(f"distmnist: error: unknown command {argv[0]!r}{hint} (commands: {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    name = MODULES.get(argv[0], f"distmnist.{argv[0]}")
    module = import_command(name) if own_process else importlib.import_module(name)
    return module.main(argv[1:], own_process=own_process)


if __name__ == "__main__":
    raise SystemExit(main())
