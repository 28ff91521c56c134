"""predict: any image of a digit, made the way MNIST's digits were, gets the right answer.

A model trained for one epoch on the real MNIST (about 15 s on one CPU thread) classifies real
test images saved as PNG and JPEG, in both polarities and at another size, and a digit drawn here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import run_module
from distmnist.checkpoint import save_weights
from distmnist.data import load_mnist
from distmnist.errors import DistmnistError
from distmnist.model import Net
from distmnist.predict import load_model, mnist_digit, predict
from distmnist.predict import main as predict_main

_TRAINED: dict[str, Path] = {}  # one training run per test session


@pytest.fixture
def trained(real_mnist, tmp_path_factory) -> Path:
    """model.safetensors of a 1-epoch run on the real MNIST, trained once and shared by the tests here."""
    if "weights" not in _TRAINED:
        out = tmp_path_factory.mktemp("predict-run")
        r = run_module("train", "--data-dir", real_mnist, "--no-download", "--epochs", "1", "--output-dir", out,
                       "--progress", "none")
        assert r.returncode == 0, r.stderr
        _TRAINED["weights"] = out / "model.safetensors"
    return _TRAINED["weights"]


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
    r = run_module("predict", "--checkpoint", trained, "--json", *files)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert [Path(x["file"]) for x in results] == files
    wrong = [(x["file"], x["digit"], label) for x, label in zip(results, labels) if x["digit"] != label]
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
    with Image.open(tmp_path / "seen" / "my-seven.28x28.png") as seen:
        assert seen.size == (28, 28) and seen.mode == "L"


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
