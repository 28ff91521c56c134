"""What a launch gets wrong is said, not trained through: an accelerate launch that starts one process of
several, threads that oversubscribe the cores, a busy machine, an Accelerate without the internals
distmnist relies on, a diverging weight decay."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from conftest import BIN, ROOT, env, free_port, in_process
from distmnist import threads
from distmnist.errors import DistmnistError


@pytest.mark.slow
def test_accelerate_launch_that_starts_one_of_several_processes_is_refused(mnist_dir, tmp_path):
    cmd = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes=2", f"--main_process_port={free_port()}",
           "-m", "distmnist.train", "--data-dir", str(mnist_dir), "--output-dir", str(tmp_path / "out"),
           "--epochs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env())
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("distmnist:")]
    assert ours == ["distmnist: error: accelerate launch was asked for several processes but started this one "
                    "alone (it does so with --cpu, or without --multi_gpu); refusing to train one process as if it "
                    "were several: on a CPU launch with --multi_gpu and ACCELERATE_USE_CPU=1, or use torchrun "
                    "--nproc_per_node N"], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.fixture
def machine(monkeypatch):
    """A pretend machine: its usable cores and load; torch's thread count put back afterwards."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def set_machine(cores: int, load: float, torch_threads: int) -> None:
        monkeypatch.setattr(threads, "usable_cores", lambda: cores)
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
        torch.set_num_threads(torch_threads)

    yield set_machine
    torch.set_num_threads(before)


def test_threads_are_fitted_to_the_usable_cores(machine):
    machine(cores=4, load=0.5, torch_threads=8)
    chosen = threads.choose_threads(local_processes=2)
    assert chosen.count == torch.get_num_threads() == 2
    assert chosen.notice == "8 torch threads per process would oversubscribe the 4 usable core(s) of 2 process(es): " \
                            "using 2"
    assert chosen.describe() == "2 per process, 4 core(s) usable, load 0.5"


def test_a_busy_machine_is_said_and_the_thread_count_kept(machine):
    machine(cores=2, load=3.2, torch_threads=2)
    chosen = threads.choose_threads(local_processes=1)
    assert chosen.count == 2  # never lowered for load: it would change the reduction order between launches
    assert chosen.notice.startswith("the machine is busy (load 3.2 on 2 core(s)) and each process runs 2 threads")
    assert "OMP_NUM_THREADS=1 runs one thread per process" in chosen.notice
    machine(cores=2, load=1.1, torch_threads=2)  # this process's own start-up: not busy
    assert threads.choose_threads(local_processes=1).notice is None
    machine(cores=2, load=5.0, torch_threads=1)  # one thread: nothing to say
    assert threads.choose_threads(local_processes=1).notice is None


def test_a_missing_accelerate_internal_is_one_line_naming_the_version(monkeypatch):
    import accelerate
    import accelerate.tracking

    from distmnist.distributed import check_tracker

    monkeypatch.delattr(accelerate.tracking, "LOGGER_TYPE_TO_CLASS")
    with pytest.raises(DistmnistError) as raised:
        check_tracker("my-tracker")
    assert str(raised.value) == (f"distmnist uses accelerate.tracking.LOGGER_TYPE_TO_CLASS, which accelerate "
                                 f"{accelerate.__version__} does not have: install an earlier accelerate (pip install "
                                 f"'accelerate<{accelerate.__version__}')")


def test_a_diverging_weight_decay_is_named_as_a_cause(mnist_dir, tmp_path):
    proc = in_process("train", "--data-dir", mnist_dir, "--output-dir", tmp_path / "out", "--epochs", "1",
                      "--weight-decay", "1e300", "--progress", "none")
    assert proc.returncode == 1
    assert proc.stderr.startswith("distmnist: error: training diverged") and \
        proc.stderr.rstrip().endswith("(try a lower --lr or --weight-decay)"), proc.stderr
