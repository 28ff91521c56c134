"""The tutorial's CNN, layer for layer; a pure nn.Module with no device or rank code."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Dropout2d(nn.Dropout2d):
    """nn.Dropout2d that can take its mask from outside: ``mask`` (batch, channels) of 0 and 1 / (1 - p),
    set before the forward pass, replaces the draw from the global generator (a global batch's masks
    do not depend on the world size: see masks.py). Without one it is exactly nn.Dropout2d."""

    mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.mask is not None:
            return x * self.mask.view(*self.mask.shape, 1, 1).to(x.dtype)
        return super().forward(x)


class Net(nn.Module):
    """conv(5x5) -> maxpool -> relu, twice; spatial dropout; two linear layers; log-probabilities.

    The attribute names are the keys of the saved weights (``conv1.weight`` ... ``fc2.bias``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.mp = nn.MaxPool2d(2)
        self.drop2D = Dropout2d(p=0.25)
        self.fc1 = nn.Linear(320, 100)
        self.fc2 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float images in [0, 1], shape (batch, 1, 28, 28); returns log-probabilities (batch, 10)."""
        x = F.relu(self.mp(self.conv1(x)))
        x = F.relu(self.mp(self.conv2(x)))
        x = self.drop2D(x)
        x = x.flatten(1)  # (batch, 320)
        x = self.fc1(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (batch, 28, 28) -> float (batch, 1, 28, 28) in [0, 1], exactly as ToTensor scales."""
    return images.unsqueeze(1).float().div_(255)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Layer:
    """One row of the model summary: a module call in the forward pass."""

    name: str  # attribute path, e.g. conv1
    kind: str  # class name, e.g. Conv2d
    output_shape: tuple[int, ...]  # without the batch dimension
    parameters: int  # counted at the module's first call only (a module called twice has them once)


def layer_summary(model: nn.Module, input_shape: tuple[int, ...] = (1, 1, 28, 28)) -> list[Layer]:
    """The leaf modules in the order the forward pass calls them, with what each returns.

    One forward pass of a zero image, without gradients and in eval mode (restored afterwards), so
    no random number is drawn and training is unchanged.
    """
    rows: list[Layer] = []
    seen: set[str] = set()
    names = {module: name for name, module in model.named_modules()}

    def record(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        name = names[module]
        count = 0 if name in seen else sum(p.numel() for p in module.parameters(recurse=False))
        seen.add(name)
        rows.append(Layer(name, type(module).__name__, tuple(output.shape[1:]), count))

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(record) for m in leaves]
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_shape, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return rows
