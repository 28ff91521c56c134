"""predict: any image of a digit, made the way MNIST's digits were, gets the right answer.

A model trained for one epoch on the real MNIST (conftest.trained_run) classifies real test images
saved as PNG and JPEG, in both polarities and at another size, and a digit drawn here.
"""

from __future__ import annotations

import json
import math
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import in_process
from distmnist.checkpoint import save_weights
from distmnist.data import load_mnist
from distmnist.digits import MAX_PIXELS, ImageTooLarge, mnist_digit, read_digit
from distmnist.errors import DistmnistError
from distmnist.model import Net
from distmnist.prediction import load_model, predict
from distmnist.prediction import main as predict_main


@pytest.fixture
def trained(trained_run) -> Path:
    """model.safetensors of that run."""
    return trained_run / "model.safetensors"


def variants(image: np.ndarray) -> dict[str, Image.Image]:
    """A 28 x 28 MNIST image (white on black) as people might hand it in."""
    light_on_dark = Image.fromarray(image)
    dark_on_light = Image.fromarray(255 - image)
    return {
        "plain.png": light_on_dark,
        "inverted.png": dark_on_light,
        "112.png": light_on_dark.resize((112, 112), Image.Resampling.BICUBIC),
        "inverted-112.png": dark_on_light.resize((112, 112), Image.Resampling.BICUBIC),
        "inverted-in-300x200.jpg": on_paper(dark_on_light.resize((140, 140), Image.Resampling.BICUBIC)),
    }


def on_paper(digit: Image.Image) -> Image.Image:
    """The digit pasted off-centre on a wider sheet of light paper, saved as a colour JPEG."""
    sheet = Image.new("L", (300, 200), 255)
    sheet.paste(digit, (150, 40))
    return sheet.convert("RGB")


@pytest.mark.slow
def test_real_test_images_in_both_polarities_and_other_sizes(trained, real_mnist, tmp_path):
    _, test = load_mnist(real_mnist, allow_download=False)
    model = load_model(trained)
    # the first 30 test images the model gets right as MNIST gives them: preprocessing must keep them right
    first = predict(model, test.images[:40], ["x"] * 40)
    chosen = [i for i, p in enumerate(first) if p.digit == int(test.labels[i])][:30]
    assert len(chosen) == 30
    files, labels = [], []
    for i in chosen:
        for suffix, image in variants(test.images[i].numpy()).items():
            path = tmp_path / f"test-{i:02d}-{suffix}"
            image.save(path)
            files.append(path)
            labels.append(int(test.labels[i]))
    r = in_process("predict", "--checkpoint", trained, "--json", *files)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert [Path(x["file"]) for x in results] == files
    wrong = [(x["file"], x["digit"], label) for x, label in zip(results, labels, strict=True) if x["digit"] != label]
    assert not wrong, wrong
    for x in results:
        assert math.isclose(sum(x["probabilities"]), 1.0, rel_tol=1e-4)
        assert [t["digit"] for t in x["top"]][0] == x["digit"] and len(x["top"]) == 3
        assert x["top"][0]["probability"] >= x["top"][1]["probability"] >= x["top"][2]["probability"]


def draw_seven(size: int, ink: int, paper: int) -> Image.Image:
    """A thick, slightly wobbly hand-drawn 7 away from the centre of a big canvas."""
    image = Image.new("L", (size, size), paper)
    draw = ImageDraw.Draw(image)
    s = size / 400
    points = [(60, 70), (120, 62), (190, 66), (235, 60), (205, 150), (170, 240), (150, 320)]
    draw.line([(x * s, y * s) for x, y in points], fill=ink, width=round(26 * s), joint="curve")
    return image


@pytest.mark.slow
def test_a_digit_drawn_here_on_paper_and_on_a_transparent_canvas(trained, tmp_path):
    paper = draw_seven(400, ink=30, paper=235)
    paper.save(tmp_path / "seven.png")
    paper.convert("RGB").save(tmp_path / "seven.jpg", quality=80)
    rgba = Image.new("RGBA", (400, 400), (0, 0, 0, 0))  # a drawing app's export: black strokes, no background
    rgba.putalpha(draw_seven(400, ink=255, paper=0))
    rgba.save(tmp_path / "seven-transparent.png")
    model = load_model(trained)
    names = ["seven.png", "seven.jpg", "seven-transparent.png"]
    digits = torch.stack([mnist_digit(Image.open(tmp_path / n), n) for n in names])
    assert [p.digit for p in predict(model, digits, names)] == [7, 7, 7]


@pytest.mark.slow
def test_table_output_and_saved_inputs(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # short paths in the table
    draw_seven(200, ink=0, paper=255).save("my-seven.png")
    assert predict_main(["--checkpoint", str(trained), "--top", "2", "--save-inputs", "seen", "my-seven.png"]) == 0
    out = capsys.readouterr().out
    assert "my-seven.png" in out and "top 2" in out and "7: " in out
    with Image.open(tmp_path / "seen" / "my-seven.28x28.png") as seen, \
            Image.open(tmp_path / "seen" / "my-seven.280x280.png") as large:
        assert seen.size == (28, 28) and seen.mode == "L"
        # the enlarged copy is the same 28 x 28 pixels, each a 10 x 10 square: no thumbnail, no blur
        assert large.size == (280, 280)
        assert np.array_equal(np.asarray(large), np.asarray(seen).repeat(10, axis=0).repeat(10, axis=1))


def test_saved_inputs_never_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "model.safetensors"
    save_weights(Net().state_dict(), weights)
    Path("a").mkdir()
    Path("b").mkdir()
    draw_seven(120, ink=0, paper=255).save("a/digit.png")
    Image.fromarray(255 - np.asarray(draw_seven(120, ink=255, paper=0).rotate(90))).save("b/digit.png")
    args = ["--checkpoint", str(weights), "--save-inputs", "seen", "--json", "a/digit.png", "b/digit.png"]
    assert predict_main(args) == 0
    seen = tmp_path / "seen"
    first = {p.name: p.read_bytes() for p in seen.iterdir()}
    assert sorted(first) == ["digit-2.280x280.png", "digit-2.28x28.png", "digit.280x280.png", "digit.28x28.png"]
    assert first["digit.28x28.png"] != first["digit-2.28x28.png"]  # two different digits, two files
    assert predict_main(args) == 0  # a second run adds files and leaves the first ones as they were
    after = {p.name: p.read_bytes() for p in seen.iterdir()}
    assert len(after) == 8 and all(after[name] == data for name, data in first.items())
    assert after["digit-3.28x28.png"] == first["digit.28x28.png"]
    assert after["digit-4.28x28.png"] == first["digit-2.28x28.png"]


# ---------------------------------------------------------------- the MNIST-like conversion


def test_conversion_fits_20_pixels_and_centres_the_mass():
    canvas = np.full((300, 500), 250, dtype=np.uint8)  # light paper, digit off in a corner
    canvas[20:140, 380:420] = 10  # a tall bar: 120 x 40
    digit = mnist_digit(Image.fromarray(canvas)).numpy().astype(float)
    rows, cols = np.nonzero(digit.any(axis=1))[0], np.nonzero(digit.any(axis=0))[0]
    assert rows[-1] - rows[0] + 1 in (20, 21)  # longer side 20 (+1 for anti-aliasing spill)
    assert cols[-1] - cols[0] + 1 in (7, 8)  # aspect ratio kept: 40 / 120 * 20
    cy = (digit.sum(axis=1) * np.arange(28)).sum() / digit.sum()
    cx = (digit.sum(axis=0) * np.arange(28)).sum() / digit.sum()
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5
    assert digit.max() == 255 and digit[0].max() == 0  # bright ink, dark background


def test_both_polarities_give_the_same_digit():
    image = np.asarray(draw_seven(160, ink=255, paper=0))
    dark_on_light = mnist_digit(Image.fromarray(255 - image))
    light_on_dark = mnist_digit(Image.fromarray(image))
    assert torch.equal(dark_on_light, light_on_dark)


def test_a_blank_image_is_refused():
    with pytest.raises(DistmnistError, match="blank.png: no digit found"):
        mnist_digit(Image.new("L", (50, 50), 255), "blank.png")


def test_a_file_that_is_not_an_image_is_named(tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture\n")
    weights = tmp_path / "model.safetensors"
    save_weights(Net().state_dict(), weights)
    for path, message in ((bad, f"{bad}: not an image"), (tmp_path / "missing.png", "missing.png: no such file")):
        with pytest.raises(SystemExit) as exit:
            predict_main(["--checkpoint", str(weights), str(path)])
        assert exit.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


# ---------------------------------------------------------------- 16-bit, float, animations, huge images


def seven_8bit() -> np.ndarray:
    """Dark ink on light paper, using the full 0..255 range."""
    image = np.asarray(draw_seven(160, ink=0, paper=255))
    assert image.min() == 0 and image.max() == 255
    return image


def formats(folder: Path) -> dict[str, Path]:
    """The same 7 as an 8-bit PNG, a 16-bit PNG (full and 12-bit range), float TIFFs and a GIF with a blank
    first frame."""
    image = seven_8bit()
    files = {name: folder / name for name in
             ("8bit.png", "16bit.png", "12bit-in-16bit.png", "float01.tiff", "float-signed.tiff", "blank-first.gif")}
    Image.fromarray(image).save(files["8bit.png"])
    Image.fromarray(image.astype(np.uint16) * 257).save(files["16bit.png"])  # 0..65535
    Image.fromarray((image.astype(np.uint16) * 16).astype(np.uint16)).save(files["12bit-in-16bit.png"])  # 0..4080
    Image.fromarray((image / 255).astype(np.float32)).save(files["float01.tiff"])  # 0..1
    Image.fromarray((image / 255 * 2 - 1).astype(np.float32)).save(files["float-signed.tiff"])  # -1..1
    blank = Image.new("L", (160, 160), 255)
    blank.save(files["blank-first.gif"], save_all=True, append_images=[Image.fromarray(image)], duration=200, loop=0)
    return files


def test_16_bit_and_float_images_are_rescaled_not_clipped(tmp_path):
    files = formats(tmp_path)
    with Image.open(files["16bit.png"]) as img16, Image.open(files["float01.tiff"]) as imgf:
        assert img16.mode.startswith("I") and imgf.mode == "F"  # what the test means to cover
        assert np.asarray(img16).max() > 255
    reference = read_digit(files["8bit.png"]).int()
    for name, path in files.items():
        digit = read_digit(path).int()
        assert (digit - reference).abs().max() <= 1, name  # float rounding at most


def test_the_first_non_blank_frame_of_an_animation(tmp_path):
    path = formats(tmp_path)["blank-first.gif"]
    with Image.open(path) as gif:
        assert gif.n_frames == 2 and np.ptp(np.asarray(gif.convert("L"))) == 0  # the first frame is blank
    assert torch.equal(read_digit(path), read_digit(tmp_path / "8bit.png"))
    all_blank = tmp_path / "all-blank.gif"
    Image.new("L", (40, 40), 0).save(all_blank, save_all=True, append_images=[Image.new("L", (40, 40), 255)])
    with pytest.raises(DistmnistError, match="all-blank.gif: no digit found .each of its first 2 frames"):
        read_digit(all_blank)
    # the pixel limit counts every frame decoded: 160 x 160 blank, then 160 x 160 more is past 30,000
    with pytest.raises(ImageTooLarge, match="blank-first.gif: no digit in the first 1 frames.*limit of 30,000"):
        read_digit(path, max_pixels=30_000)
    assert torch.equal(read_digit(path, max_pixels=51_200), read_digit(tmp_path / "8bit.png"))


def test_nan_pixels_are_refused_with_the_file_name(tmp_path):
    values = (seven_8bit() / 255).astype(np.float32)
    values[3, 3] = np.nan
    Image.fromarray(values).save(tmp_path / "nan.tiff")
    with pytest.raises(DistmnistError, match="nan.tiff: not an image that can be read.*NaN"):
        read_digit(tmp_path / "nan.tiff")


def png_bomb(path: Path, side: int) -> Path:
    """A valid 1-bit black PNG of side x side pixels: a few KB that decode into side**2 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte, then the bits of the row
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_huge_images_are_refused_before_decoding(tmp_path, monkeypatch, capsys):
    bomb = png_bomb(tmp_path / "bomb.png", 12_000)
    assert bomb.stat().st_size < 200_000  # 144 million pixels in a small file
    weights = tmp_path / "model.safetensors"
    save_weights(Net().state_dict(), weights)

    def no_decoding(self):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit:
        predict_main(["--checkpoint", str(weights), str(bomb)])
    assert exit.value.code == 2 and time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{bomb}: 12000 x 12000 = 144,000,000 pixels, over the limit of {MAX_PIXELS:,}" in err
    monkeypatch.undo()

    small = tmp_path / "small.png"
    Image.fromarray(seven_8bit()).save(small)  # 160 x 160 = 25,600 pixels
    with pytest.raises(SystemExit) as exit:
        predict_main(["--checkpoint", str(weights), "--max-pixels", "25599", str(small)])
    assert exit.value.code == 2 and "over the limit of 25,599 (--max-pixels)" in capsys.readouterr().err
    with pytest.raises(ImageTooLarge):  # a later page of a TIFF is checked too, before it is decoded
        pages = tmp_path / "pages.tiff"
        Image.new("L", (10, 10)).save(pages, save_all=True, append_images=[Image.new("L", (400, 400))])
        read_digit(pages, max_pixels=1000)


@pytest.mark.slow
def test_every_format_is_read_as_the_same_seven(trained, tmp_path):
    files = formats(tmp_path)
    r = in_process("predict", "--checkpoint", trained, "--json", *files.values())
    assert r.returncode == 0, r.stderr
    assert [x["digit"] for x in json.loads(r.stdout)] == [7] * len(files), r.stdout
