"""Exact packing (`--packing`) and token-budget batches (`--max_tokens_per_batch`).

Both are plans made once, before training, from the token count every sample already has (`LlavaDataset.lengths`,
image tokens included, so no image is decoded to plan): groups of sample indices, served by `PlannedDataset`, whose
item i is group i. The Trainer's own sampler then shuffles groups, so DDP sharding, resuming (batch skipping),
gradient accumulation and `num_items_in_batch` work unchanged. The plan depends only on the lengths and the seed,
so every process and every resumed run computes the same one.

Packing: a group is a row of whole samples, at most `--model_max_length` tokens in all (a sample is never split);
`llava.data.collator.PackingCollator` concatenates each row's samples, numbers positions from 0 per sample and leaves out the attention
mask, so the LM's attention keeps samples apart (transformers builds the mask from the restarting `position_ids`,
see there). `--per_device_train_batch_size` is then rows per batch.
Token budget: a group is a whole batch whose padded tensor (rows x longest row) holds at most
`--max_tokens_per_batch` tokens; the DataLoader takes one group per step (batch size 1), see `llava.data.collator.WholeBatches`.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections.abc import Callable

import torch

from llava.data.collator import LlavaDataCollator, PackingCollator, WholeBatches
from llava.data.types import ConfigurationError

logger = logging.getLogger(__name__)


def pack_rows(lengths: list[int], max_length: int, seed: int) -> list[list[int]]:
    """Sample indices grouped into rows of at most `max_length` tokens, every sample in exactly one row.

    Best-fit decreasing: longest samples first, each into the row with the least room that still fits it (a new
    row when none does), which fills rows about as tightly as any quick heuristic. Samples of equal length are taken
    in a seeded random order, so the seed decides which of them share rows. Rows with the same free room are kept per
    room size, so planning 665k samples takes seconds.
    """
    if lengths and max(lengths) > max_length:
        raise ValueError(f"a sample has {max(lengths)} tokens, more than the {max_length} a packed row holds.")
    rows: list[list[int]] = []
    rows_by_room: dict[int, list[int]] = {}  # free tokens -> indices of the rows with exactly that much room
    rooms: list[int] = []  # the keys of rows_by_room, sorted
    for index in _longest_first(lengths, seed):
        length = lengths[index]
        k = bisect.bisect_left(rooms, length)
        if k < len(rooms):
            room = rooms[k]
            row = rows_by_room[room].pop()
            if not rows_by_room[room]:
                del rows_by_room[room], rooms[k]
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(index)
        left = room - length
        if left:
            if left not in rows_by_room:
                bisect.insort(rooms, left)
            rows_by_room.setdefault(left, []).append(row)
    return rows


def token_budget_batches(lengths: list[int], max_tokens: int, seed: int) -> list[list[int]]:
    """Item indices grouped into batches whose padded size (items x longest item) is at most `max_tokens`.

    Items are taken longest first (equal lengths in a seeded order), so each batch holds items of similar length
    and little goes to padding; the Trainer's sampler shuffles the batches.
    """
    if lengths and max(lengths) > max_tokens:
        raise ValueError(f"an item has {max(lengths)} tokens, more than the budget of {max_tokens}.")
    batches: list[list[int]] = []
    for index in _longest_first(lengths, seed):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def _longest_first(lengths: list[int], seed: int) -> list[int]:
    """Indices by decreasing length, ties broken by a random order drawn from `seed`."""
    tie_break = list(range(len(lengths)))
    random.Random(seed).shuffle(tie_break)
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], tie_break[i]))


class PlannedDataset(torch.utils.data.Dataset):
    """Item i: the list of `dataset`'s items in `groups[i]` (a packed row, or a whole batch).

    `lengths` are the tokens each item's tensor holds (a row's total, a batch's rows x longest), so
    `--train_sampling_strategy group_by_length` groups items by them without fetching any. Over samples
    (`dataset` a `LlavaDataset`, `sample_lengths` its lengths), a sample that fails at load time under
    `--skip_invalid_samples` is replaced by one no longer than it, so a row or batch never outgrows its plan.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, groups: list[list[int]], lengths: list[int],
                 sample_lengths: list[int] | None = None):
        self.dataset = dataset
        self.groups = groups
        self.lengths = lengths
        self.sample_lengths = sample_lengths

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list:
        if self.sample_lengths is None:  # groups of planned rows
            return [self.dataset[i] for i in self.groups[index]]
        return [self.dataset.item(i, max_tokens=self.sample_lengths[i]) for i in self.groups[index]]


def planned_batches(dataset: torch.utils.data.Dataset, pad_token_id: int, max_length: int, packing: bool,
                    max_tokens_per_batch: int | None, seed: int) -> tuple[torch.utils.data.Dataset, Callable]:
    """The training dataset and collator for the flags: `dataset` and `LlavaDataCollator` unchanged without
    --packing and --max_tokens_per_batch; else `PlannedDataset`s of rows and/or whole batches (see the module
    docstring). Refuses a budget that some sample (or, packed, some row) does not fit in, before any model loads."""
    collator: Callable = LlavaDataCollator(pad_token_id=pad_token_id)
    if not packing and not max_tokens_per_batch:
        return dataset, collator
    lengths = dataset.lengths
    if packing:
        rows = pack_rows(lengths, max_length, seed)
        row_lengths = [sum(lengths[i] for i in row) for row in rows]
        logger.info("packed %d samples into %d rows of at most %d tokens (%.1f%% filled)", len(dataset), len(rows),
                    max_length, 100 * sum(row_lengths) / (len(rows) * max_length))
        dataset, lengths, collator = PlannedDataset(dataset, rows, row_lengths, lengths), row_lengths, \
            PackingCollator(pad_token_id)
    if max_tokens_per_batch:
        if max(lengths) > max_tokens_per_batch:
            what = "packed row" if packing else "sample"
            raise ConfigurationError(f"--max_tokens_per_batch {max_tokens_per_batch} is less than the longest {what} "
                             f"({max(lengths)} tokens), which would fit in no batch. Raise --max_tokens_per_batch "
                             f"to at least --model_max_length ({max_length}), or lower --model_max_length.")
        batches = token_budget_batches(lengths, max_tokens_per_batch, seed)
        logger.info("%d batches of at most %d tokens", len(batches), max_tokens_per_batch)
        dataset = PlannedDataset(dataset, batches, [len(b) * max(lengths[i] for i in b) for b in batches],
                                 None if packing else lengths)
        collator = WholeBatches(collator)
    return dataset, collator
