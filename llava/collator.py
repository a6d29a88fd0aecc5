"""Batching: pad token sequences and gather every sample's images into one pixel tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llava.processor import IGNORE_INDEX


@dataclass
class LlavaDataCollator:
    """Right-pads a list of `LlavaDataset` items into a batch.

    Input items: {"input_ids": (T_i,), "labels": (T_i,), "pixel_values": (n_i, 3, H, W) (absent: text-only)}.
    Output:
        input_ids       (B, T)  padded with `pad_token_id`
        attention_mask  (B, T)  1 on real tokens, 0 on padding, so padding is never attended to
        labels          (B, T)  -100 on padding (and wherever the item already had -100), so no loss there
        pixel_values    (sum n_i, 3, H, W)  images of all samples in batch order, which is the order their
                        image tokens appear in the flattened batch; omitted when no sample has an image

    Padding is on the right for training: every sequence starts at position 0, so positions need no offset
    and the causal mask needs no left-pad handling (generation pads on the left instead, see llava.generate).
    `pad_to_multiple_of` rounds T up (tensor-core friendly shapes on GPUs).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(items)
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pixel_values = [item["pixel_values"] for item in items if "pixel_values" in item]
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
        return batch
