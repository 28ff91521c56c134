"""A signal is a clean, exact stop. SIGTERM, SIGUSR1 and the first SIGINT make
every rank stop after the same step and save a mid-epoch checkpoint; the run exits 128 + the signal
number with one line; `--resume auto` then ends bit-identical to an uninterrupted run, wherever the
signal came (in a step, during evaluation, during a save). A second SIGINT aborts at once.

The signals are real (kill(2)); a small driver (conftest.STOP_DRIVER) only decides *when*: it wraps
one distmnist function and sends the signal from there, so positions are exact and the tests are
not timing games.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import BIN, ROOT, distmnist_tracebacks, env, free_port, in_process, worker_exit, write_mnist
from conftest import STOP_DRIVER as DRIVER
from distmnist.checkpoint import load_checkpoint, verify

pytestmark = pytest.mark.slow

N_TRAIN = 2000  # 200 steps of 10 per epoch on one process, 100 per rank on two
BATCH = 10
RECIPE = ["--batch-size", str(BATCH), "--lr", "0.02", "--progress", "plain", "--no-download", "--seed", "4"]
EPOCHS = 3


def run(cmd: list[str], **extra_env: str) -> SimpleNamespace:
    """Run to the end; also how long it took from the signal to the exit."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    ended = time.time()
    fired = [float(m) for m in re.findall(r"FIRED (\d+\.\d+)", err)]
    return SimpleNamespace(rc=proc.returncode, stdout=out, stderr=err, after_signal=ended - fired[0] if fired else None)


def single(where: str, at: int, sig: str, out: Path, data: Path, *extra: str) -> SimpleNamespace:
    return run([sys.executable, "-c", DRIVER, where, str(at), sig, "--data-dir", str(data), "--output-dir", str(out),
                *RECIPE, "--epochs", str(EPOCHS), *extra])


def two_ranks(where: str, at: int, sig: str, out: Path, data: Path, signal_rank: int = 0,
              *extra: str) -> SimpleNamespace:
    script = out.parent / "driver.py"
    script.write_text(DRIVER)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", str(script), where, str(at),
           sig, "--data-dir", str(data), "--output-dir", str(out), *RECIPE, "--epochs", str(EPOCHS), *extra]
    return run(cmd, SIGNAL_RANK=str(signal_rank), PYTHONPATH=str(ROOT))


def resume(out: Path, data: Path, nproc: int = 1) -> SimpleNamespace:
    """What the stop line says to run: only where the run is; its recorded recipe (data folder included)
    does the rest. One process: through the session's in-process driver; several: under torchrun."""
    args = ["--output-dir", str(out), "--resume", "auto"]
    if nproc == 1:
        proc = in_process("train", *args)
        return SimpleNamespace(rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr, after_signal=None)
    return run([str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}", "-m",
                "distmnist.train", *args])


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def assert_stopped(result: SimpleNamespace, out: Path, sig: str, code: int, torchrun: bool = False) -> None:
    """Exit 128 + the signal (under torchrun: torchrun's own non-zero exit), one line, no traceback of
    ours, no temp folder, within 10 s of the signal."""
    if torchrun:
        assert result.rc != 0, result.stderr[-3000:]
    else:
        assert result.rc == code, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"distmnist: stopped by {sig}")]
    assert len(lines) == 1, result.stderr[-3000:]
    command = f"--output-dir {out} --resume auto"
    assert lines[0].endswith(f"continue with: distmnist train {command}" if not torchrun else command), lines[0]
    assert not distmnist_tracebacks(result.stderr), result.stderr[-3000:]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert result.after_signal is not None and result.after_signal < 10


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("signals") / "mnist", n_train=N_TRAIN, n_test=100)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted runs, one process and two, side by side."""
    one, two = tmp_path_factory.mktemp("ref1") / "out", tmp_path_factory.mktemp("ref2") / "out"
    base = ["--data-dir", str(data), *RECIPE, "--epochs", str(EPOCHS)]
    procs = [subprocess.Popen([sys.executable, "-m", "distmnist.train", *base, "--output-dir", str(one)], cwd=ROOT,
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
             subprocess.Popen([str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", "-m",
                               "distmnist.train", *base, "--output-dir", str(two)], cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    return {1: one, 2: two}


def assert_same_as(reference: Path, out: Path) -> None:
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    ours = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"], r["train_loss"], r["test_loss"], r["train_samples"]) for r in ours] == \
        [(r["epoch"], r["step"], r["train_loss"], r["test_loss"], r["train_samples"]) for r in theirs]


# ---------------------------------------------------------------- one process


@pytest.mark.parametrize(
    "where, at, sig, code, saved",
    [
        ("step", 57, "SIGTERM", 143, ["epoch-0001-step-0057"]),  # 57 steps into epoch 1
        ("step", 331, "SIGUSR1", 138, ["epoch-0001", "epoch-0002-step-0131"]),  # 131 steps into epoch 2
        ("step", 200, "SIGINT", 130, ["epoch-0001"]),  # after the last step of epoch 1: it ends, then stops
        ("evaluate", 2, "SIGTERM", 143, ["epoch-0001", "epoch-0002"]),  # while epoch 2 is being evaluated
        ("save", 7, "SIGTERM", 143, ["epoch-0001", "epoch-0002"]),  # between two files of epoch 2's checkpoint
    ],
    ids=["sigterm-mid-epoch-1", "sigusr1-mid-epoch-2", "sigint-at-epoch-end", "during-evaluation", "during-a-save"],
)
def test_a_signal_stops_exactly_and_resume_auto_is_bit_identical(data, reference, tmp_path, where, at, sig, code,
                                                                  saved):
    out = tmp_path / "out"
    result = single(where, at, sig, out, data)
    assert_stopped(result, out, sig, code)
    assert checkpoints(out) == saved  # every checkpoint of the run so far, the one the stop saved last
    newest = saved[-1]
    ckpt = load_checkpoint(out / "checkpoints" / newest)
    if "step" in newest:  # a mid-epoch checkpoint: its recorded step is not a multiple of the epoch's 200
        assert ckpt.state.step % 200 != 0 and ckpt.state.mid_epoch.steps == 200
        assert ckpt.progress["samples"].tolist() == [ckpt.state.mid_epoch.step * BATCH]
    resumed = resume(out, data)
    assert resumed.rc == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / newest}" in resumed.stdout
    assert_same_as(reference[1], out)


def test_a_second_sigint_aborts_at_once(data, reference, tmp_path):
    out = tmp_path / "out"
    result = single("twice", 250, "SIGINT", out, data)
    assert result.rc == 130, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("distmnist:")]
    assert lines == [f"distmnist: aborted by a second SIGINT in epoch 2; newest checkpoint "
                     f"{out / 'checkpoints' / 'epoch-0001'}; continue with: distmnist train --output-dir {out} "
                     "--resume auto"], result.stderr
    assert not distmnist_tracebacks(result.stderr)
    assert checkpoints(out) == ["epoch-0001"]  # no mid-epoch save: it left at once
    assert resume(out, data).rc == 0
    assert_same_as(reference[1], out)


def test_mid_epoch_checkpoints_are_pruned_like_the_others(data, tmp_path):
    out = tmp_path / "out"
    result = single("step", 290, "SIGTERM", out, data, "--keep-checkpoints", "1")
    assert_stopped(result, out, "SIGTERM", 143)
    assert checkpoints(out) == ["epoch-0002-step-0090"]  # epoch 1's went once this one was complete
    proc = in_process("train", "--data-dir", data, "--output-dir", out, *RECIPE, "--epochs", "2", "--resume", "auto",
                      "--keep-checkpoints", "1")
    assert proc.returncode == 0, proc.stderr
    assert checkpoints(out) == ["epoch-0002"]  # and it went once epoch 2's was complete
    verify(out / "checkpoints" / "epoch-0002")


# ---------------------------------------------------------------- two processes under torchrun


@pytest.mark.parametrize(
    "where, signal_rank, at, newest",
    [("step", 1, 130, r"epoch-0002-step-0040"),  # rank 1 alone gets it, 30 steps into epoch 2: the ranks agree at 40
     # torchrun itself gets it after rank 0's step 41 and forwards it to both ranks, which agree at the next
     # check (step 60, unless the forwarded signal is slower than 19 steps)
     ("launcher", 0, 41, r"epoch-0001-step-00[68]0")],
    ids=["sigterm-to-one-rank", "sigterm-to-torchrun"],
)
def test_two_ranks_stop_together_and_resume_exactly(data, reference, tmp_path, where, signal_rank, at, newest):
    out = tmp_path / "out"
    result = two_ranks(where, at, "SIGTERM", out, data, signal_rank)
    assert_stopped(result, out, "SIGTERM", 143, torchrun=True)
    if where == "step":  # torchrun itself got no signal: it reports its workers' exit, 143
        assert worker_exit(result.stderr) == 143
    assert re.fullmatch(newest, checkpoints(out)[-1]), checkpoints(out)
    ckpt = load_checkpoint(out / "checkpoints" / checkpoints(out)[-1])
    assert ckpt.state.data.world_size == 2 and ckpt.progress["samples"].shape == (2,)
    resumed = resume(out, data, nproc=2)
    assert resumed.rc == 0, resumed.stderr[-3000:]
    assert_same_as(reference[2], out)
