"""Conversation data: LLaVA JSON/JSONL records -> typed samples -> token ids and labels -> a torch Dataset.

Labels come from the chat template itself: for every assistant turn the conversation is rendered up to
the turn's generation prompt and up to the turn's end, and the characters in between (the answer plus the
template's end-of-turn token, trailing whitespace excluded) are the trained span. Tokens are mapped to
characters with the tokenizer's offsets, so no per-template arithmetic exists that could drift from the
template and silently mask a whole sample.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm
from transformers import ProcessorMixin

from llava.model import IGNORE_INDEX, image_token_count

logger = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A sample that cannot be trained on; the message names its file, position and id and the fix."""


@dataclass
class Sample:
    """One conversation. `messages` are {"role": user|assistant|system, "content": str} with image placeholders
    left in the text; `images` are paths in placeholder order; `location` is "file:line" or "file[index]".
    """

    id: str
    location: str
    messages: list[dict]
    images: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # the record's other fields, e.g. "answer_type" for evaluation

    def describe(self) -> str:
        return f"{self.location} (id {self.id!r})"


# --------------------------------------------------------------------------------------------- reading

def read_records(path: str):
    """Yield (location, record) from a LLaVA .json list or a .jsonl file (one object per line)."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    yield f"{path}:{line_number}", _parse_json(line.strip(), f"{path}:{line_number}")
            return
        records = _parse_json(f.read(), path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of samples, got {type(records).__name__}. "
                        "Use a .jsonl file for one sample per line.")
    for index, record in enumerate(records):
        yield f"{path}[{index}]", record


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        position = f"column {error.colno}" if error.lineno == 1 else f"line {error.lineno}, column {error.colno}"
        raise DataError(f"{where}: malformed JSON at {position}: {error.msg}") from None


def to_sample(record: dict, location: str) -> Sample:
    """Turn one LLaVA record into a `Sample`; raise `DataError` naming the sample when it is malformed."""
    if not isinstance(record, dict):
        raise DataError(f"{location}: a sample must be a JSON object, got {type(record).__name__}.")
    sample_id = str(record.get("id", location))
    where = f"{location} (id {sample_id!r})"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: needs a non-empty 'conversations' list of {{'from', 'value'}} turns.")
    messages = []
    for turn_index, turn in enumerate(turns):
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower()) if isinstance(turn, dict) else None
        if role is None:
            raise DataError(f"{where}: turn {turn_index} has an unknown role; use 'from' with one of "
                            f"{sorted(ROLES)}.")
        content = turn.get("value", turn.get("content"))
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {turn_index} needs a string 'value'.")
        messages.append({"role": role, "content": content})
    images = record.get("image", record.get("images")) or []
    images = [images] if isinstance(images, str) else list(images)
    metadata = {k: v for k, v in record.items() if k not in ("id", "image", "images", "conversations")}
    return Sample(id=sample_id, location=location, messages=messages, images=images, metadata=metadata)


def load_samples(data_paths: list[str]) -> list[Sample]:
    """Read and mix every file of `--data_path`; a malformed record raises `DataError`."""
    samples = []
    for path in data_paths:
        if not os.path.isfile(path):
            raise DataError(f"--data_path file not found: {path}")
        samples.extend(to_sample(record, location) for location, record in read_records(path))
    return samples


def load_image(path: str) -> Image.Image:
    """Open an image as RGB, honouring EXIF orientation (phone photos) and flattening palette/alpha/grayscale."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


# --------------------------------------------------------------------------------------------- tokenizing

class ConversationEncoder:
    """Renders samples with the processor's chat template and returns `input_ids` and `labels`.

    Image placeholders are expanded to as many image tokens as the vision tower yields per image (labels
    -100). A sample longer than `max_length` loses text at its end; if that would cut an image span, or leave
    no trained token, the sample is refused with a `DataError`.
    """

    def __init__(self, processor: ProcessorMixin, max_length: int):
        self.tokenizer = processor.tokenizer
        self.chat_template = processor.chat_template
        if not self.chat_template:
            raise ValueError("The processor has no chat template; assemble with --chat_template.")
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self.tokens_per_image = image_token_count(processor)
        self.max_length = max_length
        self.string_content = self._template_takes_string_content()

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The chat template's text for `messages`, image placeholders left in place."""
        if not self.string_content:
            messages = [{"role": m["role"], "content": self._structured(m["content"])} for m in messages]
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _template_takes_string_content(self) -> bool:
        """True for LM-style templates (and ours); llava-hf templates want [{"type": ...}] content instead."""
        probe = f"probe{self.image_token}text"
        try:
            return probe in self.tokenizer.apply_chat_template(
                [{"role": "user", "content": probe}], chat_template=self.chat_template, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that fails on strings expects structured content
            return False

    def _structured(self, text: str) -> list[dict]:
        pieces = text.split(self.image_token)
        content = [{"type": "text", "text": pieces[0]}] if pieces[0].strip() else []
        for piece in pieces[1:]:
            content.append({"type": "image"})
            piece = piece[1:] if piece.startswith("\n") else piece  # the template writes its own separator
            if piece.strip():
                content.append({"type": "text", "text": piece})
        return content

    def trained_spans(self, sample: Sample) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans [start, end) of every assistant answer."""
        rendered = self.render(sample.messages, add_generation_prompt=False)
        spans = []
        for index, message in enumerate(sample.messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(sample.messages[:index], add_generation_prompt=True)
            through_answer = self.render(sample.messages[: index + 1], add_generation_prompt=False)
            if not (through_answer.startswith(prompt) and rendered.startswith(through_answer)):
                raise DataError(
                    f"{sample.describe()}: the chat template renders turn {index} differently depending on what "
                    "follows it, so answer spans cannot be located. Use a template whose rendering of a "
                    "conversation prefix is a prefix of the whole (pass --chat_template)."
                )
            spans.append((len(prompt), len(through_answer.rstrip())))
        return rendered, spans

    def encode(self, sample: Sample) -> dict[str, list[int]]:
        """Token ids and labels (-100 where not trained) for one sample."""
        try:
            rendered, spans = self.trained_spans(sample)
        except DataError:
            raise
        except Exception as error:  # jinja raises e.g. on roles out of order
            raise DataError(f"{sample.describe()}: the chat template rejected this conversation: {error}") from None
        if not spans:
            raise DataError(f"{sample.describe()}: no assistant turn, so nothing to train on.")
        encoded = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        input_ids, labels = [], []
        span_index = 0
        for token_id, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            while span_index < len(spans) and spans[span_index][1] <= start:
                span_index += 1
            in_answer = span_index < len(spans) and start < spans[span_index][1] and end > spans[span_index][0]
            if token_id == self.image_token_id:
                input_ids.extend([token_id] * self.tokens_per_image)
                labels.extend([IGNORE_INDEX] * self.tokens_per_image)
            else:
                input_ids.append(token_id)
                labels.append(token_id if in_answer else IGNORE_INDEX)
        placeholders = input_ids.count(self.image_token_id) // self.tokens_per_image
        if placeholders != len(sample.images):
            raise DataError(f"{sample.describe()}: {placeholders} {self.image_token} placeholder(s) but "
                            f"{len(sample.images)} image(s); put one {self.image_token} in the text per image.")
        return self._truncate(sample, input_ids, labels)

    def _truncate(self, sample: Sample, input_ids: list[int], labels: list[int]) -> dict[str, list[int]]:
        if len(input_ids) > self.max_length:
            if self.image_token_id in input_ids[self.max_length:]:
                raise DataError(
                    f"{sample.describe()}: {len(input_ids)} tokens, and --model_max_length {self.max_length} would "
                    "cut through an image's tokens; raise --model_max_length or shorten the sample."
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(f"{sample.describe()}: no answer token left within --model_max_length "
                            f"{self.max_length}; raise it or shorten the sample.")
        return {"input_ids": input_ids, "labels": labels}


# --------------------------------------------------------------------------------------------- dataset

class LlavaDataset(torch.utils.data.Dataset):
    """Tokenized samples; images are read and preprocessed per item, so in DataLoader workers.

    Each item: {"input_ids": (T,), "labels": (T,), "pixel_values": (num_images, 3, H, W)}; text-only
    samples have no "pixel_values".
    """

    def __init__(self, samples: list[Sample], processor: ProcessorMixin, max_length: int,
                 image_folder: str | None = None):
        encoder = ConversationEncoder(processor, max_length)
        self.image_processor = processor.image_processor
        self.image_folder = image_folder
        self.samples = samples
        self.encoded, problems = [], []
        for sample in tqdm(samples, desc="tokenizing", mininterval=2, disable=len(samples) < 1000):
            try:
                self.encoded.append(encoder.encode(sample))
            except DataError as error:
                problems.append(str(error))
        if problems:
            shown = "\n  ".join(problems[:50])
            more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
            raise DataError(f"{len(problems)} of {len(samples)} samples cannot be trained on:\n  {shown}{more}")
        if image_folder is None and any(s.images for s in samples):
            first = next(s for s in samples if s.images)
            raise DataError(f"{first.describe()} has images but --image_folder is not set; pass the folder "
                            "its image paths are relative to.")

    def __len__(self) -> int:
        return len(self.samples)

    def image_path(self, relative: str) -> str:
        return os.path.join(self.image_folder, relative)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample, encoded = self.samples[index], self.encoded[index]
        item = {"input_ids": torch.tensor(encoded["input_ids"]), "labels": torch.tensor(encoded["labels"])}
        if sample.images:
            images = []
            for relative in sample.images:
                try:
                    images.append(load_image(self.image_path(relative)))
                except (OSError, ValueError) as error:
                    raise DataError(f"{sample.describe()}: cannot read image {self.image_path(relative)}: "
                                    f"{error}") from None
            item["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return item


def build_dataset(data_paths: list[str], processor: ProcessorMixin, max_length: int,
                  image_folder: str | None) -> LlavaDataset:
    """Read every file, tokenize every sample, and refuse to go on with a report if any sample is bad."""
    samples = load_samples(data_paths)
    return LlavaDataset(samples, processor, max_length, image_folder)
