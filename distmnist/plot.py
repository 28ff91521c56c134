"""Pictures of a run: loss, test accuracy and images/s per epoch, and the first layer's kernels.

    python -m distmnist.plot runs/mnist                  # PNGs into runs/mnist/plots
    distmnist plot runs/mnist --out docs

Reads RUN_DIR/metrics.jsonl and RUN_DIR/model.safetensors (or, before training has finished, the
newest valid checkpoint). matplotlib is an optional extra (``pip install "distmnist[plot]"``);
figures are drawn with its object API on the Agg canvas, so no display and no pyplot state.
The mistakes grid of ``distmnist evaluate --mistakes`` is drawn here too.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .args import ArgumentParser
from .catalogue import load_weights
from .console import Console, resolve_mode
from .errors import DistmnistError, cli
from .files import check_file, check_folder, make_dirs, write_bytes
from .report import Mistake

INSTALL_HINT = 'pip install "distmnist[plot]"'
DPI = 100  # pixels per inch of the PNGs; the figure sizes below are in inches
METRIC_KEYS = ("epoch", "train_loss", "test_loss", "test_accuracy", "train_samples_per_second")


def figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas; a DistmnistError naming the extra if matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise DistmnistError(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def require_matplotlib() -> None:
    """Fail early (before any work) when matplotlib is missing."""
    figure(1, 1)


def save(fig, path: Path, what: str = "folder") -> Path:
    """The figure as a PNG at ``path``, written whole or not at all (files.write_bytes: a full or read-only
    disk leaves no partial file); ``what`` names the folder in an error (the flag that chose it)."""
    png = io.BytesIO()
    fig.savefig(png, format="png")
    make_dirs(path.parent, what)
    return write_bytes(path, png.getvalue(), what=what)


# ---------------------------------------------------------------- inputs


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The per-epoch records of metrics.jsonl, checked for the keys the plots need."""
    if check_file(path, "metrics") is None:
        raise DistmnistError(f"{path}: no such file (is the folder a distmnist run's --output-dir?)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DistmnistError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise DistmnistError(f"{path}:{number}: not valid JSON ({err})") from None
        missing = [k for k in METRIC_KEYS if not isinstance(record, dict) or k not in record]
        if missing:
            raise DistmnistError(f"{path}:{number}: missing {', '.join(missing)}")
        records.append(record)
    if not records:
        raise DistmnistError(f"{path}: no epochs recorded yet")
    return records


def run_weights(run_dir: Path, console: Console) -> dict[str, torch.Tensor]:
    """RUN_DIR/model.safetensors, or the newest valid checkpoint while the run is unfinished."""
    return load_weights(run_dir, console.notice)


# ---------------------------------------------------------------- figures


def _epoch_axes(fig, title: str, ylabel: str, records: list[dict[str, Any]]):
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    epochs = [r["epoch"] for r in records]
    ax.set_xticks(epochs if len(epochs) <= 12 else epochs[:: math.ceil(len(epochs) / 12)])
    return ax, epochs


def loss_figure(records: list[dict[str, Any]]):
    fig = figure(6, 4)
    ax, epochs = _epoch_axes(fig, "loss per epoch", "mean NLL loss", records)
    ax.plot(epochs, [r["train_loss"] for r in records], "o-", label="train (running mean over the epoch)")
    ax.plot(epochs, [r["test_loss"] for r in records], "s-", label="test (after the epoch)")
    ax.legend()
    return fig


def accuracy_figure(records: list[dict[str, Any]]):
    fig = figure(6, 4)
    ax, epochs = _epoch_axes(fig, "test accuracy per epoch", "test accuracy (%)", records)
    accuracy = [100 * r["test_accuracy"] for r in records]
    ax.plot(epochs, accuracy, "o-", color="tab:green")
    ax.margins(x=0.08, y=0.15)  # room for the label above the last point
    ax.annotate(f"{accuracy[-1]:.2f}%", (epochs[-1], accuracy[-1]), textcoords="offset points", xytext=(0, 8),
                ha="center")
    return fig


def throughput_figure(records: list[dict[str, Any]]):
    fig = figure(6, 4)
    worlds = sorted({r.get("world_size", 1) for r in records})
    who = "1 process" if worlds == [1] else f"{'/'.join(map(str, worlds))} processes together"
    ax, epochs = _epoch_axes(fig, f"training throughput per epoch ({who})", "training images / s", records)
    ax.bar(epochs, [r["train_samples_per_second"] for r in records], color="tab:purple")
    return fig


KERNEL_CMAP = "RdBu_r"  # diverging: red > 0 > blue, white at 0


def kernels_figure(conv1_weight: torch.Tensor):
    """The conv1 kernels (10, 1, 5, 5) as images on one shared, zero-centred colour scale, with a
    colour bar giving the weight each colour stands for."""
    kernels = conv1_weight.detach().float().cpu()[:, 0]
    limit = float(kernels.abs().max()) or 1.0
    cols = 5
    rows = math.ceil(len(kernels) / cols)
    fig = figure(1.3 * cols + 1.0, 1.5 * rows + 0.4)
    fig.suptitle("conv1: the first layer's 5 x 5 kernels")
    axes = []
    for i, kernel in enumerate(kernels):
        ax = fig.add_subplot(rows, cols, i + 1)
        image = ax.imshow(kernel.numpy(), cmap=KERNEL_CMAP, vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(f"kernel {i}", fontsize=9)
        ax.set_axis_off()
        axes.append(ax)
    bar = fig.colorbar(image, ax=axes, shrink=0.9, label="weight")
    bar.ax.tick_params(labelsize=8)
    return fig


def mistakes_figure(images: torch.Tensor, mistakes: list[Mistake]):
    """A grid of test images (uint8, (n, 28, 28)) with their true and predicted digits."""
    cols = max(1, min(len(mistakes), math.ceil(math.sqrt(len(mistakes)))))
    rows = max(1, math.ceil(len(mistakes) / cols))
    fig = figure(1.25 * cols, 1.45 * rows + 0.4)
    fig.suptitle("most confident mistakes" if mistakes else "no mistakes")
    for i, (image, m) in enumerate(zip(images, mistakes, strict=True)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(image.cpu().numpy(), cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"true {m.label}, said {m.predicted}\n{100 * m.confidence:.1f}% sure", fontsize=8)
        ax.set_axis_off()
    return fig


# ---------------------------------------------------------------- command


def build_parser(prog: str = "distmnist plot") -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=prog, description="PNG plots of a training run: loss.png, accuracy.png, throughput.png, kernels.png.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's --output-dir (holds metrics.jsonl)")
    p.add_argument("--out", metavar="DIR", help="folder for the PNGs (default: RUN_DIR/plots)")
    p.add_argument("--progress", choices=("auto", "rich", "plain", "none"), default="auto",
                   help="console output (default: %(default)s)")
    return p


def write_plots(run_dir: Path, out: Path, console: Console) -> list[Path]:
    require_matplotlib()
    records = read_metrics(run_dir / "metrics.jsonl")
    weights = run_weights(run_dir, console)
    make_dirs(out, "--out")  # before drawing: a taken or unwritable --out fails at once
    figures = {"loss.png": loss_figure(records), "accuracy.png": accuracy_figure(records),
               "throughput.png": throughput_figure(records), "kernels.png": kernels_figure(weights["conv1.weight"])}
    return [save(fig, out / name, "--out") for name, fig in figures.items()]


@cli
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    if check_folder(run_dir, "RUN_DIR", advice="give a training run's --output-dir") is None:
        raise DistmnistError(f"RUN_DIR: no such folder: {run_dir}")
    if args.out:
        check_folder(args.out, "--out", advice="give a folder for the PNGs")
    console = Console(resolve_mode(args.progress, True))
    for path in write_plots(run_dir, Path(args.out) if args.out else run_dir / "plots", console):
        console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    main()
