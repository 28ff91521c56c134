"""launch/slurm.sbatch under a real SLURM, a private one on this host
(tests/slurm_cluster.py). The job is stopped by the warning signal, by `scontrol requeue` and by a job
of a higher-priority partition; it checkpoints, is requeued, resumes with --resume auto and ends with
weights bit-identical to an uninterrupted run of the same world size. A finished job that is
requeued once more trains nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, alive, require_slurm

from conftest import BIN, ROOT, env, free_port, write_mnist

pytestmark = pytest.mark.slow

SBATCH = ROOT / "launch" / "slurm.sbatch"
EPOCHS = 8
N_TRAIN = 4000  # 10 steps per rank and epoch at 2 ranks: an epoch lasts about half a second here
RUN_HEADER = re.compile(r"^distmnist job (\d+), run (\d+),", re.M)
# an epoch's line in plain mode: "HH:MM:SS  epoch 3/10  train loss ..." (progress lines read "epoch 3/10: ")
EPOCH_LINE = re.compile(rf"^(?:\d\d:\d\d:\d\d  )?epoch (\d+)/{EPOCHS}  ", re.M)


def train_args(data: Path, out: Path) -> list[str]:
    return ["--data-dir", str(data), "--output-dir", str(out), "--epochs", str(EPOCHS), "--progress", "plain",
            "--seed", "3"]


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running local SLURM with two nodes (n1, n2) on this host; stopped, by PID, after the module."""
    require_slurm()
    cluster = SlurmCluster(nodes=2)
    try:
        cluster.start()
        yield cluster
    finally:
        leftovers = cluster.stop()
        if leftovers:
            print("local SLURM: ended leftover processes:", *leftovers, sep="\n  ")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("slurm-data"), n_train=N_TRAIN, n_test=250)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The uninterrupted run: plain torchrun, 2 processes, same flags; started once, in the background,
    while the SLURM jobs run. Call it to get the path of its model.safetensors."""
    out = tmp_path_factory.mktemp("slurm-reference")
    cmd = [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "distmnist.train",
           *train_args(data, out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def model() -> Path:
        if proc.returncode is None:
            output, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, output[-3000:]
        assert proc.returncode == 0
        return out / "model.safetensors"

    yield model
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def job_env(processes_per_node: int) -> dict[str, str]:
    """What the job inherits: this venv's accelerate, the processes per node, one thread per process
    (CPU bit-exactness depends on the thread count), no GPU."""
    return env(ACCELERATE=str(BIN / "accelerate"), GPUS_PER_MACHINE=str(processes_per_node))


def submit(cluster: SlurmCluster, tmp_path: Path, data: Path, *sbatch_args: str, processes_per_node: int):
    out, log = tmp_path / "out", tmp_path / "job.out"
    job = cluster.sbatch("--gpus-per-node=0", f"--output={log}", *sbatch_args, str(SBATCH),
                         *train_args(data, out), env=job_env(processes_per_node), cwd=ROOT)
    return job, out, log


def runs(log: Path) -> dict[int, str]:
    """The job's log, split into its runs (the script prints a header at the start of each)."""
    text = log.read_text()
    heads = list(RUN_HEADER.finditer(text))
    return {int(h.group(2)): text[h.start(): nxt.start() if nxt else len(text)]
            for h, nxt in zip(heads, [*heads[1:], None], strict=True)}


def epochs_trained(section: str) -> list[int]:
    return [int(e) for e in EPOCH_LINE.findall(section)]


def epochs_done(out: Path) -> int:
    """Epochs recorded in metrics.jsonl (a line is appended once the epoch's checkpoint is complete)."""
    try:
        return (out / "metrics.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


# A job that is queued, running, or passing through a requeue (RUNNING -> COMPLETING -> PENDING): not ended.
ALIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED")


def wait_for_epochs(cluster: SlurmCluster, job: int, out: Path, epochs: int, log: Path, timeout: float = 180):
    """Wait until `epochs` epochs are complete and checkpointed; fail if the job ends first."""
    deadline = time.monotonic() + timeout
    while epochs_done(out) < epochs:
        state = cluster.job(job).get("JobState")
        if state not in ALIVE or time.monotonic() > deadline:
            raise AssertionError(f"job {job} {state} before epoch {epochs} was checkpointed; log:\n"
                                 + (log.read_text()[-4000:] if log.exists() else ""))
        time.sleep(0.1)


def restarted(cluster: SlurmCluster, job: int, count: int, timeout: float = 120) -> float:
    """Wait until run count+1 of the job is running; returns the seconds it took."""
    start = time.monotonic()
    cluster.wait_job(job, lambda j: j["Restarts"] == str(count) and j["JobState"] == "RUNNING", timeout,
                     f"run {count + 1} running")
    return time.monotonic() - start


def completed(cluster: SlurmCluster, job: int, restarts: int, log: Path, timeout: float = 240) -> dict:
    try:
        return cluster.wait_job(job, lambda j: j["Restarts"] == str(restarts) and j["JobState"] in
                                ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
                                timeout, f"the end of run {restarts + 1}")
    except AssertionError as err:
        raise AssertionError(f"{err}\njob log:\n{log.read_text()[-6000:]}") from None


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of the run (hidden ones included), by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_one_node_two_processes_warned_then_requeued_ends_bit_identical(slurm_cluster, reference, data, tmp_path):
    cluster = slurm_cluster
    t0 = time.monotonic()
    job, out, log = submit(cluster, tmp_path, data, "--nodes=1", "--cpus-per-task=2", processes_per_node=2)

    # 1. The time-limit warning, as --signal=B:USR1 sends it: SIGUSR1 to the batch shell only.
    wait_for_epochs(cluster, job, out, 1, log)
    cluster.check("scancel", "--batch", "--signal=USR1", str(job))
    warned_to_running = restarted(cluster, job, 1)

    # 2. Preemption as SLURM does it: SIGTERM to every process, then SLURM requeues the job.
    # (metrics.jsonl may be in the middle of its rewrite by run 2: take the log's count too)
    wait_for_epochs(cluster, job, out, max(epochs_done(out), len(epochs_trained(runs(log)[1]))) + 1, log)
    cluster.check("scontrol", "requeue", str(job))
    requeued_to_running = restarted(cluster, job, 2)

    final = completed(cluster, job, 2, log)
    total = time.monotonic() - t0
    text = log.read_text()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", text[-6000:]
    print(f"job {job}: 3 runs in {total:.1f} s; SIGUSR1 -> run 2 running {warned_to_running:.1f} s, "
          f"scontrol requeue -> run 3 running {requeued_to_running:.1f} s")

    sections = runs(log)
    assert sorted(sections) == [1, 2, 3], text[-6000:]
    assert "SIGUSR1" in sections[1] and "requeueing" in sections[1], sections[1][-3000:]
    assert "SIGTERM" in sections[2], sections[2][-3000:]
    assert "training complete" in sections[3], sections[3][-3000:]
    trained = [epochs_trained(sections[r]) for r in (1, 2, 3)]
    # every run stopped early or continued where the previous one stopped: none started over at epoch 1
    assert all(trained) and max(trained[0]) < EPOCHS and min(trained[1]) > 1 and min(trained[2]) > 1, trained
    assert sorted(set(sum(trained, []))) == list(range(1, EPOCHS + 1)), trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    assert {r["world_size"] for r in records} == {2}

    assert (out / "model.safetensors").read_bytes() == reference().read_bytes()

    # 3. A finished job requeued once more: it runs, finds the run complete and trains nothing.
    before = snapshot(out)
    cluster.check("scontrol", "requeue", str(job))
    final = completed(cluster, job, 3, log)
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", log.read_text()[-4000:]
    fourth = runs(log)[4]
    assert epochs_trained(fourth) == [] and "training complete" in fourth, fourth[-3000:]
    assert snapshot(out) == before


def test_two_nodes_preempted_by_an_urgent_job_end_bit_identical(slurm_cluster, reference, data, tmp_path):
    """Two slurmd on this host, one process each (world size 2, as the reference); a job of the
    higher-priority partition takes node n2, SLURM requeues the training, which resumes after it."""
    cluster = slurm_cluster
    t0 = time.monotonic()
    job, out, log = submit(cluster, tmp_path, data, "--nodes=2", "--cpus-per-task=1", processes_per_node=1)
    wait_for_epochs(cluster, job, out, 1, log)
    assert cluster.job(job)["NodeList"] == "n[1-2]"
    urgent = cluster.sbatch("--partition=urgent", "--nodelist=n2", "--cpus-per-task=4", "--output=/dev/null",
                            "--wrap=sleep 1")
    preempted_to_running = restarted(cluster, job, 1)
    urgent_job = cluster.job(urgent)
    assert urgent_job["JobState"] == "COMPLETED", urgent_job

    final = completed(cluster, job, 1, log)
    text = log.read_text()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", text[-6000:]
    print(f"job {job}: 2 runs on 2 nodes in {time.monotonic() - t0:.1f} s; "
          f"preemption -> run 2 running {preempted_to_running:.1f} s")
    sections = runs(log)
    assert sorted(sections) == [1, 2] and "2 node(s)" in sections[1], text[-6000:]
    assert "SIGTERM" in sections[1], sections[1][-3000:]
    trained = [epochs_trained(sections[r]) for r in (1, 2)]
    assert all(trained) and max(trained[0]) < EPOCHS and min(trained[1]) > 1, trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["world_size"]) for r in records] == [(e, 2) for e in range(1, EPOCHS + 1)]

    assert (out / "model.safetensors").read_bytes() == reference().read_bytes()


def test_time_limit_warning_checkpoints_requeues_and_resumes(slurm_cluster, data, tmp_path):
    """SLURM's own warning: a one-minute job whose training needs far longer gets SIGUSR1 from
    --signal=B:USR1@10 and requeues itself instead of running into the limit (state TIMEOUT, never
    requeued); the next run continues after the last epoch the first one completed. SLURM checks time
    limits every 30 s and warns up to 30 s before the lead time: 20-50 s into this run (the script's
    own @120 would come at once in a one-minute job)."""
    cluster = slurm_cluster
    out, log = tmp_path / "out", tmp_path / "job.out"
    args = ["--data-dir", str(data), "--output-dir", str(out), "--epochs", "10000", "--progress", "plain"]
    job = cluster.sbatch("--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=1", "--signal=B:USR1@10",
                         f"--output={log}", str(SBATCH), *args, env=job_env(1), cwd=ROOT)
    epoch_line = re.compile(r"^(?:\d\d:\d\d:\d\d  )?epoch (\d+)/10000  ", re.M)

    def later_epochs() -> list[int]:
        return [int(e) for run, text in runs(log).items() if run > 1 for e in epoch_line.findall(text)]

    try:
        cluster.wait_job(job, lambda j: j["Restarts"] != "0", 120, "a requeue")
        deadline = time.monotonic() + 120
        while not later_epochs():
            state = cluster.job(job)
            assert state.get("JobState") in ALIVE and time.monotonic() < deadline, \
                f"no epoch after the requeue (job {state.get('JobState')}):\n{log.read_text()[-4000:]}"
            time.sleep(0.25)
    finally:
        cluster.run("scancel", str(job))
    first = runs(log)[1]
    assert "SIGUSR1" in first and "requeueing" in first, first[-3000:]
    started = re.search(r"run 1, (\S+):", first).group(1)
    warned = re.search(r"SIGUSR1 at (\S+):", first).group(1)
    seconds = time.mktime(time.strptime(warned, "%Y-%m-%dT%H:%M:%SZ")) - time.mktime(
        time.strptime(started, "%Y-%m-%dT%H:%M:%SZ"))
    before = [int(e) for e in epoch_line.findall(first)]
    print(f"job {job}: time-limit warning {seconds:.0f} s into a 60 s run, after {len(before)} epochs")
    assert 0 <= seconds < 60
    assert later_epochs()[0] == (max(before) if before else 0) + 1, (before, later_epochs())


def test_resume_flag_is_refused(slurm_cluster, data, tmp_path):
    """The job always resumes with --resume auto; a --resume of the user would restart every requeue."""
    log = tmp_path / "job.out"
    job = slurm_cluster.sbatch("--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}",
                               str(SBATCH), "--data-dir", str(data), "--resume", str(tmp_path),
                               env=job_env(1), cwd=ROOT)
    final = completed(slurm_cluster, job, 0, log, timeout=60)
    assert (final["JobState"], final["ExitCode"]) == ("FAILED", "2:0")
    assert "always trains with --resume auto" in log.read_text()


def test_cluster_stops_every_process_it_started(tmp_path):
    """stop() leaves nothing behind, even with a job still running: daemons, slurmstepd, job."""
    require_slurm()
    cluster = SlurmCluster(nodes=1)
    try:
        cluster.start()
        job = cluster.sbatch("--output=/dev/null", "--wrap=sleep 300")
        cluster.wait_job(job, lambda j: j["JobState"] == "RUNNING", 30, "running")
        running = cluster.marked_pids()
        daemons = [p.pid for p in cluster.procs.values()]
        assert set(daemons) <= set(running) and len(running) > len(daemons)  # slurmstepd, the job's shell
    finally:
        cluster.stop()
    assert [pid for pid in cluster.marked_pids() if alive(pid)] == []
    assert [pid for pid in running if alive(pid)] == []
