"""The length-grouped training order (`--train_sampling_strategy group_by_length`, the default), made a function
of the seed and the epoch alone, so a resumed run (after any kill, in any epoch) sees the order the uninterrupted
run saw."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' `LengthGroupedSampler` (batches of similar length, in a random order) drawn from a generator
    seeded with `seed + epoch`.

    Why: upstream builds it without a generator, so each epoch's order comes from the global RNG as the previous
    epochs left it (dropout, augmentation); a run resumed in epoch 2 or later restores that state only at its
    checkpoint, and so trains on another order than the run it continues. Trainer calls `set_epoch` before every
    epoch (through accelerate's `DataLoaderShard.set_epoch`); for a resumed epoch under DDP, which that call does not
    reach, `LlavaTrainer.get_resumed_dataloader` sets it.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))
