"""plot: a real (small) training run's folder becomes four valid, non-blank PNGs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import in_process, write_mnist
from distmnist.errors import DistmnistError
from distmnist.plot import main as plot_main
from distmnist.plot import read_metrics, require_matplotlib

PLOTS = ("loss.png", "accuracy.png", "throughput.png", "kernels.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-epoch run on 600 synthetic images: metrics.jsonl, checkpoints and model.safetensors."""
    root = tmp_path_factory.mktemp("plot-run")
    data = write_mnist(root / "mnist")
    r = in_process("train", "--data-dir", data, "--no-download", "--epochs", "2", "--output-dir", root / "run",
                   "--progress", "none")
    assert r.returncode == 0, r.stderr
    return root / "run"


def assert_valid_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 300 and image.height >= 200
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 0, f"{path} is blank"


def test_plot_command_writes_four_pngs_into_run_dir_plots(run_dir):
    r = in_process("plot", run_dir, "--progress", "plain")
    assert r.returncode == 0, r.stderr
    for name in PLOTS:
        assert f"wrote {run_dir / 'plots' / name}" in r.stdout
        assert_valid_png(run_dir / "plots" / name)


def test_out_folder_and_kernels_from_a_checkpoint_while_the_run_is_unfinished(run_dir, tmp_path, capsys):
    unfinished = tmp_path / "run"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    (unfinished / "checkpoints").symlink_to(run_dir / "checkpoints")
    assert plot_main([str(unfinished), "--out", str(tmp_path / "pictures"), "--progress", "plain"]) == 0
    assert "not found (run unfinished?): using" in capsys.readouterr().out
    for name in PLOTS:
        assert_valid_png(tmp_path / "pictures" / name)  # one epoch: still visible points, not blank


def test_metrics_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(DistmnistError, match="metrics.jsonl: no such file"):
        read_metrics(tmp_path / "metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(DistmnistError, match=r"metrics.jsonl:1: missing train_loss"):
        read_metrics(tmp_path / "metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(DistmnistError, match="no epochs recorded"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(DistmnistError, match=r'pip install "distmnist\[plot\]"'):
        require_matplotlib()
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit:
        plot_main([str(tmp_path)])
    assert exit.value.code == 2
    assert 'pip install "distmnist[plot]"' in capsys.readouterr().err


def test_evaluate_mistakes_without_matplotlib_fails_before_any_work(monkeypatch, tmp_path, capsys):
    from distmnist.evaluation import main as evaluate_main

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as exit:
        evaluate_main(["--checkpoint", str(tmp_path / "absent.safetensors"), "--mistakes", str(tmp_path / "m.png")])
    assert exit.value.code == 2
    assert 'pip install "distmnist[plot]"' in capsys.readouterr().err


def test_the_kernel_picture_has_a_zero_centred_colour_scale(tmp_path):
    import torch

    from distmnist.plot import kernels_figure, save

    weights = torch.linspace(-0.3, 0.2, 250).reshape(10, 1, 5, 5)
    fig = kernels_figure(weights)
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylabel() == "weight"
    low, high = bars[0].get_ylim()
    assert (low, high) == pytest.approx((-0.3, 0.3))  # symmetric: white is 0
    path = save(fig, tmp_path / "kernels.png")
    assert_valid_png(path)
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=int)
    red = (pixels[..., 0] - pixels[..., 2] > 80).sum()
    blue = (pixels[..., 2] - pixels[..., 0] > 80).sum()
    assert red > 500 and blue > 500  # both signs drawn in colour, not grey
