"""Any picture of one digit -> a 28 x 28 MNIST digit, made the way MNIST's were; used by predict and serve.

Grey levels (16-bit and float images rescaled from their own range, never clipped), bright ink on a
dark background (inverted if the background is light), cropped to the digit, scaled with
anti-aliasing so that its longer side is 20 pixels (aspect ratio kept), and pasted into a 28 x 28
field with its centre of mass at the centre. An animation gives its first frame that is not blank.
The size of an image is read from its header and checked against a pixel limit before anything is
decoded, so a small file that would unpack into gigabytes is refused at once.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from .errors import DistmnistError

MNIST_SIZE = 28  # pixels per side of an MNIST image
MNIST_BOX = 20  # longer side of the digit's bounding box in MNIST, pixels
MNIST_CENTRE = 14.0  # (row, column) of the mean centre of mass of MNIST's training digits, pixel indices
NOISE = 0.2  # ink weaker than this fraction of the strongest stroke is paper grain or JPEG noise
MAX_PIXELS = 50_000_000  # per image (frame): above any phone camera's photo; 12000 x 12000 is refused
MAX_FRAMES = 32  # frames of an animation searched for one that is not blank
HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # 16/32-bit integer and float grey levels
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)  # what PIL raises


class ImageTooLarge(DistmnistError):
    """More pixels than allowed: refused from the header, before decoding (serve answers 413)."""


class NoDigit(DistmnistError):
    """A readable image with nothing drawn on it (serve answers 422)."""


def quiet_pillow_bomb_warning() -> None:
    """Our own pixel limit refuses big images before decoding; Pillow's warning would only repeat it."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageTooLarge(f"{name}: {w} x {h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                             "(--max-pixels); not decoded")
    if w * h == 0:
        raise DistmnistError(f"{name}: the image is empty ({w} x {h} pixels)")


def open_image(source: str | Path | BinaryIO, name: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image lazily: only its header is read, and its size is checked against ``max_pixels``."""
    try:
        image = Image.open(source)
    except FileNotFoundError:
        raise DistmnistError(f"{name}: no such file") from None
    except UnidentifiedImageError:  # its text names Python objects, not the file
        raise DistmnistError(f"{name}: not an image that can be read (PNG, JPEG, GIF, TIFF, ...)") from None
    except Image.DecompressionBombError:  # Pillow's own ceiling (2 x 89M pixels), above ours
        raise ImageTooLarge(f"{name}: over the limit of {max_pixels:,} pixels (--max-pixels); not decoded") from None
    except UNREADABLE as err:  # PIL reports unknown formats as OSError and some broken files as SyntaxError
        raise DistmnistError(f"{name}: not an image that can be read (PNG, JPEG, ...): {err}") from None
    try:
        check_size(image.size, name, max_pixels)
    except DistmnistError:
        image.close()
        raise
    return image


def frames(image: Image.Image, name: str, max_pixels: int) -> Iterator[Image.Image]:
    """Each frame of a still image or an animation (at most MAX_FRAMES), decoded and upright per EXIF.

    ``max_pixels`` bounds the pixels decoded in all, so that many large blank frames cost no more
    than one large image.
    """
    decoded = 0
    for index, frame in enumerate(ImageSequence.Iterator(image)):
        if index == MAX_FRAMES:
            return
        check_size(frame.size, name, max_pixels)  # a later TIFF page may be larger than the first
        decoded += frame.size[0] * frame.size[1]
        if decoded > max_pixels:
            raise ImageTooLarge(f"{name}: no digit in the first {index} frames, and the next one would take the "
                                f"pixels decoded past the limit of {max_pixels:,} (--max-pixels)")
        frame.load()
        yield ImageOps.exif_transpose(frame)


def grey_levels(image: Image.Image) -> np.ndarray:
    """Grey levels (h, w) float32 in 0..255; a transparent canvas is filled so the strokes stand out."""
    if image.mode in HIGH_DEPTH_MODES:  # rescale the image's own range: clipping to 255 flattens it
        grey = np.asarray(image, dtype=np.float64)
        if not np.isfinite(grey).all():
            raise ValueError("pixels that are NaN or infinite")
        low, high = grey.min(), grey.max()
        return ((grey - low) * (255 / (high - low) if high > low else 0)).astype(np.float32)
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


def ink(grey: np.ndarray) -> np.ndarray | None:
    """Ink in 0..1 (bright strokes on 0), or None for a blank image (a single flat colour)."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = float(np.median(border))
    if background > 127:  # dark ink on light paper: MNIST's ink is bright
        grey, background = 255 - grey, 255 - background
    strokes = np.clip(grey - background, 0, None)
    if strokes.max() <= 0:
        return None
    return np.clip((strokes / strokes.max() - NOISE) / (1 - NOISE), 0, 1)


def place(strokes: np.ndarray) -> torch.Tensor:
    """Ink (h, w) in 0..1 -> uint8 (28, 28): cropped, longer side 20 pixels, centre of mass at the centre."""
    rows, cols = np.nonzero(strokes.any(axis=1))[0], np.nonzero(strokes.any(axis=0))[0]
    digit = strokes[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32)
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


def mnist_digit(image: Image.Image, name: str = "image", max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Any image of one digit (its first non-blank frame) -> uint8 (28, 28), white ink on black."""
    count = 0
    for count, frame in enumerate(frames(image, name, max_pixels), start=1):
        strokes = ink(grey_levels(frame))
        if strokes is not None:
            return place(strokes)
    what = "the image is a single flat colour" if count <= 1 else f"each of its first {count} frames is a single flat colour"
    raise NoDigit(f"{name}: no digit found ({what})")


def read_digit(source: str | Path | BinaryIO, name: str | None = None, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """An image file (a path or an open binary file) -> its MNIST digit; every problem names the file."""
    name = str(source) if name is None else name
    with open_image(source, name, max_pixels) as image:
        try:
            return mnist_digit(image, name, max_pixels)
        except UNREADABLE as err:  # decoding starts here: truncated data, broken chunks, unsupported modes
            raise DistmnistError(f"{name}: not an image that can be read (PNG, JPEG, ...): {err}") from None
