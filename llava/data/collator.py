"""Batching: pad (or pack) token sequences and gather every sample's images into one pixel tensor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llava.data.types import IGNORE_INDEX


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
    and the causal mask needs no left-pad handling (generation pads on the left instead, see `llava.model.inference.Answerer`).
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
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **image_batch(items)}


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
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                **image_batch([item for row in rows for item in row])}


def image_batch(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every item's images in item order, the order their image tokens appear in the flattened batch: nothing for a
    text-only batch.

    pixel_values  (sum n_i, 3, H, W), or for anyres items (sum n_i, max tiles, 3, H, W): each image's tiles, zero
                  tiles after them up to the most any image of the batch has (the model reads only an image's own,
                  counted from its size, as transformers' LLaVA-NeXT processor pads them within one call)
    image_sizes   (sum n_i, 2) (anyres only): each image's (height, width), which decides its grid
    batch_num_images  (samples with images,) (OneVision only): each sample's image count, which decides whether
                  its images are tiled (one) or base views (several); per sample, also in packed rows
    """
    with_images = [item for item in items if "pixel_values" in item]
    if not with_images:
        return {}
    pixel_values = [item["pixel_values"] for item in with_images]
    if "image_sizes" not in with_images[0]:
        return {"pixel_values": torch.cat(pixel_values)}
    tiles = max(p.shape[1] for p in pixel_values)
    padded = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1])) for p in pixel_values]
    batch = {"pixel_values": torch.cat(padded), "image_sizes": torch.cat([item["image_sizes"] for item in with_images])}
    if "batch_num_images" in with_images[0]:
        batch["batch_num_images"] = torch.cat([item["batch_num_images"] for item in with_images])
    return batch


@dataclass
class WholeBatches:
    """Collates a DataLoader batch of one planned batch (a `PlannedDataset` item) with `collator`."""

    collator: Callable[[list], dict[str, torch.Tensor]]

    def __call__(self, batches: list[list]) -> dict[str, torch.Tensor]:
        (items,) = batches
        return self.collator(items)
