"""Dropout masks that do not depend on the world size: drawn for the whole global batch from one
generator, the same on every rank, each rank keeping the rows of its own images.

With ``--global-batch-size G`` every step draws a (G, 20) mask of Net's spatial dropout (its 20
channels after conv2), whatever the number of processes and however many images the step holds (a
short last step uses the first rows), so the generator advances by the same amount every step and
the masks of step t are a function of (seed, t) alone. Rank r of N holds the images at positions
r, r + N, r + 2N ... of the global batch (batches.TrainOrder) and takes those rows. The generator
lives on the training device; on CUDA it is registered with the CUDA graph, which then advances it
at every replay (not yet run on a GPU: no GPU was at hand when this was written).
"""

from __future__ import annotations

import torch

from .distributed import mixed_seed

CHANNELS = 20  # Net.conv2's output channels, which Dropout2d drops whole
MASK_STREAM = 0x6D61736B  # distinguishes this stream's seed from every other use of --seed


class GlobalDropout:
    """Draws each step's masks for the global batch; ``rows(n)`` gives this rank's, for a step of n images."""

    def __init__(self, p: float, global_batch: int, world: int, rank: int, seed: int, device: torch.device):
        self.keep = 1.0 - p
        self.world, self.rank = world, rank
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(mixed_seed(seed, MASK_STREAM))
        self.full = torch.empty(global_batch, CHANNELS, device=device)  # a static buffer (CUDA graphs)
        self.probabilities = torch.full_like(self.full, self.keep)

    def rows(self, step_images: int) -> torch.Tensor:
        """Draw the step's (G, 20) mask; this rank's rows among the step's first ``step_images`` positions,
        scaled by 1 / (1 - p) as nn.Dropout2d scales."""
        torch.bernoulli(self.probabilities, generator=self.generator, out=self.full)
        return self.full[self.rank : step_images : self.world].div(self.keep)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"dropout": self.generator.get_state().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["dropout"].clone())

    def start_at(self, seed: int, step: int) -> None:
        """No saved state to continue from (a checkpoint without a global batch): the masks from here on
        are keyed by (seed, step) instead, and no step repeats an earlier one's."""
        self.generator.manual_seed(mixed_seed(seed, MASK_STREAM, step))
