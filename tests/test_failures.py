"""Failing ranks. Two processes under torchrun on the CPU (gloo); one worker is SIGKILLed (it dies) or SIGSTOPped
(it hangs, as a frozen node would) in the middle of training. The job must end non-zero within 60 s instead of
hanging; for the hung rank the survivor must say that --dist-timeout ran out. No process may be left behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import BIN, ROOT, env, free_port, worker_exit, write_mnist

pytestmark = pytest.mark.slow

JOB_LIMIT_S = 60  # the promised bound for the job to end after a rank dies or hangs
DIST_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # enough steps per epoch that the kill lands mid-training, not in a save
    return write_mnist(tmp_path_factory.mktemp("failures") / "mnist", n_train=2000, n_test=100)


def workers(launcher: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun started (its children, read from /proc)."""
    found = {}
    for task in os.listdir(f"/proc/{launcher}/task"):
        for child in Path(f"/proc/{launcher}/task/{task}/children").read_text().split():
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            variables = dict(item.split(b"=", 1) for item in environ if b"=" in item)
            if b"RANK" in variables:
                found[int(variables[b"RANK"])] = int(child)
    return found


def alive(pid: int) -> bool:
    """Running or stopped, not a zombie and not gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> float:
    """Wait until `text` shows up in the file; returns the time it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return time.monotonic()
        assert proc.poll() is None, f"job ended early:\n{path.read_text()}"
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not seen within {timeout} s:\n{path.read_text()}")


def fail_one_rank(data: Path, tmp_path: Path, rank: int, sig: signal.Signals) -> dict:
    """Start a long 2-process job, hit `rank` with `sig` after epoch 1, and watch the job end."""
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "distmnist.train",
           "--data-dir", str(data), "--output-dir", str(tmp_path / "out"), "--epochs", "1000", "--batch-size", "20",
           "--progress", "plain", "--dist-timeout", str(DIST_TIMEOUT_S)]
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env(), start_new_session=True)
    pids: dict[int, int] = {}
    try:
        wait_for(stdout, "epoch 1/1000", proc, timeout=240)
        pids = workers(proc.pid)
        assert sorted(pids) == [0, 1], pids
        hit = time.monotonic()
        os.kill(pids[rank], sig)
        message_at = None
        while proc.poll() is None and time.monotonic() - hit < JOB_LIMIT_S + 30:
            if message_at is None and "--dist-timeout" in stderr.read_text():
                message_at = time.monotonic() - hit
            time.sleep(0.1)
        ended = time.monotonic() - hit
        left = [pid for pid in pids.values() if alive(pid)]
        return {"returncode": proc.poll(), "seconds": ended, "message_at": message_at, "left": left,
                "stderr": stderr.read_text(), "stdout": stdout.read_text()}
    finally:
        for pid in pids.values():  # never leave a stopped or orphaned worker behind
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# Machine 1's only rank fails while setting up (its data is missing, say) and exits, while machine 0's
# rank waits for it in the first collective (DDP's broadcast of the initial weights).
SETUP_FAILS = textwrap.dedent(
    """
    import os, sys
    import distmnist.data as data
    import distmnist.training as train
    from distmnist.errors import DistmnistError

    real_load_mnist = data.load_mnist

    def load_mnist(*args, **kwargs):
        if os.environ["RANK"] == "1":
            raise DistmnistError("injected: no MNIST on machine 1")
        return real_load_mnist(*args, **kwargs)

    data.load_mnist = load_mnist
    train.main(sys.argv[1:])
    """
)


def fail_during_setup(data: Path, tmp_path: Path) -> dict:
    """Two machines (torchrun --nnodes 2, one process each) on loopback; machine 1 fails in set-up.
    Returns both exit codes, both stderr texts, and how long machine 0 outlived machine 1."""
    script = tmp_path / "setup_fails.py"
    script.write_text(SETUP_FAILS)
    port = free_port()
    logs = [tmp_path / f"machine{node}.stderr" for node in (0, 1)]
    procs = []
    for node in (0, 1):
        with open(logs[node], "w") as err:
            procs.append(subprocess.Popen(
                [str(BIN / "torchrun"), "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                 "--master_addr=127.0.0.1", f"--master_port={port}", str(script), "--data-dir", str(data),
                 "--output-dir", str(tmp_path / "out"), "--epochs", "2", "--dist-timeout", str(DIST_TIMEOUT_S)],
                stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env(PYTHONPATH=str(ROOT)),
                start_new_session=True))
    try:
        procs[1].wait(timeout=180)
        failed = time.monotonic()
        procs[0].wait(timeout=JOB_LIMIT_S + 30)
        return {"returncodes": [proc.returncode for proc in procs], "seconds": time.monotonic() - failed,
                "stderr": [log.read_text() for log in logs]}
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


SCENARIOS = {"kill rank 1": (1, signal.SIGKILL), "kill rank 0": (0, signal.SIGKILL), "stop rank 1": (1, signal.SIGSTOP)}


@pytest.fixture(scope="module")
def jobs(data, tmp_path_factory) -> dict[str, dict]:
    """The failing jobs, run side by side: they mostly wait (on gloo, on torchrun's grace period)."""
    with ThreadPoolExecutor(len(SCENARIOS) + 1) as pool:
        futures = {name: pool.submit(fail_one_rank, data, tmp_path_factory.mktemp(name.replace(" ", "-")), rank, sig)
                   for name, (rank, sig) in SCENARIOS.items()}
        futures["setup"] = pool.submit(fail_during_setup, data, tmp_path_factory.mktemp("setup"))
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("rank", [1, 0])
def test_a_dead_rank_ends_the_job_non_zero_within_60_s(jobs, rank):
    job = jobs[f"kill rank {rank}"]
    print(f"rank {rank} SIGKILLed: job exit {job['returncode']} after {job['seconds']:.1f} s")
    assert job["returncode"] not in (0, None), job["stderr"]
    assert job["seconds"] < JOB_LIMIT_S
    assert job["left"] == [], "workers left running"


def test_a_hung_rank_ends_the_job_after_dist_timeout_naming_it(jobs):
    job = jobs["stop rank 1"]
    print(f"rank 1 SIGSTOPped: survivor's message after {job['message_at']} s, job exit {job['returncode']} "
          f"after {job['seconds']:.1f} s")
    assert job["returncode"] not in (0, None), job["stderr"]
    assert job["seconds"] < JOB_LIMIT_S
    assert job["left"] == [], "workers left running"
    # the surviving rank 0 stops by itself once the timeout has run out, and says why
    survivor = [line for line in job["stderr"].splitlines() if line.startswith("distmnist: error: rank 0:")]
    assert survivor, job["stderr"]
    assert f"--dist-timeout {DIST_TIMEOUT_S} s" in survivor[0] and "Timed out" in survivor[0]
    assert job["message_at"] is not None and DIST_TIMEOUT_S - 1 < job["message_at"] < DIST_TIMEOUT_S + 15


def test_a_rank_failing_in_set_up_on_another_machine_ends_the_survivor_cleanly(jobs):
    """Machine 0 has no launcher-level view of machine 1: the ranks agree on the failure, so machine 0
    leaves at once with machine 1's reason (before: a timed-out collective, or a traceback out of
    accelerator.prepare), and each machine shows the reason once."""
    job = jobs["setup"]
    print(f"machine 1 failed in set-up: exits {job['returncodes']}, machine 0 ended {job['seconds']:.1f} s later")
    assert job["returncodes"][0] != 0 and job["returncodes"][1] != 0  # torchrun's own code for a failed worker
    assert [worker_exit(text) for text in job["stderr"]] == [2, 2]  # each machine's worker: exit 2, a usage error
    assert job["seconds"] < 15
    assert "distmnist: error: injected: no MNIST on machine 1" in job["stderr"][1]
    survivor = [line for line in job["stderr"][0].splitlines() if line.startswith("distmnist: error:")]
    assert survivor == [f"distmnist: error: rank 1 on {socket.gethostname()}: injected: no MNIST on machine 1"], \
        job["stderr"][0][-3000:]
    assert "[rank0]: Traceback" not in job["stderr"][0]  # the worker's own: none (torchrun reports exit 2 its way)
