"""Any number of processes, one trajectory: with --global-batch-size G, 1, 2 and 4 processes (torchrun,
gloo) train the same model to float tolerance, and a run stopped on N processes resumes on M at its
exact step; set-up is bounded and ends at once on a signal; an indivisible G is refused before training.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import BIN, ROOT, STOP_DRIVER, assert_ok, env, free_port, run_module, torchrun

pytestmark = pytest.mark.slow

RECIPE = ["--limit-train", "4000", "--limit-test", "1000", "--global-batch-size", "100", "--progress", "plain",
          "--no-download"]  # 40 steps per epoch
TOLERANCE = 1e-4  # float tolerance across world sizes (the reduction order differs); bit-identity within one


def launch(nproc: int, *argv) -> subprocess.CompletedProcess:
    return torchrun(nproc, "train", *argv) if nproc > 1 else run_module("train", *argv)


def max_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(wa) == set(wb)
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def last(out: Path) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(real_mnist, tmp_path_factory) -> dict[int, Path]:
    """One uninterrupted epoch of the same global batch on 1, 2 and 4 processes."""
    outs = {}
    for nproc in (1, 2, 4):
        outs[nproc] = tmp_path_factory.mktemp(f"w{nproc}") / "run"
        proc = launch(nproc, "--data-dir", real_mnist, "--output-dir", outs[nproc], *RECIPE, "--epochs", "1")
        assert_ok(proc)
        assert (f"batch: global batch 100 ({100 // nproc} per process), the same run on any number of processes"
                in proc.stdout)
    return outs


def test_one_two_and_four_processes_train_the_same_model(runs):
    for nproc in (2, 4):
        assert max_difference(runs[1], runs[nproc]) < TOLERANCE
        assert last(runs[nproc])["test_correct"] == last(runs[1])["test_correct"]
        assert last(runs[nproc])["train_samples"] == last(runs[1])["train_samples"] == 4000
        assert last(runs[nproc])["train_loss"] == pytest.approx(last(runs[1])["train_loss"], abs=TOLERANCE)


def stop_on_two(step: int, out: Path, data: Path, *argv: str) -> subprocess.CompletedProcess:
    """torchrun, 2 processes; rank 0 gets SIGTERM after its `step`-th step, the ranks agree at the next check."""
    script = out.parent / "driver.py"
    script.write_text(STOP_DRIVER)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", str(script), "step", str(step),
           "SIGTERM", "--data-dir", str(data), "--output-dir", str(out), *RECIPE, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env(PYTHONPATH=str(ROOT)))


def test_two_processes_stopped_mid_epoch_resume_exactly_on_one(real_mnist, tmp_path):
    reference = tmp_path / "one"
    assert_ok(launch(1, "--data-dir", real_mnist, "--output-dir", reference, *RECIPE, "--epochs", "2"))
    out = tmp_path / "cut"
    stopped = stop_on_two(5, out, real_mnist, "--epochs", "2")  # the ranks agree at step 20 of 40
    assert stopped.returncode != 0 and "stopped by SIGTERM at epoch 1 step 20/40" in stopped.stderr, stopped.stderr
    assert "(any number of processes that divides the global batch)" not in stopped.stderr  # torchrun: exact command
    resumed = run_module("train", "--output-dir", out, "--resume", "auto")  # one process now
    assert_ok(resumed)
    assert "epoch-0001-step-0020 at step 20" in resumed.stdout
    assert "restarts from its first step" not in resumed.stdout and "restarts from (seed" not in resumed.stdout
    assert max_difference(reference, out) < TOLERANCE
    assert last(out)["test_correct"] == last(reference)["test_correct"]
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [40, 80]


def test_one_process_stopped_at_an_epoch_end_resumes_exactly_on_two(real_mnist, tmp_path):
    reference = tmp_path / "two"
    assert_ok(launch(2, "--data-dir", real_mnist, "--output-dir", reference, *RECIPE, "--epochs", "2"))
    out = tmp_path / "cut"
    assert_ok(launch(1, "--data-dir", real_mnist, "--output-dir", out, *RECIPE, "--epochs", "1"))
    resumed = torchrun(2, "train", "--output-dir", out, "--resume", "auto", "--epochs", "2")
    assert_ok(resumed)
    assert "resuming with changed settings: epochs 1 -> 2" in resumed.stdout
    assert max_difference(reference, out) < TOLERANCE
    assert last(out)["test_correct"] == last(reference)["test_correct"] and last(out)["world_size"] == 2


def test_an_indivisible_global_batch_is_refused_before_training(real_mnist, tmp_path):
    out = tmp_path / "out"
    proc = torchrun(2, "train", "--data-dir", real_mnist, "--output-dir", out, *RECIPE, "--global-batch-size", "101")
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("distmnist: error:")]
    assert ours == ["distmnist: error: --global-batch-size 101 is not divisible by the 2 processes of this launch "
                    "(each takes G / 2 images): choose a multiple of 2"], proc.stderr[-3000:]
    assert not (out / "metrics.jsonl").exists() and "Traceback" not in "\n".join(ours)


def waiting_for_a_peer(out: Path, data: Path, *argv: str) -> subprocess.Popen:
    """A rank 0 of 2 whose peer never comes: it waits in the rendezvous (inside the C++ store client)."""
    return subprocess.Popen([sys.executable, "-m", "distmnist.train", "--data-dir", str(data), "--output-dir", str(out),
                             "--epochs", "1", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1",
                                               MASTER_PORT=str(free_port())))


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_during_a_hung_set_up_ends_it_within_seconds(real_mnist, tmp_path, sig, code):
    proc = waiting_for_a_peer(tmp_path / "out", real_mnist, "--setup-timeout", "600")
    time.sleep(4)  # well inside the rendezvous by now
    assert proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert proc.returncode == code, err
    assert err.strip().splitlines() == [f"distmnist: stopped by {sig} during set-up (joining the process group); "
                                        "nothing was trained"]
    assert not (tmp_path / "out").exists()


def test_set_up_has_its_own_timeout(real_mnist, tmp_path):
    started = time.monotonic()
    proc = waiting_for_a_peer(tmp_path / "out", real_mnist, "--setup-timeout", "3", "--dist-timeout", "600")
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "WORLD_SIZE=2 but the process group could not be formed" in lines[0], err
