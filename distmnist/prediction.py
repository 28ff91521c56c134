"""Classify your own handwriting: PNG, JPEG, GIF, TIFF files of any size, dark-on-light or light-on-dark.

    distmnist predict --checkpoint runs/mnist/model.safetensors my-digit.png
    python -m distmnist.predict --checkpoint runs/mnist/model.safetensors *.png --json

Each image is turned into a digit the way MNIST's were made (distmnist.digits, shared with
``distmnist serve``). Runs on the CPU: a few images need no accelerator. From Python,
``distmnist.predict(checkpoint, images)`` returns the Predictions (distmnist.api).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console as RichConsole
from rich.table import Table

from .args import ArgumentParser
from .catalogue import load_weights
from .digits import MAX_PIXELS, MNIST_SIZE, quiet_pillow_bomb_warning, read_digit
from .errors import DistmnistError, cli
from .files import check_file, check_folder, make_dirs, remedy
from .model import Net, to_input

ENLARGE = 10  # --save-inputs also writes the 28 x 28 image this many times larger, pixels kept square


@dataclass
class Prediction:
    file: str
    digit: int
    probabilities: list[float]  # index = digit

    def top(self, k: int) -> list[tuple[int, float]]:
        """The k most probable digits with their probabilities, most probable first (1 <= k <= 10)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self.probabilities):
            raise DistmnistError(f"Prediction.top(k): k must be a whole number from 1 to {len(self.probabilities)}, "
                                 f"got {k!r}")
        order = sorted(range(len(self.probabilities)), key=lambda d: -self.probabilities[d])[:k]
        return [(d, self.probabilities[d]) for d in order]


def load_model(checkpoint: str | Path) -> Net:
    model = Net()
    model.load_state_dict(load_weights(checkpoint))
    return model.eval()


@torch.no_grad()
def predict(model: Net, digits: torch.Tensor, files: Sequence[str]) -> list[Prediction]:
    """Classify uint8 digits (n, 28, 28) with a model in eval mode."""
    probabilities = model(to_input(digits)).exp()
    return [Prediction(str(f), int(p.argmax()), p.tolist()) for f, p in zip(files, probabilities, strict=True)]


def save_inputs(out: Path, files: Sequence[str], digits: torch.Tensor) -> list[Path]:
    """DIR/NAME.28x28.png and DIR/NAME.280x280.png per file; NAME-2, NAME-3 ... where a name is taken.
    A failed write (full or read-only disk) removes the files of that image and is one line naming the file."""
    make_dirs(out, "--save-inputs")
    big = MNIST_SIZE * ENLARGE
    written = []
    for path, digit in zip(files, digits, strict=True):
        small = Image.fromarray(digit.numpy())
        images = (small, small.resize((big, big), Image.Resampling.NEAREST))
        stem = Path(path).stem
        for n in range(1, 10_000):
            name = stem if n == 1 else f"{stem}-{n}"
            targets = [out / f"{name}.{MNIST_SIZE}x{MNIST_SIZE}.png", out / f"{name}.{big}x{big}.png"]
            if create_pngs(targets, images):
                written += targets
                break
        else:
            raise DistmnistError(f"--save-inputs: no free name for {path} in {out}")
    return written


def create_pngs(targets: list[Path], images: Sequence[Image.Image]) -> bool:
    """Each image as a PNG at its target, never overwriting (mode "x", even against another process
    writing there at the same time); False if a name is taken. Nothing is left of a failed try."""
    created: list[Path] = []
    try:
        for target, image in zip(targets, images, strict=True):
            with open(target, "xb") as fh:
                created.append(target)
                image.save(fh, format="PNG")
        return True
    except FileExistsError:
        return remove(created)
    except OSError as err:
        remove(created)
        where = err.filename or (created or targets)[-1]  # a failed open names its file, a failed write none
        raise DistmnistError(f"--save-inputs: cannot write {where}: {err.strerror or err}"
                             f"{remedy(err, '--save-inputs')}") from None


def remove(paths: list[Path]) -> bool:
    for path in paths:
        path.unlink(missing_ok=True)
    return False


def table(predictions: list[Prediction], k: int) -> Table:
    out = Table(title="predictions")
    out.add_column("file")
    out.add_column("digit", justify="right", style="bold")
    out.add_column(f"top {k} (digit: probability)")
    for p in predictions:
        out.add_row(p.file, str(p.digit), "   ".join(f"{d}: {100 * q:.1f}%" for d, q in p.top(k)))
    return out


def build_parser(prog: str = "distmnist predict") -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=prog,
        description="Classify images of handwritten digits (PNG, JPEG, GIF, TIFF, any size, either polarity).")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, one digit each")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a model.safetensors file, a checkpoint folder (verified against its manifest) or a run "
                   "folder (its model.safetensors, or its newest valid checkpoint) (required)")
    p.add_argument("--top", type=int, default=3, metavar="K",
                   help="how many digits to list per image (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print JSON (file, digit, top K, all 10 probabilities) instead of a table (default: False)")
    p.add_argument("--save-inputs", metavar="DIR",
                   help=f"also save the 28 x 28 image the model saw for each file as DIR/NAME.28x28.png, and "
                   f"{ENLARGE} times larger as DIR/NAME.280x280.png; never overwrites (NAME-2 ... instead) "
                   "(default: none)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help="refuse images with more pixels than this, before decoding them (default: %(default)s)")
    return p


@cli
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.top <= 10:
        raise DistmnistError(f"--top must be between 1 and 10, got {args.top}")
    if args.max_pixels < 1:
        raise DistmnistError(f"--max-pixels must be >= 1, got {args.max_pixels}")
    quiet_pillow_bomb_warning()
    check_file(args.checkpoint, "--checkpoint", folder=True,
               advice="give a model.safetensors file, a checkpoint folder or a run folder")
    for path in args.images:  # a named pipe would wait for a writer, a device never end: refused before any work
        check_file(path, "IMAGE", advice="give image files (PNG, JPEG, GIF, TIFF)")
    if args.save_inputs:
        check_folder(args.save_inputs, "--save-inputs", advice="give a folder for the images")
    model = load_model(args.checkpoint)
    # every file checked before any output
    digits = torch.stack([read_digit(path, max_pixels=args.max_pixels) for path in args.images])
    predictions = predict(model, digits, args.images)
    if args.save_inputs:
        save_inputs(Path(args.save_inputs), args.images, digits)
    if args.json:
        print(json.dumps([
            {"file": p.file, "digit": p.digit, "top": [{"digit": d, "probability": q} for d, q in p.top(args.top)],
             "probabilities": p.probabilities}
            for p in predictions
        ], indent=2))
    else:
        RichConsole(highlight=False).print(table(predictions, args.top))
    return 0
