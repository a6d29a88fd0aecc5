"""Training data on disk: LLaVA JSON/JSONL records -> `Sample`s, and their images (paths checked, files decoded).

Turning a sample's messages into token ids and labels is `llava.conversation`'s job.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field

from PIL import Image, ImageOps

from llava.conversation import Message
from llava.errors import DataError

logger = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Sample:
    """One conversation: its `messages` (image placeholders left in their text), the image paths in placeholder
    order, and where it came from (`location`: "file:line" or "file[index]")."""

    id: str
    location: str
    messages: list[Message]
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
        messages.append(Message(role, content, trained=role == "assistant"))
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


def load_image(path: str, max_pixels: int | None = None) -> Image.Image:
    """Open an image as RGB, honouring EXIF orientation (phone photos) and flattening palette/alpha/grayscale;
    above `max_pixels` (--max_image_pixels) it is downsized, see `downsize_image`.

    Every reader of images (training data, the sample callback, inference) comes through here, so they all
    preprocess alike. Images above PIL's pixel limit (`Image.MAX_IMAGE_PIXELS`, ~89 MP) are refused as likely
    decompression bombs rather than decoded.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return downsize_image(ImageOps.exif_transpose(image).convert("RGB"), max_pixels)


def downsize_image(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """`image` shrunk, keeping its aspect ratio, to at most `max_pixels` pixels (unchanged when within or None).

    Why before the image processor: it resizes to a few hundred pixels anyway, but a 40 MP photo would first be
    converted to float arrays (~500 MB) in a DataLoader worker.
    """
    if not max_pixels or image.width * image.height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (image.width * image.height))
    size = (max(1, math.floor(image.width * scale)), max(1, math.floor(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


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
