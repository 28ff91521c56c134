"""Any picture of one digit -> a 28 x 28 MNIST digit, made the way MNIST's were; used by predict and serve.

Grey levels (16-bit and float images rescaled from their own range, never clipped), bright ink on a
dark background (inverted if the background is light), cropped to the digit, scaled with
anti-aliasing so that its longer side is 20 pixels (aspect ratio kept), and pasted into a 28 x 28
field with its centre of mass at the centre. An animation gives its first frame that is not blank.
The size of an image is read from its header and checked against a pixel limit before anything is
decoded, so a small file that would unpack into gigabytes is refused at once. What is decoded stays
small: a large JPEG is decoded at 1/2, 1/4 or 1/8 of its size, and any other large frame is shrunk
to WORK_SIDE as soon as it is decoded, so that an image costs its decoded size about once, not the
dozen copies at full size that the steps below would make of it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from .errors import DistmnistError

MNIST_SIZE = 28  # pixels per side of an MNIST image
MNIST_BOX = 20  # longer side of the digit's bounding box in MNIST, pixels
MNIST_CENTRE = 14.0  # (row, column) of the mean centre of mass of MNIST's training digits, pixel indices
NOISE = 0.2  # ink weaker than this fraction of the strongest stroke is paper grain or JPEG noise
MAX_PIXELS = 50_000_000  # per image (frame): above any phone camera's photo; 12000 x 12000 is refused
WORK_SIDE = 1024  # longer side, pixels, that a large image is shrunk to before its ink is found (50 x MNIST_BOX)
ORIENTATION = 0x0112  # the EXIF tag
BAND_ROWS = 64  # rows of a shrunk image made at a time
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


def check_size(size: tuple[int, int], name: str, max_pixels: int, note: str = "") -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageTooLarge(f"{name}: {note}{w} x {h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                            "(--max-pixels); not decoded")
    if w * h == 0:
        raise DistmnistError(f"{name}: the image is empty ({w} x {h} pixels)")


def decode_small(image: Image.Image) -> str:
    """Ask a JPEG to decode at 1/2, 1/4 or 1/8 of its size (in the DCT, without ever holding the full
    size), keeping at least WORK_SIDE pixels on its longer side; other formats ignore it. Returns a note
    for messages about the size, '' when the image is decoded at its own size."""
    w, h = image.size
    if max(w, h) < 2 * WORK_SIDE:
        return ""
    scale = WORK_SIDE / max(w, h)
    image.draft(None, (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))
    if image.size == (w, h):
        return ""
    return f"{w} x {h} read at 1/{round(w / image.size[0])}: "


def kinds(formats: Sequence[str] | None) -> str:
    """The formats read, for messages."""
    return "PNG, JPEG, GIF, TIFF, ..." if formats is None else ", ".join(formats)


def open_image(source: str | os.PathLike[str] | BinaryIO, name: str, max_pixels: int = MAX_PIXELS,
               formats: tuple[str, ...] | list[str] | None = None) -> Image.Image:
    """Open an image lazily: only its header is read, and its size is checked against ``max_pixels``.
    ``formats`` (Pillow's names: "PNG", "JPEG", ...) limits the decoders tried; None tries them all."""
    readable = kinds(formats)
    try:
        image = Image.open(source, formats=formats)
    except FileNotFoundError:
        raise DistmnistError(f"{name}: no such file") from None
    except UnidentifiedImageError:  # its text names Python objects, not the file
        raise DistmnistError(f"{name}: not an image that can be read ({readable})") from None
    except Image.DecompressionBombError:  # Pillow's own ceiling (2 x 89M pixels), above ours
        raise ImageTooLarge(f"{name}: over the limit of {max_pixels:,} pixels (--max-pixels); not decoded") from None
    except UNREADABLE as err:  # PIL reports unknown formats as OSError and some broken files as SyntaxError
        raise DistmnistError(f"{name}: not an image that can be read ({readable}): {err}") from None
    try:
        note = decode_small(image)  # changes image.size to the size it will decode at
        check_size(image.size, name, max_pixels, note)
    except DistmnistError:
        image.close()
        raise
    return image


def frames(image: Image.Image, name: str, max_pixels: int) -> Iterator[Image.Image]:
    """Each frame of a still image or an animation (at most MAX_FRAMES), decoded, shrunk and upright.

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
        yield small_upright(frame)


def small_upright(frame: Image.Image) -> Image.Image:
    """The frame decoded, shrunk by a whole factor (box averages) until its longer side is at most
    WORK_SIDE, and turned upright per its EXIF orientation. The decoded frame is the only large
    thing made: the orientation is read from it and applied to the small image."""
    frame.load()
    factor = math.ceil(max(frame.size) / WORK_SIDE)
    if factor == 1:
        return ImageOps.exif_transpose(frame)  # a copy: the next frame of an animation reuses `frame`
    orientation = frame.getexif().get(ORIENTATION)
    small = reduced(frame, factor)
    if orientation is not None:  # the small image inherits no EXIF (and a TIFF keeps it in its tags)
        small.getexif()[ORIENTATION] = orientation
    return ImageOps.exif_transpose(small)


def reduced(image: Image.Image, factor: int) -> Image.Image:
    """``image.reduce(factor)``, made a band of rows at a time: reduce() and convert() copy the whole
    image first (RGBA to premultiplied RGBa, a palette to grey), which would double what a large frame
    costs; a band of BAND_ROWS small rows costs a few megabytes."""
    rows = factor * BAND_ROWS
    bands = [reducible(image.crop((0, top, image.width, min(top + rows, image.height)))).reduce(factor)
             for top in range(0, image.height, rows)]
    small = Image.new(bands[0].mode, (bands[0].width, sum(band.height for band in bands)))
    for index, band in enumerate(bands):
        small.paste(band, (0, index * BAND_ROWS))
    return small


def reducible(image: Image.Image) -> Image.Image:
    """The image in a mode whose pixels can be averaged: not palette indices, single bits or 16-bit
    modes (which Image.reduce refuses), and with a transparent colour made an alpha channel, since an
    average of it would no longer be that colour."""
    if image.mode == "PA" or "transparency" in image.info:
        return image.convert("RGBA")
    if image.mode in ("1", "P"):
        return image.convert("L")
    if image.mode.startswith("I;16"):
        return image.convert("I")
    return image


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
    count = 0  # frames looked at
    for frame in frames(image, name, max_pixels):
        count += 1
        strokes = ink(grey_levels(frame))
        if strokes is not None:
            return place(strokes)
    what = ("the image is a single flat colour" if count <= 1
            else f"each of its first {count} frames is a single flat colour")
    raise NoDigit(f"{name}: no digit found ({what})")


def read_digit(source: str | os.PathLike[str] | BinaryIO, name: str | None = None, max_pixels: int = MAX_PIXELS,
               formats: tuple[str, ...] | list[str] | None = None) -> torch.Tensor:
    """An image file (a path or an open binary file) -> its MNIST digit; every problem names the file."""
    name = str(source) if name is None else name
    with open_image(source, name, max_pixels, formats) as image:
        try:
            return mnist_digit(image, name, max_pixels)
        except UNREADABLE as err:  # decoding starts here: truncated data, broken chunks, unsupported modes
            raise DistmnistError(f"{name}: not an image that can be read ({kinds(formats)}): {err}") from None
