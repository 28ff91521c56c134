"""A crash during a save never costs the previous checkpoint, and no bad file is ever trusted.

Faults are injected from outside the tool: a driver script replaces ``safetensors`` writes (or
``shutil.rmtree``) with versions that SIGKILL the process half-way, and the checkpoint files are
truncated, bit-flipped, re-crafted (with a manifest that matches, so the deeper checks are reached)
or joined by a pickle whose unpickling would create a marker file.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import ROOT, checkpoint_state, env, run_in_process, run_module, write_mnist
from distmnist.catalogue import scan
from distmnist.checkpoint import load_checkpoint, load_weights, read_tensors, sha256, verify, write_checkpoint
from distmnist.errors import DistmnistError
from distmnist.model import Net

FAST = ("--progress", "plain", "--batch-size", "50")


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--output-dir", str(out), *FAST, *extra]


def weights_bytes(out: Path) -> bytes:
    return (out / "model.safetensors").read_bytes()


# ---------------------------------------------------------------- SIGKILL during a save

# Runs distmnist.train.main in this process after wrapping one function used by distmnist.checkpoint so
# that the process SIGKILLs itself in the middle of a save: nothing in distmnist knows about it.
DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    import distmnist.checkpoint as ckpt
    from distmnist.training import main

    mode, at = sys.argv[1], int(sys.argv[2])
    calls = 0

    if mode == "write_bytes":  # the at-th file of the run's checkpoints reaches the disk half-written, then death
        real_write = ckpt.write_bytes

        def write_bytes(path, data, *args, **kwargs):
            global calls
            calls += 1
            if calls == at:
                real_write(path, data[: len(data) // 2], *args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_write(path, data, *args, **kwargs)

        ckpt.write_bytes = write_bytes
    elif mode == "rmtree":  # pruning dies after deleting one file of the old checkpoint
        real_rmtree = ckpt.shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if os.path.basename(path).startswith("epoch-"):
                os.remove(os.path.join(path, "model.safetensors"))
                os.kill(os.getpid(), signal.SIGKILL)
            return real_rmtree(path, *args, **kwargs)

        ckpt.shutil.rmtree = rmtree
    main(sys.argv[3:])
    """
)


def side_by_side(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Run independent commands at the same time (two cores), each to its end."""
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, cmd in commands.items()}
    done = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(commands[name], proc.returncode, stdout, stderr)
    return done


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("safety") / "mnist", n_train=400, n_test=120)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Three 3-epoch runs side by side: one without any fault, one killed while writing epoch 2, one
    killed while pruning after epoch 2 (all with --keep-checkpoints 1 except the first)."""
    outs = {name: tmp_path_factory.mktemp(name) for name in ("trained", "died-saving", "died-pruning")}
    keep = ("--epochs", "3", "--keep-checkpoints", "1")
    results = side_by_side({
        "trained": [sys.executable, "-m", "distmnist.train", *train_args(data, outs["trained"], "--epochs", "3")],
        # write_bytes calls 1-5 write epoch 1's files (model, optimizer, rng, state, manifest); call 7 is epoch
        # 2's optimizer.safetensors
        "died-saving": [sys.executable, "-c", DRIVER, "write_bytes", "7",
                        *train_args(data, outs["died-saving"], *keep)],
        "died-pruning": [sys.executable, "-c", DRIVER, "rmtree", "0", *train_args(data, outs["died-pruning"], *keep)],
    })
    return {name: (outs[name], results[name]) for name in outs}


@pytest.fixture(scope="module")
def trained(runs) -> Path:
    """Three epochs without any fault (checkpoints epoch-0001..0003, model.safetensors): the weights a
    crashed-and-resumed run must end with, and the checkpoints the damage tests start from."""
    out, result = runs["trained"]
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_sigkill_while_writing_epoch_2_keeps_epoch_1_and_resume_auto_finishes(data, runs, trained):
    out, died = runs["died-saving"]
    assert died.returncode == -signal.SIGKILL, died.stderr

    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".tmp-epoch-0002", "epoch-0001"]
    partial = root / ".tmp-epoch-0002"
    assert not (partial / "manifest.json").exists()  # the manifest is written last: never for a partial save
    complete = (root / "epoch-0001" / "optimizer.safetensors").stat().st_size
    assert (partial / "optimizer.safetensors").stat().st_size < complete  # half-written when the process died
    # epoch 1 is intact, --keep-checkpoints 1 did not delete it before epoch 2 was complete
    verify(root / "epoch-0001")
    assert load_checkpoint(root / "epoch-0001").epoch == 1
    assert [e.path for e in scan(out)] == [root / "epoch-0001"]  # the temp folder is never a candidate

    resumed = run_module("train", *train_args(data, out, "--epochs", "3", "--keep-checkpoints", "1",
                                              "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {root / 'epoch-0001'}" in resumed.stdout
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0003"]  # partial folder cleaned, K = 1 kept
    verify(root / "epoch-0003")
    # the crash cost nothing: same weights as the run that never crashed
    assert weights_bytes(out) == weights_bytes(trained)
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


@pytest.mark.slow
def test_sigkill_while_pruning_happens_only_after_the_new_checkpoint_is_complete(data, runs, trained):
    out, died = runs["died-pruning"]
    assert died.returncode == -signal.SIGKILL, died.stderr

    root = out / "checkpoints"
    # death came while deleting epoch 1, which only starts once epoch 2 is complete and verifies
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001", "epoch-0002"]
    verify(root / "epoch-0002")
    with pytest.raises(DistmnistError, match="model.safetensors"):
        verify(root / "epoch-0001")  # half-deleted

    resumed = run_module("train", *train_args(data, out, "--epochs", "3", "--keep-checkpoints", "1",
                                              "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {root / 'epoch-0002'}" in resumed.stdout
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0003"]
    assert weights_bytes(out) == weights_bytes(trained)


def test_a_save_removes_temp_folders_left_by_crashed_saves(tmp_path):
    """Whatever epoch a crashed save was writing, the next save clears its temp folder."""
    root = tmp_path / "checkpoints"
    leftover = root / ".tmp-epoch-0007"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)  # no momentum: no state to make first
    write_checkpoint(root / "epoch-0002", net.state_dict(), optimizer.state_dict(),
                     {"cpu": torch.get_rng_state().unsqueeze(0)}, checkpoint_state(epoch=2, world=1, steps_per_epoch=5))
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0002"]
    assert load_checkpoint(root / "epoch-0002").epoch == 2


# ---------------------------------------------------------------- verified loading


class Marker:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def update_manifest(folder: Path, *names: str) -> None:
    """Make the manifest agree with the (crafted) files, so the checks beyond it are what refuses them."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in names:
        manifest["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def rewrite_tensors(folder: Path, name: str, change) -> None:
    tensors = load_file(folder / name)
    change(tensors)
    save_file(tensors, str(folder / name))
    update_manifest(folder, name)


def flip_byte(file: Path, offset: int | None = None) -> None:
    raw = bytearray(file.read_bytes())
    offset = len(raw) // 2 if offset is None else offset
    raw[offset] ^= 0x01
    file.write_bytes(bytes(raw))


def truncate(file: Path) -> None:
    os.truncate(file, file.stat().st_size // 2)


def oversized_header(file: Path) -> None:
    """A safetensors file whose 8-byte header length claims 2**62 bytes."""
    raw = file.read_bytes()
    file.write_bytes((1 << 62).to_bytes(8, "little") + raw[8:])


def huge_header(file: Path) -> None:
    """A genuine, parseable safetensors file with a 2 MiB (whitespace-padded) header."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n] + b" " * (2 << 20)
    file.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n :])


def other_architecture(t: dict) -> None:
    t["fc3.weight"] = torch.zeros(10, 10)
    del t["fc2.weight"]


def wrong_shape(t: dict) -> None:
    t["conv1.weight"] = torch.zeros(20, 1, 5, 5)


def optimizer_wrong_shape(t: dict) -> None:
    t["state.0.momentum_buffer"] = torch.zeros(3)


def wrong_dtype(t: dict) -> None:
    t.update({k: v.double() for k, v in t.items()})


def crafted(name: str, change):
    """Damage: rewrite a tensor file with `change` applied, and a manifest that matches it."""
    return lambda folder, marker: rewrite_tensors(folder, name, change)


def with_manifest(name: str, damage):
    """Damage: `damage` the file, then make the manifest match it, so the deeper check is what refuses it."""

    def apply(folder: Path, marker: Path) -> None:
        damage(folder / name, marker)
        update_manifest(folder, name)

    return apply


def on(name: str, damage):
    """Damage one file of the folder, leaving the manifest as it was."""
    return lambda folder, marker: damage(folder / name, marker)


def write_pickle(file: Path, marker: Path) -> None:
    file.write_bytes(pickle.dumps(Marker(marker)))


def break_state_json(file: Path, marker: Path) -> None:
    file.write_text(file.read_text().replace('"epoch": 1,', '"epoch": "one",', 1))


# name -> (damage(folder, marker), file the error must name, words it must contain)
CASES = {
    "truncated": (on("model.safetensors", lambda f, m: truncate(f)), "model.safetensors", "truncated"),
    "flipped_byte": (on("optimizer.safetensors", lambda f, m: flip_byte(f)), "optimizer.safetensors", "SHA-256"),
    "oversized_header": (with_manifest("model.safetensors", lambda f, m: oversized_header(f)), "model.safetensors",
                         "header"),
    "huge_header": (with_manifest("model.safetensors", lambda f, m: huge_header(f)), "model.safetensors", "header"),
    "missing_file": (on("rng.safetensors", lambda f, m: f.unlink()), "rng.safetensors", "missing"),
    "missing_manifest": (on("manifest.json", lambda f, m: f.unlink()), "manifest.json", "manifest"),
    "extra_pickle": (on("evil.pkl", write_pickle), "evil.pkl", "pickle"),
    "listed_pickle": (with_manifest("extra.pt", write_pickle), "extra.pt", "pickle"),
    "pickle_as_safetensors": (with_manifest("model.safetensors", write_pickle), "model.safetensors", "safetensors"),
    "unlisted_file": (on("notes.txt", lambda f, m: f.write_text("hi")), "notes.txt", "not listed"),
    "wrong_shape": (crafted("model.safetensors", wrong_shape), "model.safetensors", "conv1.weight"),
    "wrong_dtype": (crafted("model.safetensors", wrong_dtype), "model.safetensors", "float64"),
    "other_architecture": (crafted("model.safetensors", other_architecture), "model.safetensors", "architecture"),
    "optimizer_wrong_shape": (crafted("optimizer.safetensors", optimizer_wrong_shape), "optimizer.safetensors",
                              "momentum_buffer"),
    "rng_wrong_dtype": (crafted("rng.safetensors", lambda t: t.update({"cpu": t["cpu"].float()})), "rng.safetensors",
                        "uint8"),
    "state_json_wrong_types": (with_manifest("state.json", break_state_json), "state.json", "epoch"),
    "manifest_not_a_mapping": (on("manifest.json", lambda f, m: f.write_text('{"files": ["model.safetensors"]}')),
                               "manifest.json", "manifest"),
}


def rewrite_file(change):
    """Damage for a bare weights file: rewrite it with `change` applied."""

    def apply(file: Path) -> None:
        tensors = load_file(file)
        change(tensors)
        save_file(tensors, str(file))

    return apply


# The same for `evaluate --checkpoint FILE`: a bare model.safetensors, no manifest to lean on.
FILE_CASES = {
    "truncated": (truncate, "safetensors"),
    "oversized_header": (oversized_header, "header"),
    "huge_header": (huge_header, "header"),
    "missing": (lambda file: file.unlink(), "no such file"),
    "pickle": (None, "safetensors"),
    "wrong_shape": (rewrite_file(wrong_shape), "conv1.weight"),
    "wrong_dtype": (rewrite_file(wrong_dtype), "float64"),
    "other_architecture": (rewrite_file(other_architecture), "architecture"),
}


@pytest.fixture(scope="module")
def good(data, tmp_path_factory) -> Path:
    """A finished 1-epoch run (epoch-0001 and model.safetensors): what the damage tests start from."""
    out = tmp_path_factory.mktemp("good") / "run"
    result = run_in_process({"train": ("train", train_args(data, out, "--epochs", "1"), {})})["train"]
    assert result["code"] == 0, result["stderr"]
    return out


@pytest.fixture(scope="module")
def refused(good, data, tmp_path_factory):
    """Every damaged checkpoint through `train --resume PATH` and `evaluate --checkpoint PATH` (and an intact
    copy through both, which must be accepted), in the session's one interpreter."""
    work = tmp_path_factory.mktemp("damaged")
    marker = work / "UNPICKLED"
    source = good / "checkpoints" / "epoch-0001"
    intact = shutil.copytree(source, work / "intact")
    cases = {"train:intact": ("train", train_args(data, work / "out-intact", "--epochs", "2", "--resume", intact), {}),
             "evaluate:intact": ("evaluate", ["--checkpoint", intact, "--data-dir", data, "--progress", "none",
                                              "--output-json", work / "intact.json"], {})}
    expected = {}
    for name, (damage, file, words) in CASES.items():
        folder = work / name
        shutil.copytree(source, folder)
        damage(folder, marker)
        for command in ("train", "evaluate"):
            if command == "train":
                argv = train_args(data, work / f"out-{name}", "--epochs", "2", "--resume", str(folder))
            else:
                argv = ["--checkpoint", str(folder), "--data-dir", str(data), "--progress", "none"]
            cases[f"{command}:{name}"] = (command, argv, {})
            expected[f"{command}:{name}"] = (folder / file, words)
    for name, (damage, words) in FILE_CASES.items():
        file = work / f"file-{name}" / "model.safetensors"
        file.parent.mkdir()
        if damage is None:
            file.write_bytes(pickle.dumps(Marker(marker)))
        else:
            shutil.copy(good / "model.safetensors", file)
            damage(file)
        cases[f"evaluate-file:{name}"] = ("evaluate", ["--checkpoint", str(file), "--data-dir", str(data)], {})
        expected[f"evaluate-file:{name}"] = (file, words)
    return run_in_process(cases), expected, marker


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_an_intact_copy_is_accepted_so_the_damage_is_what_is_refused(refused, command):
    results, _, marker = refused
    got = results[f"{command}:intact"]
    assert got["code"] == 0 and "Traceback" not in got["stderr"], got["stderr"]
    if command == "train":
        assert f"resumed from {marker.parent / 'intact'}" in got["stdout"]
    else:
        assert json.loads((marker.parent / "intact.json").read_text())["test_samples"] == 120


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize("case", list(CASES))
def test_damaged_checkpoint_is_refused_naming_the_file(refused, command, case):
    results, expected, _ = refused
    got = results[f"{command}:{case}"]
    file, words = expected[f"{command}:{case}"]
    assert got["code"] == 2, got["stderr"]
    assert got["stderr"].startswith("distmnist: error: ") and got["stderr"].count("\n") == 1, got["stderr"]
    assert str(file) in got["stderr"] and words in got["stderr"], got["stderr"]


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_damaged_weights_file_is_refused_by_evaluate(refused, case):
    results, expected, _ = refused
    got = results[f"evaluate-file:{case}"]
    file, words = expected[f"evaluate-file:{case}"]
    assert got["code"] == 2, got["stderr"]
    assert got["stderr"].startswith("distmnist: error: ") and str(file) in got["stderr"] and words in got["stderr"]


def test_nothing_is_ever_unpickled(refused):
    *_, marker = refused
    assert marker.parent.is_dir() and not marker.exists()


@pytest.mark.slow
def test_resume_auto_falls_back_to_newest_valid_with_a_notice(trained, data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    root = out / "checkpoints"
    flip_byte(root / "epoch-0003" / "model.safetensors")
    truncate(root / "epoch-0002" / "rng.safetensors")
    result = run_module("train", *train_args(data, out, "--epochs", "3", "--resume", "auto"))
    assert result.returncode == 0, result.stderr
    notices = [line for line in result.stdout.splitlines() if line.startswith("notice: skipping invalid checkpoint")]
    assert len(notices) == 2, result.stdout
    assert str(root / "epoch-0003" / "model.safetensors") in notices[0] and "SHA-256" in notices[0]
    assert str(root / "epoch-0002" / "rng.safetensors") in notices[1] and "truncated" in notices[1]
    assert f"resumed from {root / 'epoch-0001'}" in result.stdout
    for epoch in (1, 2, 3):  # epochs 2 and 3 retrained and saved again, valid
        verify(root / f"epoch-{epoch:04d}")
    assert weights_bytes(out) == weights_bytes(trained)  # resumed exactly


# ---------------------------------------------------------------- fuzzed metadata: never a traceback

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
MANIFEST_KEYS = st.sampled_from(["format", "files", "model.safetensors", "state.json", "bytes", "sha256", "epoch",
                                 "step", "metrics", "optimizer_param_groups", "params"])
json_objects = st.dictionaries(MANIFEST_KEYS | st.text(max_size=6), json_values, max_size=6)


@pytest.fixture(scope="module")
def pristine(good) -> Path:
    return good / "checkpoints" / "epoch-0001"


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["manifest.json", "state.json"]), doc=json_objects | json_values, consistent=st.booleans())
def test_fuzzed_manifest_and_state_json_end_in_distmnist_error(pristine, tmp_path, which, doc, consistent):
    folder = tmp_path / "ckpt"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(pristine, folder)
    (folder / which).write_text(json.dumps(doc))
    if consistent and which == "state.json":
        update_manifest(folder, "state.json")
    try:
        load_checkpoint(folder)
    except DistmnistError as err:
        assert str(folder) in str(err)
    else:  # accepted: only if it is still what resuming needs
        raise AssertionError(f"accepted {which} = {doc!r}")


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=json_objects | json_values, tail=st.binary(max_size=64))
def test_fuzzed_safetensors_header_ends_in_distmnist_error(tmp_path, header, tail):
    file = tmp_path / "model.safetensors"
    raw = json.dumps(header).encode()
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + tail)
    try:
        weights = load_weights(file)
    except DistmnistError as err:
        assert str(file) in str(err)
    else:
        raise AssertionError(f"accepted header {header!r}: {list(weights)}")


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(["F32", "F64", "I64", "U8", "BOOL", "F16", "BF16", "F8_E4M3", "XX"]),
       shape=st.lists(st.integers(0, 2**40), max_size=4), start=st.integers(-2, 2**40), length=st.integers(-2, 2**40))
def test_fuzzed_tensor_entries_end_in_distmnist_error(tmp_path, dtype, shape, start, length):
    file = tmp_path / "t.safetensors"
    header = json.dumps({"x": {"dtype": dtype, "shape": shape, "data_offsets": [start, start + length]}}).encode()
    file.write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    try:
        read_tensors(file)
    except DistmnistError as err:
        assert str(file) in str(err)
