"""Several processes, one run: every rank agrees. Only the main process reads and writes the output folder and
sends the checkpoint to every rank, so machines that share no filesystem resume exactly; data is checked to be
the same everywhere; replicas that drift apart stop the run; a failed write ends every rank within seconds.
Real torchrun and launch/multi_node.sh jobs on the CPU.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from conftest import BIN, ROOT, distmnist_tracebacks, env, free_port, worker_exit, write_mnist
from distmnist.checkpoint import verify

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "launch" / "multi_node.sh"
RECIPE = ["--lr", "0.02", "--batch-size", "50", "--progress", "plain", "--seed", "3"]
HOST = socket.gethostname()


def machines(port: int, per_machine: list[tuple[Path, list[str]]], timeout: float = 300) -> list[dict]:
    """Two "machines" over loopback through launch/multi_node.sh, each in its own working folder."""
    procs = []
    for rank, (cwd, args) in enumerate(per_machine):
        cmd = [str(SCRIPT), "--num-machines", str(len(per_machine)), "--machine-rank", str(rank), "--main-addr",
               "127.0.0.1", "--main-port", str(port), "--gpus-per-machine", "1", "--", *args]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env(ACCELERATE=str(BIN / "accelerate")),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    started = time.monotonic()
    try:
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append({"rc": proc.returncode, "stdout": out, "stderr": err,
                            "seconds": time.monotonic() - started})
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def torchrun(*args: str, cwd: Path = ROOT, timeout: float = 300, script: Path | None = None) -> subprocess.Popen:
    target = [str(script)] if script else ["-m", "distmnist.train"]
    return subprocess.Popen([str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", *target,
                             *args], cwd=cwd, env=env(PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"rc": proc.returncode, "stdout": out, "stderr": err}


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("distmnist: error:")]


def worker_codes(result: dict) -> set[int]:
    assert result["rc"] != 0, result["stderr"][-3000:]  # a launcher exits 1 whenever a worker fails
    return {worker_exit(result["stderr"])}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("agree") / "mnist", n_train=400, n_test=101)


def test_machines_without_a_shared_disk_resume_exactly(data, tmp_path):
    """Each machine in its own folder with a relative --output-dir: after epoch 1 only machine 0 has the
    checkpoint; the rerun with --resume auto must still pair every collective and end bit-identical."""
    folders = [tmp_path / "machine0", tmp_path / "machine1"]
    for folder in folders:
        folder.mkdir()
    args = ["--data-dir", str(data), "--output-dir", "runs/x", *RECIPE]
    reference = torchrun("--data-dir", str(data), "--output-dir", str(tmp_path / "one"), *RECIPE, "--epochs", "2")
    first = machines(free_port(), [(f, [*args, "--epochs", "1"]) for f in folders])
    assert [r["rc"] for r in first] == [0, 0], first[0]["stderr"][-3000:] + first[1]["stderr"][-3000:]
    assert not (folders[1] / "runs" / "x" / "checkpoints").exists()  # rank 1's machine never sees a checkpoint
    second = machines(free_port(), [(f, [*args, "--epochs", "2", "--resume", "auto"]) for f in folders])
    assert [r["rc"] for r in second] == [0, 0], second[0]["stderr"][-3000:] + second[1]["stderr"][-3000:]
    assert "resumed from runs/x/checkpoints/epoch-0001" in second[0]["stdout"]
    assert "epoch 1/2 " not in second[0]["stdout"]
    ref = finish(reference)
    assert ref["rc"] == 0, ref["stderr"][-3000:]
    ours, theirs = folders[0] / "runs" / "x", tmp_path / "one"
    assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        assert (ours / "checkpoints" / "epoch-0002" / name).read_bytes() == \
            (theirs / "checkpoints" / "epoch-0002" / name).read_bytes(), name


def test_a_machine_without_data_fails_every_rank_at_once_with_its_reason(data, tmp_path):
    empty = tmp_path / "no-data-here"
    empty.mkdir()
    common = ["--output-dir", str(tmp_path / "out"), *RECIPE, "--epochs", "1", "--no-download"]
    results = machines(free_port(), [(tmp_path, ["--data-dir", str(data), *common]),
                                     (tmp_path, ["--data-dir", str(empty), *common])])
    assert [worker_codes(r) for r in results] == [{2}, {2}]
    assert max(r["seconds"] for r in results) < 60
    lines = errors(results[0]["stderr"])
    assert len(lines) == 1 and lines[0].startswith(f"distmnist: error: rank 1 on {HOST}: MNIST not found"), \
        results[0]["stderr"][-2000:]
    assert str(empty) in lines[0] and "--no-download" in lines[0]
    assert not distmnist_tracebacks(results[0]["stderr"] + results[1]["stderr"])
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_machine_with_a_different_copy_of_mnist_is_named(data, tmp_path):
    other = write_mnist(tmp_path / "other-mnist", n_train=400, n_test=101, seed=9)  # same shapes, other pixels
    common = ["--output-dir", str(tmp_path / "out"), *RECIPE, "--epochs", "1", "--no-download"]
    results = machines(free_port(), [(tmp_path, ["--data-dir", str(data), *common]),
                                     (tmp_path, ["--data-dir", str(other), *common])])
    assert [worker_codes(r) for r in results] == [{2}, {2}]
    lines = errors(results[0]["stderr"])
    assert len(lines) == 1 and f"rank 1 on {HOST} read different MNIST data" in lines[0], results[0]["stderr"][-2000:]


# Perturbs one weight on rank 1 only after its first epoch, as a flipped bit in one replica would.
DRIFT = textwrap.dedent(
    """
    import os, sys, torch
    import distmnist.engine as engine
    from distmnist.training import main

    real = engine.Engine.evaluate

    def evaluate(self, *args, **kwargs):
        if os.environ["RANK"] == "1":
            with torch.no_grad():
                self.accelerator.unwrap_model(self.model).fc2.bias[0] += 1e-3
        return real(self, *args, **kwargs)

    engine.Engine.evaluate = evaluate
    main(sys.argv[1:])
    """
)


def test_replicas_that_drift_apart_stop_the_run_naming_the_rank(data, tmp_path):
    script = tmp_path / "drift.py"
    script.write_text(DRIFT)
    out = tmp_path / "out"
    result = finish(torchrun("--data-dir", str(data), "--output-dir", str(out), *RECIPE, "--epochs", "2",
                             script=script))
    assert worker_codes(result) == {1}  # every rank ends with exit code 1
    lines = errors(result["stderr"])
    assert len(lines) == 1 and "replicas drifted apart after epoch 1" in lines[0] and f"rank 1 on {HOST}" in lines[0], \
        result["stderr"][-3000:]
    assert not (out / "checkpoints" / "epoch-0001").exists() and not (out / "model.safetensors").exists()


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (root only): about 1.6 checkpoints of this model fit."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=540k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_ends_every_rank_within_seconds_and_keeps_the_previous_checkpoint(data, tmp_path, tmpfs):
    out = tmpfs / "run"
    proc = torchrun("--data-dir", str(data), "--output-dir", str(out), *RECIPE, "--epochs", "3")
    result = finish(proc)
    assert worker_codes(result) == {2}  # both ranks: exit 2, not a timeout
    lines = errors(result["stderr"])
    assert len(lines) == 1 and "No space left on device" in lines[0] and "epoch-0002" in lines[0], \
        result["stderr"][-3000:]
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001"]  # nothing partial, under any name
    verify(root / "epoch-0001")


def test_a_read_only_output_folder_ends_every_rank_at_start(data, tmp_path, tmpfs):
    out = tmpfs / "run"
    first = finish(torchrun("--data-dir", str(data), "--output-dir", str(out), *RECIPE, "--epochs", "1"))
    assert first["rc"] == 0, first["stderr"][-3000:]
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    started = time.monotonic()
    result = finish(torchrun("--data-dir", str(data), "--output-dir", str(out), *RECIPE, "--epochs", "2",
                             "--resume", "auto"))
    assert time.monotonic() - started < 60
    lines = errors(result["stderr"])
    assert len(lines) == 1 and f"--output-dir {out} is not writable: Read-only file system" in lines[0], \
        result["stderr"][-3000:]
    assert worker_codes(result) == {2}
    verify(out / "checkpoints" / "epoch-0001")
