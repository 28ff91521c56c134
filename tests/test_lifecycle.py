"""The run folder's lifecycle is airtight, and a checkpoint is what it says: whatever fails on the main
process before a collective ends every rank within seconds with one line; the lock is never written
through a symlink and a file system without flock is named; a failed train() leaves no lock behind;
format 1 checkpoints still resume exactly; implausible checkpoint values are refused; the fp16 loss
scale survives a checkpoint; nothing set up grows with the run's length. One-process runs go through the
session's in-process driver (conftest.in_process); torchrun and the memory measurement use processes.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    BIN,
    ROOT,
    checkpoint_state,
    distmnist_tracebacks,
    env,
    free_port,
    in_process,
    one_line,
    run_in_process,
    write_mnist,
)
from distmnist.checkpoint import load_checkpoint, unflatten_optimizer, write_checkpoint
from distmnist.errors import DistmnistError

V1 = ROOT / "tests" / "data" / "v1-checkpoint-epoch-0002-step-0003"  # written by distmnist 0.1 (format 1)
V1_RECIPE = ["--epochs", "3", "--batch-size", "50", "--lr", "0.05", "--progress", "plain", "--no-download"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("life") / "mnist", n_train=400, n_test=100)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    proc = in_process("train", "--data-dir", data, "--output-dir", out, "--epochs", "2", "--batch-size", "50",
                      "--progress", "none")
    assert proc.returncode == 0, proc.stderr
    return out


# ---------------------------------------------------------------- the main process fails before a collective

FAIL_ON_RANK_0 = textwrap.dedent(
    """
    import errno, fcntl, os, sys
    import distmnist.records as records
    import distmnist.rundir as rundir
    from distmnist.training import main

    where = os.environ["FAIL_WHERE"]
    if os.environ.get("RANK", "0") == "0":
        if where == "prune":  # an NFS silly-rename file that rmtree cannot remove
            def prune(*args, **kwargs):
                raise OSError(errno.EBUSY, "Device or resource busy", "/nfs/run/checkpoints/epoch-0001/.nfs000000001")
            records.prune = prune
        elif where == "flock":  # Lustre mounted without flock support
            def flock(fd, op):
                raise OSError(errno.ENOSYS, "Function not implemented")
            rundir.fcntl.flock = flock
        elif where == "scan":  # stat() of a checkpoint on a flaky disk, deep in the folder's listing
            def scan(*args, **kwargs):
                raise OSError(errno.EIO, "Input/output error", "/nfs/run/checkpoints/epoch-0001/state.json")
            rundir.scan = scan
    main(sys.argv[1:])
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("where, needle", [
    ("flock", "cannot lock .lock.json on this"),
    ("scan", "Input/output error"),
    ("prune", "Device or resource busy"),
])
def test_an_error_on_rank_0_ends_every_rank_within_seconds(data, tmp_path, where, needle):
    script = tmp_path / "fail.py"
    script.write_text(FAIL_ON_RANK_0)
    out = tmp_path / "out"
    if where == "scan":  # a run to resume, so that the listing is read
        assert in_process("train", "--data-dir", data, "--output-dir", out, "--epochs", "1",
                          "--progress", "none").returncode == 0
    cmd = [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", str(script), "--data-dir",
           str(data), "--output-dir", str(out), "--epochs", "2", "--progress", "none", "--dist-timeout", "300",
           *(["--resume", "auto"] if where == "scan" else [])]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=env(FAIL_WHERE=where, PYTHONPATH=str(ROOT)))
    assert time.monotonic() - started < 15 + 10  # 15 s for the ranks; torchrun's own start and exit on top
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("distmnist:")]
    assert len(ours) == 1 and needle in ours[0], proc.stderr[-3000:]
    assert not distmnist_tracebacks(proc.stderr), proc.stderr[-3000:]


def test_lock_file_and_checkpoint_symlinks_are_never_followed(data, run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    (out / ".lock.json").unlink(missing_ok=True)
    (out / ".lock.json").symlink_to(outside)
    proc = in_process("train", "--output-dir", out, "--resume", "auto", "--epochs", "3")
    one_line(proc, 2, ".lock.json is a symlink; distmnist never writes through one")
    assert outside.read_text() == "keep me"
    (out / ".lock.json").unlink()
    # a symlinked checkpoint folder newer than every real one: skipped, and said so
    (out / "checkpoints" / "epoch-0009").symlink_to(out / "checkpoints" / "epoch-0002")
    proc = in_process("train", "--output-dir", out, "--resume", "auto", "--epochs", "3")
    assert proc.returncode == 0, proc.stderr
    assert f"skipping invalid checkpoint {out / 'checkpoints' / 'epoch-0009'}: checkpoint folder is a symlink" in \
        proc.stdout
    assert f"resumed from {out / 'checkpoints' / 'epoch-0002'}" in proc.stdout


def test_the_python_api_releases_the_folder_when_set_up_fails(data, tmp_path):
    """distmnist.train() in this process: a call that fails in set-up leaves no lock behind for the next."""
    import distmnist

    out = tmp_path / "api"
    with pytest.raises(distmnist.DistmnistError, match="--warmup-steps 1,000,000 must be less than the run's 4 "
                                                       "optimizer steps"):
        distmnist.train(data_dir=data, output_dir=out, epochs=1, lr_schedule="cosine", warmup_steps=10**6,
                        progress="none")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the commands' OMP_NUM_THREADS=1 (conftest.env)
    try:
        result = distmnist.train(data_dir=data, output_dir=out, epochs=1, progress="none")
    finally:
        torch.set_num_threads(threads)
    assert result.finished and len(result.history) == 1


def test_resume_with_an_empty_path_says_what_it_needs(data, tmp_path):
    result = run_in_process({"empty": ("train", ["--data-dir", data, "--output-dir", tmp_path / "o", "--resume", ""],
                                       {})})["empty"]
    assert result["code"] == 2 and result["stderr"].strip() == (
        "distmnist: error: --resume needs 'auto' or a path: a checkpoint folder (RUN/checkpoints/epoch-NNNN) or a "
        "run folder"), result
    assert "manifest" not in result["stderr"]


# ---------------------------------------------------------------- format 1


def test_a_format_1_checkpoint_resumes_exactly(tmp_path):
    """A mid-epoch checkpoint written by distmnist 0.1 (format 1) on this synthetic set: migrated on load, it
    resumes at its exact step and ends as an uninterrupted run of today's code."""
    data = write_mnist(tmp_path / "mnist", n_train=400, n_test=100)  # the set it was trained on
    ckpt = load_checkpoint(V1)
    assert ckpt.state.mid_epoch.step == 3 and ckpt.state.data.digest is None and ckpt.state.step == 11
    whole = tmp_path / "whole"
    assert in_process("train", "--data-dir", data, "--output-dir", whole, *V1_RECIPE).returncode == 0
    out = tmp_path / "out"
    proc = in_process("train", "--data-dir", data, "--output-dir", out, "--resume", V1, "--epochs", "3")
    assert proc.returncode == 0, proc.stderr
    assert "at step 3" in proc.stdout and "restarts from its first step" not in proc.stdout
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    state = json.loads((out / "checkpoints" / "epoch-0003" / "state.json").read_text())
    assert state["format"] == "distmnist-checkpoint/2"


def test_an_unknown_format_is_refused_with_one_line(tmp_path):
    folder = shutil.copytree(V1, tmp_path / "ckpt")
    state = json.loads((folder / "state.json").read_text())
    state["format"] = "distmnist-checkpoint/9"
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(DistmnistError, match="unknown checkpoint format 'distmnist-checkpoint/9': this distmnist "
                                             "reads distmnist-checkpoint/2 and distmnist-checkpoint/1"):
        from distmnist.checkpoint import read_state
        read_state(folder)


# ---------------------------------------------------------------- implausible values (the manifest re-signed)


def resign(src: Path, dst: Path, change_state=None, progress: dict | None = None) -> Path:
    ckpt = load_checkpoint(src)
    optimizer = unflatten_optimizer(ckpt.optimizer, ckpt.state.optimizer_param_groups)
    if change_state:
        change_state(ckpt.state)
    return write_checkpoint(dst, ckpt.model, optimizer, ckpt.rng, ckpt.state,
                            progress if progress is not None else ckpt.progress)


@pytest.mark.parametrize("case, needle", [
    ("samples-huge", "samples [4611686018427387904] disagree with the position: 3 step(s) of 50 image(s)"),
    ("samples-negative", "samples [-5] disagree with the position"),
    ("loss-negative", "loss_sum must be finite and >= 0"),
    ("mid-step-zero", "'mid_epoch.step' must be an integer from 1"),
    ("step-huge", "'step' must be an integer from 0 to 1,125,899,906,842,624, got 1000000000000000000000000000000"),
    ("step-off", "'step' 124 does not agree with its position (epoch 2 step 3 is optimizer step 11"),
    ("epoch-without-records", "1 metrics record(s) for a checkpoint after 4 finished epoch(s)"),
    ("negative-loss-record", "metrics record 1: train_loss must not be negative"),
])
def test_implausible_checkpoint_values_are_refused(tmp_path, case, needle):
    src = load_checkpoint(V1)
    sums, counts = src.progress["loss_sum"], src.progress["samples"]
    changes = {
        "samples-huge": (None, {"loss_sum": sums, "samples": torch.tensor([2**62])}),
        "samples-negative": (None, {"loss_sum": sums, "samples": torch.tensor([-5])}),
        "loss-negative": (None, {"loss_sum": torch.tensor([-1e9]), "samples": counts}),
        "mid-step-zero": (lambda s: setattr(s.mid_epoch, "step", 0), None),
        "step-huge": (lambda s: setattr(s, "step", 10**30), None),
        "step-off": (lambda s: setattr(s, "step", 124), None),
        "epoch-without-records": (lambda s: setattr(s, "epoch", 5), None),
        "negative-loss-record": (lambda s: s.progress.metrics[0].update(train_loss=-49999.8), None),
    }
    change, progress = changes[case]
    folder = resign(V1, tmp_path / "ckpt", change, progress)
    with pytest.raises(DistmnistError) as err:
        load_checkpoint(folder)
    assert needle in str(err.value) and str(folder) in str(err.value)


# ---------------------------------------------------------------- the fp16 loss scale


def test_the_fp16_loss_scale_survives_a_checkpoint(tmp_path):
    """The GradScaler's state goes into the checkpoint and back (on the CPU, where torch allows a scaler;
    tests/test_cuda.py resumes a real fp16 run exactly on a GPU)."""
    from distmnist.resume import load_training_state

    model = torch.nn.Linear(2, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    for _ in range(4):  # grow once: scale 2**11, tracker 1
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler.scale(model(torch.ones(1, 2)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    state = checkpoint_state(epoch=1, world=1, steps_per_epoch=4)
    state.scaler = scaler.state_dict()
    from distmnist.model import Net
    net = Net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.zeros(1, 1, 28, 28)).sum().backward()
    sgd.step()
    folder = write_checkpoint(tmp_path / "ckpt", net.state_dict(), sgd.state_dict(),
                              {"cpu": torch.get_rng_state().unsqueeze(0)}, state)
    loaded = load_checkpoint(folder)
    assert loaded.state.scaler == scaler.state_dict() and loaded.state.scaler["scale"] == 2.0**11

    class OneProcess:
        num_processes, process_index, device = 1, 0, torch.device("cpu")

    from distmnist.config import TrainConfig
    fresh = torch.amp.GradScaler("cpu")
    fresh_net = Net()
    notices = load_training_state(loaded, TrainConfig(), OneProcess(), fresh_net,
                                  torch.optim.SGD(fresh_net.parameters(), lr=0.1, momentum=0.9), fresh)
    assert fresh.get_scale() == 2.0**11 and fresh.state_dict() == scaler.state_dict()
    assert not any("loss scale" in n for n in notices)


# ---------------------------------------------------------------- the run's length


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_a_million_epochs_costs_no_more_memory_than_one(data, tmp_path):
    peaks = {}
    for epochs in (1, 1_000_000):
        out = tmp_path / f"e{epochs}"
        proc = subprocess.Popen([sys.executable, "-m", "distmnist.train", "--data-dir", str(data), "--output-dir",
                                 str(out), "--epochs", str(epochs), "--lr-schedule", "cosine", "--progress", "plain"],
                                cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in proc.stdout:  # the first epoch is done: every per-run structure exists by now
            if "epoch 1/" in line:
                break
        peaks[epochs] = peak_rss_mb(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert peaks[1_000_000] - peaks[1] < 100, peaks
    bad = run_in_process({"too-long": ("train", ["--data-dir", str(data), "--output-dir", str(tmp_path / "x"),
                                                 "--epochs", "1000001"], {})})["too-long"]
    assert bad["code"] == 2 and "--epochs must be between 1 and 1,000,000, got 1000001" in bad["stderr"]
