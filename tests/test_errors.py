"""Every failure is one line. Each input that used to end in a traceback (or eat memory) now exits 2 with
one line naming what is wrong. The cases run through the real entry points, train.main(argv) and
evaluate.main(argv), in the session's one in-process driver (one torch import instead of twenty).
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from conftest import in_process, run_in_process, write_mnist
from distmnist.checkpoint import load_checkpoint, sha256, unflatten_optimizer, write_checkpoint

BILLION_LAUGHS = textwrap.dedent(
    """
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
    i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
    epochs: *i
    """
)

def craft(src: Path, dst: Path, change) -> Path:
    """A copy of checkpoint src whose state is changed by `change` and whose manifest matches it."""
    ckpt = load_checkpoint(src)
    optimizer = unflatten_optimizer(ckpt.optimizer, ckpt.state.optimizer_param_groups)
    change(ckpt.state)
    return write_checkpoint(dst, ckpt.model, optimizer, ckpt.rng, ckpt.state)


def add_manifest_entry(folder: Path, name: str, target: Path) -> None:
    """List `name` in the manifest with the size and hash of `target`, as a forger would."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": target.stat().st_size, "sha256": sha256(target)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    work = tmp_path_factory.mktemp("errors")
    data = write_mnist(work / "mnist", n_train=100, n_test=50)
    run = work / "run"
    proc = in_process("train", "--data-dir", data, "--output-dir", run, "--epochs", "1", "--batch-size", "50",
                      "--progress", "none")
    assert proc.returncode == 0, proc.stderr
    good = run / "checkpoints" / "epoch-0001"

    (work / "latin1.yaml").write_bytes("epochs: 2  # größer\n".encode("latin-1"))
    (work / "laughs.yaml").write_text(BILLION_LAUGHS)
    (work / "twice.yaml").write_text("epochs: 2\nlr: 0.1\nepochs: 3\n")
    (work / "a-file").write_text("not a folder")
    (work / "link").symlink_to(good)
    craft(good, work / "no-field" / "epoch-0001", lambda s: s.progress.metrics[0].pop("test_loss"))
    escape = shutil.copytree(good, work / "escape")
    (work / "x").write_text("outside")
    add_manifest_entry(escape, "../../x", work / "x")
    absolute = shutil.copytree(good, work / "absolute")
    add_manifest_entry(absolute, "/etc/hostname", Path("/etc/hostname"))
    linked = shutil.copytree(good, work / "linked")
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(good / "model.safetensors")
    (work / "a-folder").mkdir()

    base = ["--data-dir", str(data), "--no-download", "--progress", "none", "--epochs", "2"]
    out = str(work / "out")
    table = {
        "non-utf8-config": ("train", ["--config", str(work / "latin1.yaml"), *base, "--output-dir", out], {},
                            ["latin1.yaml", "not UTF-8"]),
        "billion-laughs": ("train", ["--config", str(work / "laughs.yaml"), *base, "--output-dir", out], {},
                           ["laughs.yaml", "YAML aliases"]),
        "duplicate-key": ("train", ["--config", str(work / "twice.yaml"), *base, "--output-dir", out], {},
                          ["twice.yaml", "duplicate key 'epochs'", "line 3"]),
        "dist-timeout-inf": ("train", [*base, "--output-dir", out, "--dist-timeout", "inf"], {}, ["--dist-timeout"]),
        "seed-2**64-1": ("train", [*base, "--output-dir", out, "--seed", str(2**64 - 1)], {}, ["--seed", "4294967295"]),
        "world-size-abc": ("train", [*base, "--output-dir", out], {"WORLD_SIZE": "abc"}, ["WORLD_SIZE='abc'"]),
        "output-dir-is-a-file": ("train", [*base, "--output-dir", str(work / "a-file")], {},
                                 [str(work / "a-file"), "is a file"]),
        "output-dir-under-a-file": ("train", [*base, "--output-dir", str(work / "a-file" / "run")], {},
                                    [str(work / "a-file"), "which is a file"]),
        "symlinked-checkpoint": ("train", [*base, "--output-dir", out, "--resume", str(work / "link")], {},
                                 [str(work / "link"), "symlink"]),
        "metrics-lack-a-field": ("train", [*base, "--output-dir", out, "--resume",
                                           str(work / "no-field" / "epoch-0001")], {},
                                 ["state.json", "lacks test_loss"]),
        "manifest-escapes": ("train", [*base, "--output-dir", out, "--resume", str(escape)], {},
                             [str(escape / "manifest.json"), "'../../x'", "not a plain file name"]),
        "manifest-absolute": ("evaluate", ["--checkpoint", str(absolute), "--data-dir", str(data)], {},
                              ["'/etc/hostname'", "not a plain file name"]),
        "symlinked-weights": ("evaluate", ["--checkpoint", str(linked), "--data-dir", str(data)], {},
                              [str(linked / "model.safetensors"), "symlink"]),
        "output-json-folder": ("evaluate", ["--checkpoint", str(run), "--output-json", str(work / "a-folder")], {},
                               [str(work / "a-folder"), "is a folder"]),
    }
    argv = {name: (command, args, environ) for name, (command, args, environ, _) in table.items()}
    return run_in_process(argv), {name: words for name, (*_, words) in table.items()}, work


CASE_NAMES = ["non-utf8-config", "billion-laughs", "duplicate-key", "dist-timeout-inf", "seed-2**64-1",
              "world-size-abc", "output-dir-is-a-file", "output-dir-under-a-file", "symlinked-checkpoint",
              "metrics-lack-a-field", "manifest-escapes", "manifest-absolute", "symlinked-weights",
              "output-json-folder"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_each_former_traceback_is_one_line_and_exit_2(cases, case):
    results, words, _ = cases
    got = results[case]
    assert got["code"] == 2, got["stderr"]
    assert got["stderr"].startswith("distmnist: error: ") and got["stderr"].count("\n") == 1, got["stderr"]
    for word in words[case]:
        assert word in got["stderr"], (word, got["stderr"])


def test_nothing_outside_a_checkpoint_is_read_through_its_manifest(cases):
    *_, work = cases
    assert (work / "x").read_text() == "outside"
    assert not (work / "out" / "checkpoints").exists()  # no case got as far as training
