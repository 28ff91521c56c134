"""Offline. Without data and without network the tool fails within 30 s, saying where to put the four
files; with local data it makes no network call at all.

Two independent layers block the network, both from outside the tool:
- the kernel: the command runs in a fresh network namespace (``unshare -n``, root only), where no
  packet can leave; a "black hole" variant routes everything into loopback, where it is dropped, so
  connections hang instead of failing at once, as behind a firewall;
- Python: a ``sitecustomize`` on PYTHONPATH replaces socket connect / getaddrinfo with versions that
  record every non-loopback attempt in a log file and refuse it.
Where ``unshare`` is not permitted, the Python layer alone is used.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

from conftest import ROOT, env, write_mnist
from distmnist.data import FILES
from distmnist.model import Net

OFFLINE_LIMIT_S = 30  # the promised bound for "no data, no network"

GUARD = textwrap.dedent(
    """
    # Loaded at interpreter start-up (sitecustomize): every non-loopback network attempt is recorded
    # in $NET_GUARD_LOG and refused.
    import os, socket

    _LOG = os.environ["NET_GUARD_LOG"]
    _LOCAL = {"localhost", "127.0.0.1", "::1", "", None}


    def _local(host):
        host = host.decode() if isinstance(host, bytes) else host
        return host in _LOCAL or str(host).startswith("127.")


    def _refuse(what, target):
        with open(_LOG, "a") as fh:
            fh.write(f"{os.getpid()} {what} {target!r}\\n")
        raise OSError(101, f"network blocked by the test guard ({what} {target!r})")


    def _checked(method, name):
        def call(self, address, *args):
            if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
                _refuse(name, address)
            return method(self, address, *args)
        return call


    for _name in ("connect", "connect_ex"):
        setattr(socket.socket, _name, _checked(getattr(socket.socket, _name), _name))
    _sendto = socket.socket.sendto


    def _guarded_sendto(self, data, *rest):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(rest[-1][0]):
            _refuse("sendto", rest[-1])
        return _sendto(self, data, *rest)


    socket.socket.sendto = _guarded_sendto
    _getaddrinfo, _gethostbyname = socket.getaddrinfo, socket.gethostbyname


    def _guarded_getaddrinfo(host, *args, **kwargs):
        if not _local(host):
            _refuse("getaddrinfo", host)
        return _getaddrinfo(host, *args, **kwargs)


    def _guarded_gethostbyname(host):
        if not _local(host):
            _refuse("gethostbyname", host)
        return _gethostbyname(host)


    socket.getaddrinfo, socket.gethostbyname = _guarded_getaddrinfo, _guarded_gethostbyname
    """
)


@functools.cache
def can(command: str) -> bool:
    """Whether this machine lets us run `command` (namespaces need root and an unrestricted kernel)."""
    return shutil.which("unshare") is not None and subprocess.run(
        ["sh", "-c", command], capture_output=True, timeout=30
    ).returncode == 0


NO_NETWORK = "unshare -n true"
BLACK_HOLE = ("unshare -n -m sh -c "
              "'ip link set lo up && ip route add default dev lo && mount --bind /etc/hosts /etc/hosts'")


@pytest.fixture
def guard(tmp_path) -> tuple[dict[str, str], Path]:
    """(environment that loads the Python guard, its log file)."""
    folder = tmp_path / "guard"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "network-attempts.log"
    return env(PYTHONPATH=f"{folder}:{ROOT}", NET_GUARD_LOG=str(log)), log


def run(cmd: list[str], environ: dict[str, str], prefix: tuple[str, ...] = (), timeout: float = 120):
    """Run cmd (optionally behind a prefix such as `unshare -n`), returning (result, seconds)."""
    cmd = [*prefix, *cmd]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=environ)
    return result, time.perf_counter() - start


def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "distmnist.train", "--data-dir", str(data), "--output-dir", str(out),
            "--progress", "plain", *extra]


def assert_says_where_files_go(stderr: str, folder: Path) -> None:
    assert "distmnist: error: " in stderr and "Traceback" not in stderr, stderr
    assert str(folder) in stderr and all(name in stderr for pair in FILES.values() for name in pair), stderr


def test_guard_sees_and_refuses_a_real_network_call(guard):
    """The guard works: otherwise 'zero recorded calls' below would prove nothing."""
    environ, log = guard
    code = "import urllib.request\ntry: urllib.request.urlopen('http://example.com', timeout=5)\nexcept OSError: pass"
    result, _ = run([sys.executable, "-c", code], environ)
    assert result.returncode == 0, result.stderr
    assert "getaddrinfo 'example.com'" in log.read_text()


@pytest.mark.slow
def test_no_data_no_network_fails_fast_naming_the_four_files(guard, tmp_path, black_hole):
    """No data, no network: exit 2 within 30 s, one line naming the four files and where they go. (Also
    starts the black-hole run, which mostly waits, in the background; it is judged further down.)"""
    environ, log = guard
    empty = tmp_path / "empty"
    empty.mkdir()
    prefix = ("unshare", "-n") if can(NO_NETWORK) else ()
    result, seconds = run(driver(train_cmd(empty, tmp_path / "out")[3:]), environ, prefix)
    assert result.returncode == 2, result.stderr
    assert_says_where_files_go(result.stderr, empty)
    assert_one_clean_line(result.stderr)
    assert list(empty.iterdir()) == []  # no MNIST/raw left behind by the failed download
    assert_within_offline_limit("unshare -n + guard" if prefix else "guard only", seconds, result.stderr)


def assert_one_clean_line(stderr: str) -> None:
    """One line of distmnist's own, not torchvision's list of mirrors and errors."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("TIMING ")]
    assert len(lines) == 1 and lines[0].startswith("distmnist: error: "), stderr
    assert "Tried " not in stderr and "Error downloading" not in stderr and "<urlopen" not in stderr


@pytest.mark.slow
def test_a_mistyped_data_dir_is_named_and_not_created(guard, tmp_path):
    environ, _ = guard
    typo = tmp_path / "shared" / "mnsit"  # neither folder exists
    prefix = ("unshare", "-n") if can(NO_NETWORK) else ()
    result, _ = run(driver(train_cmd(typo, tmp_path / "out")[3:]), environ, prefix)
    assert result.returncode == 2, result.stderr
    assert_one_clean_line(result.stderr)
    assert f"into {typo}, which did not exist (is --data-dir mistyped?)" in result.stderr
    assert not (tmp_path / "shared").exists()


@pytest.mark.slow
def test_the_default_data_dir_is_not_advised_as_a_flag(guard, tmp_path):
    """Without --data-dir the files go to ./data; the message must not say 'use --data-dir data'. The
    quick start's command, offline: nothing is left behind, neither ./data nor ./runs/mnist."""
    environ, _ = guard
    prefix = ["unshare", "-n"] if can(NO_NETWORK) else []
    result = subprocess.run(prefix + driver(["--progress", "plain"]),
                            capture_output=True, text=True, timeout=120, cwd=tmp_path, env=environ)
    assert result.returncode == 2, result.stderr
    assert_one_clean_line(result.stderr)
    assert "could not download MNIST (" in result.stderr and "in data (or data/MNIST/raw)" in result.stderr
    assert "--data-dir data" not in result.stderr
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "runs").exists()  # the default --output-dir, created and removed again


@pytest.mark.slow
def test_local_data_makes_no_network_call(guard, tmp_path):
    """Train and evaluate (side by side) from local .gz files in MNIST/raw: zero network attempts."""
    environ, log = guard
    data = tmp_path / "data"
    write_mnist(data / "MNIST" / "raw", n_train=200, n_test=60, gz=True)
    weights = tmp_path / "weights.safetensors"
    save_file(Net().state_dict(), str(weights))
    prefix = ["unshare", "-n"] if can(NO_NETWORK) else []
    commands = {
        "train": train_cmd(data, tmp_path / "out", "--epochs", "1"),
        "evaluate": [sys.executable, "-m", "distmnist.evaluate", "--checkpoint", str(weights), "--data-dir", str(data)],
    }
    procs = {name: subprocess.Popen(prefix + cmd, cwd=ROOT, env=environ, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, cmd in commands.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, stderr)
        assert "test accuracy" in stdout, (name, stdout)
    assert not log.exists(), log.read_text()


class SilentMirror:
    """A TCP server that accepts connections and never answers: a mirror that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def close(self):
        self.sock.close()


# Runs distmnist.train.main and reports on stderr how long the imports took (a loaded machine's cost,
# not the tool's) and how long the tool itself ran. Optionally points torchvision's MNIST mirrors at
# argv[1] (and its MD5s at the served files'): distmnist's own download code is unchanged.
DRIVER = textwrap.dedent(
    """
    import time
    start = time.monotonic()
    import json, sys
    import torchvision.datasets
    from distmnist.training import main
    imported = time.monotonic()

    if sys.argv[1] != "-":
        torchvision.datasets.MNIST.mirrors = [sys.argv[1]]
    md5 = json.loads(sys.argv[2])
    if md5:
        torchvision.datasets.MNIST.resources = [(name, md5[name]) for name, _ in torchvision.datasets.MNIST.resources]
    try:
        main(sys.argv[3:])
    finally:
        print(f"TIMING {imported - start:.2f} {time.monotonic() - imported:.2f}", file=sys.stderr)
    """
)
IMPORT_ALLOWANCE_S = 5  # imports of torch, accelerate, torchvision on an idle machine of this kind


def driver(args: list[str], mirror: str = "-", md5: dict | None = None) -> list[str]:
    return [sys.executable, "-c", DRIVER, mirror, json.dumps(md5 or {}), *args]


def timing(stderr: str) -> tuple[float, float]:
    """(seconds of imports, seconds the tool ran after them) from the driver's last line."""
    line = [text for text in stderr.splitlines() if text.startswith("TIMING ")][-1]
    imports, tool = map(float, line.split()[1:])
    return imports, tool


def assert_within_offline_limit(name: str, wall: float, stderr: str) -> None:
    """The promised 30 s. The tool's own time after the imports must leave IMPORT_ALLOWANCE_S for them;
    the wall time is held to 30 s where the imports took their usual time (on a machine loaded by
    other work they can take 20 s, which says nothing about the tool)."""
    imports, tool = timing(stderr)
    print(f"{name}: exit 2 after {wall:.1f} s (imports {imports:.1f} s, tool {tool:.1f} s)")
    assert tool < OFFLINE_LIMIT_S - IMPORT_ALLOWANCE_S, (name, wall, imports, tool)
    if imports <= IMPORT_ALLOWANCE_S:
        assert wall < OFFLINE_LIMIT_S, (name, wall, imports, tool)


@pytest.fixture(scope="module")
def black_hole(tmp_path_factory):
    """A run with no data and a network where packets vanish instead of being refused, so every
    connection hangs (a firewalled cluster node). It mostly waits, so it is started in the background
    when this module begins and judged by the test below.

    In a network namespace whose default route leads into loopback, where packets to other addresses
    are dropped, with /etc/hosts resolving the MNIST mirrors (three addresses, each tried in turn by
    the standard library). Without the privileges for that: a local mirror that accepts connections
    and never answers."""
    tmp = tmp_path_factory.mktemp("black-hole")
    empty = tmp / "empty"
    args = train_cmd(empty, tmp / "out")[3:]
    silent = SilentMirror()
    if can(BLACK_HOLE):
        name = "black hole (DNS answers, TCP dropped)"
        hosts = tmp / "hosts"
        hosts.write_text("127.0.0.1 localhost\n10.11.12.13 ossci-datasets.s3.amazonaws.com\n"
                         "10.11.12.14 ossci-datasets.s3.amazonaws.com\n10.11.12.15 yann.lecun.com\n")
        script = (f"ip link set lo up && ip route add default dev lo && mount --bind {hosts} /etc/hosts && "
                  f"exec {shlex.join(driver(args))}")
        cmd = ["unshare", "-n", "-m", "sh", "-c", script]
    else:
        name, cmd = "silent mirror", driver(args, f"http://127.0.0.1:{silent.port}/")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield name, proc, start, empty
    silent.close()
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.mark.slow
def test_black_holed_network_fails_within_30_s(black_hole):
    name, proc, start, empty = black_hole
    _, stderr = proc.communicate(timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == 2, (name, stderr)
    assert_says_where_files_go(stderr, empty)
    assert "no data from any mirror" in stderr
    assert_one_clean_line(stderr)
    assert not empty.exists()  # the folders the download created are gone
    assert_within_offline_limit(name, seconds, stderr)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_download_from_a_served_mirror_still_works(tmp_path):
    """The download path (fetch in a thread, stall watchdog) with a live mirror on loopback."""
    served = write_mnist(tmp_path / "served", n_train=200, n_test=60, gz=True)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.iterdir()}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    server.handle_error = lambda request, address: None  # torchvision drops its first (redirect-probing) request early
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        empty = tmp_path / "empty"
        result = subprocess.run(driver(train_cmd(empty, tmp_path / "out", "--epochs", "1")[3:],
                                       f"http://127.0.0.1:{server.server_port}/", md5),
                                capture_output=True, text=True, timeout=180, cwd=ROOT, env=env())
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    raw = empty / "MNIST" / "raw"
    for name in md5:
        assert gzip.decompress((raw / name).read_bytes()) == gzip.decompress((served / name).read_bytes())
    assert "test accuracy" in result.stdout
