"""The training `Dataset`: checked, tokenized samples (cached on disk, see `llava.data.token_cache`); image tokens
are expanded and images decoded per item, in DataLoader workers."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os

import numpy as np
import torch
from transformers import ProcessorMixin

from llava.data.checking import prepare_samples
from llava.data.encoder import expand_image_tokens
from llava.data.image_tokens import ImageTokens
from llava.data.images import ImageReader, image_readers, load_image
from llava.data.mixture import Mixture
from llava.data.token_cache import TokenStore, cache_key, cached
from llava.data.types import DataError, Sample

logger = logging.getLogger(__name__)

# Image samples a process loads before `LlavaDataset.item` judges whether most of them fail, at most (see
# `LlavaDataset._loads_to_judge`).
_MIN_LOADS_TO_JUDGE = 20


class LlavaDataset(torch.utils.data.Dataset):
    """Each item: {"input_ids": (T,), "labels": (T,), "pixel_values": (num_images, 3, H, W)}; text-only
    samples have no "pixel_values". Anyres (LLaVA-NeXT) items have pixel_values (num_images, tiles, 3, H, W), tiles
    padded to the image with the most, and "image_sizes" (num_images, 2): what its processor gives; OneVision items
    also "batch_num_images" (1,): how many images the sample has (one image is tiled, several are base views).

    An image that fails to load now although it passed the up-front checks (replaced on disk, say) raises a
    `DataError` naming the sample, or, with `skip_invalid`, is logged and replaced by the next sample, so a
    long run is not killed by one file.

    Item i is `samples[i]` with the tokens of row `rows[i]` of `store`: every row in order, until a mixture's
    selection (`select`) picks some, sharing the tokens instead of copying them.
    """

    def __init__(self, samples: list[Sample], store: TokenStore, processor: ProcessorMixin, image_tokens: ImageTokens,
                 images: list[ImageReader], skip_invalid: bool = False, max_image_pixels: int | None = None):
        self.samples = samples
        self.store = store
        self.rows = np.arange(len(samples))
        self.image_token_id = processor.image_token_id
        self.image_tokens = image_tokens
        self.image_processor = processor.image_processor
        self.images = images  # one per data file: `sample.source` picks it
        self.skip_invalid = skip_invalid
        self.max_image_pixels = max_image_pixels
        self._image_samples = _count_image_samples(samples)
        self._loads = self._failures = 0  # this process's image loads, for `item`'s refusal of mostly broken data

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        """Token count of every sample (image tokens included), for length-grouped batching."""
        return self.store.lengths[self.rows].tolist()

    def select(self, indices: np.ndarray) -> LlavaDataset:
        """The items at `indices` (repeats allowed), in that order."""
        selected = copy.copy(self)
        selected.samples, selected.rows = [self.samples[i] for i in indices], self.rows[indices]
        selected._image_samples = _count_image_samples(selected.samples)
        return selected

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.item(index)

    def item(self, index: int, max_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """Item `index`; when it fails to load under `skip_invalid`, the next sample that loads instead, of at most
        `max_tokens` tokens when given (a packed row or token-budget batch planned for the failed sample's length
        must not grow past it).

        Raises:
            DataError: the sample fails and `skip_invalid` is off; or more than half of the image samples this
                process loaded failed (the images are broken as a whole, e.g. every one corrupt: training on what
                is left, text only, would not be what was asked for; text-only samples are not counted, or many of
                them would hide it); or nothing loads.
        """
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            if offset and max_tokens is not None and self.store.lengths[self.rows[candidate]] > max_tokens:
                continue
            self._loads += bool(self.samples[candidate].images)
            try:
                return self._item(candidate)
            except DataError as error:  # only images fail to load
                if not self.skip_invalid:
                    raise
                self._failures += 1
                if self._loads >= self._loads_to_judge() and 2 * self._failures > self._loads:
                    raise DataError(f"{self._failures} of the {self._loads} image samples loaded so far failed (the "
                                    f"last: {error}); --skip_invalid_samples skips a few broken files, not broken "
                                    "data. Check the images, e.g. with `python -m llava.validate_data`, which "
                                    "decodes every one.", kind="mostly_broken") from None
                logger.warning("skipping a sample that failed at load time: %s", error)
        raise DataError("every sample failed to load; check --image_folder and the image files.")

    def _loads_to_judge(self) -> int:
        """How many image samples this process must have loaded before `item` judges whether most fail.

        Why not a fixed count: each DataLoader worker holds its own copy of the dataset, re-created every epoch, and
        loads about 1/(workers x processes) of the epoch's image samples, so a count above that share is never
        reached and a small data set whose every image is corrupt would train on its text alone. The share itself
        (capped at `_MIN_LOADS_TO_JUDGE`, enough to tell a few broken files from broken data) is reached by the end
        of the worker's epoch, so it judges over all it loads, as the checking pass judges over all samples; at
        least 1, so a worker with a single image sample to load still judges it.
        """
        info = torch.utils.data.get_worker_info()
        loaders = (info.num_workers if info else 1) * int(os.environ.get("WORLD_SIZE", "1"))
        return max(1, min(_MIN_LOADS_TO_JUDGE, self._image_samples // loaders))

    def _item(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        input_ids, trained, counts = self.store[self.rows[index]]
        input_ids, labels = expand_image_tokens(input_ids, trained, counts, self.image_token_id)
        item = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
        if sample.images:
            images = []
            for reference in sample.images:
                path = self.images[sample.source].file(reference, sample)
                try:
                    images.append(load_image(path, self.max_image_pixels))
                except (OSError, ValueError, SyntaxError, Warning) as error:
                    raise DataError(f"{sample.describe()}: cannot read image {path}: {error}",
                                    kind="corrupt_image") from None
            self._check_counts(sample, images, counts)
            # The sample's images as one group, as transformers' processors receive one text's images: OneVision's
            # tiles a sample's only image and gives each image of a multi-image sample one base view.
            processed = self.image_processor(images=[images], return_tensors="pt")
            item["pixel_values"] = processed["pixel_values"]
            for name in ("image_sizes", "batch_num_images"):  # anyres: each image's size; OneVision: images per sample
                if name in processed:
                    item[name] = processed[name]
        return item

    def _check_counts(self, sample: Sample, images: list, counts: np.ndarray) -> None:
        """Refuse images whose token count differs from the one their header gave when the data was checked (an
        image replaced on disk since, or a cache of other files): its tokens would not match its features."""
        if not self.image_tokens.needs_sizes:
            return
        now = self.image_tokens.counts([(image.height, image.width) for image in images], len(counts))
        if now != counts.tolist():
            raise DataError(f"{sample.describe()}: its images now give {now} tokens, not the {counts.tolist()} counted "
                            "when the data was checked (replaced since?); clear the data cache or restore them.",
                            kind="image_changed")


def _count_image_samples(samples: list[Sample]) -> int:
    return sum(1 for sample in samples if sample.images)


def build_dataset(sources: Mixture, processor: ProcessorMixin, image_tokens: ImageTokens, max_length: int,
                  skip_invalid: bool = False, allow_absolute_image_paths: bool = False, num_workers: int | None = None,
                  max_image_pixels: int | None = None, cache_dir: str | None = None,
                  decode_images: bool = False) -> LlavaDataset:
    """Check and tokenize every sample of every source (or read that from the cache in `cache_dir`, None: no cache);
    refuse with the full report if any is invalid, unless `skip_invalid`, which drops them and logs how many were
    skipped and why. Every valid sample of each source is kept once: a mixture's amounts are applied afterwards
    (`llava.data.mixture.apply_mixture`), so one cache serves every amount."""
    images = image_readers(sources.paths, sources.image_folders, allow_absolute_image_paths)
    fingerprint = tokenization_fingerprint(processor, image_tokens, max_length, sources.image_folders,
                                           allow_absolute_image_paths)
    if image_tokens.needs_sizes:  # images are downsized before they are counted
        fingerprint["max_image_pixels"] = max_image_pixels
    if decode_images:  # another check finds other problems (keyed only when on: caches of header checks stay valid)
        fingerprint["decode_images"] = True
    result = cached(cache_dir, cache_key(sources.file_stamps, fingerprint), lambda: prepare_samples(
        sources.paths, processor, max_length, image_tokens, images, num_workers, decode_images, max_image_pixels))
    if result.problems:
        if not skip_invalid:
            raise DataError(f"invalid training data (nothing was trained; fix these samples or pass "
                            f"--skip_invalid_samples True to drop them):\n{result.report()}")
        if 2 * len(result.problems) > result.num_records:
            raise DataError(f"--skip_invalid_samples would drop {len(result.problems)} of {result.num_records} "
                            "samples, more than half: the data (or --image_folder) is broken as a whole, not a few "
                            f"samples; nothing was trained:\n{result.report(limit=20)}", kind="mostly_broken")
        logger.warning("skipping invalid samples:\n%s", result.report(limit=20))
    elif result.warnings:
        logger.warning("training data warnings:\n%s", result.report(limit=20))
    if not result.samples:
        raise DataError(f"no valid samples in {', '.join(sources.paths)}.", kind="no_samples")
    return LlavaDataset(result.samples, result.store, processor, image_tokens, images, skip_invalid,
                        max_image_pixels)


def tokenization_fingerprint(processor: ProcessorMixin, image_tokens: ImageTokens, max_length: int,
                             image_folders: list[str | None], allow_absolute_image_paths: bool) -> dict:
    """Everything besides the data files that the tokenized samples and the list of invalid ones depend on."""
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"tokenizer": hashlib.sha256(vocabulary.encode("utf-8")).hexdigest(),
            "special_tokens": tokenizer.special_tokens_map, "chat_template": processor.chat_template,
            "image_token_id": processor.image_token_id, **image_tokens.fingerprint(),
            "max_length": max_length,
            "image_folders": [os.path.abspath(folder) if folder else None for folder in image_folders],
            "allow_absolute_image_paths": allow_absolute_image_paths}
