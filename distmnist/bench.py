"""Benchmark: the tutorial's pipeline against distmnist's fast path, same recipe, same device, one run.

    python -m distmnist.bench --data-dir ../shared/mnist --output-json bench.json

Rows (seconds per training epoch of the full training set, batch 100, SGD 0.01/0.9):
  tutorial         torchvision MNIST + ToTensor through a DataLoader (0 workers, shuffle), as written
  resident-eager   distmnist: data set resident on the device, batches by index, eager step
  resident-graph   the same with the step captured once as a CUDA graph (CUDA only)
Each row runs in a fresh process of its own. Warm-up (the first epoch) and graph capture are
reported on their own, never folded into the steady-state figure, which is the median of the later
epochs. Then the end-to-end wall time of a full default run (``python -m distmnist.train``, 10
epochs, start-up to exit, with the phases its run.json records) and, with ``--launch-run``, the same
under ``accelerate launch --num_processes 1`` and ``python -m accelerate.commands.launch``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import optim

from .args import ArgumentParser
from .batches import TrainOrder, eval_batches, train_batches
from .config import MAX_SEED
from .data import FILES, find_file, load_mnist, missing_files
from .distributed import make_accelerator
from .engine import Engine, make_sgd, synchronize, tune_for_device
from .errors import DistmnistError, RunFailed, cli
from .files import check_file, check_folder, write_json
from .model import Net
from .signals import CHECK_EVERY, StopRequests


@dataclass
class Row:
    name: str
    epoch_seconds: list[float]  # every timed epoch, the first one included
    capture_seconds: float = 0.0  # CUDA graph capture, inside the first epoch
    setup_seconds: float = 0.0  # building the data pipeline (decode, copy to device)
    test_accuracy: float | None = None
    notes: str = ""
    steady_seconds: float = field(init=False)  # median epoch after the first (warm-up)
    images_per_second: float = field(init=False)

    def finish(self, images: int) -> Row:
        later = self.epoch_seconds[1:] or self.epoch_seconds
        self.steady_seconds = statistics.median(later)
        self.images_per_second = images / self.steady_seconds
        return self


def torchvision_root(data_dir: Path, scratch: Path) -> Path:
    """A folder torchvision's MNIST class accepts (MNIST/raw with uncompressed files)."""
    raw = scratch / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in (n for pair in FILES.values() for n in pair):
        src = find_file(data_dir, name)
        if src is None:
            raise DistmnistError(f"--data-dir {data_dir}: {name} not found")
        opener = gzip.open if src.suffix == ".gz" else open
        with opener(src, "rb") as fin, open(raw / name, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    return scratch


def tutorial(root: Path, device: torch.device, epochs: int, seed: int) -> Row:
    """The tutorial's code path, modernised only where old APIs no longer exist (Variable, .data[0])."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    start = time.perf_counter()
    train = datasets.MNIST(root=str(root), train=True, transform=transforms.ToTensor(), download=False)
    test = datasets.MNIST(root=str(root), train=False, transform=transforms.ToTensor(), download=False)
    train_loader = DataLoader(dataset=train, batch_size=100, shuffle=True)
    test_loader = DataLoader(dataset=test, batch_size=1000)
    net = Net().to(device)
    optimizer = optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    setup = time.perf_counter() - start
    seconds = []
    for _ in range(epochs):
        synchronize(device)
        t0 = time.perf_counter()
        net.train()
        for data, target in train_loader:
            data, target = data.to(device), target.to(device)
            optimizer.zero_grad()
            loss = F.nll_loss(net(data), target)
            loss.backward()
            optimizer.step()
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
    net.eval()
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            correct += (net(data.to(device)).argmax(1) == target.to(device)).sum().item()
    return Row("tutorial", seconds, setup_seconds=setup, test_accuracy=correct / len(test))


def fast(name: str, accelerator, data_dir: Path, epochs: int, seed: int, graphs: bool) -> Row:
    """distmnist's own pieces, exactly as train.py wires them, on one process."""
    start = time.perf_counter()
    train, test = load_mnist(data_dir, allow_download=False)
    device = accelerator.device
    torch.manual_seed(seed)
    model = tune_for_device(Net(), device)
    optimizer = make_sgd(model, 0.01, 0.9, device)
    model, optimizer = accelerator.prepare(model, optimizer)
    sampler = TrainOrder(len(train), 1, 0, seed, batch_size=100)
    batches = train_batches(train, sampler, device, resident=True)
    engine = Engine(accelerator, model, optimizer, cuda_graphs=graphs)
    synchronize(device)
    setup = time.perf_counter() - start
    seconds, capture = [], 0.0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        stats = engine.train_epoch(batches)
        seconds.append(stats.seconds)
        capture += stats.capture_seconds
    result = engine.evaluate(eval_batches(test, 1, 0, 1000, device))
    return Row(name, seconds, capture_seconds=capture, setup_seconds=setup, test_accuracy=result.accuracy)


def full_run(data_dir: Path, launcher: str, cpu: bool) -> dict:
    """Wall time of a complete default training run in a fresh process, start-up to exit."""
    out = Path(tempfile.mkdtemp(prefix="distmnist-bench-"))
    args = ["--data-dir", str(data_dir), "--output-dir", str(out), "--progress", "none", *(["--cpu"] if cpu else [])]
    launch_flags = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if launcher == "python":
        cmd = [sys.executable, "-m", "distmnist.train", *args]
    elif launcher == "accelerate":  # the `accelerate` command: its CLI loads every subcommand first
        accelerate = Path(sys.executable).parent / "accelerate"
        cmd = [str(accelerate) if accelerate.exists() else "accelerate", "launch", *launch_flags,
               "-m", "distmnist.train", *args]
    else:  # the same launcher module without the CLI around it
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_flags, "-m", "distmnist.train", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RunFailed(f"full run with {launcher} failed: {child_failure(proc)}")
    summary = json.loads((out / "run.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    seconds = summary["seconds"]
    process = seconds["process"]
    return {
        "launcher": launcher,
        "wall_seconds": wall,
        "epochs": summary["epochs_run"],
        "test_accuracy": summary["final"]["test_accuracy"],
        # where the wall time went: the launcher and process exit, the interpreter and imports of the
        # training process before main(), then main()'s own phases
        "launcher_and_exit_seconds": None if process is None else wall - process,
        "interpreter_and_imports_seconds": None if process is None else process - seconds["main"],
        "phases": seconds,
    }


def stop_check_cost(data_dir: Path, cpu: bool, seed: int, epochs: int = 2, calls: int = 2000) -> dict:
    """What agreeing on the stop flag costs against the step (the aim: under 1%), on every rank of this launch.

    Times the agreement itself (``StopRequests.agreed``: a Python read with one process, one all-reduce
    of one integer with several), the step, and whole epochs with and without the checks. The fraction
    is one agreement per ``CHECK_EVERY`` steps (every step with one process) over the step time."""
    accelerator = make_accelerator(cpu, "no")
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    train, _ = load_mnist(data_dir, allow_download=False)
    torch.manual_seed(seed)
    model = tune_for_device(Net(), device)
    model, optimizer = accelerator.prepare(model, make_sgd(model, 0.01, 0.9, device))
    sampler = TrainOrder(len(train), world, rank, seed, batch_size=100)
    batches = train_batches(train, sampler, device, resident=True)
    engine = Engine(accelerator, model, optimizer)
    stop = StopRequests(accelerator)  # not installed: no signal is needed to time the agreement
    sampler.set_epoch(0)
    engine.train_epoch(batches)  # warm-up
    seconds: dict[str, list[float]] = {"without": [], "with": []}
    for epoch in range(1, 2 * epochs + 1):  # alternate, so drift of the machine hits both alike
        variant = "with" if epoch % 2 else "without"
        engine.stop = stop if variant == "with" else None
        sampler.set_epoch(epoch)
        seconds[variant].append(engine.train_epoch(batches).seconds)
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    for _ in range(calls):
        stop.agreed()
    check = (time.perf_counter() - start) / calls
    step = statistics.median(seconds["without"]) / len(batches)
    every = 1 if world == 1 else CHECK_EVERY
    return {"world_size": world, "check_every": every, "check_seconds": check, "step_seconds": step,
            "fraction_of_step": check / (every * step), "epoch_seconds_without": seconds["without"],
            "epoch_seconds_with": seconds["with"], "steps_per_epoch": len(batches)}


def stop_check_in_fresh_processes(argv: Sequence[str], world: int) -> dict:
    """The stop-check measurement on `world` CPU processes (torchrun) or one (python)."""
    inner = ["-m", "distmnist.bench", *argv, "--row", "stop-check"]
    if world == 1:
        cmd = [sys.executable, *inner]
    else:
        torchrun = Path(sys.executable).parent / "torchrun"
        with socket.socket() as sock:  # a free port for the rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [str(torchrun), f"--nproc_per_node={world}", f"--master_port={port}", *inner]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RunFailed(f"stop-check benchmark on {world} process(es) failed: {child_failure(proc)}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="distmnist bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="data", metavar="DIR", help="local MNIST IDX files (default: %(default)s)")
    p.add_argument("--tutorial-epochs", type=int, default=3,
                   help="epochs of the tutorial pipeline (default: %(default)s)")
    p.add_argument("--fast-epochs", type=int, default=5, help="epochs of each distmnist row (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")
    p.add_argument("--cpu", action="store_true", help="benchmark the CPU even if a GPU is present (default: False)")
    p.add_argument("--no-full-run", action="store_true", help="skip the end-to-end default run (default: False)")
    p.add_argument("--launch-run", action="store_true",
                   help="also time the full run under `accelerate launch --num_processes 1` and under "
                   "`python -m accelerate.commands.launch` (default: False)")
    p.add_argument("--stop-check", action="store_true",
                   help="also time the signal check (the ranks' agreement on the stop flag) against the step, on "
                   "1 and 2 CPU processes (default: False)")
    p.add_argument("--output-json", metavar="FILE", help="write the results as JSON (default: none)")
    p.add_argument("--row", choices=(*ROWS, "stop-check"), help=argparse.SUPPRESS)  # internal: one row as JSON
    return p


ROWS = ("tutorial", "resident-eager", "resident-graph")


def time_row(name: str, args: argparse.Namespace) -> dict:
    """One row, in this process (the parent runs each row in a fresh one)."""
    data_dir = Path(args.data_dir)
    if name == "tutorial":
        device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        with tempfile.TemporaryDirectory() as scratch:
            row = tutorial(torchvision_root(data_dir, Path(scratch)), device, args.tutorial_epochs, args.seed)
    else:
        accelerator = make_accelerator(args.cpu, "no")
        row = fast(name, accelerator, data_dir, args.fast_epochs, args.seed, graphs=name == "resident-graph")
    return asdict(row.finish(len(load_mnist(data_dir, allow_download=False)[0])))


def child_failure(proc: subprocess.CompletedProcess) -> str:
    """One line for why a child process failed: its own one-line error, else the last line it wrote."""
    lines = [line.strip() for line in (proc.stderr or "").splitlines() if line.strip()]
    own = [line for line in lines if line.startswith("distmnist: ")]
    last = own[-1].removeprefix("distmnist: ").removeprefix("error: ") if own else lines[-1] if lines else "no output"
    return f"{last} (exit {proc.returncode})"


def check_args(args: argparse.Namespace) -> None:
    """Every flag's range, the data and the output file, before any row runs (each in a process of its own)."""
    for flag, value in (("--tutorial-epochs", args.tutorial_epochs), ("--fast-epochs", args.fast_epochs)):
        if value < 1:
            raise DistmnistError(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.seed <= MAX_SEED:
        raise DistmnistError(f"--seed must be between 0 and {MAX_SEED}, got {args.seed}")
    if args.output_json:
        check_file(args.output_json, "--output-json", advice="give a file name")
    data_dir = Path(args.data_dir)
    check_folder(data_dir, "--data-dir", advice="give the folder that holds the four MNIST IDX files")
    missing = missing_files(data_dir)
    if missing:  # bench never downloads: it times what is on this machine
        raise DistmnistError(f"--data-dir {data_dir}: {', '.join(missing)} not found (bench does not download: "
                             "run `distmnist train` once, or point --data-dir at the MNIST files)")


def row_in_fresh_process(name: str, argv: Sequence[str]) -> dict:
    """Each pipeline gets a process of its own: what one leaves behind (allocator state, thread
    pools, autotuning caches) measurably changes the next one's time (docs/benchmarks.md)."""
    proc = subprocess.run([sys.executable, "-m", "distmnist.bench", *argv, "--row", name], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RunFailed(f"benchmark row {name} failed: {child_failure(proc)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@cli
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.row == "stop-check":
        result = stop_check_cost(Path(args.data_dir), cpu=True, seed=args.seed)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return 0
    if args.row:
        print(json.dumps(time_row(args.row, args)))
        return 0
    data_dir = Path(args.data_dir)
    cuda = torch.cuda.is_available() and not args.cpu
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"distmnist bench on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)

    rows = [row_in_fresh_process(row, argv) for row in ROWS if cuda or row != "resident-graph"]
    base = rows[0]["steady_seconds"]
    print(f"\n{'pipeline':<16} {'steady s/epoch':>14} {'images/s':>10} {'x tutorial':>10} {'first epoch s':>13} "
          f"{'capture s':>9} {'setup s':>8} {'accuracy':>8}")
    for r in rows:
        acc = f"{100 * r['test_accuracy']:.2f}%" if r["test_accuracy"] is not None else "-"
        print(f"{r['name']:<16} {r['steady_seconds']:>14.3f} {r['images_per_second']:>10,.0f} "
              f"{base / r['steady_seconds']:>10.2f} {r['epoch_seconds'][0]:>13.3f} {r['capture_seconds']:>9.3f} "
              f"{r['setup_seconds']:>8.2f} {acc:>8}")

    runs = []
    if not args.no_full_run:
        launchers = ["python"] + (["accelerate", "accelerate-module"] if args.launch_run else [])
        for launcher in launchers:
            runs.append(full_run(data_dir, launcher, args.cpu))
            r = runs[-1]
            ph = r["phases"]
            print(f"full default run ({launcher}): {r['wall_seconds']:.1f} s wall, {r['epochs']} epochs, "
                  f"test accuracy {100 * r['test_accuracy']:.2f}%; launcher and exit "
                  f"{r['launcher_and_exit_seconds'] or 0:.1f} s, interpreter and imports "
                  f"{r['interpreter_and_imports_seconds'] or 0:.1f} s, setup {ph['setup']:.2f} s ("
                  + ", ".join(f"{k[6:]} {v:.2f}" for k, v in ph.items() if k.startswith("setup_"))
                  + f"), train {ph['train']:.2f} s "
                  f"(capture {ph['capture']:.2f}), eval {ph['eval']:.2f} s, checkpoints {ph['checkpoint']:.2f} s")
    checks = []
    if args.stop_check:
        print("\nstop check (the ranks' agreement on a signal; CPU processes, gloo):")
        for world in (1, 2):
            c = stop_check_in_fresh_processes([a for a in argv if a != "--stop-check"], world)
            checks.append(c)
            print(f"  world size {world}: {1e6 * c['check_seconds']:.2f} us per check, every {c['check_every']} "
                  f"step(s) of {1e3 * c['step_seconds']:.2f} ms = {100 * c['fraction_of_step']:.3f}% of step time; "
                  f"epochs with checks {', '.join(f'{x:.2f}' for x in c['epoch_seconds_with'])} s, without "
                  f"{', '.join(f'{x:.2f}' for x in c['epoch_seconds_without'])} s")
    if args.output_json:
        write_json(args.output_json, {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                      "rows": rows, "full_runs": runs, "stop_checks": checks}, "--output-json")
    return 0


if __name__ == "__main__":
    main()
