"""CPU threads per process: never more than the cores this process may use, and a word in the plan when
those cores are busy with other work.

torch takes one thread per core it sees. With several processes on one machine (torchrun sets
OMP_NUM_THREADS=1, Accelerate divides the cores) or a CPU set by a scheduler (taskset, cgroups,
SLURM's --cpus-per-task) that can be too many: then distmnist takes the cores this process may use
divided by the processes of this machine. It never lowers the thread count because of load, which
changes from one minute to the next: the count decides the order of oneDNN's reductions, and a resume
is bit-identical only with the same count. A busy machine is said in the plan instead, with the cure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

BUSY_SHARE = 0.5  # more than half a core busy with other work, per thread we would run: say so


@dataclass
class Threads:
    count: int  # torch threads of this process
    cores: int  # cores this process may use
    load: float | None  # the machine's 1-minute load average, other processes included
    notice: str | None = None

    def describe(self) -> str:
        load = f", load {self.load:.1f}" if self.load is not None else ""
        return f"{self.count} per process, {self.cores} core(s) usable{load}"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def choose_threads(local_processes: int) -> Threads:
    """Fit torch's threads to the cores this process may use (shared by this machine's processes)."""
    cores = usable_cores()
    fair = max(1, cores // max(local_processes, 1))
    notice = None
    if torch.get_num_threads() > fair and "OMP_NUM_THREADS" not in os.environ:
        notice = (f"{torch.get_num_threads()} torch threads per process would oversubscribe the {cores} usable "
                  f"core(s) of {local_processes} process(es): using {fair}")
        torch.set_num_threads(fair)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    threads = Threads(torch.get_num_threads(), cores, load, notice)
    # the load includes this process's own start-up (about one core); the rest is other work
    others = None if load is None else max(load - 1.0, 0.0)
    if notice is None and others is not None and threads.count > 1 and \
            others > cores - threads.count * local_processes + BUSY_SHARE * threads.count:
        threads.notice = (f"the machine is busy (load {load:.1f} on {cores} core(s)) and each process runs "
                          f"{threads.count} threads: with fewer idle cores than threads every step can be many "
                          "times slower; OMP_NUM_THREADS=1 runs one thread per process")
    return threads
