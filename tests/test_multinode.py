"""Several machines, simulated on one host over loopback. Two "machines" with one process each (machine ranks 0
and 1, main address 127.0.0.1), started through launch/multi_node.sh, must train exactly as 2 processes on one
machine: bit-identical weights.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, ROOT, env, free_port, write_mnist

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "launch" / "multi_node.sh"
N_TEST = 251  # not a multiple of the world size: exact counting is visible


def node_command(rank: int, port: int, args: list[str]) -> list[str]:
    """One machine's launch: through launch/multi_node.sh, or accelerate launch where it is missing."""
    if SCRIPT.exists():
        return [str(SCRIPT), "--num-machines", "2", "--machine-rank", str(rank), "--main-addr", "127.0.0.1",
                "--main-port", str(port), "--gpus-per-machine", "1", "--", *args]
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_machines=2", "--num_processes=2",
            f"--machine_rank={rank}", "--main_process_ip=127.0.0.1", f"--main_process_port={port}",
            "--rdzv_backend=static", "--same_network", "--mixed_precision=no", "--dynamo_backend=no",
            "-m", "distmnist.train", *args]


def test_two_machines_over_loopback_match_two_processes_on_one_machine(tmp_path):
    data = write_mnist(tmp_path / "mnist", n_train=600, n_test=N_TEST)

    def train_args(out: Path) -> list[str]:
        return ["--data-dir", str(data), "--output-dir", str(out), "--epochs", "2", "--progress", "plain",
                "--seed", "5"]

    environ = env(ACCELERATE=str(BIN / "accelerate"), ACCELERATE_USE_CPU="1")
    port = free_port()
    jobs = {  # all side by side: the two machines must meet, the one-machine run is independent
        "machine 0": node_command(0, port, train_args(tmp_path / "node0")),
        "machine 1": node_command(1, port, train_args(tmp_path / "node1")),
        "one machine": [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}",
                        "-m", "distmnist.train", *train_args(tmp_path / "single")],
    }
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True) for name, cmd in jobs.items()}
    results = {}
    try:
        for name, proc in procs.items():
            results[name] = proc.communicate(timeout=300)
            assert proc.returncode == 0, (name, results[name][1][-3000:])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    print("launched through", SCRIPT if SCRIPT.exists() else "accelerate launch (launch/multi_node.sh missing)")

    # one job of two ranks, not two independent jobs: the world size is 2 and only global rank 0 writes
    assert "world size: 2" in results["machine 0"][0]
    assert not (tmp_path / "node1" / "model.safetensors").exists() and results["machine 1"][0].strip() == ""
    for out in ("node0", "single"):
        records = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        assert [(r["world_size"], r["test_samples"]) for r in records] == [(2, N_TEST)] * 2

    two_machines = tmp_path / "node0"
    one_machine = tmp_path / "single"
    assert (two_machines / "model.safetensors").read_bytes() == (one_machine / "model.safetensors").read_bytes()
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        a = two_machines / "checkpoints" / "epoch-0002" / name
        assert a.read_bytes() == (one_machine / "checkpoints" / "epoch-0002" / name).read_bytes(), name
