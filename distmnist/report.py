"""What the model gets right and wrong: pure functions over labels and predictions, no ranks, no files.

The confusion matrix has the true digit as its row and the predicted digit as its column, so
``confusion[t].sum()`` is the number of test images of digit ``t`` and the diagonal holds the hits.
Counts are plain integer tensors, so per-rank matrices add up to the global one with one reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.table import Table

CLASSES = 10


@dataclass
class Mistake:
    """One misclassified test image."""

    index: int  # position in the test set
    label: int  # true digit
    predicted: int
    confidence: float  # the model's probability for the (wrong) predicted digit


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, classes: int = CLASSES) -> torch.Tensor:
    """(classes, classes) int64 counts: row = true digit, column = predicted digit."""
    pairs = labels.long().flatten() * classes + predicted.long().flatten()
    return torch.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[float | None]:
    """Fraction of each true digit's images predicted correctly; None for a digit with no images."""
    totals = confusion.sum(dim=1).tolist()
    hits = confusion.diagonal().tolist()
    return [h / n if n else None for h, n in zip(hits, totals, strict=True)]


def local_mistakes(log_probs: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """The k most confident mistakes among these predictions as a fixed-size (k, 4) float64 tensor.

    Columns: confidence, test-set index, true digit, predicted digit. Rows past the number of
    mistakes hold confidence -1 so that every rank contributes the same shape to a gather.
    """
    probs, predicted = log_probs.float().exp().max(dim=1)
    wrong = (predicted != labels).nonzero().flatten()
    order = probs[wrong].argsort(descending=True, stable=True)[:k]
    pick = wrong[order]
    out = torch.full((k, 4), -1.0, dtype=torch.float64, device=log_probs.device)
    out[: len(pick)] = torch.stack([probs[pick].double(), indices.to(log_probs.device)[pick].double(),
                                    labels[pick].double(), predicted[pick].double()], dim=1)
    return out


def top_mistakes(rows: torch.Tensor, k: int) -> list[Mistake]:
    """Merge (n, 4) rows from local_mistakes (of one rank or gathered from all): the k most confident."""
    rows = rows[rows[:, 0] >= 0].cpu()
    # most confident first; ties broken by test-set index, so the result does not depend on the world size
    order = sorted(range(len(rows)), key=lambda i: (-float(rows[i, 0]), int(rows[i, 1])))[:k]
    return [Mistake(int(rows[i, 1]), int(rows[i, 2]), int(rows[i, 3]), float(rows[i, 0])) for i in order]


# ---------------------------------------------------------------- rich tables


def per_class_table(confusion: torch.Tensor) -> Table:
    accuracy = per_class_accuracy(confusion)
    table = Table(title="per-class accuracy")
    for col in ("digit", "images", "correct", "accuracy"):
        table.add_column(col, justify="right")
    for digit, (row, acc) in enumerate(zip(confusion.tolist(), accuracy, strict=True)):
        table.add_row(str(digit), str(sum(row)), str(row[digit]), "-" if acc is None else f"{100 * acc:.2f}%")
    return table


def confusion_table(confusion: torch.Tensor) -> Table:
    table = Table(title="confusion matrix (row = true, column = predicted)")
    table.add_column("true", justify="right", style="bold")
    for digit in range(confusion.shape[1]):
        table.add_column(str(digit), justify="right")
    for digit, row in enumerate(confusion.tolist()):
        cells = [f"[green]{n}[/]" if j == digit else (f"[red]{n}[/]" if n else "[dim]0[/]") for j, n in enumerate(row)]
        table.add_row(str(digit), *cells)
    return table
