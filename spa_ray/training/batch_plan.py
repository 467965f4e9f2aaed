"""Which pairs each rank sees at each optimizer step: a pure function of (seed, step).

Deriving the data order from the seed and the global step (instead of iterating a
stateful loader) is what makes a resumed run see exactly the data an uninterrupted one
would: the data position is just the step number in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchPlan:
    num_pairs: int
    global_batch_size: int
    micro_batch_size: int
    world_size: int
    epochs: int
    seed: int

    def __post_init__(self) -> None:
        per_step = self.world_size * self.micro_batch_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size ({self.micro_batch_size}) x trainer workers ({self.world_size})"
            )
        if self.num_pairs < self.global_batch_size:
            raise ValueError(
                f"{self.num_pairs} pairs are fewer than one global batch ({self.global_batch_size}): "
                "not training on it"
            )
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.world_size * self.micro_batch_size)

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch; the remainder (< one batch) rotates with the shuffle."""
        return self.num_pairs // self.global_batch_size

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_pairs, generator=generator)

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Pair indices of ``rank``'s micro-batches for global optimizer ``step``."""
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} outside [0, {self.total_steps})")
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch_size
        global_batch = self.epoch_order(epoch)[start : start + self.global_batch_size].tolist()
        mine = global_batch[rank :: self.world_size]
        m = self.micro_batch_size
        return [mine[i : i + m] for i in range(0, len(mine), m)]


def group_by_length(micro_batches: list[list[int]], lengths) -> list[list[int]]:
    """The same pairs and micro-batch sizes, regrouped so each micro-batch holds pairs of
    similar length (longest first): padding to a micro-batch's longest pair shrinks.

    Only the split of one rank's share of ONE optimizer step changes, so the step's
    gradient (the mean over its equal-size micro-batches) is the same set of pairs, and
    the grouping stays a pure function of (seed, step): resume-safe. `lengths[i]` is pair
    i's padded length (prompt + longer response). Ties keep the plan's order.
    """
    flat = [i for mb in micro_batches for i in mb]
    flat.sort(key=lambda i: -int(lengths[i]))  # stable: ties keep the plan's order
    out, start = [], 0
    for mb in micro_batches:
        out.append(flat[start : start + len(mb)])
        start += len(mb)
    return out
