"""A private SLURM on localhost for the tests: its own munged, slurmctld and slurmd daemons, config,
ports, munge key and socket, all under one temporary folder, stopped by PID at the end.

Debian's `slurm-wlm` and `munge` packages provide the daemons (`apt-get install -y slurm-wlm munge`);
without them, or without root (slurmd must be able to start jobs), the tests that use the cluster
are skipped, except under CI=true, where that is a failure. Several nodes run as several slurmd
daemons on this one host (`slurmd -N NAME`, each with its own port), all reached at 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import stop_process

SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo")

# A requeued job may start again only after AuthInfo's cred_expire + 1 s (default 120 s, so about two
# minutes); 5 s is the smallest value SLURM accepts (below it, it falls back to 120 s with an error).
CRED_EXPIRE_S = 5
# The main scheduling loop runs every sched_interval seconds (default 60 s): without a short interval a
# requeued job waits up to a minute more after its begin time. Measured here: requeue to running 6-7 s.
SLURM_CONF = """\
ClusterName=distmnisttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
SchedulerParameters=sched_interval=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{nodes}
PartitionName=main Nodes={node_list} Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes={node_list} MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
"""
# Each node claims 4 CPUs whatever the host has (config_overrides), so that jobs of 1-2 CPUs fit;
# a job of the `urgent` partition preempts (requeues) jobs of `main` when they compete for CPUs.
NODE_LINE = "NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=4 RealMemory=2000 State=UNKNOWN"


def find(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def missing_reason() -> str | None:
    """Why a local SLURM cannot run here, or None."""
    missing = [n for n in DAEMONS + CLIENTS + ("munge",) if find(n) is None]
    if missing:
        return f"SLURM not installed (missing {', '.join(missing)}): apt-get install -y slurm-wlm munge"
    if os.geteuid() != 0:
        return "the local SLURM needs root (slurmd starts the jobs)"
    return None


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """munged + slurmctld + one slurmd per node, in the foreground of processes this object owns."""

    def __init__(self, nodes: int = 2):
        # Not under pytest's tmp_path: munged refuses a socket whose parent folders are not
        # searchable by everyone, and pytest's base folder is private (0700).
        self.root = Path(tempfile.mkdtemp(prefix="distmnist-slurm-"))
        self.root.chmod(0o755)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.conf = self.root / "slurm.conf"
        # Every process of this cluster carries the marker (daemons, slurmstepd, jobs submitted with
        # self.env), so whatever outlives the daemons is found and ended by PID in stop().
        self.marker = f"DISTMNIST_SLURM_CLUSTER={self.root}"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "DISTMNIST_SLURM_CLUSTER": str(self.root)}
        self.env.pop("SLURM_JOB_ID", None)
        self.procs: dict[str, subprocess.Popen] = {}

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> SlurmCluster:
        root = self.root
        for sub in ("munge", "munge/key", "state", "run", "log", *(f"spool/{n}" for n in self.nodes)):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "munge").chmod(0o755)  # the socket's folder: searchable by all, writable by root only
        key = root / "munge" / "key" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (root / "munge" / "key").chmod(0o700)

        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        nodes = "\n".join(NODE_LINE.format(name=n, host=host, port=p)
                          for n, p in zip(self.nodes, node_ports, strict=True))
        self.conf.write_text(SLURM_CONF.format(
            host=host, ctld_port=ctld_port, root=root, cred_expire=CRED_EXPIRE_S, nodes=nodes,
            node_list=",".join(self.nodes)))

        sock = root / "munge" / "munge.socket"
        self._spawn("munged", [find("munged"), "--foreground", f"--socket={sock}", f"--key-file={key}",
                               f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
                               f"--seed-file={root}/munge/munged.seed"])
        self._until(lambda: sock.exists(), timeout, "munged did not create its socket")
        self._spawn("slurmctld", [find("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._until(lambda: self.run_ok("scontrol", "ping") and "UP" in self.run("scontrol", "ping").stdout,
                    timeout, "slurmctld did not answer `scontrol ping`")
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", [find("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self._until(lambda: self.node_states() == {n: "idle" for n in self.nodes}, timeout,
                    "the nodes did not become idle")
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.close()

    def _until(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"local SLURM: {what}" + (f" ({', '.join(dead)} exited)" if dead else "")
                                   + "\n" + self.logs())
            time.sleep(0.2)

    def stop(self) -> list[str]:
        """Cancel every job, stop the daemons by PID, end any process left with the marker.
        Returns what had to be ended after the daemons stopped (normally nothing)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self.job_ids(active_only=True)
            if jobs:
                self.run("scancel", "--full", "--signal=KILL", *jobs)  # a quick end for any job left
            deadline = time.monotonic() + 30
            while self.job_ids(active_only=True) and time.monotonic() < deadline:
                time.sleep(0.5)
        for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            stop_process(proc, timeout=15)
        leftovers = self._end_marked_processes()
        shutil.rmtree(self.root, ignore_errors=True)
        return leftovers

    def _end_marked_processes(self) -> list[str]:
        """slurmstepd and job processes outlive slurmd; they inherited the marker: end them by PID."""
        found = []
        for sig in (signal.SIGTERM, signal.SIGKILL):  # then KILL what is still there
            pids = self.marked_pids()
            if not pids:
                break
            for pid in pids:
                found.append(f"{pid} {self.cmdline(pid)}")
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        return found

    def marked_pids(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if self.marker.encode() in environ:
                pids.append(int(entry.name))
        return pids

    @staticmethod
    def cmdline(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            return "?"

    # -- commands -----------------------------------------------------------------------------

    def run(self, *cmd: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 30):
        return subprocess.run([find(cmd[0]) or cmd[0], *cmd[1:]], capture_output=True, text=True,
                              env={**self.env, **(env or {})}, cwd=cwd, timeout=timeout)

    def run_ok(self, *cmd: str) -> bool:
        try:
            return self.run(*cmd).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def check(self, *cmd: str, **kw) -> str:
        result = self.run(*cmd, **kw)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> int:
        """Submit; returns the job id. env is added to this cluster's environment (the job inherits it)."""
        return int(self.check("sbatch", "--parsable", *args, env=env, cwd=cwd).strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once SLURM forgot it."""
        result = self.run("scontrol", "--oneliner", "show", "job", str(job_id))
        if result.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+(?:/\w+)?)=(\S*)", result.stdout))

    def job_ids(self, active_only: bool = False) -> list[str]:
        states = ["--states=PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING,REQUEUED,REQUEUE_FED,REQUEUE_HOLD,"
                  "RESIZING,SIGNALING,STAGE_OUT,STOPPED"] if active_only else ["--states=all"]
        result = self.run("squeue", "--noheader", "--format=%i", *states)
        return result.stdout.split() if result.returncode == 0 else []

    def wait_job(self, job_id: int, ready, timeout: float, what: str) -> dict[str, str]:
        """Poll `scontrol show job` until ready(job) holds; fail with the logs after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job and ready(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: {what} not reached within {timeout:.0f} s; "
                                     f"last state {job.get('JobState')} restarts {job.get('Restarts')}\n"
                                     + self.logs())
            time.sleep(0.25)

    def node_states(self) -> dict[str, str]:
        result = self.run("sinfo", "--noheader", "--Node", "--format=%N %t")
        if result.returncode != 0:
            return {}
        return dict(line.split() for line in result.stdout.splitlines() if line.strip())

    def logs(self, lines: int = 30) -> str:
        """The tails of the daemons' logs, for failure messages."""
        out = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)


def require_slurm() -> None:
    """Skip without a usable SLURM; under CI=true, fail instead."""
    reason = missing_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (required under CI=true; .ci/run installs it)")
        pytest.skip(reason)


def alive(pid: int) -> bool:
    """A live process (a zombie waiting for its parent to reap it is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False

