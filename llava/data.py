"""Conversation data: LLaVA JSON/JSONL records -> typed samples (+ their images) -> token ids and labels.

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
import warnings
from dataclasses import dataclass, field

from PIL import Image, ImageOps
from transformers import ProcessorMixin

from llava.model import IGNORE_INDEX, image_token_count

logger = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A sample that cannot be trained on; the message names its file, position and id and the fix.

    `kind` is a short name of the defect (e.g. "missing_image"), used to count problems by kind.
    """

    def __init__(self, message: str, kind: str = "invalid_sample"):
        super().__init__(message)
        self.kind = kind


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
    """Yield (location, record) from a LLaVA .json list or a .jsonl file (one object per line).

    A malformed JSONL line is yielded as (location, DataError) so one bad line does not hide the rest; a
    malformed .json file raises, since nothing after the error can be located.
    """
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    location = f"{path}:{line_number}"
                    try:
                        yield location, _parse_json(line.strip(), location)
                    except DataError as error:
                        yield location, error
            return
        records = _parse_json(f.read(), path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of samples, got {type(records).__name__}. "
                        "Use a .jsonl file for one sample per line.", kind="malformed_json")
    for index, record in enumerate(records):
        yield f"{path}[{index}]", record


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        position = f"column {error.colno}" if error.lineno == 1 else f"line {error.lineno}, column {error.colno}"
        raise DataError(f"{where}: malformed JSON at {position}: {error.msg}", kind="malformed_json") from None


def to_sample(record: dict, location: str) -> Sample:
    """Turn one LLaVA record into a `Sample`; raise `DataError` naming the sample when it is malformed."""
    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict):
        raise DataError(f"{location}: a sample must be a JSON object, got {type(record).__name__}.",
                        kind="malformed_sample")
    sample_id = str(record.get("id", location))
    where = f"{location} (id {sample_id!r})"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: needs a non-empty 'conversations' list of {{'from', 'value'}} turns.",
                        kind="malformed_sample")
    messages = []
    for turn_index, turn in enumerate(turns):
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower()) if isinstance(turn, dict) else None
        if role is None:
            raise DataError(f"{where}: turn {turn_index} has an unknown role; use 'from' with one of "
                            f"{sorted(ROLES)}.", kind="unknown_role")
        content = turn.get("value", turn.get("content"))
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {turn_index} needs a string 'value'.", kind="malformed_sample")
        if not content.strip():
            raise DataError(f"{where}: turn {turn_index} ({role}) has empty text; remove the turn or fill it in.",
                            kind="empty_text")
        messages.append({"role": role, "content": content})
    images = record.get("image", record.get("images")) or []
    images = [images] if isinstance(images, str) else list(images)
    if not all(isinstance(image, str) and image for image in images):
        raise DataError(f"{where}: 'image' must be a path or a list of paths.", kind="malformed_sample")
    metadata = {k: v for k, v in record.items() if k not in ("id", "image", "images", "conversations")}
    return Sample(id=sample_id, location=location, messages=messages, images=images, metadata=metadata)


def iter_samples(data_paths: list[str]):
    """Yield a `Sample`, or the `DataError` of a malformed record, for every record of every file, in order."""
    for path in data_paths:
        if not os.path.isfile(path):
            raise DataError(f"--data_path file not found: {path}", kind="missing_data_file")
        for location, record in read_records(path):
            try:
                yield to_sample(record, location)
            except DataError as error:
                yield error


def load_samples(data_paths: list[str]) -> list[Sample]:
    """Read and mix every file of `--data_path`; the first malformed record raises its `DataError`."""
    samples = []
    for item in iter_samples(data_paths):
        if isinstance(item, DataError):
            raise item
        samples.append(item)
    return samples


# --------------------------------------------------------------------------------------------- images

def resolve_image_path(image_folder: str | None, relative: str, sample: Sample,
                       allow_absolute: bool = False) -> str:
    """`relative` inside `image_folder`; refuse absolute paths and `..` escapes (untrusted data) unless allowed."""
    if image_folder is None and not (allow_absolute and os.path.isabs(relative)):
        raise DataError(f"{sample.describe()} has images but --image_folder is not set; pass the folder its "
                        "image paths are relative to.", kind="no_image_folder")
    if allow_absolute:
        return os.path.join(image_folder or "", relative)
    folder = os.path.normpath(image_folder)
    path = os.path.normpath(os.path.join(folder, relative))
    if os.path.isabs(relative) or not path.startswith(folder + os.sep):
        raise DataError(f"{sample.describe()}: image path {relative!r} leaves --image_folder; use a path relative "
                        "to it, or pass --allow_absolute_image_paths True if you trust this data.",
                        kind="image_path_escapes_folder")
    return path


def load_image(path: str) -> Image.Image:
    """Open an image as RGB, honouring EXIF orientation (phone photos) and flattening palette/alpha/grayscale.

    Images above PIL's pixel limit (`Image.MAX_IMAGE_PIXELS`, ~89 MP) are refused as likely decompression
    bombs rather than decoded.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")


def check_image(path: str, sample: Sample) -> None:
    """Raise a `DataError` naming the sample if the image at `path` is missing, corrupt or too large."""
    try:
        load_image(path)
    except FileNotFoundError:
        raise DataError(f"{sample.describe()}: image not found: {path}", kind="missing_image") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise DataError(f"{sample.describe()}: image {path} refused as a possible decompression bomb ({error}); "
                        "downscale it.", kind="image_too_large") from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL's ways of saying "not a (complete) image"
        raise DataError(f"{sample.describe()}: unreadable or corrupt image {path}: {error}",
                        kind="corrupt_image") from None


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
                    "conversation prefix is a prefix of the whole (pass --chat_template).", kind="template_error"
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
            raise DataError(f"{sample.describe()}: the chat template rejected this conversation: {error}",
                            kind="template_error") from None
        if not spans:
            raise DataError(f"{sample.describe()}: no assistant turn, so nothing to train on.",
                            kind="no_assistant_turn")
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
                            f"{len(sample.images)} image(s); put one {self.image_token} in the text per image.",
                            kind="image_count_mismatch")
        return self._truncate(sample, input_ids, labels)

    def _truncate(self, sample: Sample, input_ids: list[int], labels: list[int]) -> dict[str, list[int]]:
        if len(input_ids) > self.max_length:
            image_tokens = input_ids.count(self.image_token_id)
            if image_tokens > self.max_length:
                raise DataError(f"{sample.describe()}: its images alone take {image_tokens} tokens, more than "
                                f"--model_max_length {self.max_length}; raise it or use fewer images.",
                                kind="images_exceed_max_length")
            if self.image_token_id in input_ids[self.max_length:]:
                raise DataError(
                    f"{sample.describe()}: {len(input_ids)} tokens, and --model_max_length {self.max_length} would "
                    "cut through an image's tokens; raise --model_max_length or shorten the sample.",
                    kind="truncation_cuts_image")
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(f"{sample.describe()}: no answer token left within --model_max_length "
                            f"{self.max_length}; raise it or shorten the sample.", kind="no_answer_within_max_length")
        # Tokens after the last trained one (the template's closing newline, say) cannot change the loss of a
        # causal LM: dropping them saves their forward and backward.
        end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
        return {"input_ids": input_ids[:end], "labels": labels[:end]}
