"""The flags reference page of the docs (docs/reference/flags.md), generated from every command's own parser.

    python -m distmnist.reference > docs/reference/flags.md      # after adding or changing a flag

tests/test_docs.py compares the committed page with this output, so a flag added to a parser and
not to the page (or the other way round) fails the tests until the page is regenerated.
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .cli import COMMANDS


@dataclass(frozen=True)
class FlagRow:
    """One row of a command's table: what --help says about one argument, split into its columns."""

    flag: str  # as typed: `--lr-schedule {constant,step,cosine,onecycle}`, `IMAGE ...`
    default: str  # '' for a required flag or a positional argument
    meaning: str
    config_key: str = ""  # train only: the key of a --config YAML file


# the trailing "(default: ...)" or "(required)" of a help text, which becomes the default column
DEFAULT_NOTE = re.compile(r"\s*\((?:default: (?P<default>.*)|(?P<required>required))\)$")
SHOWN = {"None": "none", "False": "off"}  # argparse's spelling of "not set" as the page spells it


def parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command's parser, in the order of `distmnist --help` (imported here: torch comes with some)."""
    modules = {"serve": "distmnist.serve.command", "train": "distmnist.config", "evaluate": "distmnist.evaluation",
               "predict": "distmnist.prediction"}
    out = []
    for name in COMMANDS:
        build: Callable[[], argparse.ArgumentParser] = importlib.import_module(
            modules.get(name, f"distmnist.{name}")).build_parser
        out.append((name, build()))
    return out


def flag_spelling(action: argparse.Action) -> str:
    if not action.option_strings:  # a positional argument
        name = action.metavar or action.dest
        return f"{name} ..." if action.nargs in ("+", "*") else str(name)
    name = max(action.option_strings, key=len)
    if action.nargs == 0:  # store_true
        return name
    if action.metavar:
        return f"{name} {action.metavar}"
    if action.choices:
        return f"{name} {{{','.join(map(str, action.choices))}}}"
    return f"{name} {action.dest.upper()}"


def expand(text: str, action: argparse.Action, prog: str) -> str:
    """argparse's own %-expansion of a help text (`%(default)s`, `%(prog)s`)."""
    return text % {**vars(action), "prog": prog}


def row(action: argparse.Action, prog: str, config_keys: Iterable[str]) -> FlagRow:
    """Split a help text into meaning and default. A default that is prose with the value appended
    ("the number of CPUs, %(default)s") keeps the prose only: the value depends on the machine."""
    raw = action.help or ""
    note = DEFAULT_NOTE.search(raw)
    meaning = expand(raw[: note.start()] if note else raw, action, prog)
    default = ""
    if note and note.group("default") is not None:
        text = note.group("default")
        if text != "%(default)s":
            text = re.sub(r",?\s*%\(default\)s", "", text)
        default = expand(text, action, prog)
        default = SHOWN.get(default, default)
        if " " not in default:
            default = f"`{default}`"
    key = action.dest if action.option_strings and action.dest in set(config_keys) else ""
    return FlagRow(flag=flag_spelling(action), default=default, meaning=meaning, config_key=key)


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def command_section(name: str, parser: argparse.ArgumentParser, config_keys: Iterable[str]) -> list[str]:
    keys = list(config_keys)
    rows = [row(action, parser.prog, keys) for action in parser._actions
            if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)]
    module = "distmnist.serve" if name == "serve" else f"distmnist.{name}"
    lines = [f"## distmnist {name}", "", f"`distmnist {name} --help`, also `python -m {module}`: "
             f"{cell(parser.description or COMMANDS[name])}", ""]
    if keys:
        lines += ["| flag | config key | default | meaning |", "| --- | --- | --- | --- |"]
        lines += [f"| `{cell(r.flag)}` | {f'`{r.config_key}`' if r.config_key else ''} | {cell(r.default)} | "
                  f"{cell(r.meaning)} |" for r in rows]
    else:
        lines += ["| flag | default | meaning |", "| --- | --- | --- |"]
        lines += [f"| `{cell(r.flag)}` | {cell(r.default)} | {cell(r.meaning)} |" for r in rows]
    return lines + [""]


def flags_page() -> str:
    """The whole page, Markdown, ending in one newline."""
    from .config import FIELDS

    lines = [
        "# Flags",
        "",
        "<!-- Generated from the commands' parsers by `python -m distmnist.reference > docs/reference/flags.md`;",
        "     edit the parsers, not this page (tests/test_docs.py fails when the two differ). -->",
        "",
        "Every command's flags, as its `--help` lists them. Flags are not abbreviated: a mistyped one is",
        "refused in one line with the flag it most likely meant (`--data_dir` → `--data-dir`, `--epoch` →",
        "`--epochs`); so are mistyped commands (`distmnist trian` → `train`), choices (`--lr-schedule cosin`)",
        "and config keys. A train flag's config key is its name in snake_case, for a",
        "[`--config` file](config.md).",
        "",
        "| command | what it does |",
        "| --- | --- |",
        *[f"| `distmnist {name}` | {cell(text)} |" for name, text in COMMANDS.items()],
        "",
    ]
    for name, parser in parsers():
        lines += command_section(name, parser, FIELDS if name == "train" else ())
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> int:
    print(flags_page(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
