"""The serve command line: flags, checks, the listening socket, and uvicorn running the app."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
from pathlib import Path
from typing import Sequence

from ..args import ArgumentParser
from ..digits import MAX_PIXELS
from ..errors import DistmnistError, cli

INSTALL_HINT = 'pip install "distmnist[serve]"'


def build_parser(prog: str = "distmnist serve") -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=prog, description="Web pages for a run: draw a digit and see what the model thinks; "
        "watch the run's curves while it trains. Binds to this machine only unless --host says otherwise.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's --output-dir (e.g. runs/mnist)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 opens it to the network (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 = any free port (default: %(default)s)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="MNIST folder for the Run page's confusion matrix and mistakes "
                   "(default: the data_dir of RUN_DIR/config.json)")
    p.add_argument("--max-upload-bytes", type=int, default=2_000_000, metavar="N",
                   help="largest image accepted by /api/predict, in bytes (default: %(default)s)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help="largest image accepted, in pixels, checked before decoding (default: %(default)s)")
    p.add_argument("--max-in-flight", type=int, default=256, metavar="N",
                   help="predict requests accepted at once; more are answered 503 (default: %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="threads decoding and classifying at once (default: the number of CPUs, %(default)s)")
    p.add_argument("--poll-seconds", type=float, default=1.0, metavar="S",
                   help="how often RUN_DIR is checked for newer weights (default: %(default)s)")
    return p


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
    except (OSError, OverflowError) as err:
        raise DistmnistError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def default_data_dir(run_dir: Path) -> Path:
    try:
        config = json.loads((run_dir / "config.json").read_text())
        return Path(config["data_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return Path("data")


@cli
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("max_upload_bytes", "max_pixels", "max_in_flight", "workers"):
        if getattr(args, flag) < 1:
            raise DistmnistError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not args.poll_seconds > 0:
        raise DistmnistError(f"--poll-seconds must be > 0, got {args.poll_seconds}")
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise DistmnistError(f"{run_dir}: no such run folder (a distmnist train --output-dir)")
    if not any((run_dir / name).exists() for name in ("config.json", "metrics.jsonl", "model.safetensors", "checkpoints")):
        raise DistmnistError(f"{run_dir}: not a distmnist run folder (no config.json, metrics.jsonl, "
                             "model.safetensors or checkpoints/)")
    try:
        import uvicorn

        from .app import Limits, create_app
    except ImportError as err:
        raise DistmnistError(f"serve needs {err.name}, which is not installed: {INSTALL_HINT}") from None

    import torch

    torch.set_num_threads(1)  # one request per thread: threads compete less than per-request parallelism
    limits = Limits(upload_bytes=args.max_upload_bytes, pixels=args.max_pixels, in_flight=args.max_in_flight,
                    workers=args.workers, poll_seconds=args.poll_seconds)
    app = create_app(run_dir, Path(args.data_dir) if args.data_dir else default_data_dir(run_dir), limits)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    if not is_local(args.host):
        print(f"distmnist: warning: listening on {args.host}: anyone who can reach this machine on port {port} "
              "can use these pages and the API (no password, no TLS)", file=sys.stderr, flush=True)
    print(f"serving {run_dir} at {url}/ (draw a digit) and {url}/run (the run); Ctrl+C stops", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2))
    server.run(sockets=[sock])
    return 0
