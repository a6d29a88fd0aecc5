"""Exact packing (`--packing`) and token-budget batches (`--max_tokens_per_batch`).

Both are plans made once, before training, from the token count every sample already has (`LlavaDataset.lengths`,
image tokens included, so no image is decoded to plan): groups of sample indices, served by `PlannedDataset`, whose
item i is group i. The Trainer's own sampler then shuffles groups, so DDP sharding, resuming (batch skipping),
gradient accumulation and `num_items_in_batch` work unchanged. The plan depends only on the lengths and the seed,
so every process and every resumed run computes the same one.

Packing: a group is a row of whole samples, at most `--model_max_length` tokens in all (a sample is never split);
`PackingCollator` concatenates each row's samples, numbers positions from 0 per sample and leaves out the attention
mask, so the LM's attention keeps samples apart (transformers builds the mask from the restarting `position_ids`,
see `PackingCollator`). `--per_device_train_batch_size` is then rows per batch.
Token budget: a group is a whole batch whose padded tensor (rows x longest row) holds at most
`--max_tokens_per_batch` tokens; the DataLoader takes one group per step (batch size 1), see `WholeBatches`.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llava.collator import LlavaDataCollator
from llava.model import components, parameters_sharded
from llava.processor import IGNORE_INDEX

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
    `--train_sampling_strategy group_by_length` groups items by them without fetching any. A sample that
    `LlavaDataset` replaces by the next one at load time (`--skip_invalid_samples`, an image broken since the checks)
    can make its row or batch longer than planned.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, groups: list[list[int]], lengths: list[int]):
        self.dataset = dataset
        self.groups = groups
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list:
        return [self.dataset[i] for i in self.groups[index]]


@dataclass
class PackingCollator:
    """Rows of whole samples (`PlannedDataset` items of `LlavaDataset` items) into one batch.

    Output:
        input_ids     (B, T)  each row its samples back to back, right-padded with `pad_token_id` to the longest row
        labels        (B, T)  the samples' labels, -100 at every sample's first token (the previous sample's last
                              position must not learn to predict it) and on padding
        position_ids  (B, T)  0, 1, ... per sample, and again 0, 1, ... over a row's padding
        pixel_values  (sum n_i, 3, H, W)  every sample's images in row order, then sample order: the order their
                      image tokens appear in the flattened batch; omitted when no sample has an image

    No attention mask: given restarting `position_ids` and no mask, transformers' mask builder
    (`masking_utils.find_packed_sequence_indices`) lets each token attend only to earlier tokens of its own run, for
    eager and sdpa attention; the padding is a run of its own, so no sample sees it. Flash attention gets the same
    boundaries from `position_ids` (see `LlavaForConditionalGeneration._flash_varlen_kwargs`). With per-sample
    positions, rotary embeddings too see each sample as if it were alone: loss and gradients equal those of the
    padded batch of the same samples.
    """

    pad_token_id: int

    def __call__(self, rows: list[list[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        length = max(sum(len(item["input_ids"]) for item in row) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.empty((len(rows), length), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for item in row:
                end = start + len(item["input_ids"])
                input_ids[r, start:end] = item["input_ids"]
                labels[r, start + 1:end] = item["labels"][1:]
                position_ids[r, start:end] = torch.arange(end - start)
                start = end
            position_ids[r, start:] = torch.arange(length - start)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        pixel_values = [item["pixel_values"] for row in rows for item in row if "pixel_values" in item]
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
        return batch


@dataclass
class WholeBatches:
    """Collates a DataLoader batch of one planned batch (a `PlannedDataset` item) with `collator`."""

    collator: Callable[[list], dict[str, torch.Tensor]]

    def __call__(self, batches: list[list]) -> dict[str, torch.Tensor]:
        (items,) = batches
        return self.collator(items)


def check_exact_packing(model: torch.nn.Module) -> None:
    """Refuse --packing for a language model whose attention would cross the boundaries of packed samples.

    Why: packed rows rely on the LM building its attention mask from the restarting `position_ids`
    (`transformers.masking_utils.create_causal_mask(..., position_ids=...)`); a decoder that leaves them out (OPT in
    transformers 5.x, possibly remote code) lets each sample attend to those before it in its row, silently. Two
    forward passes of 20 tokens decide: a 4-token sample packed after one 16-token sample must come out as it does
    after another (kept apart, nothing of the first reaches it; leaking, its logits change at every layer).
    Skipped (with a warning) when weights are already partitioned over processes (ZeRO-3 loading): no pass can run
    before DeepSpeed takes the model over.
    """
    decoder = type(components(model)["language_model"]).__name__
    if parameters_sharded(model):
        logger.warning("--packing: weights are sharded, so the check that %s keeps packed samples apart is skipped.",
                       decoder)
        return
    device = model.get_input_embeddings().weight.device
    second = torch.arange(17, 21)
    positions = torch.cat([torch.arange(16), torch.arange(4)]).to(device)[None]
    logits = []
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in (torch.arange(1, 17), torch.arange(21, 37)):
                row = torch.cat([first, second]).to(device)[None]
                labels = torch.full_like(row, IGNORE_INDEX)
                labels[:, -3:] = row[:, -3:]
                logits.append(model(input_ids=row, labels=labels, position_ids=positions).logits.float())
    finally:
        model.train(training)
    if (logits[0] - logits[1]).abs().max() > 1e-3 * logits[0].abs().max():
        raise ValueError(f"--packing: {decoder} does not keep packed samples apart (its attention mask ignores the "
                         "restarting position_ids), so they would attend to each other. Train it without --packing; "
                         "--max_tokens_per_batch and --train_sampling_strategy group_by_length also keep padding "
                         "low.")


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
        dataset, lengths, collator = PlannedDataset(dataset, rows, row_lengths), row_lengths, PackingCollator(
            pad_token_id)
    if max_tokens_per_batch:
        if max(lengths) > max_tokens_per_batch:
            what = "packed row" if packing else "sample"
            raise ValueError(f"--max_tokens_per_batch {max_tokens_per_batch} is less than the longest {what} "
                             f"({max(lengths)} tokens), which would fit in no batch. Raise --max_tokens_per_batch "
                             f"to at least --model_max_length ({max_length}), or lower --model_max_length.")
        batches = token_budget_batches(lengths, max_tokens_per_batch, seed)
        logger.info("%d batches of at most %d tokens", len(batches), max_tokens_per_batch)
        dataset = PlannedDataset(dataset, batches, [len(b) * max(lengths[i] for i in b) for b in batches])
        collator = WholeBatches(collator)
    return dataset, collator
