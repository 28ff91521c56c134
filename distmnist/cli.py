"""The ``distmnist`` command: one subcommand per module (``distmnist train ...`` = ``python -m distmnist.train ...``)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "train the CNN (same flags as python -m distmnist.train)",
    "evaluate": "test loss and accuracy of saved weights",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: distmnist {" + ",".join(COMMANDS) + "} [flags]\n")
        for name, text in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"distmnist.{argv[0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
