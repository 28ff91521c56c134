"""The evaluation report: per-class accuracy, confusion matrix and most confident mistakes.

Hand counts on tiny sets for the pure functions; then `evaluate` on one process and on two
(torchrun) must report the same matrix as a plain loop over the model's predictions.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console as RichConsole

from conftest import run_module, torchrun
from distmnist.checkpoint import load_weights, save_weights
from distmnist.data import load_mnist
from distmnist.model import Net, to_input
from distmnist.report import (
    Mistake,
    confusion_matrix,
    confusion_table,
    local_mistakes,
    per_class_accuracy,
    per_class_table,
    top_mistakes,
)

# ten images: true digits and what a model said, counted by hand below
LABELS = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 9])
SAID = torch.tensor([0, 1, 1, 1, 7, 2, 2, 0, 2, 9])


def test_confusion_matrix_matches_a_hand_count():
    confusion = confusion_matrix(LABELS, SAID)
    expected = torch.zeros(10, 10, dtype=torch.long)
    expected[0, 0] = 1  # one 0 read as 0
    expected[0, 1] = 1  # one 0 read as 1
    expected[1, 1] = 2
    expected[1, 7] = 1
    expected[2, 2] = 3
    expected[2, 0] = 1
    expected[9, 9] = 1
    assert confusion.dtype == torch.long
    assert torch.equal(confusion, expected)
    assert int(confusion.sum()) == 10 and int(confusion.trace()) == 7


def test_per_class_accuracy_matches_a_hand_count():
    accuracy = per_class_accuracy(confusion_matrix(LABELS, SAID))
    assert accuracy[0] == 1 / 2
    assert accuracy[1] == 2 / 3
    assert accuracy[2] == 3 / 4
    assert accuracy[9] == 1.0
    assert accuracy[3:9] == [None] * 6  # digits with no images have no accuracy


def test_confusion_of_shards_adds_up_to_the_whole():
    whole = confusion_matrix(LABELS, SAID)
    shards = [confusion_matrix(LABELS[r::3], SAID[r::3]) for r in range(3)]
    assert torch.equal(sum(shards), whole)


def _log_probs(rows: list[tuple[int, float]]) -> torch.Tensor:
    """Log-probabilities where each row puts probability p on digit d and spreads the rest evenly."""
    out = torch.empty(len(rows), 10)
    for i, (digit, p) in enumerate(rows):
        out[i] = (1 - p) / 9
        out[i, digit] = p
    return out.log()


def test_most_confident_mistakes_by_hand():
    labels = torch.tensor([3, 5, 5, 8, 1, 7])
    log_probs = _log_probs([(3, 0.9), (6, 0.8), (5, 0.7), (0, 0.95), (7, 0.6), (1, 0.8)])
    indices = torch.tensor([10, 11, 12, 13, 14, 15])  # their places in the test set
    rows = local_mistakes(log_probs, labels, indices, k=3)
    assert rows.shape == (3, 4)
    mistakes = top_mistakes(rows, 3)
    # wrong: 11 (5 said 6, 0.8), 13 (8 said 0, 0.95), 14 (1 said 7, 0.6), 15 (7 said 1, 0.8)
    assert [m.index for m in mistakes] == [13, 11, 15]  # 0.95, then the 0.8 tie broken by index
    assert mistakes[0] == Mistake(index=13, label=8, predicted=0, confidence=pytest.approx(0.95))
    assert (mistakes[1].label, mistakes[1].predicted) == (5, 6)


def test_fewer_mistakes_than_asked_are_padded_and_dropped():
    labels = torch.tensor([2, 4])
    rows = local_mistakes(_log_probs([(2, 0.9), (9, 0.7)]), labels, torch.tensor([0, 1]), k=5)
    assert rows.shape == (5, 4) and (rows[1:, 0] == -1).all()
    assert [(m.index, m.label, m.predicted) for m in top_mistakes(rows, 5)] == [(1, 4, 9)]


def test_merging_ranks_gives_the_single_process_answer():
    torch.manual_seed(0)
    n, k = 40, 6
    log_probs = torch.randn(n, 10).log_softmax(dim=1)
    labels = torch.randint(0, 10, (n,))
    whole = top_mistakes(local_mistakes(log_probs, labels, torch.arange(n), k), k)
    per_rank = [local_mistakes(log_probs[r::3], labels[r::3], torch.arange(r, n, 3), k) for r in range(3)]
    assert top_mistakes(torch.cat(per_rank), k) == whole


def test_tables_show_the_counts():
    console = RichConsole(record=True, width=120, file=io.StringIO())
    confusion = confusion_matrix(LABELS, SAID)
    console.print(per_class_table(confusion))
    console.print(confusion_table(confusion))
    text = console.export_text()
    assert "66.67%" in text and "75.00%" in text  # digits 1 and 2
    assert "confusion matrix" in text


# ---------------------------------------------------------------- evaluate, 1 and 2 processes


def hand_counted_confusion(weights: Path, data_dir: Path) -> np.ndarray:
    """Predict every test image with a plain Net and count pairs in a Python loop."""
    model = Net()
    model.load_state_dict(load_weights(weights))
    model.eval()
    _, test = load_mnist(data_dir, allow_download=False)
    with torch.no_grad():
        said = model(to_input(test.images)).argmax(dim=1).tolist()
    counts = np.zeros((10, 10), dtype=int)
    for true, pred in zip(test.labels.tolist(), said, strict=True):
        counts[true, pred] += 1
    return counts


@pytest.mark.slow
def test_evaluate_reports_the_same_counts_on_one_and_two_processes(mnist_dir, tmp_path):
    torch.manual_seed(3)
    weights = tmp_path / "model.safetensors"
    save_weights(Net().state_dict(), weights)  # untrained: plenty of mistakes in every row
    common = ["--checkpoint", weights, "--data-dir", mnist_dir, "--no-download", "--progress", "plain",
              "--test-batch-size", "64", "--mistakes-count", "12"]
    one = run_module("evaluate", *common, "--output-json", tmp_path / "one.json", "--mistakes", tmp_path / "one.png")
    assert one.returncode == 0, one.stderr
    two = torchrun(2, "evaluate", *common, "--output-json", tmp_path / "two.json", "--mistakes", tmp_path / "two.png")
    assert two.returncode == 0, two.stderr
    assert "confusion matrix" in one.stdout and "per-class accuracy" in one.stdout

    r1, r2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert r2["world_size"] == 2
    expected = hand_counted_confusion(weights, mnist_dir)
    for report in (r1, r2):
        confusion = np.array(report["confusion_matrix"])
        assert (confusion == expected).all()
        assert confusion.sum() == report["test_samples"] == 250  # each image counted once
        assert np.trace(confusion) == report["test_correct"]
        for digit, acc in enumerate(report["per_class_accuracy"]):
            row = confusion[digit]
            assert acc == (pytest.approx(row[digit] / row.sum()) if row.sum() else None)
        assert len(report["mistakes"]) == 12
    # the same mistakes whichever rank held them
    assert [(m["index"], m["label"], m["predicted"]) for m in r1["mistakes"]] == \
        [(m["index"], m["label"], m["predicted"]) for m in r2["mistakes"]]
    assert [m["confidence"] for m in r1["mistakes"]] == pytest.approx([m["confidence"] for m in r2["mistakes"]])
    for png in ("one.png", "two.png"):
        with Image.open(tmp_path / png) as image:
            assert image.format == "PNG" and np.asarray(image.convert("L")).std() > 0
    conf = [m["confidence"] for m in r1["mistakes"]]
    assert conf == sorted(conf, reverse=True) and all(0 < c <= 1 and not math.isnan(c) for c in conf)
