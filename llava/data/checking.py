"""Check the training data: read, check and tokenize every sample before training (`llava.validate_data` runs the
same step alone). Each problem is reported with its file, position and sample id, counted by kind, so a bad sample
costs seconds at start instead of a crash at step 40,000; what training keeps is the compact tokens
(`llava.data.token_cache`).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator

from tqdm.auto import tqdm
from transformers import ProcessorMixin

from llava.data.encoder import ConversationEncoder, expanded_length
from llava.data.image_tokens import ImageTokens
from llava.data.images import ImageReader, check_image
from llava.data.records import iter_samples
from llava.data.token_cache import PreparedData, TokenStore
from llava.data.types import DataError, Sample

# Below this many samples a worker pool costs more than it saves.
_POOL_THRESHOLD = 2000
# Samples held with their texts at a time (see `prepare_samples`).
_CHUNK = 16384


class SampleChecker:
    """Tokenizes one sample and checks its turns and images; returns (encoded, None, warnings) or
    (None, DataError, [])."""

    def __init__(self, encoder: ConversationEncoder, images: list[ImageReader], decode_images: bool = False,
                 max_image_pixels: int | None = None):
        self.encoder = encoder
        self.images = images  # one per data file: `sample.source` picks it
        self.decode_images = decode_images
        self.max_image_pixels = max_image_pixels  # images are downsized before the processor: counts follow
        # Many questions share an image: check each once, keeping the size it will have (read from its header).
        self._checked_images: dict[tuple[int, str], tuple[int, int]] = {}

    def __call__(self, sample: Sample | DataError):
        if isinstance(sample, DataError):
            return None, sample, []
        try:
            _check_turn_order(sample)
            warnings = self._image_in_answer(sample)
            sizes = [self._image_size(sample, reference) for reference in sample.images]
            encoded = self.encoder.encode_compact(sample, warnings, sizes)
            return encoded, None, warnings
        except DataError as error:
            return None, error, []

    def _image_size(self, sample: Sample, reference: str) -> tuple[int, int]:
        """(height, width) of an image as the processor will get it, checked (`check_image`) the first time it is
        seen; an image whose size the architecture cannot use (`ImageTokens.check_size`) is refused here."""
        key = (sample.source, reference)
        if key not in self._checked_images:
            path = self.images[sample.source].file(reference, sample)
            size = check_image(path, sample, self.decode_images, self.max_image_pixels)
            problem = self.encoder.image_tokens.check_size(size)
            if problem:
                raise DataError(f"{sample.describe()}: image {path} ({size[1]}x{size[0]} pixels): {problem}",
                                kind="image_size_unsupported")
            self._checked_images[key] = size
        return self._checked_images[key]

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


def _duplicate_id(sample: Sample, first_seen: dict[str, str]) -> DataError | None:
    """A warning when an earlier sample already has this sample's id (merged or repeated exports); `first_seen` maps
    each id seen so far to its location."""
    if sample.id in first_seen:
        return DataError(f"{sample.describe()}: same id as {first_seen[sample.id]}; ids should be unique (a "
                         "duplicated export?).", kind="duplicate_id")
    first_seen[sample.id] = sample.location
    return None


_worker_checker: SampleChecker | None = None  # set before forking, inherited by pool workers


def _check_in_worker(sample):
    return _worker_checker(sample)


def prepare_samples(data_paths: list[str], processor: ProcessorMixin, max_length: int, image_tokens: ImageTokens,
                    images: list[ImageReader], num_workers: int | None = None,
                    decode_images: bool = False, max_image_pixels: int | None = None) -> PreparedData:
    """Read, tokenize and check every sample of every file, in parallel for large sets; `images` holds one
    `ImageReader` per file (`llava.data.images.image_readers`), `image_tokens` what each image expands to (counted
    from its header's size where that matters, after --max_image_pixels), `decode_images` whether each image is
    decoded (else its header is read, see `check_image`).

    Samples go through in chunks, each reduced to its tokens (one flat array per chunk) and what locates it, so the
    texts of only two chunks (beside a .json file's text) are held at a time: a 665k-sample mix fits in a few GB.
    The next chunk is read while the workers check the current one."""
    checker = SampleChecker(ConversationEncoder(processor, max_length, image_tokens), images, decode_images,
                            max_image_pixels)
    total_bytes = sum(os.path.getsize(path) for path in data_paths if os.path.isfile(path))
    read = _Counter()  # bytes of the files read so far: the progress bar's position, for its rate and ETA
    chunks = _chunks(iter_samples(data_paths, read), _CHUNK)
    first = next(chunks, [])
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    workers = workers if len(first) >= _POOL_THRESHOLD else 1
    samples, parts, problems, warnings, first_seen = [], [], [], [], {}
    with _checking(checker, workers) as submit, tqdm(
            desc="checking samples", total=total_bytes, unit="B", unit_scale=True, mininterval=2,
            disable=len(first) < 1000) as progress:
        checked = ((chunk, submit(chunk), read.total) for chunk in itertools.chain([first], chunks))
        for chunk, results, bytes_read in _one_ahead(checked):
            encoded = []
            for item, (tokens, problem, item_warnings) in zip(chunk, results.get()):
                if not isinstance(item, DataError) and (duplicate := _duplicate_id(item, first_seen)):
                    warnings.append(duplicate)
                warnings += item_warnings
                if problem is not None:
                    problems.append(problem)
                else:  # training needs no texts any more: only what locates the sample and its images
                    samples.append(Sample(id=item.id, location=item.location, messages=[], images=item.images,
                                          source=item.source))
                    encoded.append(tokens)
            parts.append(TokenStore.from_samples(
                encoded, [expanded_length(tokens["input_ids"], tokens["image_tokens"]) for tokens in encoded]))
            progress.set_postfix_str(f"{len(samples) + len(problems)} samples", refresh=False)
            progress.update(bytes_read - progress.n)
    return PreparedData(samples, TokenStore.concatenate(parts), problems, warnings)


def _one_ahead(items: Iterator) -> Iterator:
    """`items`, each handed out only once the next one was taken: taking one submits a chunk to the workers (and
    reads it), so the workers check chunk k + 1 while chunk k's results are collected."""
    previous = None
    for item in items:
        if previous is not None:
            yield previous
        previous = item
    if previous is not None:
        yield previous


@contextlib.contextmanager
def _checking(checker: SampleChecker, workers: int) -> Iterator[Callable[[list], object]]:
    """A function that starts checking a chunk of samples and returns a handle whose `get()` gives the results: in
    `workers` forked processes (which inherit `checker`), or here, at once."""
    global _worker_checker
    if workers <= 1:
        yield lambda chunk: _Checked([checker(item) for item in chunk])
        return
    _worker_checker = checker
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            yield lambda chunk: pool.map_async(_check_in_worker, chunk, chunksize=256)
    finally:
        _worker_checker = None


class _Checked:
    def __init__(self, results: list):
        self.results = results

    def get(self) -> list:
        return self.results


class _Counter:
    def __init__(self):
        self.total = 0

    def __call__(self, amount: int) -> None:
        self.total += amount


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
