"""The training `Dataset`: checked, tokenized samples (cached on disk, see `llava.token_store`); image tokens are
expanded and images decoded per item, in DataLoader workers."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch
from transformers import ProcessorMixin

from llava.conversation import expand_image_tokens
from llava.data import Sample, load_image, resolve_image_path
from llava.errors import DataError
from llava.processor import image_token_count
from llava.token_store import TokenStore, cache_key, cached
from llava.preparation import prepare_samples

logger = logging.getLogger(__name__)


class LlavaDataset(torch.utils.data.Dataset):
    """Each item: {"input_ids": (T,), "labels": (T,), "pixel_values": (num_images, 3, H, W)}; text-only
    samples have no "pixel_values".

    An image that fails to load now although it passed the up-front checks (replaced on disk, say) raises a
    `DataError` naming the sample, or, with `skip_invalid`, is logged and replaced by the next sample, so a
    long run is not killed by one file.
    """

    def __init__(self, samples: list[Sample], store: TokenStore, processor: ProcessorMixin,
                 image_folder: str | None, allow_absolute_image_paths: bool = False, skip_invalid: bool = False,
                 max_image_pixels: int | None = None):
        self.samples = samples
        self.store = store
        self.image_token_id = processor.image_token_id
        self.tokens_per_image = image_token_count(processor)
        self.image_processor = processor.image_processor
        self.image_folder = image_folder
        self.allow_absolute_image_paths = allow_absolute_image_paths
        self.skip_invalid = skip_invalid
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        """Token count of every sample (image tokens included), for length-grouped batching."""
        return self.store.lengths.tolist()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for offset in range(len(self.samples)):
            try:
                return self._item((index + offset) % len(self.samples))
            except DataError as error:
                if not self.skip_invalid:
                    raise
                logger.warning("skipping a sample that failed at load time: %s", error)
        raise DataError("every sample failed to load; check --image_folder and the image files.")

    def _item(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        input_ids, labels = expand_image_tokens(*self.store[index], self.image_token_id, self.tokens_per_image)
        item = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
        if sample.images:
            images = []
            for relative in sample.images:
                path = resolve_image_path(self.image_folder, relative, sample, self.allow_absolute_image_paths)
                try:
                    images.append(load_image(path, self.max_image_pixels))
                except (OSError, ValueError, SyntaxError, Warning) as error:
                    raise DataError(f"{sample.describe()}: cannot read image {path}: {error}",
                                    kind="corrupt_image") from None
            item["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return item


def build_dataset(data_paths: list[str], processor: ProcessorMixin, max_length: int, image_folder: str | None,
                  skip_invalid: bool = False, allow_absolute_image_paths: bool = False,
                  num_workers: int | None = None, max_image_pixels: int | None = None,
                  cache_dir: str | None = None) -> LlavaDataset:
    """Check and tokenize every sample (or read that from the cache in `cache_dir`, None: no cache); refuse with the
    full report if any is invalid, unless `skip_invalid`, which drops them and logs how many were skipped and why."""
    fingerprint = tokenization_fingerprint(processor, max_length, image_folder, allow_absolute_image_paths)
    result = cached(cache_dir, cache_key(data_paths, fingerprint), lambda: prepare_samples(
        data_paths, processor, max_length, image_folder, allow_absolute_image_paths, num_workers))
    if result.problems:
        if not skip_invalid:
            raise DataError(f"invalid training data (nothing was trained; fix these samples or pass "
                            f"--skip_invalid_samples True to drop them):\n{result.report()}")
        logger.warning("skipping invalid samples:\n%s", result.report(limit=20))
    elif result.warnings:
        logger.warning("training data warnings:\n%s", result.report(limit=20))
    if not result.samples:
        raise DataError(f"no valid samples in {', '.join(data_paths)}.", kind="no_samples")
    return LlavaDataset(result.samples, result.store, processor, image_folder, allow_absolute_image_paths,
                        skip_invalid, max_image_pixels)


def tokenization_fingerprint(processor: ProcessorMixin, max_length: int, image_folder: str | None,
                             allow_absolute_image_paths: bool) -> dict:
    """Everything besides the data files that the tokenized samples and the list of invalid ones depend on."""
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"tokenizer": hashlib.sha256(vocabulary.encode("utf-8")).hexdigest(),
            "special_tokens": tokenizer.special_tokens_map, "chat_template": processor.chat_template,
            "image_token_id": processor.image_token_id, "tokens_per_image": image_token_count(processor),
            "max_length": max_length, "image_folder": os.path.abspath(image_folder) if image_folder else None,
            "allow_absolute_image_paths": allow_absolute_image_paths}
