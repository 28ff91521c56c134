"""Shared fixtures: small synthetic MNIST files, the real data set, and real multi-process launches."""

from __future__ import annotations

import atexit
import contextlib
import gc
import gzip
import json
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_MNIST = Path(os.environ.get("DISTMNIST_TEST_MNIST", ROOT.parent / "shared" / "mnist"))  # env: GPU host copy
BIN = Path(sys.executable).parent


def pytest_collection_finish(session) -> None:
    """Freeze what is alive once the test files are imported (torch, distmnist, the fixtures' modules) out of
    the garbage collector's reach: a command called in this process ends with gc.collect()
    (errors.leave_process_group), a walk over the whole heap that costs 0.1 s per call once torch is
    imported, and there are dozens of such calls here."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="module", autouse=True)
def freeze_what_is_imported() -> None:
    """The same at each test file's start, for what the files before it imported lazily (Accelerate's
    state, matplotlib, Starlette): only what a test file itself creates is left to walk."""
    gc.freeze()


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (magic 0x0000 0x08 ndim, big-endian dims, data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist(folder: Path, n_train: int = 600, n_test: int = 250, seed: int = 0, gz: bool = False) -> Path:
    """Write the four MNIST IDX files with learnable synthetic digits: class k lights up band k."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 * k + 4 : 2 * k + 7, 4:24] = 255
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = idx_bytes(arr)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    """600 train / 250 test synthetic images as plain IDX files."""
    return write_mnist(tmp_path / "mnist")


@pytest.fixture(scope="session")
def real_mnist() -> Path:
    """The real MNIST beside the project; its absence fails under CI=true and skips elsewhere."""
    if not (REAL_MNIST / "train-images-idx3-ubyte.gz").exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"real MNIST expected at {REAL_MNIST} under CI=true")
        pytest.skip(f"real MNIST not found at {REAL_MNIST}")
    return REAL_MNIST


@pytest.fixture(scope="session")
def trained_run(real_mnist, tmp_path_factory) -> Path:
    """The output folder of a 1-epoch run of the default recipe on the real MNIST, trained once per session
    (predict and serve read it)."""
    out = tmp_path_factory.mktemp("real-run")
    result = run_in_process({"train": ("train", ["--data-dir", real_mnist, "--no-download", "--epochs", "1",
                                                 "--output-dir", out, "--progress", "none"], {})})["train"]
    assert result["code"] == 0, result["stderr"]
    return out


def metrics_record(epoch: int, steps_per_epoch: int = 14, world: int = 2) -> dict:
    """An epoch's metrics record with every field a resumed run reads back."""
    return {"epoch": epoch, "step": steps_per_epoch * epoch, "train_loss": 0.5, "train_samples": 600,
            "train_seconds": 1.5, "test_loss": 0.4, "test_accuracy": 0.9, "test_correct": 225, "test_samples": 250,
            "world_size": world}


def checkpoint_state(run_id: str = "run-a", epoch: int = 3, world: int = 2, steps_per_epoch: int = 14,
                     config: dict | None = None):
    """A consistent TrainState at the end of ``epoch`` (records for epochs 1..epoch, the step where they end)."""
    from distmnist.state import DataOrder, RunProgress, TrainState

    config = {"lr": 0.01} if config is None else config
    return TrainState(
        run_id=run_id, epoch=epoch, step=steps_per_epoch * epoch,
        data=DataOrder(seed=1, world_size=world, batch_size=25, global_batch_size=None, train_images=600, val_size=0,
                       limit_train=None, digest="0" * 64),
        progress=RunProgress([metrics_record(e, steps_per_epoch, world) for e in range(1, epoch + 1)]),
        config=config, config_history=[{"from_epoch": 1, "from_step": 0, "config": config}])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout`` seconds; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # of a launcher around pytest


def env(**extra: str) -> dict[str, str]:
    """This environment without a launcher's variables, one thread per process, no GPU, and `extra`."""
    e = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    e.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}, **extra)
    return e


def run_module(module: str, *args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """python -m distmnist.<module> args, in one process."""
    return subprocess.run([sys.executable, "-m", f"distmnist.{module}", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env(), **kw)


def torchrun(nproc: int, module: str, *args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """torchrun --nproc_per_node N -m distmnist.<module> args: real N-process gloo on the CPU."""
    cmd = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", f"distmnist.{module}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env(), **kw)


def accelerate_launch(nproc: int, module: str, *args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """accelerate launch --multi_gpu --num_processes N on the CPU (ACCELERATE_USE_CPU=1)."""
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", f"--num_processes={nproc}", "--num_machines=1",
           "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}",
           "-m", f"distmnist.{module}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env(ACCELERATE_USE_CPU="1"), **kw)


def assert_ok(proc) -> None:
    """The command ended with exit 0 (the failure shows its output)."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"


def one_line(proc, code: int, *needles: str) -> str:
    """Exit `code`, exactly one line on stderr holding every needle, no traceback anywhere; returns the line."""
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def distmnist_tracebacks(text: str) -> list[str]:
    """Tracebacks out of distmnist's own code in a launcher's output. (torchrun and accelerate launch
    report a worker's non-zero exit, and a signal to themselves, with a traceback of their own: not ours.)"""
    return [block for block in text.split("Traceback (most recent call last):")[1:]
            if re.search(r'File "[^"]*[/\\]distmnist[/\\]\w+\.py"', block) or "KeyboardInterrupt" in block]


def worker_exit(stderr: str) -> int:
    """The exit code of the failed worker that torchrun / accelerate launch name as the root cause. When
    one worker fails the launcher SIGTERMs the others, so their own codes may read -15: only the first
    observed failure tells what the job did. Every other reported code must be that one or -15."""
    _, _, root = stderr.partition("Root Cause (first observed failure):")
    match = re.search(r"exitcode\s*: (-?\d+)", root)
    assert match, stderr[-3000:]
    code = int(match.group(1))
    others = {int(c) for c in re.findall(r"exitcode\s*: (-?\d+)", stderr)}
    assert others <= {code, -15}, stderr[-3000:]
    return code


# Sends a real signal to this process (or its launcher) at an exact point of a run, then runs
# train.main(argv): argv[1] where (step: after the at-th training step; launcher: the same, to the
# parent; twice: two signals; evaluate: as the at-th evaluation starts; save: between two files of a
# checkpoint), argv[2] at, argv[3] the signal's name (SIGKILL too: a lost worker), the rest train's argv.
# SIGNAL_RANK picks the rank that fires (default 0).
STOP_DRIVER = textwrap.dedent(
    """
    import os, signal, sys, time
    import distmnist.checkpoint as checkpoint
    import distmnist.engine as engine
    from distmnist.training import main

    where, at, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sig = getattr(signal, name)
    me = os.environ.get("RANK", "0") == os.environ.get("SIGNAL_RANK", "0")
    calls = 0

    def fire(pid):
        print(f"FIRED {time.time():.3f}", file=sys.stderr, flush=True)
        os.kill(pid, sig)
        if where == "twice":
            os.kill(pid, sig)

    def wrap(owner, attr, before):
        real = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            global calls
            calls += 1
            hit = me and calls == at
            if hit and before:
                fire(os.getppid() if where == "launcher" else os.getpid())
            result = real(*args, **kwargs)
            if hit and not before:
                fire(os.getppid() if where == "launcher" else os.getpid())
            return result

        setattr(owner, attr, wrapper)

    if where in ("step", "launcher", "twice"):  # after the at-th training step of the run
        wrap(engine.Engine, "_step", before=False)
    elif where == "evaluate":  # as the at-th evaluation starts
        wrap(engine.Engine, "evaluate", before=True)
    elif where == "save":  # between two files of a checkpoint being written
        wrap(checkpoint, "write_bytes", before=False)
    main(sys.argv[4:])
    """
)


# Calls the real entry points, train.main(argv), evaluate.main(argv), plot.main(argv) ... (what `python -m`
# runs, with its exit code and one-line error) in one interpreter that lives for the whole session: one
# torch import for every case of every test file instead of one per case. Each request is a line of JSON
# {case: [command, argv, environ]} on stdin; the answer, {case: {code, stdout, stderr}}, is one line on a
# private copy of stdout (fd 1 itself goes to /dev/null, so that nothing a case writes below Python's
# sys.stdout can corrupt the answer). The environment is restored after each case. What is alive after a
# case (torch, the imported modules) is frozen out of the garbage collector's reach: a command called from
# Python ends with gc.collect() (errors.leave_process_group), a walk over the whole heap that would
# otherwise cost 0.2 s per case in an interpreter that has imported torch.
IN_PROCESS_DRIVER = textwrap.dedent(
    """
    import contextlib, gc, importlib, io, json, os, sys, traceback
    from distmnist.cli import MODULES

    answer = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    for request in sys.stdin:
        results = {}
        for name, (command, argv, environ) in json.loads(request).items():
            saved = dict(os.environ)
            os.environ.update(environ)
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:  # the command's own code (distmnist.training for train), as `distmnist COMMAND` runs it
                    module = importlib.import_module(MODULES.get(command, f"distmnist.{command}"))
                    code = module.main(argv)
                except SystemExit as exit:
                    code = exit.code
                except BaseException:
                    code, err = "exception", io.StringIO(traceback.format_exc())
            os.environ.clear()
            os.environ.update(saved)
            results[name] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
            gc.freeze()
        answer.write(json.dumps(results) + "\\n")
        answer.flush()
    """
)


class InProcessDriver:
    """The session's IN_PROCESS_DRIVER process: started at the first request, started again after a
    request that it did not answer in time (or that killed it), stopped when the session ends. Its stderr
    goes to a log file whose end is shown when it fails."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None

    def start(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            if self.log is None:
                handle, name = tempfile.mkstemp(prefix="distmnist-in-process-", suffix=".log")
                os.close(handle)
                self.log = Path(name)
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen([sys.executable, "-c", IN_PROCESS_DRIVER], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=log, cwd=ROOT, env=env())
        return self.proc

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(BrokenPipeError):  # (a driver that died cannot read it)
                self.proc.stdin.close()  # the driver's loop ends at the end of its input
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                stop_process(self.proc, timeout=10)
            self.proc.stdout.close()
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self.log is not None:
            self.log.unlink(missing_ok=True)

    def ask(self, cases: dict, timeout: float) -> dict:
        proc = self.start()
        proc.stdin.write(json.dumps(cases).encode() + b"\n")
        proc.stdin.flush()
        line, deadline = b"", time.monotonic() + timeout
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(proc.stdout.fileno(), 1 << 20) if ready else b""
            if not chunk:  # the driver died, or gave no answer in time: a fresh one serves the next request
                died = proc.poll()
                self.stop()
                why = f"died (exit code {died})" if died is not None else f"gave no answer within {timeout} s"
                raise AssertionError(f"the in-process driver {why}\n{self.log.read_text(errors='replace')[-3000:]}")
            line += chunk
        return json.loads(line)


DRIVER = InProcessDriver()
atexit.register(DRIVER.close)


def run_in_process(cases: dict[str, tuple[str, list, dict[str, str]]], timeout: float = 300) -> dict[str, dict]:
    """Each case (command, argv, extra environment) through the session's IN_PROCESS_DRIVER:
    {case: {code, stdout, stderr}}."""
    return DRIVER.ask({name: (command, [str(a) for a in argv], environ)
                       for name, (command, argv, environ) in cases.items()}, timeout)


def in_process(command: str, *args, timeout: float = 300, **environ: str) -> subprocess.CompletedProcess:
    """run_module's twin without the process: `distmnist COMMAND args` through the session's in-process
    driver, its exit code, stdout and stderr as a CompletedProcess. For what happens inside one command;
    what needs a process of its own (signals, locks held by another process, exit paths) uses run_module."""
    result = run_in_process({command: (command, list(args), environ)}, timeout)[command]
    return subprocess.CompletedProcess([command, *map(str, args)], result["code"], result["stdout"], result["stderr"])
