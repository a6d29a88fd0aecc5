"""Check every sample before training (and in `llava.validate_data`): report each problem with its file,
position and sample id, counted by kind, so a bad sample costs seconds at start instead of a crash at step
40,000. Samples are tokenized here too, so training reuses the work.
"""

from __future__ import annotations

import multiprocessing
import os

from tqdm.auto import tqdm
from transformers import ProcessorMixin

from llava.conversation import ConversationEncoder
from llava.data import Sample, check_image, iter_samples, resolve_image_path
from llava.errors import DataError
from llava.token_store import PreparedData, TokenStore

# Below this many samples a worker pool costs more than it saves.
_POOL_THRESHOLD = 2000


class SampleChecker:
    """Tokenizes one sample and checks its turns and images; returns (encoded, None, warnings) or
    (None, DataError, [])."""

    def __init__(self, encoder: ConversationEncoder, image_folder: str | None, allow_absolute_image_paths: bool):
        self.encoder = encoder
        self.image_folder = image_folder
        self.allow_absolute_image_paths = allow_absolute_image_paths
        self._checked_images: set[str] = set()  # many questions share an image: check each file once

    def __call__(self, sample: Sample | DataError):
        if isinstance(sample, DataError):
            return None, sample, []
        try:
            _check_turn_order(sample)
            warnings = self._image_in_answer(sample)
            encoded = self.encoder.encode_compact(sample, warnings)
            for relative in sample.images:
                path = resolve_image_path(self.image_folder, relative, sample, self.allow_absolute_image_paths)
                if path not in self._checked_images:
                    check_image(path, sample)
                    self._checked_images.add(path)
            return encoded, None, warnings
        except DataError as error:
            return None, error, []

    def _image_in_answer(self, sample: Sample) -> list[DataError]:
        """A warning for an image placeholder inside an assistant turn: the model would be trained to see an image
        in its own answer (the image tokens are never trained, the text around them is)."""
        token = self.encoder.image_token
        return [DataError(f"{sample.describe()}: turn {i} (assistant) contains {token}; images belong in user turns.",
                          kind="image_in_assistant_turn")
                for i, m in enumerate(sample.messages) if m.role == "assistant" and token in m.content]


def _check_turn_order(sample: Sample) -> None:
    """The conversation opens with the user (after an optional system turn) and ends with the assistant."""
    first = next((m for m in sample.messages if m.role != "system"), None)
    if first is not None and first.role == "assistant":
        raise DataError(f"{sample.describe()}: the conversation starts with an assistant turn, answering nothing; "
                        "start it with the user's question (a 'human' turn).", kind="first_turn_assistant")
    if sample.messages[-1].role != "assistant":
        raise DataError(f"{sample.describe()}: the last turn is the {sample.messages[-1].role}'s, so "
                        "it is never answered; end every conversation with an assistant turn.",
                        kind="last_turn_not_assistant")


def _duplicate_ids(items: list[Sample | DataError]) -> list[DataError]:
    """A warning for every sample whose id an earlier sample already has (merged or repeated exports)."""
    first_seen: dict[str, Sample] = {}
    warnings = []
    for item in items:
        if isinstance(item, DataError):
            continue
        if item.id in first_seen:
            warnings.append(DataError(f"{item.describe()}: same id as {first_seen[item.id].location}; ids should "
                                      "be unique (a duplicated export?).", kind="duplicate_id"))
        else:
            first_seen[item.id] = item
    return warnings


_worker_checker: SampleChecker | None = None  # set before forking, inherited by pool workers


def _check_in_worker(sample):
    return _worker_checker(sample)


def validate(data_paths: list[str], processor: ProcessorMixin, max_length: int, image_folder: str | None,
             allow_absolute_image_paths: bool = False, num_workers: int | None = None) -> PreparedData:
    """Read, tokenize and check every sample of every file, in parallel for large sets."""
    global _worker_checker
    checker = SampleChecker(ConversationEncoder(processor, max_length), image_folder, allow_absolute_image_paths)
    items = list(iter_samples(data_paths))
    num_workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    progress = dict(total=len(items), desc="checking samples", unit="sample", mininterval=2,
                    disable=len(items) < 1000)
    if num_workers > 1 and len(items) >= _POOL_THRESHOLD:
        _worker_checker = checker
        try:
            with multiprocessing.get_context("fork").Pool(num_workers) as pool:
                outcomes = list(tqdm(pool.imap(_check_in_worker, items, chunksize=256), **progress))
        finally:
            _worker_checker = None
    else:
        outcomes = [checker(item) for item in tqdm(items, **progress)]
    samples, encoded, problems, all_warnings = [], [], [], _duplicate_ids(items)
    for item, (tokens, problem, warnings) in zip(items, outcomes):
        all_warnings += warnings
        if problem is not None:
            problems.append(problem)
        else:  # training needs no texts any more: only what locates the sample and its images
            samples.append(Sample(id=item.id, location=item.location, messages=[], images=item.images))
            encoded.append(tokens)
    lengths = [checker.encoder.expanded_length(tokens["input_ids"]) for tokens in encoded]
    return PreparedData(samples, TokenStore.from_samples(encoded, lengths), problems, all_warnings)
