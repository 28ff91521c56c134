"""The docs: the generated flags page matches the parsers, the README stays a front door with the quick
start CI runs, and every relative link of the README and the docs pages leads somewhere."""

from __future__ import annotations

import argparse
import re
import unicodedata
from itertools import zip_longest
from pathlib import Path

import pytest
import yaml

from distmnist import config, reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
FLAGS_PAGE = DOCS / "reference" / "flags.md"
REGENERATE = "python -m distmnist.reference > docs/reference/flags.md"
TRAIN_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m distmnist.train"


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def test_flags_page_is_what_the_parsers_generate():
    committed = FLAGS_PAGE.read_text(encoding="utf-8")
    generated = reference.flags_page()
    if committed != generated:
        differing = [f"  page: {a!r}\n  parsers: {b!r}"
                     for a, b in zip_longest(committed.splitlines(), generated.splitlines()) if a != b][:3]
        pytest.fail(f"docs/reference/flags.md and the parsers differ; regenerate it: {REGENERATE}\n"
                    + "\n".join(differing))


def test_flags_page_has_a_row_for_every_flag_of_every_command():
    page = FLAGS_PAGE.read_text(encoding="utf-8")
    sections = {m.group(1): m.group(2) for m in re.finditer(r"(?ms)^## distmnist (\w+)\n(.*?)(?=^## |\Z)", page)}
    assert list(sections) == ["train", "evaluate", "predict", "plot", "serve", "bench"]
    for name, parser in reference.parsers():
        rows = re.findall(r"(?m)^\| `(--[\w-]+)", sections[name])
        hidden = {s for a in parser._actions if a.help == argparse.SUPPRESS for s in a.option_strings}
        assert sorted(rows) == sorted(set(parser.flags()) - hidden - {"--help"}), name
    train_keys = re.findall(r"(?m)^\| `--[\w-]+[^|]*\| `(\w+)` \|", sections["train"])
    assert train_keys == list(config.FIELDS)


def test_a_new_flag_appears_on_the_regenerated_page(monkeypatch):
    build = config.build_parser

    def with_new_flag(prog: str = "distmnist train"):
        parser = build(prog)
        parser.add_argument("--brand-new", type=int, metavar="N", help="a flag added later (default: 7)")
        return parser

    monkeypatch.setattr(config, "build_parser", with_new_flag)
    page = reference.flags_page()
    assert "| `--brand-new N` |  | `7` | a flag added later |" in page
    assert page != FLAGS_PAGE.read_text(encoding="utf-8")


def test_defaults_that_depend_on_the_machine_are_not_written_into_the_page():
    page = FLAGS_PAGE.read_text(encoding="utf-8")
    assert "| `--workers N` | the number of CPUs | threads decoding and classifying at once |" in page


def test_readme_is_one_screen_with_the_quick_start_commands_verbatim():
    text = README.read_text(encoding="utf-8")
    lines = len(text.splitlines())
    assert lines <= 200, f"README.md has {lines} lines: it is the front door, the manual lives in docs/"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = re.search(r"^TEST_COMMAND='(.*)'$", ci, flags=re.M).group(1)
    assert test_command in text
    assert TRAIN_COMMAND in text
    assert "--data-dir" in text and ".[all]" in text


def test_every_page_is_in_the_site_navigation():
    def entries(nav) -> list[str]:
        if isinstance(nav, str):
            return [nav]
        if isinstance(nav, dict):
            return [e for value in nav.values() for e in entries(value)]
        return [e for item in nav for e in entries(item)]

    nav = entries(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])
    assert sorted(nav) == sorted(p.relative_to(DOCS).as_posix() for p in pages())


def slug(heading: str) -> str:
    """The anchor of a heading, as Python-Markdown's toc (the site) and, for plain headings, GitHub make it."""
    text = re.sub(r"[`*]", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def prose(path: Path) -> str:
    """The file without its code blocks and code spans, where link-like text is not a link."""
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text(encoding="utf-8"))
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text(encoding="utf-8"))  # no headings inside code blocks
    return {slug(h) for h in re.findall(r"(?m)^#{1,6} (.+)$", text)}


def links(path: Path) -> list[str]:
    text = prose(path)
    return (re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"<(?:img|a)\b[^>]*?(?:src|href)=\"([^\"]+)\"", text))


@pytest.mark.parametrize("path", [README, *pages()], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_an_existing_file_and_heading(path):
    checked = 0
    for target in links(path):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.relative_to(ROOT)}: {target} points at a missing file"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{path.relative_to(ROOT)}: {target}: no such heading in {linked.name}"
        checked += 1
    if path != FLAGS_PAGE:
        assert checked, f"{path.relative_to(ROOT)} links to nothing: is the link pattern still right?"


def test_the_link_check_catches_a_broken_link_and_a_broken_anchor(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    page.write_text("[ok](other.md#a-section) [gone](missing.md) ![pic](gone.png) [bad](other.md#nope)\n"
                    "`[in code](nowhere.md)`\n")
    found = links(page)
    assert found == ["other.md#a-section", "missing.md", "gone.png", "other.md#nope"]
    assert "a-section" in anchors(tmp_path / "other.md") and "nope" not in anchors(tmp_path / "other.md")
