"""The edges of every command: each input that used to end in a traceback or a hang is one line and exit 2;
signals at any moment leave one line and the right exit code; a closed stdout or stderr stops the output,
never the run.

One-line cases that cross no process boundary run through the real entry points in one process
(conftest.run_in_process); signals and pipes are real: `python -m distmnist.train` in a process of its
own, sent real signals, its stdout a real pipe that `head` closes. The full and read-only disks are
64 KiB tmpfs mounts (root only; the cases skip, saying why, where mounting is not allowed).
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BIN, ROOT, env, idx_bytes, run_in_process, write_mnist
from distmnist.checkpoint import save_weights
from distmnist.data import read_idx
from distmnist.errors import DistmnistError
from distmnist.files import write_bytes
from distmnist.model import Net

DEADLINE_S = 30  # every case ends, with its line, within this
BOMB_BYTES = 3 << 30  # what the gzip bomb decompresses to: 3 GiB of zeros behind a valid header


# ---------------------------------------------------------------- inputs


def bomb(path: Path, n_images: int) -> Path:
    """A .gz whose IDX header (n_images x 28 x 28) is valid, followed by BOMB_BYTES of zeros, in ~3 MB:
    gzip members of 64 MiB of zeros each, one after another (gzip readers read every member)."""
    member = 64 << 20
    head = idx_bytes(np.zeros((n_images, 28, 28), np.uint8))[:16]
    zeros = gzip.compress(bytes(member), mtime=0)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(head + bytes(member - len(head)), mtime=0))
        for _ in range(BOMB_BYTES // member - 1):
            fh.write(zeros)
    return path


def run_folder(folder: Path) -> Path:
    """A finished run's files as plot and predict read them: config.json, two epochs of metrics, weights."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}\n")
    records = [{"epoch": e, "train_loss": 1.0 / e, "test_loss": 1.2 / e, "test_accuracy": 0.5 + e / 10,
                "train_samples_per_second": 1000.0} for e in (1, 2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    torch.manual_seed(0)
    save_weights(Net().state_dict(), folder / "model.safetensors")
    return folder


def tmpfs(folder: Path, *options: str) -> str | None:
    """Mount a 64 KiB tmpfs on folder; None, or why it could not be mounted."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=64k", *options)), "tmpfs", str(folder)],
                            capture_output=True, text=True)
    return None if result.returncode == 0 else f"mount -t tmpfs failed: {result.stderr.strip()}"


def fill(folder: Path) -> None:
    """Write into folder until its disk is full."""
    with open(folder / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(bytes(4096))
        except OSError:
            pass


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    """{"full": DIR, "read-only": DIR} on tmpfs mounts (full: plots/ and inputs/ made before it filled up),
    or {"why": reason} where they cannot be mounted. Unmounted afterwards."""
    base = tmp_path_factory.mktemp("disks")
    mounted, found = [], {}
    try:
        why = tmpfs(base / "full")
        if why is None:
            mounted.append(base / "full")
            for name in ("plots", "inputs"):
                (base / "full" / name).mkdir()
            fill(base / "full")
            why = tmpfs(base / "read-only", "ro")
            if why is None:
                mounted.append(base / "read-only")
                found = {"full": base / "full", "read-only": base / "read-only"}
        yield found or {"why": why}
    finally:
        for folder in mounted:
            subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("edges")
    run_folder(work / "run")
    write_mnist(work / "mnist", n_train=100, n_test=50)
    write_mnist(work / "bomb", n_train=100, n_test=50, gz=True)
    bomb(work / "bomb" / "train-images-idx3-ubyte.gz", 100)
    write_mnist(work / "fifo-data", n_train=100, n_test=50)
    (work / "fifo-data" / "train-images-idx3-ubyte").unlink()
    os.mkfifo(work / "fifo-data" / "train-images-idx3-ubyte")
    os.mkfifo(work / "fifo")
    try:  # a character device of our own, like /dev/null: a regression that replaced it would harm nothing
        os.mknod(work / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError:  # not root
        pass
    (work / "a-file").write_text("not a folder")
    (work / "a-folder").mkdir()
    image = np.full((56, 56), 255, np.uint8)
    image[10:46, 24:32] = 0  # a dark stroke on white: a 1
    Image.fromarray(image).save(work / "one.png")
    return work


# ---------------------------------------------------------------- one line and exit 2, in one process


def cases(work: Path, disks: dict) -> dict[str, tuple[str, list[str], list[str]]]:
    """{case: (command, argv, words the line must hold)}."""
    run, data = str(work / "run"), ["--data-dir", str(work / "mnist"), "--no-download"]
    image, train_out = str(work / "one.png"), ["--output-dir", str(work / "out"), "--progress", "none"]
    table = {
        "plot-out-is-a-file": ("plot", [run, "--out", str(work / "a-file")], ["--out", "is a file, not a folder"]),
        "predict-save-inputs-is-a-file": ("predict", ["--checkpoint", run, image, "--save-inputs",
                                                      str(work / "a-file")], ["--save-inputs", "is a file"]),
        "predict-image-is-a-fifo": ("predict", ["--checkpoint", run, str(work / "fifo")],
                                    [str(work / "fifo"), "named pipe", "give image files"]),
        "predict-checkpoint-is-a-fifo": ("predict", ["--checkpoint", str(work / "fifo"), image],
                                         ["--checkpoint", "named pipe"]),
        "evaluate-checkpoint-is-a-fifo": ("evaluate", ["--checkpoint", str(work / "fifo"), *data],
                                          ["--checkpoint", "named pipe"]),
        "config-is-a-folder": ("train", ["--config", str(work / "a-folder"), *data, *train_out],
                               ["--config", "is a folder, not a file"]),
        "config-is-a-fifo": ("train", ["--config", str(work / "fifo"), *data, *train_out],
                             ["--config", "named pipe (FIFO), not a file"]),
        "config-is-dev-zero": ("train", ["--config", "/dev/zero", *data, *train_out],
                               ["--config /dev/zero", "character device"]),
        "data-dir-is-a-file": ("train", ["--data-dir", str(work / "a-file"), *train_out],
                               ["--data-dir", "is a file, not a folder"]),
        "data-file-is-a-fifo": ("train", ["--data-dir", str(work / "fifo-data"), "--no-download", *train_out],
                                ["train-images-idx3-ubyte", "named pipe"]),
        "gzip-bomb": ("train", ["--data-dir", str(work / "bomb"), "--no-download", *train_out],
                      ["train-images-idx3-ubyte.gz", "has trailing bytes", "100 x 28 x 28 = 78400 bytes",
                       "replace it with an intact copy"]),
        "bench-zero-epochs": ("bench", ["--tutorial-epochs", "0", "--fast-epochs", "0", "--no-full-run", *data[:2]],
                              ["--tutorial-epochs must be >= 1, got 0"]),
        "bench-negative-seed": ("bench", ["--seed", "-5", "--no-full-run", *data[:2]],
                                ["--seed must be between 0 and 4294967295, got -5"]),
    }
    if (work / "null").exists():
        table["evaluate-output-json-is-a-device"] = ("evaluate", ["--checkpoint", run, *data, "--output-json",
                                                                  str(work / "null")],
                                                     [f"--output-json {work / 'null'}", "character device"])
    if "full" in disks:
        full, readonly = disks["full"], disks["read-only"]
        table |= {
            "plot-out-full-disk": ("plot", [run, "--out", str(full / "plots")],
                                   [str(full / "plots" / "loss.png"), "No space left on device",
                                    "free space there or give another --out"]),
            "plot-out-read-only": ("plot", [run, "--out", str(readonly / "plots")],
                                   [str(readonly / "plots"), "Read-only file system", "give another --out"]),
            "predict-save-inputs-full-disk": ("predict", ["--checkpoint", run, image, "--save-inputs",
                                                          str(full / "inputs")],
                                              [str(full / "inputs" / "one.28x28.png"), "No space left on device",
                                               "give another --save-inputs"]),
            "predict-save-inputs-read-only": ("predict", ["--checkpoint", run, image, "--save-inputs",
                                                          str(readonly / "inputs")],
                                              ["Read-only file system", "give another --save-inputs"]),
        }
    return table


def huge_counts(work: Path) -> dict[str, tuple[str, list[str], dict]]:
    """Counts past what torch can index (they used to crash in C++): more than the test set is all of it."""
    huge = str(10**23)
    return {
        "evaluate-huge-batch": ("evaluate", ["--checkpoint", str(work / "run"), "--data-dir", str(work / "mnist"),
                                             "--test-batch-size", huge, "--progress", "none"], {}),
        "evaluate-huge-mistakes": ("evaluate", ["--checkpoint", str(work / "run"), "--data-dir", str(work / "mnist"),
                                                "--mistakes", str(work / "mistakes.png"), "--mistakes-count", huge,
                                                "--output-json", str(work / "eval.json"), "--progress", "none"], {}),
    }


@pytest.fixture(scope="module")
def results(work, disks):
    table = cases(work, disks)
    started = time.monotonic()
    got = run_in_process({**{name: (command, argv, {}) for name, (command, argv, _) in table.items()},
                          **huge_counts(work)}, timeout=DEADLINE_S * len(table))
    return got, {name: words for name, (*_, words) in table.items()}, time.monotonic() - started


CASES = ["plot-out-is-a-file", "predict-save-inputs-is-a-file", "predict-image-is-a-fifo",
         "predict-checkpoint-is-a-fifo", "evaluate-checkpoint-is-a-fifo", "evaluate-output-json-is-a-device",
         "config-is-a-folder", "config-is-a-fifo", "config-is-dev-zero", "data-dir-is-a-file", "data-file-is-a-fifo",
         "gzip-bomb", "bench-zero-epochs", "bench-negative-seed", "plot-out-full-disk", "plot-out-read-only",
         "predict-save-inputs-full-disk", "predict-save-inputs-read-only"]


@pytest.mark.parametrize("case", CASES)
def test_each_former_traceback_or_hang_is_one_line_and_exit_2(results, disks, case):
    got, words, seconds = results
    if case not in got:
        pytest.skip("making a device node needs root" if "device" in case else disks["why"])
    assert got[case]["code"] == 2, got[case]["stderr"]
    line = got[case]["stderr"]
    assert line.startswith("distmnist: error: ") and line.count("\n") == 1, line
    for word in words[case]:
        assert word in line, (word, line)
    assert seconds < DEADLINE_S * len(got)


def test_a_full_disk_leaves_no_partial_file(results, disks):
    got, *_ = results
    if "full" not in disks:
        pytest.skip(disks["why"])
    assert got["plot-out-full-disk"]["code"] == 2
    assert sorted(p.name for p in (disks["full"] / "plots").iterdir()) == []  # no 0-byte loss.png, no .tmp-
    assert sorted(p.name for p in (disks["full"] / "inputs").iterdir()) == []


def test_a_data_dir_that_is_a_file_is_not_called_missing(results):
    got, *_ = results
    assert "did not exist" not in got["data-dir-is-a-file"]["stderr"]
    assert "download" not in got["data-dir-is-a-file"]["stderr"]


def test_counts_past_the_test_set_mean_the_whole_test_set(results, work):
    got, *_ = results
    for case in huge_counts(work):
        assert got[case]["code"] == 0, got[case]["stderr"]
    report = json.loads((work / "eval.json").read_text())
    wrong = report["test_samples"] - report["test_correct"]
    assert report["test_samples"] == 50 and len(report["mistakes"]) == wrong > 0
    assert (work / "mistakes.png").read_bytes().startswith(b"\x89PNG")


def test_a_gzip_bomb_is_refused_before_it_is_decompressed(work):
    """3 GiB of zeros behind a valid header: refused after one byte more than the header promises,
    in well under a second of decompression and without the memory to hold it."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the peak so far
    started = time.monotonic()
    with pytest.raises(DistmnistError, match="has trailing bytes"):
        read_idx(work / "bomb" / "train-images-idx3-ubyte.gz", 3)
    assert time.monotonic() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 << 10  # under 256 MiB more


def test_a_header_promising_more_than_a_gz_can_hold_is_refused_unread(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + (2**32 - 1).to_bytes(4, "big") + bytes([0, 0, 0, 28]) * 2))
    with pytest.raises(DistmnistError, match="can hold at most"):
        read_idx(path, 3)


def test_a_write_never_replaces_a_device_a_pipe_or_a_folder(work):
    targets = [(work / "fifo", "named pipe"), (work / "a-folder", "folder")]
    if (work / "null").exists():
        targets.append((work / "null", "character device"))
    for target, kind in targets:
        with pytest.raises(DistmnistError, match=f"cannot write {target}: it is a.* {kind}"):
            write_bytes(target, b"x")
    still = {"named pipe": Path.is_fifo, "folder": Path.is_dir, "character device": Path.is_char_device}
    for target, kind in targets:  # each is still what it was: nothing replaced it
        assert still[kind](target), target


def test_a_command_that_owns_its_process_ends_it_as_python_would():
    """Its threads finish (an idle executor's workers are let go, not waited on forever), atexit callbacks
    run, buffered output is flushed, and the exit code is the command's."""
    script = (
        "import atexit, sys, threading, time\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from distmnist.errors import cli\n"
        "@cli\n"
        "def main(argv):\n"
        "    ThreadPoolExecutor(2).submit(int).result()\n"
        "    threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start()\n"
        "    atexit.register(print, 'atexit ran')\n"
        "    sys.stdout.write('buffered, no newline')\n"
        "    return 3\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=DEADLINE_S,
                            cwd=ROOT, env=env())
    assert result.returncode == 3, result.stderr
    assert result.stdout == "buffered, no newlinethread done\natexit ran\n" and result.stderr == ""


# ---------------------------------------------------------------- signals and pipes, real processes


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("long") / "mnist", n_train=2000, n_test=100)


@pytest.fixture(scope="module")
def short_data(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("short") / "mnist", n_train=200, n_test=50)


def train_args(data: Path, out: Path, epochs: int, batch: int) -> list[str]:
    return ["-m", "distmnist.train", "--data-dir", str(data), "--output-dir", str(out), "--epochs", str(epochs),
            "--batch-size", str(batch), "--progress", "plain", "--log-interval", "0.1", "--no-download"]


def launch(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, marker: str) -> None:
    """Read stdout up to a line holding marker (the process is killed if that takes over DEADLINE_S)."""
    watchdog = threading.Timer(DEADLINE_S, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if marker in line:
                return
    finally:
        watchdog.cancel()
    pytest.fail(f"no line with {marker!r}: {proc.communicate()[1][-3000:]}")


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {DEADLINE_S} s later: {proc.communicate()[1][-3000:]}")


def assert_complete(out: Path, epochs: int) -> None:
    """Every record of a finished run: each epoch in metrics.jsonl, the final weights, run.json."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    assert (out / "model.safetensors").stat().st_size > 0
    assert json.loads((out / "run.json").read_text())["epochs_run"] == epochs


# Imported first by every Python started with it on its path: blocks the import of distmnist.training (the
# heavy one: torch) after writing a marker, so that a Ctrl-C lands during the imports, before main() runs.
SLOW_IMPORT = """
import importlib.abc, os, sys, time

class Slow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "distmnist.training":
            open(os.environ["IMPORT_MARKER"], "w").close()
            time.sleep(60)
        return None

sys.meta_path.insert(0, Slow())
"""


@pytest.mark.slow
@pytest.mark.parametrize("command", [["-m", "distmnist.train"], ["-m", "distmnist", "train"], ["distmnist", "train"]],
                         ids=["python-m-distmnist.train", "python-m-distmnist", "distmnist-script"])
def test_a_ctrl_c_during_the_imports_ends_with_one_line_and_exit_130(tmp_path, command):
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(SLOW_IMPORT)
    marker = tmp_path / "importing"
    argv = [str(BIN / command[0]), *command[1:]] if command[0] == "distmnist" else [sys.executable, *command]
    proc = subprocess.Popen([*argv, "--data-dir", str(tmp_path / "none"), "--no-download"], cwd=ROOT,
                            env=env(PYTHONPATH=str(tmp_path / "hook"), IMPORT_MARKER=str(marker)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + DEADLINE_S
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    _, err = finish(proc)
    assert (proc.returncode, err) == (130, "distmnist: interrupted\n")


@pytest.mark.slow
@pytest.mark.parametrize("gap", [0.05, 0.5, "burst"], ids=["gap-0.05s", "gap-0.5s", "every-2ms-until-exit"])
def test_a_second_ctrl_c_ends_the_run_with_one_line_and_exit_130(long_data, tmp_path, gap):
    proc = launch(train_args(long_data, tmp_path / "out", 20, 10))
    wait_for(proc, "epoch 1/")  # training, past set-up
    proc.send_signal(signal.SIGINT)
    if gap == "burst":  # whatever the process is doing when one lands: saving, printing, leaving
        while proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            time.sleep(0.002)
    else:
        time.sleep(gap)
        proc.send_signal(signal.SIGINT)  # a no-op if it has already exited
    _, err = finish(proc)
    assert proc.returncode == 130, err[-3000:]
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(("distmnist: stopped by SIGINT", "distmnist: aborted by a second "
                                                    "SIGINT")), err[-3000:]
    assert "Traceback" not in err


@pytest.mark.slow
def test_signals_after_the_summary_leave_a_finished_run_exit_0(short_data, tmp_path):
    """From the summary on every file is written: SIGTERM every 5 ms until the process is gone changes nothing."""
    out = tmp_path / "out"
    proc = launch(train_args(short_data, out, 2, 20))
    wait_for(proc, "files: ")
    sent = 0
    while proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        sent += 1
        time.sleep(0.005)
    _, err = finish(proc)
    assert sent >= 1
    assert proc.returncode == 0, err[-3000:]
    assert err == ""
    assert_complete(out, 2)


@pytest.mark.slow
def test_head_closing_stdout_stops_the_output_not_the_run(short_data, tmp_path):
    """`distmnist train ... | head -2`: two lines, then the run goes on to write every record."""
    out = tmp_path / "out"
    command = " ".join(map(shlex.quote, [sys.executable, *train_args(short_data, out, 3, 20)]))
    result = subprocess.run(["bash", "-c", f"{command} | head -2; exit ${{PIPESTATUS[0]}}"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT, env=env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 2 and result.stdout.startswith("distmnist run plan\n")
    assert result.stderr == ""
    assert_complete(out, 3)


@pytest.mark.slow
def test_a_run_started_with_stdout_and_stderr_closed_finishes(short_data, tmp_path):
    out = tmp_path / "out"
    command = " ".join(map(shlex.quote, [sys.executable, *train_args(short_data, out, 2, 20)]))
    result = subprocess.run(["bash", "-c", f"{command} >&- 2>&-"], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env=env())
    assert result.returncode == 0 and result.stdout == ""
    assert_complete(out, 2)
    failing = " ".join(map(shlex.quote, [sys.executable, *train_args(tmp_path / "missing", tmp_path / "out2", 2, 20)]))
    result = subprocess.run(["bash", "-c", f"{failing} 2>&-"], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env=env())
    assert result.returncode == 2
    assert "error" not in result.stdout  # the line had nowhere to go; it does not land on stdout instead
