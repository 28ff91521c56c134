"""The serve command line: flags, checks, the listening socket, and uvicorn running the app."""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import socket
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..args import ArgumentParser
from ..errors import DistmnistError, cli

if TYPE_CHECKING:
    import uvicorn

INSTALL_HINT = 'pip install "distmnist[serve]"'
MAX_PIXELS = 16_000_000  # per upload: a 12 MP photo as a PNG (4032 x 3024); a JPEG of any size reads at 1/2..1/8
WIDTH = 80  # columns of the start-up lines
INTEGER_RANGES = {  # flag: (lowest, highest or None)
    "port": (0, 65535),
    "max_upload_bytes": (1, None),
    "max_pixels": (1, None),
    "max_in_flight": (1, None),
    "max_connections": (1, None),
    "workers": (1, 1024),
}
SECONDS = ("request_timeout", "poll_seconds")


def build_parser(prog: str = "distmnist serve") -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=prog, description="Web pages for a run: draw a digit and see what the model thinks; "
        "watch the run's curves while it trains. Binds to this machine only unless --host says otherwise.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's --output-dir (e.g. runs/mnist)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 opens it to the network (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 = any free port (default: %(default)s)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another name this server may be reached by, repeatable: example.org, *.example.org for "
                   "a domain, * for any; other Host headers get 400 (default: localhost, 127.0.0.1, ::1 and --host)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="MNIST folder for the Run page's confusion matrix and mistakes "
                   "(default: the data_dir of RUN_DIR/config.json)")
    p.add_argument("--max-upload-bytes", type=int, default=2_000_000, metavar="N",
                   help="largest image accepted by /api/predict, in bytes (default: %(default)s)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help="largest image decoded, in pixels, checked before decoding; a large JPEG counts at the "
                   "1/2, 1/4 or 1/8 size it is decoded at (default: %(default)s)")
    p.add_argument("--max-in-flight", type=int, default=256, metavar="N",
                   help="predict requests whose upload has arrived, answered at once; more get 503 "
                   "(default: %(default)s)")
    p.add_argument("--max-connections", type=int, default=512, metavar="N",
                   help="connections served at once; requests on more get 503 (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a client has to send a whole request, headers and body; a slower one gets "
                   "408 and is disconnected (default: %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="threads decoding and classifying at once (default: the number of CPUs, %(default)s)")
    p.add_argument("--poll-seconds", type=float, default=1.0, metavar="S",
                   help="how often RUN_DIR is checked for newer weights (default: %(default)s)")
    return p


def check_numbers(args: argparse.Namespace) -> None:
    """Every number in its range, or one line naming the flag and the range."""
    for flag, (low, high) in INTEGER_RANGES.items():
        value = getattr(args, flag)
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"from {low} to {high}"
            raise DistmnistError(f"--{flag.replace('_', '-')} must be {span}, got {value}")
    for flag in SECONDS:
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            raise DistmnistError(f"--{flag.replace('_', '-')} must be a number of seconds > 0, got {value}")


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise DistmnistError(f"{run_dir}: no such run folder (a distmnist train --output-dir)")
    run_files = ("config.json", "metrics.jsonl", "model.safetensors", "checkpoints")
    if not any((run_dir / name).exists() for name in run_files):
        raise DistmnistError(f"{run_dir}: not a distmnist run folder (no config.json, metrics.jsonl, "
                             "model.safetensors or checkpoints/)")


def is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """Bind here, so that a taken port or an unknown host is one clear line, not uvicorn's exit."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family, backlog=1024)
    except (OSError, UnicodeError) as err:  # UnicodeError: a host name that IDNA cannot encode
        raise DistmnistError(f"cannot listen on {host}:{port}: {getattr(err, 'strerror', None) or err}") from None


def default_data_dir(run_dir: Path) -> Path:
    try:
        config = json.loads((run_dir / "config.json").read_text())
        return Path(config["data_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return Path("data")


def fit(text: str, width: int) -> str:
    """``text`` in at most ``width`` columns, its middle elided (a long path keeps its ends)."""
    if len(text) <= width:
        return text
    keep = width - 3
    return text[: keep // 2] + "..." + text[len(text) - (keep - keep // 2):]


def start_up(run_dir: Path, url: str) -> list[str]:
    """What serve prints once it listens: each line at most WIDTH columns, the URL on its own."""
    return [fit(f"serving {run_dir}", WIDTH), "/ draws a digit, /run shows the run; Ctrl+C stops", f"{url}/"]


def warnings_for(host: str, port: int, allowed: Sequence[str]) -> list[str]:
    """The warnings of a server open to the network, wrapped to WIDTH columns."""
    if is_local(host):
        return []
    texts = [f"open to the network on {host}:{port}, no password, no TLS"]
    if host in ("0.0.0.0", "::") and not allowed:
        texts.append("other machines must use a name given to --allowed-host")
    return [line for text in texts
            for line in textwrap.wrap(f"distmnist: warning: {text}", WIDTH, subsequent_indent="  ")]


def server(app: Any, args: argparse.Namespace) -> uvicorn.Server:
    """uvicorn, its h11 protocol guarded (guard.py): a deadline per request, a cap on connections, JSON."""
    import uvicorn

    from .guard import guarded_protocol

    protocol = guarded_protocol(args.max_connections, args.request_timeout)
    return uvicorn.Server(uvicorn.Config(app, http=protocol, ws="none", log_level="warning", access_log=False,
                                         timeout_graceful_shutdown=2))


@cli
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_numbers(args)
    run_dir = Path(args.run_dir)
    check_run_dir(run_dir)
    try:
        import uvicorn  # noqa: F401  (checked here: server() uses it)

        from .app import Limits, create_app
        from .hosts import allowed_hosts
    except ImportError as err:
        raise DistmnistError(f"serve needs {err.name}, which is not installed: {INSTALL_HINT}") from None
    hosts = allowed_hosts(args.host, args.allowed_host)

    import torch

    torch.set_num_threads(1)  # one request per thread: threads compete less than per-request parallelism
    limits = Limits(upload_bytes=args.max_upload_bytes, pixels=args.max_pixels, in_flight=args.max_in_flight,
                    workers=args.workers, poll_seconds=args.poll_seconds)
    app = create_app(run_dir, Path(args.data_dir) if args.data_dir else default_data_dir(run_dir), limits, hosts)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    for line in warnings_for(args.host, port, args.allowed_host):
        print(line, file=sys.stderr, flush=True)
    print("\n".join(start_up(run_dir, f"http://{f'[{host}]' if ':' in host else host}:{port}")), flush=True)
    server(app, args).run(sockets=[sock])
    return 0
