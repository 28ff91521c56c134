"""Classify your own handwriting: PNG or JPEG files of any size, dark-on-light or light-on-dark.

    distmnist predict --checkpoint runs/mnist/model.safetensors my-digit.png
    python -m distmnist.predict --checkpoint runs/mnist/model.safetensors *.png --json

Each image is turned into a digit the way MNIST's were made: grey levels, bright ink on a dark
background (inverted if the background is light), cropped to the digit, scaled with anti-aliasing
so that its longer side is 20 pixels (aspect ratio kept), and pasted into a 28 x 28 field with its
centre of mass at the centre. Runs on the CPU: a few images need no accelerator.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from rich.console import Console as RichConsole
from rich.table import Table

from .rundir import load_weights
from .errors import DistmnistError, cli
from .model import Net, to_input

MNIST_SIZE = 28  # pixels per side of an MNIST image
MNIST_BOX = 20  # longer side of the digit's bounding box in MNIST, pixels
MNIST_CENTRE = 14.0  # (row, column) of the mean centre of mass of MNIST's training digits, pixel indices
NOISE = 0.2  # ink weaker than this fraction of the strongest stroke is paper grain or JPEG noise


@dataclass
class Prediction:
    file: str
    digit: int
    probabilities: list[float]  # index = digit

    def top(self, k: int) -> list[tuple[int, float]]:
        order = sorted(range(len(self.probabilities)), key=lambda d: -self.probabilities[d])[:k]
        return [(d, self.probabilities[d]) for d in order]


# ---------------------------------------------------------------- image -> MNIST digit


def open_image(path: str | Path) -> Image.Image:
    """Read an image file fully (upright per its EXIF tag); anything unreadable names the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise DistmnistError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # PIL reports unknown formats as OSError and some broken files as SyntaxError
        raise DistmnistError(f"{path}: not an image that can be read (PNG, JPEG, ...): {err}") from None


def grey_levels(image: Image.Image) -> np.ndarray:
    """Grey levels (h, w) float32 in 0..255; a transparent canvas is filled so the strokes stand out."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"))
        if alpha.min() < 255:
            grey = np.asarray(rgba.convert("L"))
            opaque = grey[alpha > 127]
            strokes_dark = opaque.size == 0 or np.median(opaque) < 128
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if strokes_dark else (0, 0, 0, 255))
            image = Image.alpha_composite(canvas, rgba)
    return np.asarray(image.convert("L"), dtype=np.float32)


def mnist_digit(image: Image.Image, name: str = "image") -> torch.Tensor:
    """Any image of one digit -> uint8 (28, 28), white ink on black, made the way MNIST's digits were."""
    grey = grey_levels(image)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = float(np.median(border))
    if background > 127:  # dark ink on light paper: MNIST's ink is bright
        grey, background = 255 - grey, 255 - background
    ink = np.clip(grey - background, 0, None)
    if ink.max() <= 0:
        raise DistmnistError(f"{name}: no digit found (the image is a single flat colour)")
    ink = np.clip((ink / ink.max() - NOISE) / (1 - NOISE), 0, 1)

    rows, cols = np.nonzero(ink.any(axis=1))[0], np.nonzero(ink.any(axis=0))[0]
    digit = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = digit.shape
    scale = MNIST_BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL sizes are (width, height)
    small = np.asarray(Image.fromarray(np.ascontiguousarray(digit)).resize(size, Image.Resampling.LANCZOS))
    small = np.clip(small, 0, None)
    small = small / small.max()  # the strongest stroke at full intensity, as in MNIST

    h, w = small.shape
    mass = small.sum()
    cy = (small.sum(axis=1) * np.arange(h)).sum() / mass
    cx = (small.sum(axis=0) * np.arange(w)).sum() / mass
    top = min(max(round(MNIST_CENTRE - cy), 0), MNIST_SIZE - h)  # stay inside the field
    left = min(max(round(MNIST_CENTRE - cx), 0), MNIST_SIZE - w)
    field = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)
    field[top : top + h, left : left + w] = small
    return torch.from_numpy(np.round(field * 255).astype(np.uint8))


def load_digit(path: str | Path) -> torch.Tensor:
    return mnist_digit(open_image(path), str(path))


# ---------------------------------------------------------------- classify


def load_model(checkpoint: str | Path) -> Net:
    model = Net()
    model.load_state_dict(load_weights(checkpoint))
    return model.eval()


@torch.no_grad()
def predict(model: Net, digits: torch.Tensor, files: Sequence[str]) -> list[Prediction]:
    """Classify uint8 digits (n, 28, 28) with a model in eval mode."""
    probabilities = model(to_input(digits)).exp()
    return [Prediction(str(f), int(p.argmax()), p.tolist()) for f, p in zip(files, probabilities)]


def table(predictions: list[Prediction], k: int) -> Table:
    out = Table(title="predictions")
    out.add_column("file")
    out.add_column("digit", justify="right", style="bold")
    out.add_column(f"top {k} (digit: probability)")
    for p in predictions:
        out.add_row(p.file, str(p.digit), "   ".join(f"{d}: {100 * q:.1f}%" for d, q in p.top(k)))
    return out


def build_parser(prog: str = "distmnist predict") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Classify images of handwritten digits (PNG, JPEG, any size, either polarity).")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, one digit each")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a model.safetensors file, a checkpoint folder (verified against its manifest) or a run "
                   "folder (its model.safetensors, or its newest valid checkpoint) (required)")
    p.add_argument("--top", type=int, default=3, metavar="K",
                   help="how many digits to list per image (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print JSON (file, digit, top K, all 10 probabilities) instead of a table (default: False)")
    p.add_argument("--save-inputs", metavar="DIR",
                   help="also save the 28 x 28 image the model saw for each file as DIR/NAME.28x28.png "
                   "(default: none)")
    return p


@cli
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.top <= 10:
        raise DistmnistError(f"--top must be between 1 and 10, got {args.top}")
    model = load_model(args.checkpoint)
    digits = torch.stack([load_digit(path) for path in args.images])  # every file checked before any output
    predictions = predict(model, digits, args.images)
    if args.save_inputs:
        out = Path(args.save_inputs)
        out.mkdir(parents=True, exist_ok=True)
        for path, digit in zip(args.images, digits):
            Image.fromarray(digit.numpy()).save(out / f"{Path(path).stem}.28x28.png")
    if args.json:
        print(json.dumps([
            {"file": p.file, "digit": p.digit, "top": [{"digit": d, "probability": q} for d, q in p.top(args.top)],
             "probabilities": p.probabilities}
            for p in predictions
        ], indent=2))
    else:
        RichConsole(highlight=False).print(table(predictions, args.top))
    return 0


if __name__ == "__main__":
    main()
