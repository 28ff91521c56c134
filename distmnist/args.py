"""The argument parser of every distmnist command: 'did you mean' for mistyped flags and choices,
one-line errors, and no abbreviated flags.

Abbreviations are off (argparse's allow_abbrev): `--epoch 3` would otherwise quietly mean
`--epochs 3` today and become an error the day another flag starting with `--epoch` is added;
instead it is refused with the flag it most likely meant. Flags typed in snake_case, as in the
YAML config (`--data_dir`), are matched to their kebab-case spelling.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

from .errors import EXIT_USAGE


def suggest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate `word` most likely meant, or None: same word up to case and _/-, a unique
    candidate it is the start of, or the closest by difflib."""
    candidates = list(candidates)
    key = word.lower().replace("_", "-")
    for candidate in candidates:
        if candidate.lower().replace("_", "-") == key:
            return candidate
    starts = [c for c in candidates if c.startswith(word)]
    if len(starts) == 1:
        return starts[0]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """'; did you mean X?' or '' (for the end of an error message)."""
    match = suggest(word, candidates)
    return f"; did you mean {match}?" if match else ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with suggestions; every command's build_parser makes one."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def flags(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings if s.startswith("--")]

    def parse_known_args(self, args: Iterable[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        # unknown --flags first, so that a mistyped required flag is named as such, not as missing
        args = list(sys.argv[1:] if args is None else args)
        known = set(self.flags())
        tokens = args[: args.index("--")] if "--" in args else args
        unknown = [t.split("=", 1)[0] for t in tokens if t.startswith("--") and t.split("=", 1)[0] not in known]
        if unknown:
            self.error(self.unrecognized(unknown))
        return super().parse_known_args(args, namespace)

    def unrecognized(self, names: list[str]) -> str:
        """Name each unknown flag with the flag it most likely meant."""
        parts = []
        for name in names:
            match = suggest(name, self.flags())
            parts.append(f"{name} (did you mean {match}?)" if match else name)
        return f"unrecognized argument{'s' if len(parts) > 1 else ''} {', '.join(parts)}"

    def error(self, message: str) -> NoReturn:
        """One line on stderr, exit 2 (argparse would print the whole usage first)."""
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = re.findall(r"'([^']*)'", choice.group(2))
            message += did_you_mean(choice.group(1), options)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} ({self.prog} --help lists every flag)\n")
